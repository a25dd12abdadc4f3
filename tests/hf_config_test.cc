// Tests of the Hugging Face config.json parser.
//
// Dimension legend: D = head_dim, R = rotary_dim, N = R / 2 pairs.
// Configs follow the published config.json layouts (as each model publishes it on the Hugging Face
// Hub); expected fields are the numbers written in them or transformers' documented derivations
// (int(D * factor), MPE / OMP,
// ...).
#include "ropekit/hf_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace ropekit {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

void ExpectError(const std::string& text, const std::string& needle,
                 std::string_view layer_type = {}) {
  EXPECT_THAT([&] { ParseHfConfig(text, layer_type); },
              ::testing::ThrowsMessage<Error>(HasSubstr(needle)))
      << text;
}

std::string Phi3Mini128k(const std::string& type = "su") {
  Json j = {{"model_type", "phi3"},
            {"hidden_size", 3072},
            {"num_attention_heads", 32},
            {"num_key_value_heads", 32},
            {"max_position_embeddings", 131072},
            {"original_max_position_embeddings", 4096},
            {"rope_theta", 10000.0}};
  Json s = Json::array(), l = Json::array();
  for (int i = 0; i < 48; ++i) {
    s.push_back(1.0 + 0.01 * i);
    l.push_back(1.0 + 1.2 * i);
  }
  j["rope_scaling"] = {{"type", type}, {"short_factor", s}, {"long_factor", l}};
  return j.dump();
}

const char* kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 4096,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "max_position_embeddings": 131072,
  "rope_theta": 500000.0,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  }
})";

TEST(HfConfig, Llama31) {
  const HfRopeConfig c = ParseHfConfig(kLlama31);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.layout, Layout::kHalfSplit);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.params.type, RopeType::kLlama3);
  EXPECT_EQ(c.params.base, 500000.0);
  EXPECT_EQ(c.params.head_dim, 128);
  EXPECT_EQ(c.params.rotary_dim, 128);
  EXPECT_EQ(c.params.factor, 8.0);
  EXPECT_EQ(c.params.low_freq_factor, 1.0);
  EXPECT_EQ(c.params.high_freq_factor, 4.0);
  EXPECT_EQ(c.params.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.params.max_position_embeddings, 131072);
}

TEST(HfConfig, TopLevelOriginalMaxHasPriority) {
  Json j = Json::parse(kLlama31);
  j["original_max_position_embeddings"] = 4096;
  EXPECT_EQ(ParseHfConfig(j.dump()).params.original_max_position_embeddings, 4096);
}

TEST(HfConfig, TypeAliasAndLegacyKeys) {
  const HfRopeConfig c = ParseHfConfig(
      R"({"model_type":"llama","hidden_size":2048,"num_attention_heads":16,"rope_theta":10000,
          "max_position_embeddings":4096,"rope_scaling":{"type":"linear","factor":2}})");
  EXPECT_EQ(c.params.type, RopeType::kLinear);
  EXPECT_EQ(c.params.factor, 2.0);
  EXPECT_EQ(c.params.head_dim, 128);
  EXPECT_EQ(c.num_key_value_heads, 0);
  // rope_type wins over type.
  EXPECT_EQ(
      ParseHfConfig(
          R"({"model_type":"llama","head_dim":64,"rope_theta":1e4,"max_position_embeddings":4096,
      "rope_scaling":{"type":"linear","rope_type":"dynamic","factor":2}})")
          .params.type,
      RopeType::kDynamic);
  // Null rope_scaling is default RoPE.
  EXPECT_EQ(
      ParseHfConfig(R"({"model_type":"llama","head_dim":64,"rope_theta":1e4,"rope_scaling":null})")
          .params.type,
      RopeType::kDefault);
}

TEST(HfConfig, RopeParametersV5) {
  const HfRopeConfig c = ParseHfConfig(
      R"({"model_type":"qwen2","hidden_size":3584,"num_attention_heads":28,
          "max_position_embeddings":32768,
          "rope_parameters":{"rope_type":"yarn","rope_theta":1000000.0,"factor":4.0,
                             "original_max_position_embeddings":32768}})");
  EXPECT_EQ(c.params.type, RopeType::kYarn);
  EXPECT_EQ(c.params.base, 1e6);
  EXPECT_EQ(c.params.head_dim, 128);
  // Current transformers keeps the explicit factor even though MPE / OMP = 1.
  EXPECT_EQ(c.params.factor, 4.0);
  EXPECT_EQ(c.params.original_max_position_embeddings, 32768);
  EXPECT_EQ(c.params.beta_fast, 32.0);
  EXPECT_EQ(c.params.beta_slow, 1.0);
  EXPECT_TRUE(c.params.truncate);
  EXPECT_FALSE(c.params.attention_factor.has_value());
  EXPECT_NEAR(ComputeFrequencies(c.params, Numerics::kExact).attention_factor, 1.1386294361, 1e-10);
}

