// Prompt tuning (src/model/prompt_tuning.cc) and prefix tuning (src/model/prefix_tuning.cc).
// Prompt tuning: the TEXT initialisation reproduces the base model
// given the text as a prefix, bit for bit; virtual-token gradients against central finite
// differences of a float64-accumulated loss; training lowers the loss and never writes the base;
// the adapter round-trips through the PEFT files and resumes bit for bit; KV-cache decoding equals
// a recompute; bad configs, foreign bases and merge are clear errors. The PEFT semantics
// themselves (positions, inputs_embeds) are checked against an independent float64 PyTorch
// implementation in tests/python/test_prompt_tuning_cli.py.
// Prefix tuning: gradients of the table and of the reparameterisation MLP against central
// differences; KV-cache decoding with the prefix at entries 0..K-1 equals a recompute; the
// projection trains, resumes bit for bit, and its saved output alone (a plain PEFT directory)
// gives the same outputs; errors. HF semantics (unrotated prefix keys, real tokens from
// position K) are checked against float64 PyTorch in the same Python file.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "ropekit/model.h"
#include "tests/test_util.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff

ModelConfig Tiny() {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.intermediate_size = 24;
  c.max_position_embeddings = 32;
  c.init_std = 0.1;
  return c;
}

LoraConfig Prompt(int k, std::string text = "") {
  LoraConfig l;
  l.type = PeftType::kPromptTuning;
  l.num_virtual_tokens = k;
  l.prompt_init_text = std::move(text);
  return l;
}

std::vector<int32_t> Tokens(size_t n, uint32_t seed) { return testing::RandomTokens(n, seed); }

std::string TempDir(const std::string& name) {
  const std::string dir = testing::FreshTempPath("ropekit_prompt", name);
  std::filesystem::create_directories(dir);
  return dir;
}

// Six steps of adapter training on bytes over 8 values ('a'..'h', so the virtual tokens can shift
// the predictions towards them), checkpointed every 3 steps.
struct AdapterTraining {
  std::vector<int32_t> text;
  TrainConfig tc;

  explicit AdapterTraining(double lr) : text(Tokens(600, 4)) {
    for (int32_t& t : text) t = 'a' + t % 8;
    tc.steps = 6;
    tc.batch_size = 2;
    tc.seq_len = 12;
    tc.lr = lr;
    tc.warmup_steps = 1;
    tc.eval_interval = 0;
    tc.checkpoint_interval = 3;
  }

  // Trains `lc` on the checkpoint in `base_dir` into `out`, stopping after step `stop_after`
  // (-1: all steps). Returns the loss on a fixed batch before and after; checks that the base
  // weights stay frozen and that the optimizer state covers exactly the trainable parameters.
  std::pair<double, double> Run(const std::string& base_dir, const LoraConfig& lc,
                                const std::string& out, int64_t stop_after) const {
    const std::vector<int32_t> batch(text.begin(), text.begin() + 4 * 13);
    Model m = LoadModel(base_dir);
    m.AddLora(lc, 3);
    const std::vector<float> frozen(m.parameters().begin(), m.parameters().end());
    const double before = m.ForwardBackward(batch, 4, 12, {}, 1.0f, nullptr);
    TrainConfig c = tc;
    c.checkpoint_dir = out;
    OptimizerState st;
    struct Stop {};
    try {
      Train(m, st, c, text, {}, nullptr, [&](const TrainLogEntry& e) {
        if (e.step == stop_after) throw Stop{};
      });
    } catch (const Stop&) {
    }
    const double after = m.ForwardBackward(batch, 4, 12, {}, 1.0f, nullptr);
    EXPECT_EQ(st.m.size(), m.trainable_parameters().size());
    for (size_t i = 0; i < frozen.size(); ++i) EXPECT_EQ(frozen[i], m.parameters()[i]) << i;
    return {before, after};
  }
};

