// Checkpoints commit as one unit: every part is verified against the manifest and the step
// recorded inside it, mixes of two saves are refused with an error naming the part, and every
// JSON reader of a checkpoint rejects deep nesting before parsing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ropekit/model.h"

namespace ropekit {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

ModelConfig Tiny() {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.intermediate_size = 24;
  c.max_position_embeddings = 16;
  return c;
}

std::string TempDir(const std::string& name) {
  const auto dir =
      fs::temp_directory_path() / ("ropekit_ckpt_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir.string();
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void Spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Saves the state at `step` (different weights and moments per step).
void SaveAt(const std::string& dir, int64_t step) {
  Model model(Tiny(), static_cast<uint64_t>(step));
  OptimizerState state;
  state.step = step;
  state.m.assign(model.parameters().size(), static_cast<float>(step));
  state.v.assign(model.parameters().size(), 1.0f);
  TrainConfig tc;
  SaveCheckpoint(dir, model, &state, &tc);
}

std::string LoadError(const std::string& dir) {
  try {
    LoadCheckpoint(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(CheckpointUnit, KeepsOnlyTheCommittedStepAndLoadsIt) {
  const std::string dir = TempDir("unit");
  SaveAt(dir, 10);
  SaveAt(dir, 20);
  EXPECT_EQ(fs::read_symlink(dir + "/current").string(), "step-00000020");
  EXPECT_FALSE(fs::exists(dir + "/step-00000010"));  // removed after the commit
  const TrainingCheckpoint ck = LoadCheckpoint(dir);
  EXPECT_EQ(ck.optimizer.step, 20);
  EXPECT_EQ(ck.optimizer.m[0], 20.0f);
  EXPECT_EQ(FindCheckpoint(dir), std::optional<int64_t>(20));
  // Saving the committed step again goes to a fresh directory, never over the committed one.
  SaveAt(dir, 20);
  EXPECT_EQ(fs::read_symlink(dir + "/current").string(), "step-00000020.2");
  EXPECT_EQ(LoadCheckpoint(dir).optimizer.step, 20);
  fs::remove_all(dir);
}

TEST(CheckpointUnit, RefusesAPartFromAnotherSave) {
  const std::string a = TempDir("mix_a"), b = TempDir("mix_b");
  SaveAt(a, 10);
  SaveAt(b, 20);
  const std::string a_step = fs::canonical(a + "/current").string();
  const std::string b_step = fs::canonical(b + "/current").string();
  for (const char* part : {"model.safetensors", "optimizer.safetensors", "trainer_state.json"}) {
    const std::string keep = Slurp(a_step + "/" + part);
    Spit(a_step + "/" + part, Slurp(b_step + "/" + part));
    const std::string error = LoadError(a);
    EXPECT_THAT(error, HasSubstr(part));
    EXPECT_THAT(error, HasSubstr("manifest"));
    Spit(a_step + "/" + part, keep);
  }
  EXPECT_EQ(LoadError(a), "");
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(CheckpointUnit, PlainDirectoryMixOfTwoSavesIsRefused) {
  // The layout before commit links: four plain files, here model.safetensors of step 20 with the
  // optimizer and trainer state of step 10 (what a kill between two renames left).
  const std::string a = TempDir("plain_a"), b = TempDir("plain_b"), plain = TempDir("plain");
  SaveAt(a, 10);
  SaveAt(b, 20);
  fs::create_directories(plain);
  for (const char* part : {"config.json", "optimizer.safetensors", "trainer_state.json"}) {
    fs::copy_file(fs::canonical(a + "/" + part), plain + "/" + part);
  }
  fs::copy_file(fs::canonical(b + "/model.safetensors"), plain + "/model.safetensors");
  const std::string error = LoadError(plain);
  EXPECT_THAT(error, HasSubstr("model.safetensors is from step 20"));
  EXPECT_THAT(error, HasSubstr("trainer_state.json is from step 10"));
  EXPECT_THAT(error, HasSubstr("mixes two saves"));
  fs::remove(plain + "/model.safetensors");
  fs::copy_file(fs::canonical(a + "/model.safetensors"), plain + "/model.safetensors");
  EXPECT_EQ(LoadError(plain), "");  // a consistent plain directory loads
  for (const auto& d : {a, b, plain}) fs::remove_all(d);
}

TEST(CheckpointUnit, InterruptedFirstSaveIsNoCheckpoint) {
  const std::string dir = TempDir("first");
  SaveAt(dir, 2);
  fs::remove(dir + "/current");  // as if killed before the commit
  EXPECT_EQ(FindCheckpoint(dir), std::nullopt);
  EXPECT_THAT(LoadError(dir), HasSubstr("no committed checkpoint"));
  EXPECT_GT(CleanCheckpointDirectory(dir), 0);
  EXPECT_FALSE(fs::exists(dir + "/step-00000002"));
  fs::remove_all(dir);
}

TEST(CheckpointUnit, DeepJsonIsRejectedByEveryReader) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string deep_obj = "{\"step\": 1, \"x\": " + deep + "}";
  auto expect_depth_error = [](auto&& read, const std::string& name) {
    try {
      read();
      ADD_FAILURE() << name << ": no error";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("nesting deeper than 64")) << name;
      EXPECT_THAT(e.what(), HasSubstr(name)) << name;
    }
  };
  expect_depth_error([&] { ModelConfigFromJson(deep_obj, "config.json"); }, "config.json");
  expect_depth_error([&] { TrainConfigFromJson(deep_obj, "trainer_state.json"); },
                     "trainer_state.json");
  const std::string dir = TempDir("deep");
  SaveAt(dir, 3);
  const std::string step_dir = fs::canonical(dir + "/current").string();
  // A safetensors file whose header is deeply nested JSON.
  std::string header = "{\"__metadata__\": " + deep + "}";
  while (header.size() % 8) header += ' ';
  std::string file(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  Spit(dir + "/deep.safetensors", file + header);
  expect_depth_error([&] { ReadSafetensors(dir + "/deep.safetensors"); }, "deep.safetensors");
  Spit(step_dir + "/trainer_state.json", deep_obj);
  expect_depth_error([&] { LoadCheckpoint(dir); }, "trainer_state.json");
  Spit(step_dir + "/manifest.json", deep_obj);
  expect_depth_error([&] { LoadCheckpoint(dir); }, "manifest.json");
  fs::remove_all(dir);
}

TEST(CheckpointUnit, StrictTrainerStateAndMetadata) {
  const std::string dir = TempDir("strict");
  SaveAt(dir, 10);
  const std::string step_dir = fs::canonical(dir + "/current").string();
  // A plain directory (no manifest) so that the parsers, not the checksums, see the bytes.
  const std::string plain = TempDir("strict_plain");
  fs::create_directories(plain);
  for (const char* part :
       {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}) {
    fs::copy_file(step_dir + "/" + part, plain + "/" + part);
  }
  std::string state = Slurp(plain + "/trainer_state.json");
  const std::string good_state = state;
  state.replace(state.find("\"step\": 10"), 10, "\"step\": 10.7");
  Spit(plain + "/trainer_state.json", state);
  EXPECT_THAT(LoadError(plain), HasSubstr("step must be an integer"));
  Spit(plain + "/trainer_state.json", good_state);
  EXPECT_EQ(LoadError(plain), "");
  // __metadata__ that is not an object.
  std::string weights = Slurp(plain + "/model.safetensors");
  const size_t at = weights.find("\"__metadata__\":{");
  ASSERT_NE(at, std::string::npos);
  const size_t end = weights.find('}', at);
  std::string replaced = "\"__metadata__\":[1]";
  replaced.resize(end + 1 - at, ' ');
  weights.replace(at, end + 1 - at, replaced);
  Spit(plain + "/model.safetensors", weights);
  EXPECT_THAT(LoadError(plain), HasSubstr("__metadata__ must be an object"));
  fs::remove_all(dir);
  fs::remove_all(plain);
}

// A libFuzzer finding (fuzz_trainer_state): an integer field holding a number beyond int64 was
// converted out of range (undefined behaviour) instead of refused.
TEST(CheckpointUnit, TrainConfigIntegerFieldsRefuseFloatsAndOutOfRangeValues) {
  for (const char* text : {R"({"steps": 11111111111111111111111111111111})", R"({"steps": 10.5})",
                           R"({"batch_size": 9223372036854775808})"}) {
    try {
      TrainConfigFromJson(text, "trainer_state.json");
      ADD_FAILURE() << text << " was accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("must be an integer")) << text;
    }
  }
  try {
    TrainConfigFromJson(R"({"data_seed": -1})", "trainer_state.json");
    ADD_FAILURE() << "a negative data_seed was accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("data_seed must be an integer"));
  }
  EXPECT_EQ(TrainConfigFromJson(R"({"steps": 7})", "trainer_state.json").steps, 7);
}

TEST(CheckpointUnit, WeightsTooSmallForTheConfigFailBeforeAllocating) {
  const std::string dir = TempDir("small");
  SaveAt(dir, 1);
  const std::string plain = TempDir("small_plain");
  fs::create_directories(plain);
  fs::copy_file(fs::canonical(dir + "/model.safetensors"), plain + "/model.safetensors");
  std::string config = Slurp(fs::canonical(dir + "/config.json").string());
  config.replace(config.find("\"hidden_size\": 16"), 17, "\"hidden_size\": 4096");
  config.replace(config.find("\"intermediate_size\": 24"), 23, "\"intermediate_size\": 11008");
  Spit(plain + "/config.json", config);
  try {
    LoadModel(plain);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("model.safetensors"));
    EXPECT_THAT(e.what(), HasSubstr("implies at least"));
  }
  fs::remove_all(dir);
  fs::remove_all(plain);
}

}  // namespace
}  // namespace ropekit
