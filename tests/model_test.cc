// Whole-model tests on tiny models generated at test time: gradients against finite
// differences for every position encoding, KV-cache decoding against a full recompute, GQA
// against MHA with replicated KV heads, training determinism across runs and thread counts,
// checkpoint round trips, corrupt-file detection, bit-exact resume and RoPE overrides.
//
// The full-model parity with an independent PyTorch implementation (logits and every gradient)
// is in tests/python/test_model_torch.py.
#include "ropekit/model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff

ModelConfig TinyConfig(PositionEncodingKind kind) {
  ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.intermediate_size = 24;
  c.max_position_embeddings = 16;
  c.init_std = 0.1;  // larger than 0.02 so that attention patterns are not uniform
  c.position_encoding = ModelConfig::DefaultPositionEncoding();
  c.position_encoding.kind = kind;
  if (kind == PositionEncodingKind::kSinusoidal || kind == PositionEncodingKind::kLearned) {
    c.position_encoding.embedding_scale = EmbeddingScale::kSqrtDim;
  }
  if (kind == PositionEncodingKind::kT5) {
    c.position_encoding.num_buckets = 8;
    c.position_encoding.max_distance = 16;
    c.position_encoding.init_std = 0.5;
  }
  if (kind == PositionEncodingKind::kLearned) c.position_encoding.init_std = 0.1;
  return c;
}

using testing::RandomTokens;

std::string TempDir(const std::string& name) {
  return testing::FreshTempPath("ropekit_model_test", name);
}

struct KindCase {
  const char* name;
  PositionEncodingKind kind;
  RopeType rope_type = RopeType::kDefault;
  Layout layout = Layout::kHalfSplit;
  int rotary_dim = 0;
};

ModelConfig CaseConfig(const KindCase& k) {
  ModelConfig c = TinyConfig(k.kind);
  RopeParams& r = c.position_encoding.rope;
  r.type = k.rope_type;
  r.rotary_dim = k.rotary_dim;
  c.position_encoding.rope_layout = k.layout;
  if (k.rope_type == RopeType::kYarn || k.rope_type == RopeType::kLinear ||
      k.rope_type == RopeType::kDynamic) {
    r.factor = 2.0;
  }
  if (k.rope_type == RopeType::kDynamic) c.max_position_embeddings = 6;  // growth inside tests
  return c;
}

const KindCase kKinds[] = {
    {"none", PositionEncodingKind::kNone},
    {"rope", PositionEncodingKind::kRope},
    {"rope_gptj_partial", PositionEncodingKind::kRope, RopeType::kDefault, Layout::kInterleaved, 2},
    {"rope_yarn", PositionEncodingKind::kRope, RopeType::kYarn},
    {"rope_dynamic", PositionEncodingKind::kRope, RopeType::kDynamic},
    {"sinusoidal", PositionEncodingKind::kSinusoidal},
    {"learned", PositionEncodingKind::kLearned},
    {"alibi", PositionEncodingKind::kAlibi},
    {"t5", PositionEncodingKind::kT5},
};

class ModelKinds : public ::testing::TestWithParam<KindCase> {};

