// libFuzzer target: the training configuration reader of trainer_state.json.
// Every input must parse or throw ropekit::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "ropekit/error.h"
#include "ropekit/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const ropekit::TrainConfig c = ropekit::TrainConfigFromJson(
        std::string_view(reinterpret_cast<const char*>(data), size), "trainer_state.json");
    (void)ropekit::LearningRate(c, c.steps / 2);
  } catch (const ropekit::Error&) {
  }
  return 0;
}