TEST(HfConfig, YarnFieldsAndDefaults) {
  // DeepSeek-V3: rope slice qk_rope_head_dim = 64, adjacent-pair checkpoint layout.
  HfRopeConfig c = ParseHfConfig(
      R"({"model_type":"deepseek_v3","hidden_size":7168,"num_attention_heads":128,
          "qk_rope_head_dim":64,"max_position_embeddings":163840,"rope_theta":10000,
          "rope_scaling":{"type":"yarn","factor":40,"original_max_position_embeddings":4096,
                          "beta_fast":32,"beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0}})");
  EXPECT_EQ(c.params.head_dim, 64);
  EXPECT_EQ(c.params.rotary_dim, 64);
  EXPECT_EQ(c.layout, Layout::kInterleaved);
  EXPECT_EQ(c.params.mscale, 1.0);
  EXPECT_EQ(c.params.mscale_all_dim, 1.0);
  EXPECT_EQ(ComputeFrequencies(c.params, Numerics::kExact).attention_factor, 1.0);
  // gpt-oss: truncate false; betas 0 / null mean the defaults (Python `or`).
  c = ParseHfConfig(
      R"({"model_type":"gpt_oss","head_dim":64,"hidden_size":2880,"num_attention_heads":64,
          "max_position_embeddings":131072,"rope_theta":150000,
          "rope_scaling":{"rope_type":"yarn","factor":32.0,"original_max_position_embeddings":4096,
                          "beta_fast":0,"beta_slow":null,"truncate":false}})");
  EXPECT_EQ(c.params.head_dim, 64);
  EXPECT_FALSE(c.params.truncate);
  EXPECT_EQ(c.params.beta_fast, 32.0);
  EXPECT_EQ(c.params.beta_slow, 1.0);
  EXPECT_NEAR(ComputeFrequencies(c.params, Numerics::kExact).attention_factor, 1.3465736, 1e-7);
  // No factor: s = MPE / OMP.
  c = ParseHfConfig(
      R"({"model_type":"llama","head_dim":128,"max_position_embeddings":65536,"rope_theta":1e4,
          "rope_scaling":{"rope_type":"yarn","original_max_position_embeddings":4096,
                          "attention_factor":1.5}})");
  EXPECT_EQ(c.params.factor, 16.0);
  EXPECT_EQ(c.params.attention_factor.value_or(0), 1.5);
}

TEST(HfConfig, Phi3LongRope) {
  for (const std::string type : {"su", "longrope", "yarn"}) {
    const HfRopeConfig c = ParseHfConfig(Phi3Mini128k(type));
    EXPECT_EQ(c.params.type, RopeType::kLongRope) << type;
    EXPECT_EQ(c.params.head_dim, 96);
    EXPECT_EQ(c.params.rotary_dim, 96);
    EXPECT_EQ(c.params.original_max_position_embeddings, 4096);
    EXPECT_EQ(c.params.factor, 0.0);
    EXPECT_EQ(c.params.short_factor.size(), 48u);
    EXPECT_EQ(c.params.long_factor[47], 1.0 + 1.2 * 47);
    EXPECT_NEAR(ComputeFrequencies(c.params, Numerics::kExact).attention_factor, 1.1902380714238083,
                4e-16);
  }
}

TEST(HfConfig, MropeIsDefault) {
  const HfRopeConfig c = ParseHfConfig(
      R"({"model_type":"qwen2_vl","hidden_size":3584,"num_attention_heads":28,"rope_theta":1000000.0,
          "rope_scaling":{"type":"mrope","mrope_section":[16,24,24]}})");
  EXPECT_EQ(c.params.type, RopeType::kDefault);
  EXPECT_EQ(c.params.rotary_dim, 128);
}

