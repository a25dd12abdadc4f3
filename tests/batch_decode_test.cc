// Batched decoding for the server: the row-independent matrix product (ops::MatMulRowwise)
// against a double-precision reference and its bitwise row independence; BatchDecoder against
// the single-sequence KV-cache forward for every position encoding, and bitwise equality of a
// sequence's logits alone and inside batches of any size, order and thread count.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ropekit/model.h"
#include "src/ops/rowwise_matmul.h"

namespace ropekit {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

bool SameBits(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

TEST(MatMulRowwise, MatchesDoubleReferenceWithinTheSummationBound) {
  ThreadPool pool(2);
  const int64_t L = ops::MatMulRowwiseLanes();
  for (const auto& [m, k, n] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1},
                                {7, 37, 13},
                                {33, 128, 352},
                                {5, 352, 128},
                                {4, 16, 256}}) {
    for (bool accumulate : {false, true}) {
      const auto x = RandomFloats(m * k, 1), w = RandomFloats(n * k, 2),
                 y0 = RandomFloats(m * n, 3);
      std::vector<float> y = y0;
      ops::MatMulRowwise(x.data(), w.data(), y.data(), m, k, n, &pool, accumulate);
      // Higham (2002) eq. 3.5 for L partial sums of ceil(K/L) terms each, then a reduction of
      // depth <= log2(L) + 1 (any order): |err| <= gamma_j * sum |x w|, j = ceil(K/L) + L; the
      // accumulate adds one rounding of |y0 + s|, and the final store one more u |y|.
      const double j = static_cast<double>((k + L - 1) / L + L + 2);
      const double gamma = j * kU / (1.0 - j * kU);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < n; ++c) {
          double exact = accumulate ? y0[r * n + c] : 0.0, mag = std::abs(exact);
          for (int64_t i = 0; i < k; ++i) {
            exact += double{x[r * k + i]} * w[c * k + i];
            mag += std::abs(double{x[r * k + i]} * w[c * k + i]);
          }
          ASSERT_NEAR(y[r * n + c], exact, gamma * mag) << m << "x" << k << "x" << n;
        }
      }
    }
  }
}

TEST(MatMulRowwise, EveryRowIsBitwiseIndependentOfTheOthers) {
  const int64_t m = 37, k = 352, n = 131;
  const auto x = RandomFloats(m * k, 4), w = RandomFloats(n * k, 5);
  std::vector<float> all(m * n);
  ThreadPool pool(2);
  ops::MatMulRowwise(x.data(), w.data(), all.data(), m, k, n, &pool);
  // Each row alone, single-threaded.
  for (int64_t r = 0; r < m; ++r) {
    std::vector<float> one(n);
    ops::MatMulRowwise(x.data() + r * k, w.data(), one.data(), 1, k, n, nullptr);
    ASSERT_TRUE(SameBits(one.data(), all.data() + r * n, n)) << "row " << r;
  }
  // Rows in a different order and a different batch: reversed, in groups of 3.
  for (int64_t r0 = 0; r0 < m; r0 += 3) {
    const int64_t rows = std::min<int64_t>(3, m - r0);
    std::vector<float> xs, ys(rows * n);
    for (int64_t i = rows - 1; i >= 0; --i) {
      xs.insert(xs.end(), x.begin() + (r0 + i) * k, x.begin() + (r0 + i + 1) * k);
    }
    ops::MatMulRowwise(xs.data(), w.data(), ys.data(), rows, k, n, &pool);
    for (int64_t i = 0; i < rows; ++i) {
      ASSERT_TRUE(SameBits(ys.data() + (rows - 1 - i) * n, all.data() + (r0 + i) * n, n));
    }
  }
}