// Directional derivative: (L(p + h u) - L(p - h u)) / 2h against g . u for random directions u.
// u has N(0, 1) entries (weights are ~0.1), h = 1e-3. The loss is computed in float32 (error
// ~ 1e-6), so the rounding part of the difference quotient is ~1e-3 and the O(h^2) truncation
// smaller; the directional derivative itself is O(1), so 2% + 1e-3 separates correct gradients
// from any missing or mis-scaled term.
TEST_P(ModelKinds, GradientMatchesFiniteDifferences) {
  Model model(CaseConfig(GetParam()), 7);
  const int64_t B = 2, T = 8;
  const auto tokens = RandomTokens(B * (T + 1), 3);
  std::vector<float> grads(model.parameters().size(), 0.0f);
  model.ForwardBackward(tokens, B, T, grads, 1.0f / (B * T), nullptr);
  std::vector<float> base(model.parameters().begin(), model.parameters().end());
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<float> u(base.size(), 0.0f);
    for (const TensorInfo& t : model.tensors()) {
      for (int64_t i = 0; i < t.size; ++i) u[t.offset + i] = normal(gen);
    }
    double gu = 0;
    for (size_t i = 0; i < u.size(); ++i) gu += double{grads[i]} * u[i];
    const double h = 1e-3;
    auto loss_at = [&](double sign) {
      auto p = model.parameters();
      for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(base[i] + sign * h * u[i]);
      return model.ForwardBackward(tokens, B, T, {}, 1.0f, nullptr);
    };
    const double fd = (loss_at(1) - loss_at(-1)) / (2 * h);
    std::copy(base.begin(), base.end(), model.parameters().begin());
    EXPECT_NEAR(fd, gu, 0.02 * std::abs(gu) + 1e-3) << "trial " << trial;
  }
}

// Prefill + one-token steps equal full forward passes over the same prefixes (for dynamic RoPE
// the table depends on the current length, so each step is compared with a recompute of its own
// prefix, as a non-cached generator would do). The cached path runs the same float32 ops on
// different matrix shapes (M = 1 instead of M = T), so results may differ by the reassociation
// of sums: logits are O(1) sums of d = 16 products of O(1) activations and weights through two
// layers; 256 u per unit of logit magnitude bounds that.
//
// Dynamic RoPE: the table changes with the length, so the hidden states of earlier tokens in
// layers >= 1 differ between a cached run (each computed once, with the table of its own step)
// and a recompute (all with the table of the final length); the cache re-rotates stored
// pre-rotation keys, which is exact for the first layer. The equality is therefore tested on a
// one-layer model for dynamic RoPE, where it must hold.
TEST_P(ModelKinds, KvCacheDecodeEqualsFullRecompute) {
  ModelConfig config = CaseConfig(GetParam());
  if (config.position_encoding.rope.type == RopeType::kDynamic) config.num_layers = 1;
  Model model(config, 5);
  const int64_t T = 13, prefill = 5;
  const auto tokens = RandomTokens(T, 4);
  const int64_t V = model.config().vocab_size;
  KVCache cache(model.config(), T);
  std::vector<float> cached(T * V);
  model.ForwardCached(std::span<const int32_t>(tokens.data(), prefill), cache, cached.data(), false,
                      nullptr);
  for (int64_t t = prefill; t < T; ++t) {
    model.ForwardCached(std::span<const int32_t>(tokens.data() + t, 1), cache,
                        cached.data() + t * V, true, nullptr);
  }
  EXPECT_EQ(cache.size(), T);
  for (int64_t t = prefill - 1; t < T; ++t) {
    const int64_t len = t + 1;
    std::vector<float> full(len * V);
    model.Forward(std::span<const int32_t>(tokens.data(), len), 1, len, full.data(), nullptr,
                  nullptr, nullptr);
    // The prefill rows are checked against the prefix of length `prefill`.
    const int64_t first = t == prefill - 1 ? 0 : t;
    double max_abs = 1.0;
    for (float x : full) max_abs = std::max(max_abs, double(std::abs(x)));
    for (int64_t r = first; r <= t; ++r) {
      for (int64_t i = 0; i < V; ++i) {
        ASSERT_NEAR(cached[r * V + i], full[r * V + i], 256 * kU * max_abs)
            << "row " << r << " of prefix " << len;
      }
    }
  }
  EXPECT_THROW(model.ForwardCached(std::span<const int32_t>(tokens.data(), 1), cache, cached.data(),
                                   true, nullptr),
               Error);  // capacity exceeded
}