TEST(HfConfig, PerLayerTypeRopeParameters) {
  const std::string gemma3 =
      R"({"model_type":"gemma3_text","head_dim":256,"hidden_size":2560,"num_attention_heads":8,
          "max_position_embeddings":131072,
          "rope_parameters":{
            "full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0},
            "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}})";
  HfRopeConfig c = ParseHfConfig(gemma3);  // full_attention by default
  EXPECT_EQ(c.params.type, RopeType::kLinear);
  EXPECT_EQ(c.params.base, 1e6);
  EXPECT_EQ(c.params.head_dim, 256);
  c = ParseHfConfig(gemma3, "sliding_attention");
  EXPECT_EQ(c.params.type, RopeType::kDefault);
  EXPECT_EQ(c.params.base, 1e4);
  ExpectError(gemma3, "available: full_attention, sliding_attention", "chunked_attention");
  ExpectError(gemma3, "rope_parameters has no entry for layer type \"chunked_attention\"",
              "chunked_attention");
  // Older Gemma-3 form: rope_local_base_freq for the sliding layers.
  const std::string old_form =
      R"({"model_type":"gemma3_text","head_dim":256,"num_attention_heads":8,"rope_theta":1000000.0,
          "rope_local_base_freq":10000.0,"rope_scaling":{"rope_type":"linear","factor":8.0}})";
  c = ParseHfConfig(old_form, "sliding_attention");
  EXPECT_EQ(c.params.type, RopeType::kDefault);
  EXPECT_EQ(c.params.base, 1e4);
  ExpectError(kLlama31, "is not a per-layer-type dict", "sliding_attention");
}

TEST(HfConfig, PartialRotary) {
  // GPT-NeoX-20B: rotary_pct 0.25 of 96, rotary_emb_base.
  HfRopeConfig c = ParseHfConfig(
      R"({"model_type":"gpt_neox","hidden_size":6144,"num_attention_heads":64,
          "rotary_pct":0.25,"rotary_emb_base":10000,"max_position_embeddings":2048})");
  EXPECT_EQ(c.params.head_dim, 96);
  EXPECT_EQ(c.params.rotary_dim, 24);
  EXPECT_EQ(c.params.base, 1e4);
  EXPECT_EQ(c.layout, Layout::kHalfSplit);
  // Phi-2: 80 * 0.4 = 32.
  c = ParseHfConfig(R"({"model_type":"phi","hidden_size":2560,"num_attention_heads":32,
                        "partial_rotary_factor":0.4,"rope_theta":10000.0})");
  EXPECT_EQ(c.params.rotary_dim, 32);
  // int(100 * 0.29) = int(28.999999999999996) = 28: truncation of the double product.
  c = ParseHfConfig(R"({"model_type":"llama","head_dim":100,"partial_rotary_factor":0.29,
                        "rope_theta":1e4})");
  EXPECT_EQ(c.params.rotary_dim, 28);
  // v5: partial_rotary_factor inside rope_parameters (Phi-4-mini 0.75 of 128).
  c = ParseHfConfig(R"({"model_type":"phi3","head_dim":128,
      "rope_parameters":{"rope_type":"default","rope_theta":10000.0,"partial_rotary_factor":0.75}})");
  EXPECT_EQ(c.params.rotary_dim, 96);
}

TEST(HfConfig, HeadDimRules) {
  // Explicit head_dim differing from hidden / heads (Gemma-7B: 256 vs 3072 / 16 = 192).
  EXPECT_EQ(ParseHfConfig(R"({"model_type":"gemma","head_dim":256,"hidden_size":3072,
                              "num_attention_heads":16,"rope_theta":10000.0})")
                .params.head_dim,
            256);
  // null / 0 head_dim fall back to hidden / heads (Python truthiness).
  for (const char* hd : {"null", "0"}) {
    EXPECT_EQ(ParseHfConfig(std::string(R"({"model_type":"llama","head_dim":)") + hd +
                            R"(,"hidden_size":3072,"num_attention_heads":16,"rope_theta":1e4})")
                  .params.head_dim,
              192);
  }
}

TEST(HfConfig, InterleavedFamilies) {
  // GPT-J-6B: n_embd / n_head = 256, rotary_dim 64, base fixed at 10000.
  HfRopeConfig c = ParseHfConfig(R"({"model_type":"gptj","n_embd":4096,"n_head":16,
                                     "rotary_dim":64,"n_positions":2048})");
  EXPECT_EQ(c.layout, Layout::kInterleaved);
  EXPECT_EQ(c.params.head_dim, 256);
  EXPECT_EQ(c.params.rotary_dim, 64);
  EXPECT_EQ(c.params.base, 1e4);
  EXPECT_EQ(c.params.max_position_embeddings, 2048);
  EXPECT_EQ(c.num_attention_heads, 16);
  // rotary_dim null: the whole head.
  c = ParseHfConfig(R"({"model_type":"codegen","n_embd":1024,"n_head":16,"rotary_dim":null})");
  EXPECT_EQ(c.params.rotary_dim, 64);
  // GLM: interleaved, default partial factor 0.5.
  c = ParseHfConfig(R"({"model_type":"glm","hidden_size":4096,"num_attention_heads":32,
                        "head_dim":128,"rope_theta":10000.0})");
  EXPECT_EQ(c.layout, Layout::kInterleaved);
  EXPECT_EQ(c.params.rotary_dim, 64);
  // ChatGLM3 / GLM-4 remote code: kv_channels, base 10000 * rope_ratio.
  c = ParseHfConfig(R"({"model_type":"chatglm","hidden_size":4096,"num_attention_heads":32,
                        "kv_channels":128,"rope_ratio":500,"seq_length":131072,
                        "multi_query_group_num":2})");
  EXPECT_EQ(c.layout, Layout::kInterleaved);
  EXPECT_EQ(c.params.head_dim, 128);
  EXPECT_EQ(c.params.rotary_dim, 64);
  EXPECT_EQ(c.params.base, 5e6);
  EXPECT_EQ(c.params.max_position_embeddings, 131072);
  EXPECT_EQ(c.num_key_value_heads, 2);
}