// Several outputs in one call (q | k | v in one row): each column range bitwise equal to its own
// MatMulRowwise, with or without a pool; the columns between outputs are left alone.
TEST(MatMulRowwise, MultiEqualsSeparateProductsBitwise) {
  const int64_t m = 19, k = 40, n0 = 70, n1 = 13, n2 = 64, ldy = n0 + n1 + n2 + 3;
  const auto x = RandomFloats(m * k, 6), w0 = RandomFloats(n0 * k, 7), w1 = RandomFloats(n1 * k, 8),
             w2 = RandomFloats(n2 * k, 9);
  ThreadPool pool(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    std::vector<float> y(m * ldy, -7.0f);
    const ops::RowwiseOutput outs[] = {{w0.data(), n0, y.data()},
                                       {w1.data(), n1, y.data() + n0},
                                       {w2.data(), n2, y.data() + n0 + n1}};
    ops::MatMulRowwiseMulti(x.data(), outs, m, k, ldy, p);
    int64_t col = 0;
    for (const auto& [w, n] : {std::pair{&w0, n0}, {&w1, n1}, {&w2, n2}}) {
      std::vector<float> ref(m * n);
      ops::MatMulRowwise(x.data(), w->data(), ref.data(), m, k, n, nullptr);
      for (int64_t r = 0; r < m; ++r) {
        ASSERT_TRUE(SameBits(ref.data() + r * n, y.data() + r * ldy + col, n)) << r;
      }
      col += n;
    }
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = col; c < ldy; ++c) ASSERT_EQ(y[r * ldy + c], -7.0f);
    }
  }
  std::vector<float> y(m * ldy);
  const ops::RowwiseOutput wide[] = {{w0.data(), n0, y.data()}};
  EXPECT_THROW(ops::MatMulRowwiseMulti(x.data(), wide, m, k, n0 - 1, nullptr), Error);
}

ModelConfig DecodeConfig(PositionEncodingKind kind, RopeType type = RopeType::kDefault,
                         Layout layout = Layout::kHalfSplit, int rotary_dim = 0) {
  ModelConfig c;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.intermediate_size = 40;
  c.max_position_embeddings = 32;
  c.init_std = 0.1;
  c.position_encoding.kind = kind;
  c.position_encoding.rope.type = type;
  c.position_encoding.rope.rotary_dim = rotary_dim;
  c.position_encoding.rope_layout = layout;
  if (type == RopeType::kYarn) c.position_encoding.rope.factor = 2.0;
  if (kind == PositionEncodingKind::kT5) {
    c.position_encoding.num_buckets = 8;
    c.position_encoding.max_distance = 16;
    c.position_encoding.init_std = 0.5;
  }
  if (kind == PositionEncodingKind::kLearned) c.position_encoding.init_std = 0.1;
  return c;
}

struct DecodeCase {
  const char* name;
  ModelConfig config;
};

class BatchDecode : public ::testing::TestWithParam<DecodeCase> {};

// Sequence s: a prompt of 2 + 3s tokens, then 6 decoded tokens (fixed ids).
std::vector<int32_t> SequenceTokens(int s) {
  std::mt19937 gen(100 + s);
  std::uniform_int_distribution<int> dist(0, 255);
  std::vector<int32_t> t(2 + 3 * s + 6);
  for (auto& x : t) x = dist(gen);
  return t;
}

// Decodes sequences `which` together for 6 steps; returns their logits [step][index][V].
std::vector<std::vector<float>> DecodeTogether(Model& model, const std::vector<int>& which,
                                               ThreadPool* pool) {
  const int64_t V = model.config().vocab_size;
  std::vector<std::unique_ptr<KVCache>> caches;
  std::vector<std::vector<int32_t>> tokens;
  for (int s : which) {
    tokens.push_back(SequenceTokens(s));
    caches.push_back(std::make_unique<KVCache>(model.config(), 32));
    const int64_t prompt = static_cast<int64_t>(tokens.back().size()) - 6;
    model.ForwardCached(std::span<const int32_t>(tokens.back().data(), prompt), *caches.back(),
                        nullptr, true, pool);
  }
  BatchDecoder decoder(model);
  std::vector<std::vector<float>> out;
  for (int step = 0; step < 6; ++step) {
    std::vector<KVCache*> cs;
    std::vector<int32_t> ids;
    for (size_t i = 0; i < which.size(); ++i) {
      cs.push_back(caches[i].get());
      ids.push_back(tokens[i][tokens[i].size() - 6 + step]);
    }
    out.emplace_back(which.size() * V);
    decoder.Step(cs, ids, out.back().data(), pool);
  }
  return out;
}

TEST_P(BatchDecode, EqualsTheSingleSequenceCachedForward) {
  Model model(GetParam().config, 3);
  const int64_t V = model.config().vocab_size;
  const std::vector<int> which = {0, 1, 2, 3};
  const auto batched = DecodeTogether(model, which, nullptr);
  for (size_t i = 0; i < which.size(); ++i) {
    const auto tokens = SequenceTokens(which[i]);
    const int64_t prompt = static_cast<int64_t>(tokens.size()) - 6;
    KVCache cache(model.config(), 32);
    model.ForwardCached(std::span<const int32_t>(tokens.data(), prompt), cache, nullptr, true,
                        nullptr);
    for (int step = 0; step < 6; ++step) {
      std::vector<float> ref(V);
      model.ForwardCached(std::span<const int32_t>(tokens.data() + prompt + step, 1), cache,
                          ref.data(), true, nullptr);
      // The two paths differ only in the summation order of each dot product (sgemm vs the
      // row-wise kernel): as in the cache-vs-recompute test of model_test.cc, the difference of
      // two O(K u)-accurate float32 evaluations through two layers stays below 256 u |logits|.
      double max_abs = 1.0;
      for (float x : ref) max_abs = std::max(max_abs, double(std::abs(x)));
      for (int64_t v = 0; v < V; ++v) {
        ASSERT_NEAR(batched[step][i * V + v], ref[v], 256 * kU * max_abs)
            << "sequence " << i << " step " << step;
      }
    }
  }
}

