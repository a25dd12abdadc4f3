// libFuzzer target: the model's config.json reader and its validation.
// Every input must parse or throw ropekit::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "ropekit/error.h"
#include "ropekit/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const ropekit::ModelConfig c = ropekit::ModelConfigFromJson(
        std::string_view(reinterpret_cast<const char*>(data), size), "config.json");
    (void)c.Resolved();
  } catch (const ropekit::Error&) {
  }
  return 0;
}