TEST(HfConfig, MissingRopeTheta) {
  // The transformers LLaMA config class defaults rope_theta to 10000.
  EXPECT_EQ(ParseHfConfig(R"({"model_type":"llama","head_dim":128})").params.base, 1e4);
  EXPECT_EQ(ParseHfConfig(R"({"model_type":"mixtral","head_dim":128})").params.base, 1e6);
  ExpectError(R"({"model_type":"mystery","head_dim":128})",
              "config.json: rope_theta is missing and model_type \"mystery\"");
  ExpectError(R"({"head_dim":128})", "rope_theta is missing");
}

TEST(HfConfig, Errors) {
  ExpectError(R"({"model_type":"llama","head_dim":128,"rope_theta":1e4)", "invalid JSON at line 1");
  ExpectError("{\n\"model_type\": \"llama\",\n\"head_dim\": 12x8}", "invalid JSON at line 3");
  ExpectError("[1, 2]", "the top level must be a JSON object");
  ExpectError("", "invalid JSON");
  const std::string base = R"({"model_type":"llama","head_dim":128,"rope_theta":10000,
                               "max_position_embeddings":4096,)";
  ExpectError(base + R"("rope_scaling":{"rope_type":"linear","factor":"8"}})",
              "config.json: rope_scaling.factor must be a number (got string \"8\")");
  ExpectError(base + R"("rope_scaling":{"rope_type":"linear","factor":0.5}})",
              "config.json: rope_scaling.factor must be a finite number >= 1 (got 0.5)");
  ExpectError(base + R"("rope_parameters":{"rope_type":"linear","factor":0.5}})",
              "config.json: rope_parameters.factor must be a finite number >= 1 (got 0.5)");
  ExpectError(base + R"("rope_scaling":{"rope_type":"linear","factor":null}})",
              "rope_scaling.factor is required for rope_type linear");
  ExpectError(base + R"("rope_scaling":{"rope_type":"linear"}})",
              "rope_scaling.factor is required");
  ExpectError(base + R"("rope_scaling":{"factor":2}})", "rope_scaling.rope_type is missing");
  ExpectError(base + R"("rope_scaling":{"rope_type":"fancy","factor":2}})",
              "rope_scaling.rope_type: rope_type must be one of");
  ExpectError(base + R"("rope_scaling":{"rope_type":7}})",
              "rope_scaling.rope_type must be a string");
  ExpectError(base + R"("rope_scaling":[1,2]})", "rope_scaling must be an object or null");
  ExpectError(base + R"("rope_scaling":{"rope_type":"llama3","factor":8,"high_freq_factor":4}})",
              "rope_scaling.low_freq_factor is required for rope_type llama3");
  ExpectError(base + R"("rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,
                                         "high_freq_factor":1}})",
              "rope_scaling.high_freq_factor must be a finite number > low_freq_factor");
  ExpectError(base + R"("rope_scaling":{"rope_type":"yarn","factor":4,"truncate":"no"}})",
              "rope_scaling.truncate must be true or false");
  ExpectError(
      base + R"("rope_scaling":{"rope_type":"yarn","factor":4,"beta_fast":1,"beta_slow":2}})",
      "rope_scaling.beta_fast must be a finite number > beta_slow");
  ExpectError(base + R"("rope_scaling":{"rope_type":"yarn","factor":4,"mscale":-1}})",
              "rope_scaling.mscale must be a finite number >= 0");
  ExpectError(base + R"("rope_scaling":{"rope_type":"yarn","factor":4,"attention_factor":0}})",
              "rope_scaling.attention_factor must be a finite number > 0");
  ExpectError(base + R"("rope_scaling":{"rope_type":"yarn","factor":4,"attention_factor":1e308}})",
              "rope_scaling.attention_factor must be a finite number > 0 and <= 65536");
  // An mscale that makes the computed YaRN factor huge: refused when the tables are computed.
  const HfRopeConfig huge = ParseHfConfig(
      base +
      R"("rope_scaling":{"rope_type":"yarn","factor":4,"mscale":7e299,"mscale_all_dim":1}})");
  EXPECT_THAT([&] { ComputeFrequencies(huge.params, Numerics::kExact, 0); },
              ::testing::ThrowsMessage<Error>(HasSubstr("attention_factor")));
  ExpectError(base + R"("rope_scaling":{"rope_type":"dynamic","factor":1e400}})", "invalid JSON");
  ExpectError(base + R"("rope_scaling":{"rope_type":"dynamic","factor":-1e308}})",
              "rope_scaling.factor must be a finite number >= 1");

  // Phi-3 lists.
  Json phi = Json::parse(Phi3Mini128k());
  phi["rope_scaling"]["short_factor"].erase(0);
  ExpectError(phi.dump(),
              "rope_scaling.short_factor must be a list of rotary_dim / 2 = 48 numbers");
  phi = Json::parse(Phi3Mini128k());
  phi["rope_scaling"]["long_factor"][3] = "x";
  ExpectError(phi.dump(), "rope_scaling.long_factor[3] must be a number");
  phi = Json::parse(Phi3Mini128k());
  phi["rope_scaling"]["long_factor"][5] = -1.0;
  ExpectError(phi.dump(), "rope_scaling.long_factor[5] must be a finite number > 0");
  phi = Json::parse(Phi3Mini128k());
  phi["rope_scaling"].erase("long_factor");
  ExpectError(phi.dump(), "rope_scaling.long_factor is required for rope_type longrope");
  phi = Json::parse(Phi3Mini128k());
  phi["rope_scaling"]["short_factor"] = 3;
  ExpectError(phi.dump(), "rope_scaling.short_factor must be a list of numbers");

  // Dimensions.
  ExpectError(
      R"({"model_type":"llama","rope_theta":1e4,"hidden_size":4096,"num_attention_heads":0})",
      "num_attention_heads must be an integer in [1, ");
  ExpectError(
      R"({"model_type":"llama","rope_theta":1e4,"hidden_size":-4096,"num_attention_heads":32})",
      "hidden_size must be an integer");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":64,"num_attention_heads":32,
                  "num_key_value_heads":5})",
              "num_key_value_heads must divide num_attention_heads = 32 (got 5)");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"hidden_size":4096})",
              "head_dim is missing and hidden_size / num_attention_heads cannot be formed");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":3.5})",
              "head_dim must be an integer");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":"128"})",
              "head_dim must be an integer");
  ExpectError(
      R"({"model_type":"llama","rope_theta":1e4,"head_dim":100,"partial_rotary_factor":0.33})",
      "rotary_dim = int(head_dim 100 * partial_rotary_factor 0.33000000000000002) = 33");
  ExpectError(R"({"model_type":"gpt_neox","head_dim":96,"rotary_pct":1.5,"rotary_emb_base":1e4})",
              "rotary_pct must be a number in (0, 1]");
  ExpectError(R"({"model_type":"gptj","n_embd":4096,"n_head":16,"rotary_dim":63})",
              "rotary_dim must be an even integer in [2, head_dim = 256] (got 63)");
  ExpectError(R"({"model_type":"gptj","n_embd":4096,"n_head":16,"rotary_dim":512})",
              "rotary_dim must be an even integer");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":99999999})",
              "head_dim must be an integer in [0, 1048576]");
  ExpectError(R"({"model_type":"llama","rope_theta":0.5,"head_dim":64})",
              "config.json: rope_theta must be a finite number > 1 (got 0.5)");
  ExpectError(R"({"model_type":"llama","rope_theta":null,"rotary_emb_base":"big","head_dim":64})",
              "rotary_emb_base must be a number");
  ExpectError(
      R"({"model_type":"llama","rope_theta":1e4,"head_dim":64,"max_position_embeddings":0})",
      "max_position_embeddings must be an integer in [1, 2147483647]");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":64,
                  "rope_scaling":{"rope_type":"dynamic","factor":2}})",
              "max_position_embeddings is missing");
  ExpectError(R"({"model_type":"llama","rope_theta":1e4,"head_dim":64,"model_type":5})",
              "model_type must be a string");
  ExpectError(std::string(100, '[') + std::string(100, ']'), "JSON nesting deeper than 64");
}