TEST(PromptTuning, TextInitReproducesTheBaseGivenTheTextBitForBit) {
  // K = 7 from "abc": PEFT repeats the ids to "abcabca".
  const std::string text = "abc", prefix = "abcabca";
  const int64_t K = 7, T = 9, B = 2, V = 256;
  Model base(Tiny(), 7);
  Model tuned(Tiny(), 7);
  tuned.AddLora(Prompt(K, text), 1);
  ASSERT_EQ(tuned.num_virtual_tokens(), K);
  const std::vector<int32_t> tokens = Tokens(B * T, 3);
  std::vector<int32_t> with_prefix;
  for (int64_t b = 0; b < B; ++b) {
    for (char ch : prefix) with_prefix.push_back(static_cast<unsigned char>(ch));
    with_prefix.insert(with_prefix.end(), tokens.begin() + b * T, tokens.begin() + (b + 1) * T);
  }
  std::vector<float> want(B * (K + T) * V), got(B * T * V);
  base.Forward(with_prefix, B, K + T, want.data(), nullptr, nullptr, nullptr);
  tuned.Forward(tokens, B, T, got.data(), nullptr, nullptr, nullptr);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < T * V; ++i) {
      ASSERT_EQ(got[b * T * V + i], want[(b * (K + T) + K) * V + i]) << b << " " << i;
    }
  }
  // The cached path puts the virtual tokens first as well (one call for the K virtual tokens,
  // then the prompt: the base does the same with the text's ids).
  KVCache cache(tuned.config(), K + T);
  std::vector<float> cached(T * V);
  tuned.ForwardCached(std::span<const int32_t>(tokens.data(), T), cache, cached.data(), false,
                      nullptr);
  EXPECT_EQ(cache.size(), K + T);
  KVCache base_cache(base.config(), K + T);
  std::vector<float> base_cached(T * V);
  base.ForwardCached(std::span<const int32_t>(with_prefix.data(), K), base_cache, nullptr, true,
                     nullptr);
  base.ForwardCached(std::span<const int32_t>(with_prefix.data() + K, T), base_cache,
                     base_cached.data(), false, nullptr);
  for (int64_t i = 0; i < T * V; ++i) ASSERT_EQ(cached[i], base_cached[i]) << i;
}

TEST(PromptTuning, GradientsMatchCentralDifferences) {
  Model m(Tiny(), 7);
  const int64_t K = 3, T = 6, B = 2;
  m.AddLora(Prompt(K), 5);
  const std::vector<int32_t> tokens = Tokens(B * (T + 1), 9);
  std::vector<float> g(m.trainable_parameters().size(), 0.0f);
  const float scale = 1.0f / (B * T);
  m.ForwardBackward(tokens, B, T, g, scale, nullptr);
  // Mean loss in double from the per-token float32 losses.
  auto loss = [&] {
    std::vector<int32_t> in, tg;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        in.push_back(tokens[b * (T + 1) + t]);
        tg.push_back(tokens[b * (T + 1) + t + 1]);
      }
    }
    std::vector<float> l(B * T);
    m.Forward(in, B, T, nullptr, tg.data(), l.data(), nullptr);
    double s = 0;
    for (float x : l) s += x;
    return s / (B * T);
  };
  // Central differences with h = 1e-2 on entries of size O(1) (N(0, 1) init): truncation
  // h^2 / 6 |L'''| ~ 2e-5 |L'''|; rounding: each float32 loss carries a relative error of a few
  // hundred u (~20 float32 ops of ~16-term sums), |L| ~ 5.5, so 2 * 5.5 * 300 u / (2h) ~ 1e-5.
  // 2e-4 absolute (~5x their sum) + 2% relative (curvature at larger gradients); the largest
  // differences must be well above that (a missing batch row or a wrong position changes a
  // gradient by O(1) relative).
  std::span<float> p = m.trainable_parameters();
  const double h = 1e-2;
  int checked = 0;
  double fd_max = 0;
  for (int64_t i = 0; i < K * 16; i += 5) {
    const float x0 = p[i];
    p[i] = static_cast<float>(x0 + h);
    const double up = loss();
    p[i] = static_cast<float>(x0 - h);
    const double down = loss();
    p[i] = x0;
    const double fd = (up - down) / (2 * h);
    EXPECT_NEAR(g[i], fd, 2e-4 + 0.02 * std::fabs(fd)) << "entry " << i;
    fd_max = std::max(fd_max, std::fabs(fd));
    ++checked;
  }
  EXPECT_GT(checked, 8);
  EXPECT_GT(fd_max, 5e-3);  // 25x the absolute tolerance: the comparison has teeth
  double norm = 0;
  for (float x : g) norm += double{x} * x;
  EXPECT_GT(norm, 0.0);
}