// Length-dependent RoPE (dynamic NTK, LongRoPE): decoding keeps one cos/sin table while the
// length leaves the frequencies unchanged (dynamic: up to max_position_embeddings; LongRoPE: up
// to original_max_position_embeddings, then once more for the long factors), and the cached
// logits still equal a full recompute of each prefix (one layer, for the reason given above;
// same tolerance).
TEST(Model, LengthDependentRopeRebuildsTheTableOnlyWhenTheFrequenciesChange) {
  for (RopeType type : {RopeType::kDynamic, RopeType::kLongRope}) {
    ModelConfig c = TinyConfig(PositionEncodingKind::kRope);
    c.num_layers = 1;
    c.max_position_embeddings = 8;
    RopeParams& r = c.position_encoding.rope;
    r.type = type;
    if (type == RopeType::kDynamic) {
      r.factor = 2.0;
    } else {
      c.max_position_embeddings = 32;
      r.original_max_position_embeddings = 8;
      r.short_factor = {1.0, 1.5};
      r.long_factor = {2.0, 7.0};
    }
    const int64_t threshold = 8, T = 14, prefill = 3;
    Model model(c, 5);
    const int64_t V = model.config().vocab_size;
    const auto tokens = RandomTokens(T, 9);
    KVCache cache(model.config(), T);
    std::vector<float> cached(V);
    model.ForwardCached(std::span<const int32_t>(tokens.data(), prefill), cache, cached.data(),
                        true, nullptr);
    ASSERT_EQ(model.rope_table_builds(), 1);
    for (int64_t t = prefill; t < T; ++t) {
      const int64_t before = model.rope_table_builds();
      model.ForwardCached(std::span<const int32_t>(tokens.data() + t, 1), cache, cached.data(),
                          true, nullptr);
      const int64_t len = t + 1;
      int64_t want = 0;  // rebuilds in this step
      if (len > threshold) want = type == RopeType::kDynamic ? 1 : (len == threshold + 1);
      ASSERT_EQ(model.rope_table_builds() - before, want)
          << RopeTypeName(type) << " step to length " << len;
      // Against a full recompute of the prefix (another model: its own table).
      Model fresh(c, 5);
      std::vector<float> full(len * V);
      fresh.Forward(std::span<const int32_t>(tokens.data(), len), 1, len, full.data(), nullptr,
                    nullptr, nullptr);
      double max_abs = 1.0;
      for (float x : full) max_abs = std::max(max_abs, double(std::abs(x)));
      for (int64_t i = 0; i < V; ++i) {
        ASSERT_NEAR(cached[i], full[(len - 1) * V + i], 256 * kU * max_abs)
            << RopeTypeName(type) << " length " << len;
      }
    }
  }
}

// The fused attention (default) against the unfused one inside the whole model, for every
// encoding, at a length with two query / key tiles (T = 80 > kFlashQueryTile = 64). Per layer the
// two attention outputs differ by at most 2 (2T + 8) u relative (the op-level budget of
// OpsFlashAttention); the rest of the model is the same code, so logits, loss and gradients may
// differ by that budget per layer. We allow 4x for the amplification through the residual path
// and the backward: tol = 4 L (2T + 8) u max|x|.
TEST_P(ModelKinds, FusedAttentionMatchesUnfused) {
  ModelConfig c = CaseConfig(GetParam());
  if (GetParam().rope_type != RopeType::kDynamic) c.max_position_embeddings = 128;
  const int64_t B = 2, T = 80;
  const auto tokens = RandomTokens(B * (T + 1), 17);
  auto run = [&](AttentionKernel kernel, ThreadPool* pool) {
    Model model(c, 5);
    model.set_attention_kernel(kernel);
    std::vector<float> grads(model.parameters().size(), 0.0f);
    const double loss = model.ForwardBackward(tokens, B, T, grads, 1.0f / (B * T), pool);
    return std::make_pair(loss, grads);
  };
  const auto [loss_f, grads_f] = run(AttentionKernel::kFused, nullptr);
  const auto [loss_u, grads_u] = run(AttentionKernel::kUnfused, nullptr);
  const double budget = 4.0 * c.num_layers * (2 * T + 8) * kU;
  EXPECT_NEAR(loss_f, loss_u, budget * std::abs(loss_u));
  double max_abs = 0.0;
  for (float g : grads_u) max_abs = std::max<double>(max_abs, std::abs(g));
  ASSERT_GT(max_abs, 0.0);
  for (size_t i = 0; i < grads_f.size(); ++i) {
    ASSERT_NEAR(grads_f[i], grads_u[i], budget * max_abs) << "parameter " << i;
  }
  // Bitwise the same with two workers.
  ThreadPool pool(2);
  const auto [loss_2, grads_2] = run(AttentionKernel::kFused, &pool);
  EXPECT_EQ(loss_f, loss_2);
  EXPECT_EQ(grads_f, grads_2);
}