TEST(HfConfig, LoadNamesThePath) {
  const std::string path = ::testing::TempDir() + "ropekit_hf_config_test.json";
  {
    std::ofstream out(path);
    out << kLlama31;
  }
  EXPECT_EQ(LoadHfConfig(path).params.type, RopeType::kLlama3);
  {
    std::ofstream out(path);
    out << R"({"model_type":"llama","head_dim":64,"rope_theta":-3})";
  }
  EXPECT_THAT([&] { LoadHfConfig(path); },
              ::testing::ThrowsMessage<Error>(HasSubstr(path + ": rope_theta must be")));
  std::remove(path.c_str());
  EXPECT_THAT([&] { LoadHfConfig(::testing::TempDir()); },
              ::testing::ThrowsMessage<Error>(HasSubstr(": is a directory")));
  EXPECT_THAT([&] { LoadHfConfig(path); },
              ::testing::ThrowsMessage<Error>(HasSubstr(path + ": cannot open")));
}

TEST(HfConfig, LoadReadsAPipe) {
  // LoadHfConfig reads through ReadFileToString, which streams a pipe to its end.
  const std::string path = ::testing::TempDir() + "ropekit_hf_config_test.fifo";
  std::remove(path.c_str());
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  // A reader that gave up early must fail the test, not kill it with SIGPIPE.
  void (*old_handler)(int) = std::signal(SIGPIPE, SIG_IGN);
  std::thread writer([&] {
    std::ofstream out(path);
    out << kLlama31;
  });
  std::optional<HfRopeConfig> config;
  EXPECT_NO_THROW(config = LoadHfConfig(path));
  writer.join();
  std::signal(SIGPIPE, old_handler);
  std::remove(path.c_str());
  ASSERT_TRUE(config.has_value());
  EXPECT_EQ(config->params.type, RopeType::kLlama3);
  EXPECT_EQ(config->params.base, 500000.0);
}