TEST(PromptTuning, TrainingLowersTheLossLeavesTheBaseAndResumesBitForBit) {
  const std::string dir = TempDir("train");
  const std::string base_dir = dir + "/base", full = dir + "/full", part = dir + "/part";
  Model base(Tiny(), 7);
  SaveCheckpoint(base_dir, base);
  LoraConfig lc = Prompt(4, "rope");
  lc.base_model = base_dir;
  const AdapterTraining training(0.1);
  const auto [before, after] = training.Run(base_dir, lc, full, -1);
  EXPECT_LT(after, before - 0.05);
  training.Run(base_dir, lc, part, 3);
  TrainingCheckpoint ck = LoadCheckpoint(part);
  ASSERT_NE(ck.model.lora_config(), nullptr);
  EXPECT_EQ(ck.model.lora_config()->type, PeftType::kPromptTuning);
  EXPECT_EQ(ck.model.num_virtual_tokens(), 4);
  EXPECT_EQ(ck.optimizer.step, 3);
  Train(ck.model, ck.optimizer, ck.train_config, training.text, {}, nullptr);
  TrainingCheckpoint done = LoadCheckpoint(full);
  ASSERT_EQ(done.model.trainable_parameters().size(), ck.model.trainable_parameters().size());
  for (size_t i = 0; i < ck.model.trainable_parameters().size(); ++i) {
    ASSERT_EQ(done.model.trainable_parameters()[i], ck.model.trainable_parameters()[i]) << i;
  }
  // The plain adapter directory loads onto the base with the same outputs.
  Model loaded = LoadModel(base_dir);
  LoadLoraAdapter(loaded, full);
  const std::vector<int32_t> in = Tokens(10, 8);
  std::vector<float> a(10 * 256), b(10 * 256);
  loaded.Forward(in, 1, 10, a.data(), nullptr, nullptr, nullptr);
  done.model.Forward(in, 1, 10, b.data(), nullptr, nullptr, nullptr);
  EXPECT_EQ(a, b);
  // On a base of another width: token_dim is named.
  ModelConfig other = Tiny();
  other.hidden_size = 32;
  Model wrong(other, 1);
  try {
    LoadLoraAdapter(wrong, full);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("token_dim 16"));
    EXPECT_THAT(e.what(), HasSubstr("another base shape"));
  }
  std::filesystem::remove_all(dir);
}

TEST(PromptTuning, CachedDecodingEqualsRecompute) {
  Model m(Tiny(), 7);
  const int64_t K = 5, T = 11, prefill = 4, V = 256;
  m.AddLora(Prompt(K), 2);
  const std::vector<int32_t> tokens = Tokens(T, 6);
  KVCache cache(m.config(), K + T);
  std::vector<float> cached(T * V);
  m.ForwardCached(std::span<const int32_t>(tokens.data(), prefill), cache, cached.data(), false,
                  nullptr);
  for (int64_t t = prefill; t < T; ++t) {
    m.ForwardCached(std::span<const int32_t>(tokens.data() + t, 1), cache, cached.data() + t * V,
                    true, nullptr);
  }
  EXPECT_EQ(cache.size(), K + T);
  std::vector<float> full(T * V);
  m.Forward(tokens, 1, T, full.data(), nullptr, nullptr, nullptr);
  double max_abs = 1.0;
  for (float x : full) max_abs = std::max(max_abs, double(std::abs(x)));
  // The same tolerance as the base model's cache test (model_test.cc): the cached and full
  // passes differ only in float32 summation order.
  for (int64_t i = 0; i < T * V; ++i) ASSERT_NEAR(cached[i], full[i], 256 * kU * max_abs) << i;
  // Generate sizes its cache for the virtual tokens as well.
  const std::vector<int32_t> out =
      Generate(m, std::span<const int32_t>(tokens.data(), 3), 4, SamplerConfig{}, nullptr);
  EXPECT_EQ(out.size(), 4u);
}