TEST_P(ModelKinds, ConfigJsonRoundTrip) {
  const ModelConfig c = CaseConfig(GetParam()).Resolved();
  const ModelConfig back = ModelConfigFromJson(ModelConfigToJson(c), "config.json");
  EXPECT_EQ(ModelConfigToJson(back), ModelConfigToJson(c));
  EXPECT_EQ(back.position_encoding.kind, c.position_encoding.kind);
  EXPECT_EQ(back.position_encoding.rope.type, c.position_encoding.rope.type);
  EXPECT_EQ(back.position_encoding.rope.rotary_dim, c.position_encoding.rope.rotary_dim);
  EXPECT_EQ(back.position_encoding.rope_layout, c.position_encoding.rope_layout);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ModelKinds, ::testing::ValuesIn(kKinds),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Model, GqaWithReplicatedKvHeadsEqualsMha) {
  ModelConfig mqa = TinyConfig(PositionEncodingKind::kRope);
  mqa.num_kv_heads = 1;
  ModelConfig mha = mqa;
  mha.num_kv_heads = mha.num_heads;
  Model a(mqa, 9), b(mha, 9);
  const int64_t D = a.config().head_dim, d = a.config().hidden_size;
  for (const TensorInfo& t : a.tensors()) {
    auto src = a.tensor(t.name);
    auto dst = b.tensor(t.name);
    if (t.name.find("k_proj") != std::string::npos || t.name.find("v_proj") != std::string::npos) {
      for (int h = 0; h < mha.num_heads; ++h) {
        std::copy(src.begin(), src.end(), dst.begin() + h * D * d);
      }
    } else {
      std::copy(src.begin(), src.end(), dst.begin());
    }
  }
  const int64_t T = 10;
  const auto tokens = RandomTokens(T, 5);
  std::vector<float> la(T * 256), lb(T * 256);
  a.Forward(tokens, 1, T, la.data(), nullptr, nullptr, nullptr);
  b.Forward(tokens, 1, T, lb.data(), nullptr, nullptr, nullptr);
  for (size_t i = 0; i < la.size(); ++i) ASSERT_NEAR(la[i], lb[i], 64 * kU) << i;
}

TEST(Model, TokenizerIsLossless) {
  ByteTokenizer tok;
  std::string text = "caf\xc3\xa9 \x01\xff\n";
  EXPECT_EQ(tok.Decode(tok.Encode(text)), text);
  EXPECT_EQ(tok.Encode("A")[0], 65);
  std::vector<int32_t> bad = {256};
  EXPECT_THROW(tok.Decode(bad), Error);
}

TEST(Model, RejectsBadConfigsAndTokens) {
  ModelConfig c = TinyConfig(PositionEncodingKind::kRope);
  c.num_kv_heads = 3;
  try {
    Model m(c, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("num_key_value_heads"));
  }
  Model m(TinyConfig(PositionEncodingKind::kRope), 1);
  std::vector<int32_t> bad = {1, 2, 300};
  EXPECT_THROW(m.Forward(bad, 1, 3, nullptr, nullptr, nullptr, nullptr), Error);
  ModelConfig learned = TinyConfig(PositionEncodingKind::kLearned);
  learned.position_encoding.max_positions = 4;
  Model ml(learned, 1);
  std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_THROW(ml.Forward(five, 1, 5, nullptr, nullptr, nullptr, nullptr), Error);
}