// ---- the rope_scaling dict alone: writer and reader ---------------------------------------------

RopeParams ScalingBase() {
  RopeParams base;
  base.base = 500000.0;
  base.head_dim = 64;
  base.rotary_dim = 32;  // N = 16 pairs
  base.max_position_embeddings = 8192;
  return base;
}

// `base` with type t and every field the type's dict carries set away from its default.
RopeParams WithEveryField(RopeParams p, RopeType t) {
  p.type = t;
  switch (t) {
    case RopeType::kLinear:
    case RopeType::kDynamic:
      p.factor = 3.5;
      break;
    case RopeType::kNtk:
      p.ntk_alpha = 2.5;
      break;
    case RopeType::kYarn:
      p.factor = 4.0;
      p.original_max_position_embeddings = 2048;
      p.beta_fast = 16.0;
      p.beta_slow = 2.0;
      p.mscale = 0.707;
      p.mscale_all_dim = 0.5;
      p.truncate = false;
      p.attention_factor = 1.25;
      break;
    case RopeType::kLongRope:
      p.factor = 4.0;
      p.original_max_position_embeddings = 2048;
      for (int i = 0; i < p.rotary_dim / 2; ++i) {
        p.short_factor.push_back(1.0 + 0.125 * i);
        p.long_factor.push_back(2.0 + 0.375 * i);
      }
      p.attention_factor = 1.1;
      break;
    case RopeType::kLlama3:
      p.factor = 8.0;
      p.low_freq_factor = 1.5;
      p.high_freq_factor = 3.0;
      p.original_max_position_embeddings = 2048;
      break;
    default:
      break;
  }
  return p;
}

void ExpectSameParams(const RopeParams& a, const RopeParams& b, const std::string& what) {
  EXPECT_EQ(a.type, b.type) << what;
  EXPECT_EQ(a.base, b.base) << what;
  EXPECT_EQ(a.head_dim, b.head_dim) << what;
  EXPECT_EQ(a.rotary_dim, b.rotary_dim) << what;
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings) << what;
  EXPECT_EQ(a.factor, b.factor) << what;
  EXPECT_EQ(a.ntk_alpha, b.ntk_alpha) << what;
  EXPECT_EQ(a.original_max_position_embeddings, b.original_max_position_embeddings) << what;
  EXPECT_EQ(a.beta_fast, b.beta_fast) << what;
  EXPECT_EQ(a.beta_slow, b.beta_slow) << what;
  EXPECT_EQ(a.mscale, b.mscale) << what;
  EXPECT_EQ(a.mscale_all_dim, b.mscale_all_dim) << what;
  EXPECT_EQ(a.truncate, b.truncate) << what;
  EXPECT_EQ(a.attention_factor, b.attention_factor) << what;
  EXPECT_EQ(a.short_factor, b.short_factor) << what;
  EXPECT_EQ(a.long_factor, b.long_factor) << what;
  EXPECT_EQ(a.low_freq_factor, b.low_freq_factor) << what;
  EXPECT_EQ(a.high_freq_factor, b.high_freq_factor) << what;
}