TEST(PromptTuning, BadConfigsAreClearErrors) {
  auto message = [](const ModelConfig& c, const LoraConfig& l) {
    try {
      Model m(c, 1);
      m.AddLora(l, 1);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message(Tiny(), Prompt(0)), HasSubstr("--prompt-tuning 0"));
  EXPECT_THAT(message(Tiny(), Prompt(32)), HasSubstr("is outside [1, 31]"));
  ModelConfig small = Tiny();
  small.vocab_size = 64;
  EXPECT_THAT(message(small, Prompt(4, "abc")), HasSubstr("--prompt-tuning-init-text: byte 97"));
  Model m(Tiny(), 1);
  m.AddLora(Prompt(3), 1);
  EXPECT_THROW(m.MergeLora(), Error);
  try {
    m.MergeLora();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cannot be merged"));
  }
  // Virtual ids are internal: a caller's id >= vocab_size is refused.
  std::vector<int32_t> bad = {1, 256, 2};
  EXPECT_THROW(m.Forward(bad, 1, 3, nullptr, nullptr, nullptr, nullptr), Error);
}

LoraConfig Prefix(int k, bool projection = false, int hidden = 0) {
  LoraConfig l;
  l.type = PeftType::kPrefixTuning;
  l.num_virtual_tokens = k;
  l.prefix_projection = projection;
  l.prefix_hidden = hidden;
  return l;
}

// Central differences of the mean loss (computed from float32 per-token losses, summed in
// double) at a few entries of every trainable tensor; tolerance as in
// PromptTuning.GradientsMatchCentralDifferences.
void CheckAgainstCentralDifferences(Model& m) {
  const int64_t T = 6, B = 2;
  const std::vector<int32_t> tokens = Tokens(B * (T + 1), 9);
  std::vector<float> g(m.trainable_parameters().size(), 0.0f);
  m.ForwardBackward(tokens, B, T, g, 1.0f / (B * T), nullptr);
  std::vector<int32_t> in, tg;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      in.push_back(tokens[b * (T + 1) + t]);
      tg.push_back(tokens[b * (T + 1) + t + 1]);
    }
  }
  auto loss = [&] {
    std::vector<float> l(B * T);
    m.Forward(in, B, T, nullptr, tg.data(), l.data(), nullptr);
    double s = 0;
    for (float x : l) s += x;
    return s / (B * T);
  };
  std::span<float> p = m.trainable_parameters();
  const double h = 1e-2;
  double fd_max = 0;
  for (const TensorInfo& t : m.trainable_tensors()) {
    double gmax = 0;
    for (int64_t i = 0; i < t.size; ++i) gmax = std::max(gmax, std::fabs(double{g[t.offset + i]}));
    EXPECT_GT(gmax, 0.0) << t.name;
    for (int64_t i = 0; i < t.size; i += std::max<int64_t>(1, t.size / 6)) {
      const int64_t at = t.offset + i;
      const float x0 = p[at];
      p[at] = static_cast<float>(x0 + h);
      const double up = loss();
      p[at] = static_cast<float>(x0 - h);
      const double down = loss();
      p[at] = x0;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(g[at], fd, 2e-4 + 0.02 * std::fabs(fd)) << t.name << " entry " << i;
      fd_max = std::max(fd_max, std::fabs(fd));
    }
  }
  EXPECT_GT(fd_max, 2e-3);  // 10x the absolute tolerance
}

TEST(PrefixTuning, GradientsMatchCentralDifferences) {
  for (bool projection : {false, true}) {
    Model m(Tiny(), 7);
    m.AddLora(Prefix(3, projection, 8), 5);
    EXPECT_EQ(m.num_virtual_tokens(), 3);
    CheckAgainstCentralDifferences(m);
  }
}

TEST(PrefixTuning, CachedDecodingEqualsRecomputeWithThePrefixAtEntries0ToKMinus1) {
  Model m(Tiny(), 7);
  const int64_t K = 4, T = 11, prefix = 5, V = 256;
  m.AddLora(Prefix(K), 2);
  const std::vector<int32_t> tokens = Tokens(T, 6);
  KVCache cache(m.config(), K + T);
  std::vector<float> cached(T * V);
  m.ForwardCached(std::span<const int32_t>(tokens.data(), prefix), cache, cached.data(), false,
                  nullptr);
  for (int64_t t = prefix; t < T; ++t) {
    m.ForwardCached(std::span<const int32_t>(tokens.data() + t, 1), cache, cached.data() + t * V,
                    true, nullptr);
  }
  EXPECT_EQ(cache.size(), K + T);
  std::vector<float> full(T * V);
  m.Forward(tokens, 1, T, full.data(), nullptr, nullptr, nullptr);
  double max_abs = 1.0;
  for (float x : full) max_abs = std::max(max_abs, double(std::abs(x)));
  for (int64_t i = 0; i < T * V; ++i) ASSERT_NEAR(cached[i], full[i], 256 * kU * max_abs) << i;
  // The prefix changes the outputs (a check that it is used at all).
  Model base(Tiny(), 7);
  std::vector<float> plain(T * V);
  base.Forward(tokens, 1, T, plain.data(), nullptr, nullptr, nullptr);
  double diff = 0;
  for (int64_t i = 0; i < T * V; ++i) diff = std::max(diff, double(std::abs(plain[i] - full[i])));
  EXPECT_GT(diff, 1e-3);
}

