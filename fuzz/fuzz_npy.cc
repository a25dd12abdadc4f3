// libFuzzer target: the .npy reader. Every input must parse or throw ropekit::Error.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ropekit/error.h"
#include "ropekit/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const ropekit::NpyArray a = ropekit::ParseNpy(std::vector<uint8_t>(data, data + size), "fuzz");
    (void)a.NumElements();
  } catch (const ropekit::Error&) {
  }
  return 0;
}