TEST(RopeScalingJson, EveryTypeRoundTripsThroughWriterAndReaders) {
  for (int t = 0; t < static_cast<int>(RopeType::kSentinel); ++t) {
    const RopeParams p = WithEveryField(ScalingBase(), static_cast<RopeType>(t));
    const std::string what(RopeTypeName(p.type));
    ASSERT_NO_THROW(p.Validate()) << what;
    const std::string dict = RopeScalingToJson(p);
    if (p.type == RopeType::kDefault) {
      EXPECT_EQ(dict, "null");
    }
    ExpectSameParams(ParseRopeScaling(dict, ScalingBase()), p, what);
    // The same dict inside a config.json, with the other fields at the top level.
    const Json config = {{"model_type", "llama"},
                         {"head_dim", p.head_dim},
                         {"partial_rotary_factor", 0.5},
                         {"rope_theta", p.base},
                         {"max_position_embeddings", p.max_position_embeddings},
                         {"rope_scaling", Json::parse(dict)}};
    ExpectSameParams(ParseHfConfig(config.dump()).params, p, what + " in config.json");
  }
}

TEST(RopeScalingJson, WriterSpellsTheHuggingFaceKeys) {
  RopeParams p = ScalingBase();
  p.type = RopeType::kLinear;
  p.factor = 2.0;
  EXPECT_EQ(RopeScalingToJson(p), R"({"rope_type":"linear","factor":2.0})");
  p.type = RopeType::kNtk;
  p.ntk_alpha = 4.0;
  EXPECT_EQ(RopeScalingToJson(p), R"({"rope_type":"ntk","alpha":4.0})");
}

TEST(RopeScalingJson, ReaderKeepsTheBaseAndNamesItsSource) {
  const RopeParams base = ScalingBase();
  RopeParams p = ParseRopeScaling(R"({"type":"linear","factor":2,"rope_theta":1e6})", base);
  EXPECT_EQ(p.type, RopeType::kLinear);
  EXPECT_EQ(p.factor, 2.0);
  EXPECT_EQ(p.base, 1e6);  // a rope_theta inside the dict wins, as in transformers v5
  EXPECT_EQ(p.head_dim, 64);
  EXPECT_EQ(p.rotary_dim, 32);
  EXPECT_EQ(p.max_position_embeddings, 8192);
  p = ParseRopeScaling("null", base);
  EXPECT_EQ(p.type, RopeType::kDefault);
  EXPECT_EQ(p.base, 500000.0);
  auto expect_error = [&](const std::string& text, const std::string& needle) {
    EXPECT_THAT([&] { ParseRopeScaling(text, base, "--rope-scaling"); },
                ::testing::ThrowsMessage<Error>(HasSubstr(needle)))
        << text;
  };
  expect_error("[1]", "--rope-scaling: must be a JSON object or null");
  expect_error("{", "--rope-scaling: invalid JSON");
  expect_error(R"({"rope_type":"linear"})",
               "--rope-scaling: rope_scaling.factor is required for rope_type linear");
  expect_error(R"({"rope_type":"linear","factor":0.5})",
               "--rope-scaling: rope_scaling.factor must be a finite number >= 1");
  expect_error(R"({"rope_type":"spiral","factor":2})", "--rope-scaling: rope_scaling.rope_type");
}

// ---- fuzzing ------------------------------------------------------------------------------------

// Replaces a random value somewhere in the document with a value of another type or an extreme
// number.
void MutateValue(Json& j, std::mt19937_64& rng) {
  static const std::vector<Json> kReplacements = {
      nullptr,
      true,
      false,
      0,
      -1,
      1,
      2,
      3,
      63,
      1e308,
      -1e308,
      1e-320,
      5e-324,
      0.5,
      -0.0,
      std::numeric_limits<int64_t>::max(),
      std::numeric_limits<int64_t>::min(),
      std::numeric_limits<uint64_t>::max(),
      2147483648LL,
      4096,
      1e4,
      "x",
      "su",
      "yarn",
      "llama3",
      "longrope",
      "dynamic",
      "ntk",
      "linear",
      Json::array(),
      Json::object(),
      Json::array({1, 2, 3}),
      Json::object({{"full_attention", Json::object()}})};
  Json* node = &j;
  for (int depth = 0; depth < 4; ++depth) {
    if (node->is_object() && !node->empty()) {
      auto it = node->begin();
      std::advance(it, rng() % node->size());
      if (rng() % 3 == 0 || !(it->is_object() || it->is_array())) {
        if (rng() % 8 == 0) {
          node->erase(it);
        } else {
          *it = kReplacements[rng() % kReplacements.size()];
        }
        return;
      }
      node = &*it;
    } else if (node->is_array() && !node->empty()) {
      Json& el = (*node)[rng() % node->size()];
      if (rng() % 2 == 0 || !(el.is_object() || el.is_array())) {
        el = kReplacements[rng() % kReplacements.size()];
        return;
      }
      node = &el;
    } else {
      *node = kReplacements[rng() % kReplacements.size()];
      return;
    }
  }
}