std::string TinyText() {
  std::string text;
  const char* words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ", "and ", "dog ", "ran "};
  uint32_t s = 1;
  for (int i = 0; i < 3000; ++i) {
    s = s * 1664525u + 1013904223u;
    text += words[(s >> 16) % 9];
  }
  return text;
}

TrainConfig TinyTrain() {
  TrainConfig t;
  t.steps = 6;
  t.batch_size = 2;
  t.seq_len = 8;
  t.grad_accum = 2;
  t.lr = 1e-2;
  t.min_lr = 1e-3;
  t.warmup_steps = 2;
  t.eval_interval = 3;
  t.eval_batches = 2;
  return t;
}

TEST(Training, LossFallsAndIsDeterministicAcrossRunsAndThreads) {
  ByteTokenizer tok;
  const auto data = tok.Encode(TinyText());
  std::span<const int32_t> train(data.data(), data.size() * 9 / 10);
  std::span<const int32_t> val(data.data() + train.size(), data.size() - train.size());
  TrainConfig tc = TinyTrain();
  tc.steps = 30;
  tc.eval_interval = 10;
  auto run = [&](ThreadPool* pool) {
    Model model(TinyConfig(PositionEncodingKind::kRope), 3);
    OptimizerState state;
    auto log = Train(model, state, tc, train, val, pool);
    return std::make_pair(log,
                          std::vector<float>(model.parameters().begin(), model.parameters().end()));
  };
  auto [log1, p1] = run(nullptr);
  auto [log1b, p1b] = run(nullptr);
  ThreadPool pool(2);
  auto [log2, p2] = run(&pool);
  ASSERT_EQ(log1.size(), 30u);
  EXPECT_LT(log1.back().loss, log1.front().loss - 1.0);  // from ~ln 256 = 5.5 downwards
  EXPECT_GE(log1.back().val_loss, 0.0);
  EXPECT_LT(log1.back().val_loss, log1[9].val_loss);
  for (size_t i = 0; i < log1.size(); ++i) {
    EXPECT_EQ(log1[i].loss, log1b[i].loss);
    EXPECT_EQ(log1[i].loss, log2[i].loss);
    EXPECT_EQ(log1[i].grad_norm, log2[i].grad_norm);
    EXPECT_EQ(log1[i].val_loss, log2[i].val_loss);
  }
  EXPECT_EQ(p1, p1b);
  EXPECT_EQ(p1, p2);
}

