// libFuzzer target: the Hugging Face config.json parser, then the frequencies it asks for.
// Every input must parse or throw ropekit::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "ropekit/error.h"
#include "ropekit/hf_config.h"
#include "ropekit/rope.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const ropekit::HfRopeConfig c =
        ropekit::ParseHfConfig(std::string_view(reinterpret_cast<const char*>(data), size));
    (void)ropekit::ComputeFrequencies(c.params, ropekit::Numerics::kExact, 0);
  } catch (const ropekit::Error&) {
  }
  return 0;
}