std::string MutateText(std::string s, std::mt19937_64& rng) {
  if (s.empty()) return s;
  switch (rng() % 5) {
    case 0:  // byte flip
      s[rng() % s.size()] ^= static_cast<char>(1 << (rng() % 8));
      break;
    case 1:  // truncation
      s.resize(rng() % s.size());
      break;
    case 2: {  // insert a structural character
      const char kChars[] = "{}[]\",:0-.eE9 \\\x01\xff";
      s.insert(s.begin() + static_cast<std::ptrdiff_t>(rng() % s.size()),
               kChars[rng() % (sizeof(kChars) - 1)]);
      break;
    }
    case 3: {  // delete a span
      const size_t at = rng() % s.size();
      s.erase(at, rng() % 8);
      break;
    }
    default: {  // duplicate a span
      const size_t at = rng() % s.size();
      s.insert(at, s.substr(at, rng() % 16));
      break;
    }
  }
  return s;
}

TEST(HfConfigFuzz, EveryMutationParsesOrThrowsError) {
  const std::vector<std::string> seeds = {
      kLlama31,
      Phi3Mini128k(),
      R"({"model_type":"gpt_neox","hidden_size":6144,"num_attention_heads":64,"rotary_pct":0.25,
          "rotary_emb_base":10000,"max_position_embeddings":2048})",
      R"({"model_type":"gptj","n_embd":4096,"n_head":16,"rotary_dim":64,"n_positions":2048})",
      R"({"model_type":"qwen2","hidden_size":3584,"num_attention_heads":28,
          "max_position_embeddings":32768,"rope_parameters":{"rope_type":"yarn",
          "rope_theta":1000000.0,"factor":4.0,"original_max_position_embeddings":32768,
          "beta_fast":32,"beta_slow":1,"mscale":0.707,"mscale_all_dim":0.707,"truncate":false}})",
      R"({"model_type":"gemma3_text","head_dim":256,"num_attention_heads":8,
          "max_position_embeddings":131072,"rope_parameters":{
          "full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0},
          "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}})",
      R"({"model_type":"llama","head_dim":64,"max_position_embeddings":2048,"rope_theta":1e4,
          "rope_scaling":{"rope_type":"dynamic","factor":2.0}})",
  };
  std::mt19937_64 rng(20240917);
  int parsed = 0, rejected = 0;
  for (int iter = 0; iter < 6000; ++iter) {
    const std::string& seed = seeds[iter % seeds.size()];
    std::string text;
    if (iter % 2 == 0) {
      Json j = Json::parse(seed);
      const int rounds = 1 + static_cast<int>(rng() % 3);
      for (int r = 0; r < rounds; ++r) MutateValue(j, rng);
      text = j.dump();
    } else {
      text = seed;
      const int rounds = 1 + static_cast<int>(rng() % 4);
      for (int r = 0; r < rounds; ++r) text = MutateText(text, rng);
    }
    const std::string layer = rng() % 4 == 0 ? "sliding_attention" : "";
    try {
      const HfRopeConfig c = ParseHfConfig(text, layer);
      EXPECT_NO_THROW(c.params.Validate()) << text;
      ++parsed;
      for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
        try {
          const RopeFrequencies f = ComputeFrequencies(c.params, numerics, 131101);
          ASSERT_EQ(f.inv_freq.size(), static_cast<size_t>(c.params.rotary_dim / 2));
          for (double w : f.inv_freq) ASSERT_TRUE(std::isfinite(w) && w > 0) << text;
          ASSERT_TRUE(std::isfinite(f.attention_factor) && f.attention_factor > 0) << text;
        } catch (const Error&) {
          // Out-of-range results of extreme-but-valid parameters are reported, not produced.
        }
      }
    } catch (const Error& e) {
      ++rejected;
      EXPECT_THAT(std::string(e.what()), HasSubstr("config.json: ")) << text;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "non-ropekit exception " << e.what() << " for " << text;
    } catch (...) {
      ADD_FAILURE() << "unknown exception for " << text;
    }
  }
  // Both outcomes must occur, or the mutations are not exercising the parser.
  RecordProperty("parsed", parsed);
  RecordProperty("rejected", rejected);
  EXPECT_GT(parsed, 300);
  EXPECT_GT(rejected, 300);
}

}  // namespace
}  // namespace ropekit