TEST(Training, LearningRateSchedule) {
  TrainConfig c;
  c.steps = 100;
  c.warmup_steps = 10;
  c.lr = 1.0;
  c.min_lr = 0.1;
  EXPECT_DOUBLE_EQ(LearningRate(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(c, 9), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(c, 10), 1.0);
  EXPECT_NEAR(LearningRate(c, 99), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(c, 10 + 89 / 2.0), 0.55, 0.02);
  c.schedule = LrSchedule::kConstant;
  EXPECT_DOUBLE_EQ(LearningRate(c, 50), 1.0);
}

TEST(Checkpoint, RoundTripAndOverride) {
  const std::string dir = TempDir("roundtrip");
  ModelConfig c = TinyConfig(PositionEncodingKind::kRope);
  c.tie_word_embeddings = false;
  Model model(c, 21);
  SaveCheckpoint(dir, model);
  Model back = LoadModel(dir);
  EXPECT_EQ(ModelConfigToJson(back.config()), ModelConfigToJson(model.config()));
  ASSERT_EQ(back.parameters().size(), model.parameters().size());
  EXPECT_TRUE(
      std::equal(back.parameters().begin(), back.parameters().end(), model.parameters().begin()));
  // Load-time RoPE override: YaRN factor 4 for 4x the trained context.
  RopeParams yarn;
  yarn.type = RopeType::kYarn;
  yarn.factor = 4.0;
  yarn.original_max_position_embeddings = 16;
  Model ext = LoadModel(dir, LoadOptions{yarn});
  EXPECT_EQ(ext.config().position_encoding.rope.type, RopeType::kYarn);
  EXPECT_EQ(ext.config().position_encoding.rope.head_dim, 4);
  const auto tokens = RandomTokens(64, 8);
  std::vector<float> la(64 * 256), lb(64 * 256);
  back.Forward(tokens, 1, 64, la.data(), nullptr, nullptr, nullptr);
  ext.Forward(tokens, 1, 64, lb.data(), nullptr, nullptr, nullptr);
  EXPECT_NE(la, lb);  // the scaling changes the rotation
  // A non-RoPE model rejects a RoPE override.
  Model alibi(TinyConfig(PositionEncodingKind::kAlibi), 1);
  EXPECT_THROW(alibi.SetRopeParams(yarn), Error);
  std::filesystem::remove_all(dir);
}

TEST(Checkpoint, DetectsTruncatedAndCorruptFiles) {
  const std::string dir = TempDir("corrupt");
  Model model(TinyConfig(PositionEncodingKind::kT5), 2);
  SaveCheckpoint(dir, model);
  // The file itself (dir/model.safetensors links to it through the commit link `current`).
  const std::string weights = std::filesystem::canonical(dir + "/model.safetensors").string();
  std::vector<char> bytes;
  {
    std::ifstream in(weights, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](const std::vector<char>& b) {
    std::ofstream out(weights, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };
  auto expect_error = [&](const std::string& part) {
    try {
      LoadModel(dir);
      ADD_FAILURE() << "no error for " << part;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("model.safetensors"));
      EXPECT_THAT(e.what(), HasSubstr(part));
    }
  };
  write(std::vector<char>(bytes.begin(), bytes.end() - 100));
  expect_error("truncated");
  write(std::vector<char>(bytes.begin(), bytes.begin() + 5));
  expect_error("8-byte");
  auto flipped = bytes;
  flipped[flipped.size() - 7] ^= 0x40;
  write(flipped);
  expect_error("checksum");
  auto bad_header = bytes;
  bad_header[8] = '#';  // the header's opening brace
  write(bad_header);
  expect_error("JSON");
  std::filesystem::remove(weights);
  expect_error("not found");
  {
    std::ofstream out(dir + "/config.json", std::ios::trunc);
    out << "{\"hidden_size\": 16";
  }
  try {
    LoadModel(dir);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("config.json"));
  }
  std::filesystem::remove_all(dir);
}

TEST(Checkpoint, ResumeReproducesTheUninterruptedRunBitForBit) {
  ByteTokenizer tok;
  const auto data = tok.Encode(TinyText());
  std::span<const int32_t> train(data.data(), data.size() * 9 / 10);
  std::span<const int32_t> val(data.data() + train.size(), data.size() - train.size());
  const TrainConfig tc = TinyTrain();
  Model full(TinyConfig(PositionEncodingKind::kT5), 4);
  OptimizerState full_state;
  const auto full_log = Train(full, full_state, tc, train, val, nullptr);

  const std::string dir = TempDir("resume");
  TrainConfig interrupted = tc;
  interrupted.checkpoint_dir = dir;
  interrupted.checkpoint_interval = 3;
  Model first(TinyConfig(PositionEncodingKind::kT5), 4);
  OptimizerState first_state;
  struct Stop {};
  try {
    Train(first, first_state, interrupted, train, val, nullptr, [](const TrainLogEntry& e) {
      if (e.step == 3) throw Stop{};
    });
  } catch (const Stop&) {
  }
  Model resumed = LoadModel(dir);
  OptimizerState state = LoadOptimizerState(dir, resumed);
  EXPECT_EQ(state.step, 3);
  const TrainConfig saved = LoadTrainConfig(dir);
  EXPECT_EQ(TrainConfigToJson(saved), TrainConfigToJson(interrupted));
  const auto rest = Train(resumed, state, tc, train, val, nullptr);
  ASSERT_EQ(rest.size(), 3u);
  for (size_t i = 0; i < rest.size(); ++i) {
    EXPECT_EQ(rest[i].step, full_log[3 + i].step);
    EXPECT_EQ(rest[i].loss, full_log[3 + i].loss);
    EXPECT_EQ(rest[i].val_loss, full_log[3 + i].val_loss);
  }
  EXPECT_TRUE(std::equal(resumed.parameters().begin(), resumed.parameters().end(),
                         full.parameters().begin()));
  std::filesystem::remove_all(dir);
}

TEST(Evaluation, TailProtocolScoresTheSameTargetsAtEveryLength) {
  Model model(TinyConfig(PositionEncodingKind::kAlibi), 6);
  const auto tokens = RandomTokens(400, 9);
  EvalOptions o;
  o.contexts = {16, 32, 64};
  o.num_tail_windows = 4;
  o.tail = 8;
  o.max_windows = 3;
  o.bucket_size = 16;
  const auto results = Evaluate(model, tokens, o, nullptr);
  ASSERT_EQ(results.size(), 3u);
  for (const EvalResult& r : results) {
    EXPECT_EQ(r.windows, 3);
    EXPECT_EQ(static_cast<int64_t>(r.position_loss.size()), r.context / 16);
    EXPECT_NEAR(r.perplexity, std::exp(r.mean_loss), 1e-9 * r.perplexity);
    EXPECT_GT(r.tail_loss, 0.0);
  }
  // Independent check of one tail value: score the windows by hand.
  const int64_t c = 32, cmax = 64, n = 400;
  double sum = 0;
  for (int k = 0; k < 4; ++k) {
    const int64_t e = (cmax + 1) + (n - cmax - 1) * k / 3;
    std::vector<int32_t> in(tokens.begin() + e - c - 1, tokens.begin() + e - 1);
    std::vector<int32_t> tg(tokens.begin() + e - c, tokens.begin() + e);
    std::vector<float> losses(c);
    model.Forward(in, 1, c, nullptr, tg.data(), losses.data(), nullptr);
    for (int64_t t = c - 8; t < c; ++t) sum += losses[t];
  }
  EXPECT_NEAR(results[1].tail_loss, sum / 32, 1e-5);
  o.contexts = {500};
  EXPECT_THROW(Evaluate(model, tokens, o, nullptr), Error);
}

TEST(Generation, GreedyIsArgmaxAndSamplingIsSeeded) {
  Model model(TinyConfig(PositionEncodingKind::kRope), 12);
  const std::vector<int32_t> prompt = {72, 101, 108};
  SamplerConfig greedy;
  const auto g1 = Generate(model, prompt, 6, greedy, nullptr);
  ASSERT_EQ(g1.size(), 6u);
  // Greedy against argmax of full forwards.
  std::vector<int32_t> seq = prompt;
  for (int i = 0; i < 6; ++i) {
    std::vector<float> logits(seq.size() * 256);
    model.Forward(seq, 1, static_cast<int64_t>(seq.size()), logits.data(), nullptr, nullptr,
                  nullptr);
    const float* last = logits.data() + (seq.size() - 1) * 256;
    const int32_t best = static_cast<int32_t>(std::max_element(last, last + 256) - last);
    EXPECT_EQ(g1[i], best) << i;
    seq.push_back(g1[i]);
  }
  SamplerConfig top1;
  top1.temperature = 1.0;
  top1.top_k = 1;
  EXPECT_EQ(Generate(model, prompt, 6, top1, nullptr), g1);
  SamplerConfig hot;
  hot.temperature = 1.5;
  hot.top_p = 0.9;
  hot.seed = 5;
  ThreadPool pool(2);
  EXPECT_EQ(Generate(model, prompt, 8, hot, nullptr), Generate(model, prompt, 8, hot, &pool));
  SamplerConfig bad;
  bad.top_p = 0.0;
  EXPECT_THROW(Sampler{bad}, Error);
}

}  // namespace
}  // namespace ropekit