TEST(PrefixTuning, ProjectionTrainsResumesBitForBitAndSavesItsOutput) {
  const std::string dir = TempDir("prefix");
  const std::string base_dir = dir + "/base", full = dir + "/full", part = dir + "/part";
  Model base(Tiny(), 7);
  SaveCheckpoint(base_dir, base);
  LoraConfig lc = Prefix(3, true, 12);
  lc.base_model = base_dir;
  const AdapterTraining training(0.05);
  const auto [before, after] = training.Run(base_dir, lc, full, -1);
  EXPECT_LT(after, before - 0.05);
  training.Run(base_dir, lc, part, 3);
  TrainingCheckpoint ck = LoadCheckpoint(part);
  ASSERT_NE(ck.model.lora_config(), nullptr);
  EXPECT_TRUE(ck.model.lora_config()->prefix_projection);
  Train(ck.model, ck.optimizer, ck.train_config, training.text, {}, nullptr);
  TrainingCheckpoint done = LoadCheckpoint(full);
  ASSERT_EQ(done.model.trainable_parameters().size(), ck.model.trainable_parameters().size());
  for (size_t i = 0; i < ck.model.trainable_parameters().size(); ++i) {
    ASSERT_EQ(done.model.trainable_parameters()[i], ck.model.trainable_parameters()[i]) << i;
  }
  // A plain PEFT directory (no encoder file): the saved table alone gives the same outputs.
  const std::string plain = dir + "/plain";
  std::filesystem::create_directories(plain);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
    std::filesystem::copy_file(full + "/" + f, plain + "/" + f);
  }
  Model loaded = LoadModel(base_dir);
  LoadLoraAdapter(loaded, plain);
  EXPECT_FALSE(loaded.lora_config()->prefix_projection);
  EXPECT_EQ(loaded.prefix_table(), done.model.prefix_table());
  const std::vector<int32_t> in = Tokens(10, 8);
  std::vector<float> a(10 * 256), b(10 * 256);
  loaded.Forward(in, 1, 10, a.data(), nullptr, nullptr, nullptr);
  done.model.Forward(in, 1, 10, b.data(), nullptr, nullptr, nullptr);
  EXPECT_EQ(a, b);
  // On a base with other KV heads: token_dim (Hkv * D) is named.
  ModelConfig other = Tiny();
  other.num_kv_heads = 4;
  Model wrong(other, 1);
  try {
    LoadLoraAdapter(wrong, plain);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("token_dim 8"));
  }
  std::filesystem::remove_all(dir);
}

TEST(PrefixTuning, BadConfigsAreClearErrors) {
  auto message = [](const ModelConfig& c, const LoraConfig& l) {
    try {
      Model m(c, 1);
      m.AddLora(l, 1);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message(Tiny(), Prefix(32)), HasSubstr("--prefix-tuning 32 (num_virtual_tokens)"));
  ModelConfig dynamic = Tiny();
  dynamic.position_encoding.rope.type = RopeType::kDynamic;
  dynamic.position_encoding.rope.factor = 2.0;
  EXPECT_THAT(message(dynamic, Prefix(2)), HasSubstr("re-rotates cached keys"));
  Model m(Tiny(), 1);
  m.AddLora(Prefix(2), 1);
  EXPECT_THROW(m.MergeLora(), Error);
  // A context shift must keep the prefix entries (they are never re-rotated or moved).
  KVCache cache(m.config(), 8);
  const std::vector<int32_t> tokens = Tokens(4, 1);
  m.ForwardCached(tokens, cache, nullptr, true, nullptr);
  EXPECT_EQ(cache.size(), 6);
  try {
    m.ContextShift(cache, 1, 2, nullptr);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("n_keep (1) must keep the adapter's 2"));
  }
  m.ContextShift(cache, 2, 2, nullptr);
  EXPECT_EQ(cache.size(), 4);
}

}  // namespace
}  // namespace ropekit