TEST_P(BatchDecode, SequenceLogitsAreBitwiseTheSameAloneOrInAnyBatch) {
  Model model(GetParam().config, 3);
  const int64_t V = model.config().vocab_size;
  ThreadPool pool(2), pool3(3);
  const auto alone = DecodeTogether(model, {2}, nullptr);
  // B = 1 < 2 threads: the ops of the one sequence use the pool. B >= threads: each thread
  // decodes a contiguous share of the sequences (5 over 3 threads: shares of 1, 2 and 2).
  const auto alone_pooled = DecodeTogether(model, {2}, &pool);
  const auto batch = DecodeTogether(model, {5, 2, 0, 7, 1}, &pool);
  const auto batch3 = DecodeTogether(model, {5, 0, 7, 2, 1}, &pool3);
  const auto reversed = DecodeTogether(model, {1, 7, 0, 2, 5, 3, 4, 6}, &pool);
  for (int step = 0; step < 6; ++step) {
    ASSERT_TRUE(SameBits(alone[step].data(), alone_pooled[step].data(), V)) << step;
    ASSERT_TRUE(SameBits(alone[step].data(), batch[step].data() + 1 * V, V)) << step;
    ASSERT_TRUE(SameBits(alone[step].data(), batch3[step].data() + 3 * V, V)) << step;
    ASSERT_TRUE(SameBits(alone[step].data(), reversed[step].data() + 3 * V, V)) << step;
  }
}

const DecodeCase kDecodeCases[] = {
    {"none", DecodeConfig(PositionEncodingKind::kNone)},
    {"rope", DecodeConfig(PositionEncodingKind::kRope)},
    {"rope_gptj_partial",
     DecodeConfig(PositionEncodingKind::kRope, RopeType::kDefault, Layout::kInterleaved, 4)},
    {"rope_yarn", DecodeConfig(PositionEncodingKind::kRope, RopeType::kYarn)},
    {"sinusoidal", DecodeConfig(PositionEncodingKind::kSinusoidal)},
    {"learned", DecodeConfig(PositionEncodingKind::kLearned)},
    {"alibi", DecodeConfig(PositionEncodingKind::kAlibi)},
    {"t5", DecodeConfig(PositionEncodingKind::kT5)},
};

INSTANTIATE_TEST_SUITE_P(Kinds, BatchDecode, ::testing::ValuesIn(kDecodeCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(BatchDecodeErrors, RefusesLengthDependentRopeAndBadArguments) {
  ModelConfig dyn = DecodeConfig(PositionEncodingKind::kRope, RopeType::kDynamic);
  dyn.position_encoding.rope.factor = 2.0;
  Model dynamic_model(dyn, 1);
  EXPECT_THROW(BatchDecoder{dynamic_model}, Error);

  Model model(DecodeConfig(PositionEncodingKind::kRope), 1);
  BatchDecoder decoder(model);
  KVCache empty(model.config(), 4);
  std::vector<float> logits(256);
  KVCache* caches[] = {&empty};
  const int32_t token = 1;
  EXPECT_THROW(decoder.Step(caches, std::span<const int32_t>(&token, 1), logits.data(), nullptr),
               Error);  // nothing prefilled
  const int32_t prompt[] = {1, 2, 3, 4};
  model.ForwardCached(prompt, empty, nullptr, true, nullptr);
  EXPECT_THROW(decoder.Step(caches, std::span<const int32_t>(&token, 1), logits.data(), nullptr),
               Error);  // full
  KVCache ok(model.config(), 8);
  model.ForwardCached(prompt, ok, nullptr, true, nullptr);
  KVCache* good[] = {&ok};
  const int32_t bad = 256;
  EXPECT_THROW(decoder.Step(good, std::span<const int32_t>(&bad, 1), logits.data(), nullptr),
               Error);
}

}  // namespace
}  // namespace ropekit