namespace ropekit {
namespace {

// Mixed precision: every matmul operand is rounded to bfloat16 (relative error <= 2^-9 each).
// A logit passes through ~4 rounded operands per layer plus the head, i.e. ~10 roundings of
// 2^-9 (relative to the activations' scale) on a 2-layer model: 10 * 2^-9 ~ 0.02 of the largest
// logit bounds the difference to float32, while it must not be zero (the rounding is applied).
// Runs on the AVX512-BF16 kernel where the CPU has it and on the float32 fallback
// (ROPEKIT_BF16_MATMUL=off); the two share that bound against float32, so they differ by at most
// twice it.
std::vector<float> CheckBf16Model() {
  Model model(TinyConfig(PositionEncodingKind::kRope), 13);
  const int64_t T = 12;
  const auto tokens = RandomTokens(T, 14);
  std::vector<float> f32(T * 256), bf16(T * 256);
  model.Forward(tokens, 1, T, f32.data(), nullptr, nullptr, nullptr);
  model.set_matmul_precision(MatmulPrecision::kBf16);
  model.Forward(tokens, 1, T, bf16.data(), nullptr, nullptr, nullptr);
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < f32.size(); ++i) {
    max_abs = std::max(max_abs, double(std::abs(f32[i])));
    max_diff = std::max(max_diff, double(std::abs(f32[i] - bf16[i])));
  }
  EXPECT_GT(max_diff, 0.0);
  EXPECT_LE(max_diff, 10.0 / 512 * max_abs);
  // The KV-cache path uses the same rounding.
  KVCache cache(model.config(), T);
  std::vector<float> cached(T * 256);
  model.ForwardCached(tokens, cache, cached.data(), false, nullptr);
  for (size_t i = 0; i < cached.size(); ++i) EXPECT_NEAR(cached[i], bf16[i], 256 * kU * max_abs);

