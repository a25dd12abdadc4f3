// libFuzzer target: the safetensors reader (header JSON, offsets, dtypes, checksum).
// Every input must parse or throw ropekit::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "ropekit/error.h"
#include "ropekit/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    (void)ropekit::ParseSafetensors(std::string_view(reinterpret_cast<const char*>(data), size),
                                    "fuzz.safetensors");
  } catch (const ropekit::Error&) {
  }
  return 0;
}