  ByteTokenizer tok;
  const auto data = tok.Encode(TinyText());
  std::span<const int32_t> train(data.data(), data.size());
  TrainConfig tc = TinyTrain();
  tc.steps = 20;
  tc.bf16 = true;
  auto run = [&](ThreadPool* pool) {
    Model m(TinyConfig(PositionEncodingKind::kAlibi), 3);
    OptimizerState state;
    return Train(m, state, tc, train, {}, pool);
  };
  ThreadPool pool(2);
  const auto a = run(nullptr), b = run(&pool);
  EXPECT_LT(a.back().loss, a.front().loss - 0.5);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].loss, b[i].loss);
  bf16.push_back(static_cast<float>(max_abs));
  return bf16;
}

TEST(MixedPrecision, Bf16StaysCloseToF32AndTrainsDeterministically) {
  const std::vector<float> kernel = CheckBf16Model();
  ASSERT_EQ(setenv("ROPEKIT_BF16_MATMUL", "off", 1), 0);
  const std::vector<float> fallback = CheckBf16Model();
  ASSERT_EQ(unsetenv("ROPEKIT_BF16_MATMUL"), 0);
  const double max_abs = kernel.back();
  for (size_t i = 0; i + 1 < kernel.size(); ++i) {
    ASSERT_NEAR(kernel[i], fallback[i], 2 * 10.0 / 512 * max_abs) << i;
  }
}

}  // namespace
}  // namespace ropekit
