// Tests of the non-RoPE position encodings: published values (ALiBi slopes, T5 buckets, the
// sinusoidal example), math properties (relative-only biases, the sinusoid's block rotation),
// the learned table's range handling, and every backward against finite differences.
//
// Oracles are independent of the code under test: closed forms evaluated in long double (80-bit
// on x86-64), the values published with the papers, and finite differences.
#include "ropekit/position_encoding.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace ropekit {
namespace {

using ::testing::HasSubstr;

constexpr double kF32Eps = 1.0 / (1 << 23);  // float32 machine epsilon, 2^-23

// Expects `fn` to throw Error whose message contains every string of `parts`.
template <typename Fn>
void ExpectError(Fn&& fn, std::vector<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no Error thrown; expected a message with '" << parts[0] << "'";
  } catch (const Error& e) {
    for (const auto& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
  }
}

PositionEncoding MakeAlibi(int heads) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kAlibi;
  spec.num_heads = heads;
  return PositionEncoding(spec);
}

// ----------------------------------------------------------------------------------------------
// Names and sites.

TEST(PositionEncodingKindTest, NamesRoundTripAndNopeAlias) {
  for (int k = 0; k < static_cast<int>(PositionEncodingKind::kSentinel); ++k) {
    const auto kind = static_cast<PositionEncodingKind>(k);
    EXPECT_EQ(ParsePositionEncodingKind(PositionEncodingKindName(kind)), kind);
  }
  EXPECT_EQ(ParsePositionEncodingKind("nope"), PositionEncodingKind::kNone);
  EXPECT_EQ(ParsePositionEncodingKind("none"), PositionEncodingKind::kNone);
  EXPECT_EQ(ParsePositionEncodingKind("alibi"), PositionEncodingKind::kAlibi);
  ExpectError([] { ParsePositionEncodingKind("Alibi"); }, {"'Alibi'", "alibi", "t5"});
  ExpectError([] { ParsePositionEncodingKind(""); }, {"accepted"});
  EXPECT_EQ(ParseEmbeddingScale("sqrt_d"), EmbeddingScale::kSqrtDim);
  ExpectError([] { ParseEmbeddingScale("sqrt"); }, {"embedding_scale", "'sqrt'"});
  EXPECT_EQ(ParseOutOfRange("clamp"), OutOfRange::kClamp);
  ExpectError([] { ParseOutOfRange("wrap"); }, {"out_of_range", "'wrap'"});
}

TEST(PositionEncodingKindTest, EachKindActsAtExactlyOneSite) {
  using K = PositionEncodingKind;
  struct Row {
    K kind;
    bool embeddings, query_key, logits;
  };
  const Row rows[] = {{K::kNone, false, false, false},      {K::kRope, false, true, false},
                      {K::kSinusoidal, true, false, false}, {K::kLearned, true, false, false},
                      {K::kAlibi, false, false, true},      {K::kT5, false, false, true}};
  for (const Row& row : rows) {
    EXPECT_EQ(ActsOnEmbeddings(row.kind), row.embeddings) << PositionEncodingKindName(row.kind);
    EXPECT_EQ(ActsOnQueryKey(row.kind), row.query_key) << PositionEncodingKindName(row.kind);
    EXPECT_EQ(ActsOnLogits(row.kind), row.logits) << PositionEncodingKindName(row.kind);
  }
}

TEST(PositionEncodingSpecTest, ValidateNamesTheField) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kSinusoidal;
  ExpectError([&] { spec.Validate(); }, {"dim", "sinusoidal"});
  spec.dim = 8;
  spec.sinusoidal_base = 1.0;
  ExpectError([&] { spec.Validate(); }, {"sinusoidal_base", "> 1"});
  spec.sinusoidal_base = std::numeric_limits<double>::quiet_NaN();
  ExpectError([&] { spec.Validate(); }, {"sinusoidal_base"});
  spec.sinusoidal_base = 10000.0;
  spec.Validate();

  spec.kind = PositionEncodingKind::kLearned;
  ExpectError([&] { spec.Validate(); }, {"max_positions", "learned"});
  spec.max_positions = 16;
  spec.init_std = -1.0;
  ExpectError([&] { spec.Validate(); }, {"init_std"});
  spec.init_std = 0.02;
  spec.Validate();

  spec.kind = PositionEncodingKind::kAlibi;
  ExpectError([&] { spec.Validate(); }, {"num_heads", "alibi"});
  spec.num_heads = 4;
  spec.Validate();
  spec.embedding_scale = EmbeddingScale::kSqrtDim;
  ExpectError([&] { spec.Validate(); }, {"embedding_scale", "alibi"});
  spec.embedding_scale = EmbeddingScale::kNone;

  spec.kind = PositionEncodingKind::kT5;
  spec.num_buckets = 1;
  ExpectError([&] { spec.Validate(); }, {"num_buckets", "1"});
  spec.num_buckets = 32;
  spec.max_distance = 16;  // equal to the 16 exact buckets: log(1) = 0 would divide by zero
  ExpectError([&] { spec.Validate(); }, {"max_distance", "16"});
  spec.bidirectional = true;  // 8 exact buckets per direction: 16 is now fine
  spec.Validate();
  spec.num_buckets = 3;
  ExpectError([&] { spec.Validate(); }, {"num_buckets", "bidirectional"});

  spec = PositionEncodingSpec{};
  spec.kind = PositionEncodingKind::kNone;
  spec.Validate();
  spec.kind = PositionEncodingKind::kRope;  // RoPE's own parameters are validated too
  ExpectError([&] { spec.Validate(); }, {"head_dim"});
  spec.rope.head_dim = 32;
  spec.rope.rotary_dim = 32;
  spec.Validate();
  spec.kind = PositionEncodingKind::kSentinel;
  ExpectError([&] { spec.Validate(); }, {"kind"});
}

TEST(PositionEncodingTest, NoneAndRopeHooksDoNothing) {
  for (auto kind : {PositionEncodingKind::kNone, PositionEncodingKind::kRope}) {
    PositionEncodingSpec spec;
    spec.kind = kind;
    spec.rope.head_dim = 8;
    spec.rope.rotary_dim = 8;
    const PositionEncoding pe(spec);
    EXPECT_EQ(pe.num_parameters(), 0);
    std::vector<float> x = {1.5f, -2.0f, 3.25f, 0.5f};
    const std::vector<float> before = x;
    const std::vector<int64_t> positions = {7, 1048573};
    pe.AddToEmbeddings(positions, {}, x.data(), 2);
    pe.AddToEmbeddingsBackward(positions, x.data(), 2, {});
    pe.AddLogitBias(1048573, positions, 0, {}, x.data());
    pe.AddLogitBiasBackward(1048573, positions, 0, x.data(), {});
    EXPECT_EQ(x, before);
  }
}

TEST(PositionEncodingTest, RopeFrequenciesComeFromTheSpec) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kRope;
  spec.rope.head_dim = 16;
  spec.rope.rotary_dim = 8;
  spec.rope.base = 500000.0;
  const PositionEncoding pe(spec);
  EXPECT_TRUE(pe.acts_on_query_key());
  const RopeFrequencies freq = pe.RopeFrequenciesFor(100);
  ASSERT_EQ(freq.inv_freq.size(), 4u);
  EXPECT_EQ(freq.rotary_dim, 8);
  for (int i = 0; i < 4; ++i) {
    // w_i = base^(-2i/R) (RoFormer), in long double; kExact keeps double precision.
    const long double w = std::pow(500000.0L, -2.0L * i / 8);
    EXPECT_NEAR(freq.inv_freq[i], static_cast<double>(w), 4e-16 * static_cast<double>(w)) << i;
  }
  ExpectError([] { MakeAlibi(2).RopeFrequenciesFor(); }, {"alibi", "not rope"});
}

// ----------------------------------------------------------------------------------------------
// ALiBi.

// Relative error bound of the reference's s * s^h in double: s = 2^(-8/P) carries a relative
// rounding error <= u = 2^-53, which s^h multiplies by h, plus one rounding each for pow and the
// product: (h + 3) u. (The reference code itself gives 0.5000000000000001 for H = 16, h = 1.)
double SlopeTolerance(int h, double value) { return (h + 3) * std::ldexp(1.0, -53) * value; }

// Published slopes (Press et al. 2022, arXiv:2108.12409, reference get_slopes). Values given
// to 6 significant digits are compared at 5e-6 relative, the powers of two at SlopeTolerance.
TEST(AlibiTest, PublishedSlopes) {
  const std::vector<std::pair<int, std::vector<double>>> published = {
      {1, {0.00390625}},
      {2, {0.0625, 0.00390625}},
      {4, {0.25, 0.0625, 0.015625, 0.00390625}},
      {6, {0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125}},
      {8, {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625}},
      {12,
       {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.707107, 0.353553,
        0.176777, 0.0883883}},
      {16,
       {0.707107, 0.5, 0.353553, 0.25, 0.176777, 0.125, 0.0883883, 0.0625, 0.0441942, 0.03125,
        0.0220971, 0.015625, 0.0110485, 0.0078125, 0.00552427, 0.00390625}},
  };
  for (const auto& [heads, expected] : published) {
    const std::vector<double> slopes = AlibiSlopes(heads);
    ASSERT_EQ(slopes.size(), expected.size()) << heads;
    for (size_t h = 0; h < expected.size(); ++h) {
      const bool power_of_two = std::exp2(std::round(std::log2(expected[h]))) == expected[h];
      if (power_of_two) {
        EXPECT_NEAR(slopes[h], expected[h], SlopeTolerance(static_cast<int>(h), expected[h]))
            << "H=" << heads << " h=" << h;
      } else {
        EXPECT_NEAR(slopes[h], expected[h], 5e-6 * expected[h]) << "H=" << heads << " h=" << h;
      }
    }
  }
}

// The rule for every head count 1..16 (and a few larger): with P the largest power of two <= H,
// head h < P gets 2^(-8(h+1)/P); head P + k gets 2^(-8(2k+1)/(2P)) (closed forms in long double).
TEST(AlibiTest, SlopeRuleForAnyHeadCount) {
  std::vector<int> counts(16);
  std::iota(counts.begin(), counts.end(), 1);
  for (int extra : {20, 24, 32, 40, 96, 100}) counts.push_back(extra);
  for (int heads : counts) {
    int p = 1;
    while (p * 2 <= heads) p *= 2;
    const std::vector<double> slopes = AlibiSlopes(heads);
    ASSERT_EQ(static_cast<int>(slopes.size()), heads);
    for (int h = 0; h < heads; ++h) {
      const long double exponent =
          h < p ? -8.0L * (h + 1) / p : -8.0L * (2 * (h - p) + 1) / (2 * p);
      const long double expected = std::exp2(exponent);
      const int term = h < p ? h : 2 * (h - p);  // index in the P or 2P sequence
      EXPECT_NEAR(slopes[h], static_cast<double>(expected),
                  SlopeTolerance(term, static_cast<double>(expected)))
          << "H=" << heads << " h=" << h;
    }
  }
  ExpectError([] { AlibiSlopes(0); }, {"num_heads", "0"});
}

// bias(i, j) = -m (i - j), rounded once to float: within half an ulp of the long double value.
TEST(AlibiTest, BiasMatchesFormulaAtLargePositions) {
  const PositionEncoding pe = MakeAlibi(12);
  const std::vector<int64_t> queries = {0, 1, 37, 4097, 32771, 131101, 1048573, 2147483647};
  for (int head = 0; head < 12; ++head) {
    for (int64_t i : queries) {
      std::vector<int64_t> keys;
      for (int64_t j : {int64_t{0}, i / 3, i - 1, i, i + 5}) {
        if (j >= 0 && j <= kMaxPosition) keys.push_back(j);
      }
      std::vector<float> row(keys.size(), 0.0f);
      pe.AddLogitBias(i, keys, head, {}, row.data());
      for (size_t j = 0; j < keys.size(); ++j) {
        const long double expected =
            -static_cast<long double>(pe.alibi_slopes()[head]) * (i - keys[j]);
        EXPECT_NEAR(row[j], static_cast<double>(expected),
                    0.5 * kF32Eps * std::fabs(static_cast<double>(expected)))
            << "head " << head << " i " << i << " j " << keys[j];
      }
    }
  }
}

// The bias depends only on i - j: a KV-cache decoding row (query at 1048573, keys near it) equals
// the corresponding row of a short full forward pass, bit for bit, for ALiBi and T5.
TEST(RelativeBiasTest, DependsOnlyOnDistance) {
  PositionEncodingSpec t5;
  t5.kind = PositionEncodingKind::kT5;
  t5.num_heads = 3;
  t5.num_buckets = 32;
  t5.max_distance = 128;
  const PositionEncoding t5_pe(t5);
  std::vector<float> table(t5_pe.num_parameters());
  t5_pe.InitParameters(7, table);
  const PositionEncoding alibi_pe = MakeAlibi(6);
  const int64_t distances_span = 300;
  for (int64_t shift :
       {int64_t{1}, int64_t{4097}, int64_t{131101}, int64_t{1048573}, kMaxPosition - 600}) {
    for (int64_t i : {int64_t{0}, int64_t{5}, int64_t{150}, int64_t{299}}) {
      std::vector<int64_t> keys, shifted_keys;
      for (int64_t j = 0; j < distances_span; ++j) {
        keys.push_back(j);
        shifted_keys.push_back(j + shift);
      }
      for (int head = 0; head < 3; ++head) {
        for (const PositionEncoding* pe : {&t5_pe, &alibi_pe}) {
          std::vector<float> a(keys.size(), 0.25f), b(keys.size(), 0.25f);
          const std::span<const float> params =
              pe == &t5_pe ? std::span<const float>(table) : std::span<const float>();
          pe->AddLogitBias(i, keys, head, params, a.data());
          pe->AddLogitBias(i + shift, shifted_keys, head, params, b.data());
          for (size_t j = 0; j < a.size(); ++j) {
            // Same integer distance, same double arithmetic: bitwise equal.
            ASSERT_EQ(a[j], b[j]) << PositionEncodingKindName(pe->kind()) << " i " << i << " j "
                                  << j << " shift " << shift;
          }
        }
      }
    }
  }
}

// The contiguous-key overloads equal the PositionSpan ones bit for bit, forward and backward,
// including rows that cross the ends of T5's bucket table (|r| = max_distance = 128) and
// positions near 2^31 - 1.
TEST(RelativeBiasTest, KeyRangeOverloadsEqualSpanOverloads) {
  PositionEncodingSpec t5;
  t5.kind = PositionEncodingKind::kT5;
  t5.num_heads = 3;
  // max_distance 200000 exceeds the 65536 tabulated distances: buckets beyond are computed.
  for (auto [bidirectional, max_distance] :
       {std::pair{false, 128}, std::pair{true, 128}, std::pair{false, 200000}}) {
    t5.bidirectional = bidirectional;
    t5.max_distance = max_distance;
    const PositionEncoding t5_pe(t5);
    std::vector<float> table(t5_pe.num_parameters());
    t5_pe.InitParameters(11, table);
    const PositionEncoding alibi_pe = MakeAlibi(5);
    struct Case {
      int64_t query, first, count;
    };
    const Case cases[] = {{0, 0, 1},        {5, 0, 6},
                          {300, 0, 301},    {300, 100, 500},
                          {131101, 0, 400}, {131101, 130900, 202},
                          {10, 20, 0},      {kMaxPosition, kMaxPosition - 299, 300},
                          {65600, 0, 200},  {65600, 65400, 400}};
    for (const Case& c : cases) {
      std::vector<int64_t> keys(c.count);
      for (int64_t j = 0; j < c.count; ++j) keys[j] = c.first + j;
      for (int head = 0; head < 3; ++head) {
        for (const PositionEncoding* pe : {&t5_pe, &alibi_pe}) {
          const std::span<const float> params =
              pe == &t5_pe ? std::span<const float>(table) : std::span<const float>();
          std::vector<float> a(c.count), b;
          for (int64_t j = 0; j < c.count; ++j) a[j] = static_cast<float>(std::cos(0.3 * j));
          b = a;
          pe->AddLogitBias(c.query, keys, head, params, a.data());
          pe->AddLogitBias(c.query, c.first, c.count, head, params, b.data());
          ASSERT_EQ(a, b) << PositionEncodingKindName(pe->kind()) << " query " << c.query
                          << " first " << c.first;
        }
        std::vector<float> grad(c.count), ga(table.size(), 0.5f), gb = ga;
        for (int64_t j = 0; j < c.count; ++j) grad[j] = static_cast<float>(std::sin(0.7 * j));
        t5_pe.AddLogitBiasBackward(c.query, keys, head, grad.data(), ga);
        t5_pe.AddLogitBiasBackward(c.query, c.first, c.count, head, grad.data(), gb);
        ASSERT_EQ(ga, gb) << "t5 backward query " << c.query << " first " << c.first;
      }
    }
  }
  const PositionEncoding alibi_pe = MakeAlibi(2);
  std::vector<float> row(4);
  ExpectError([&] { alibi_pe.AddLogitBias(3, 0, -1, 0, {}, row.data()); }, {"num_keys"});
  ExpectError([&] { alibi_pe.AddLogitBias(3, -2, 4, 0, {}, row.data()); }, {"first_key", "-2"});
  ExpectError([&] { alibi_pe.AddLogitBias(3, kMaxPosition, 2, 0, {}, row.data()); }, {"key"});
}

// ----------------------------------------------------------------------------------------------
// T5 buckets.

TEST(T5BucketTest, PublishedCausalBuckets) {
  const std::vector<int64_t> n = {0,  1,  7,   15,  16,  17,  20,  24,  32,  48,
                                  64, 90, 100, 116, 117, 127, 128, 200, 1000};
  const std::vector<int> expected32 = {0,  1,  7,  15, 16, 16, 17, 19, 21, 24,
                                       26, 29, 30, 31, 31, 31, 31, 31, 31};
  const std::vector<int> expected16 = {0,  1,  7,  9,  10, 10, 10, 11, 12, 13,
                                       14, 14, 15, 15, 15, 15, 15, 15, 15};
  for (size_t k = 0; k < n.size(); ++k) {
    // n = query - key >= 0, i.e. relative_position = key - query = -n.
    EXPECT_EQ(T5RelativeBucket(-n[k], false, 32, 128), expected32[k]) << "n=" << n[k];
    EXPECT_EQ(T5RelativeBucket(-n[k], false, 16, 128), expected16[k]) << "n=" << n[k];
  }
  // Future keys share bucket 0 in the causal scheme.
  EXPECT_EQ(T5RelativeBucket(5, false, 32, 128), 0);
  EXPECT_EQ(T5RelativeBucket(kMaxPosition, false, 32, 128), 0);
  EXPECT_EQ(T5RelativeBucket(-kMaxPosition, false, 32, 128), 31);
}

// Bidirectional: the bucket count is halved; keys after the query use the upper half, and each
// half is the causal scheme with num_buckets / 2 buckets on |relative_position|.
TEST(T5BucketTest, BidirectionalHalvesTheBuckets) {
  for (int64_t n = 0; n < 600; ++n) {
    const int causal_half = T5RelativeBucket(-n, false, 16, 128);
    EXPECT_EQ(T5RelativeBucket(-n, true, 32, 128), causal_half) << n;
    EXPECT_EQ(T5RelativeBucket(n, true, 32, 128), n == 0 ? 0 : 16 + causal_half) << n;
  }
}

// An independent statement of T5's bucketing in exact arithmetic: n < E -> n; else
// min(B - 1, E + floor(log(n/E) / log(max_distance/E) * (B - E))). Evaluated in long double; a
// value within 1e-12 of an integer k is taken as exactly k (e.g. B = 32, max_distance = 4096,
// n = 2048 gives 2 log2(128) = 14 exactly, which long double rounds to 13.999...).
int ReferenceBucket(int64_t n, int buckets, int max_distance) {
  const int exact = buckets / 2;
  if (n < exact) return static_cast<int>(n);
  const long double v = std::log(static_cast<long double>(n) / exact) /
                        std::log(static_cast<long double>(max_distance) / exact) *
                        (buckets - exact);
  const long double nearest = std::round(v);
  const long double whole = std::fabs(v - nearest) < 1e-12L ? nearest : std::floor(v);
  return static_cast<int>(std::min<long double>(buckets - 1, exact + whole));
}

// Properties and agreement with the exact-arithmetic formula over many configurations: monotone
// in the distance, exact below E, saturated at and beyond max_distance. (The float32 evaluation
// could in principle differ from exact arithmetic where the scaled logarithm is an integer; none
// of these configurations hits such a case, including the exact integers n = 8, 16, 32 of
// B = 8, max_distance = 64 and n = 2048 of B = 32, max_distance = 4096.)
TEST(T5BucketTest, MatchesExactFormulaAndIsMonotone) {
  for (int buckets : {2, 4, 8, 10, 16, 32, 64, 128}) {
    for (int max_distance : {8, 20, 64, 100, 128, 256, 1000, 4096}) {
      if (max_distance <= buckets / 2) continue;
      int previous = 0;
      for (int64_t n = 0; n < 3 * max_distance; ++n) {
        const int b = T5RelativeBucket(-n, false, buckets, max_distance);
        ASSERT_EQ(b, ReferenceBucket(n, buckets, max_distance))
            << "B=" << buckets << " max_distance=" << max_distance << " n=" << n;
        ASSERT_GE(b, previous);
        if (n >= max_distance) {
          ASSERT_EQ(b, buckets - 1);
        }
        previous = b;
      }
    }
  }
}

TEST(T5BucketTest, TabulatedBucketsEqualTheFunction) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kT5;
  spec.num_heads = 2;
  spec.num_buckets = 32;
  spec.max_distance = 128;
  for (bool bidirectional : {false, true}) {
    spec.bidirectional = bidirectional;
    const PositionEncoding pe(spec);
    for (int64_t r : {int64_t{-1048573}, int64_t{-4097}, int64_t{-129}, int64_t{-128},
                      int64_t{-127}, int64_t{-1}, int64_t{0}, int64_t{1}, int64_t{127},
                      int64_t{128}, int64_t{129}, int64_t{32771}}) {
      EXPECT_EQ(pe.Bucket(r), T5RelativeBucket(r, bidirectional, 32, 128)) << r;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Sinusoidal.

// The published worked example (seq_len = 3, d = 3, n = 100): pair 0 has frequency 1, and the
// odd last column is 0 (it is not sin(k / 100^(2/3)) = 0.0464 for k = 1).
TEST(SinusoidalTest, SeedExample) {
  const std::vector<float> table = SinusoidalTable(3, 3, 100.0);
  const double expected[3][3] = {
      {0, 1, 0}, {0.84147098, 0.54030231, 0}, {0.90929743, -0.41614684, 0}};
  for (int k = 0; k < 3; ++k) {
    for (int c = 0; c < 3; ++c) {
      // 8 published decimals (5e-9) plus half a float ulp.
      EXPECT_NEAR(table[k * 3 + c], expected[k][c], 5e-9 + 0.5 * kF32Eps) << k << "," << c;
    }
    EXPECT_EQ(table[k * 3 + 2], 0.0f);
  }
}

// Against sin/cos in long double at positions up to 2^31 - 1, for even and odd d. Error budget:
// half a float ulp (<= 2^-25) for the final rounding, plus the double angle k / n^(2i/d) off by
// <= 2 ulp of double (pow and the division), i.e. |angle| * 2^-52.
TEST(SinusoidalTest, MatchesLongDoubleAtLargePositions) {
  for (int dim : {1, 2, 5, 8, 33, 64}) {
    for (double base : {100.0, 10000.0, 500000.0}) {
      std::vector<float> row(dim);
      for (int64_t k : {0LL, 1LL, 2LL, 101LL, 4097LL, 32771LL, 131101LL, 1048573LL, 2147483647LL}) {
        SinusoidalRow(k, dim, base, row.data());
        for (int i = 0; i < dim / 2; ++i) {
          const long double angle = static_cast<long double>(k) /
                                    std::pow(static_cast<long double>(base), 2.0L * i / dim);
          const double tol = 0.5 * kF32Eps * 0.5 + static_cast<double>(angle) * 4.5e-16;
          EXPECT_NEAR(row[2 * i], static_cast<double>(std::sin(angle)), tol)
              << "d=" << dim << " base=" << base << " k=" << k << " i=" << i;
          EXPECT_NEAR(row[2 * i + 1], static_cast<double>(std::cos(angle)), tol)
              << "d=" << dim << " base=" << base << " k=" << k << " i=" << i;
        }
        if (dim % 2 == 1) {
          EXPECT_EQ(row[dim - 1], 0.0f) << "odd d=" << dim << " k=" << k;
        }
      }
    }
  }
}

// P[k + r] = M(r) P[k] for the block-diagonal rotation M(r) that does not depend on k: for pair i
// with frequency w, (sin w(k+r), cos w(k+r)) = [[cos wr, sin wr], [-sin wr, cos wr]] (sin wk,
// cos wk). Tolerance: the two stored rows are each within 2^-25 + angle error of exact, and M
// has norm 1.
TEST(SinusoidalTest, ShiftIsAFixedBlockRotation) {
  const int dim = 16;
  const double base = 10000.0;
  std::vector<float> a(dim), b(dim);
  for (int64_t r : {1, 3, 17, 250, 4097}) {
    for (int64_t k : {0LL, 1LL, 9LL, 1000LL, 32771LL, 131101LL, 1048573LL}) {
      SinusoidalRow(k, dim, base, a.data());
      SinusoidalRow(k + r, dim, base, b.data());
      for (int i = 0; i < dim / 2; ++i) {
        const long double w = 1.0L / std::pow(static_cast<long double>(base), 2.0L * i / dim);
        const long double c = std::cos(w * r), s = std::sin(w * r);
        const double rotated_sin = static_cast<double>(c * a[2 * i] + s * a[2 * i + 1]);
        const double rotated_cos = static_cast<double>(-s * a[2 * i] + c * a[2 * i + 1]);
        const double angle = static_cast<double>(w) * static_cast<double>(k + r);
        const double tol = 2.0 * (0.25 * kF32Eps + angle * 4.5e-16) * 1.5;
        EXPECT_NEAR(b[2 * i], rotated_sin, tol) << "r=" << r << " k=" << k << " i=" << i;
        EXPECT_NEAR(b[2 * i + 1], rotated_cos, tol) << "r=" << r << " k=" << k << " i=" << i;
      }
    }
  }
}

PositionEncodingSpec SinusoidalSpec(int dim, EmbeddingScale scale, int64_t cached) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kSinusoidal;
  spec.dim = dim;
  spec.embedding_scale = scale;
  spec.max_positions = cached;
  return spec;
}

// x' = scale * x + P[pos] with strided rows, positions in any order and as int32 or int64;
// cached and on-the-fly rows agree; padding between rows is untouched.
TEST(SinusoidalTest, AddToEmbeddings) {
  const int dim = 7;
  const int64_t stride = 9;
  const std::vector<int32_t> positions32 = {5, 0, 131101, 5, 2147483647, 63};
  const std::vector<int64_t> positions64(positions32.begin(), positions32.end());
  for (EmbeddingScale scale : {EmbeddingScale::kNone, EmbeddingScale::kSqrtDim}) {
    for (int64_t cached : {0, 64}) {
      const PositionEncoding pe(SinusoidalSpec(dim, scale, cached));
      const double s = scale == EmbeddingScale::kSqrtDim ? std::sqrt(7.0) : 1.0;
      EXPECT_EQ(pe.embedding_scale(), s);
      std::vector<float> x(positions32.size() * stride), y;
      for (size_t k = 0; k < x.size(); ++k) x[k] = static_cast<float>(std::sin(0.37 * k + 1.0));
      y = x;
      pe.AddToEmbeddings(positions32, {}, x.data(), stride);
      pe.AddToEmbeddings(positions64, {}, y.data(), stride);
      EXPECT_EQ(x, y);
      std::vector<float> row(dim);
      for (size_t t = 0; t < positions32.size(); ++t) {
        SinusoidalRow(positions32[t], dim, 10000.0, row.data());
        for (int c = 0; c < stride; ++c) {
          const double original = std::sin(0.37 * (t * stride + c) + 1.0);
          const float x0 = static_cast<float>(original);
          if (c >= dim) {
            EXPECT_EQ(x[t * stride + c], x0) << "padding changed";
            continue;
          }
          const double expected = s * x0 + row[c];
          EXPECT_NEAR(x[t * stride + c], expected, 0.5 * kF32Eps * std::fabs(expected) + 1e-45);
        }
      }
    }
  }
  const PositionEncoding pe(SinusoidalSpec(dim, EmbeddingScale::kNone, 0));
  std::vector<float> x(dim, 1.0f);
  const std::vector<int64_t> bad = {-1};
  ExpectError([&] { pe.AddToEmbeddings(bad, {}, x.data(), dim); }, {"position -1"});
  EXPECT_EQ(x, std::vector<float>(dim, 1.0f)) << "a rejected call must not write";
  const std::vector<int64_t> ok = {0};
  ExpectError([&] { pe.AddToEmbeddings(ok, {}, x.data(), dim - 1); }, {"row_stride"});
}

// ----------------------------------------------------------------------------------------------
// Learned absolute.

PositionEncodingSpec LearnedSpec(int dim, int64_t rows, OutOfRange mode) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kLearned;
  spec.dim = dim;
  spec.max_positions = rows;
  spec.out_of_range = mode;
  return spec;
}

TEST(LearnedTest, InitIsSeededNormal) {
  const PositionEncoding pe(LearnedSpec(64, 2048, OutOfRange::kError));
  ASSERT_EQ(pe.num_parameters(), 64 * 2048);
  std::vector<float> a(pe.num_parameters()), b(a.size()), c(a.size());
  pe.InitParameters(1234, a);
  pe.InitParameters(1234, b);
  pe.InitParameters(1235, c);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // Sample mean and standard deviation of 131072 normal(0, 0.02) draws: mean within 5 standard
  // errors (5 * 0.02 / sqrt(n) = 2.8e-4); std within 5 standard errors of the std estimate
  // (5 * 0.02 / sqrt(2n) = 2.0e-4).
  double sum = 0, sum2 = 0;
  for (float v : a) {
    sum += v;
    sum2 += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(a.size());
  const double mean = sum / n;
  EXPECT_NEAR(mean, 0.0, 2.8e-4);
  EXPECT_NEAR(std::sqrt(sum2 / n - mean * mean), 0.02, 2.0e-4);
  std::vector<float> wrong(10);
  ExpectError([&] { pe.InitParameters(1, wrong); }, {"10", std::to_string(64 * 2048)});
}

TEST(LearnedTest, OutOfRangeIsAnErrorByDefault) {
  const PositionEncoding pe(LearnedSpec(4, 16, OutOfRange::kError));
  std::vector<float> table(pe.num_parameters(), 0.5f), x(8, 1.0f);
  const std::vector<int64_t> positions = {15, 16};
  ExpectError([&] { pe.AddToEmbeddings(positions, table, x.data(), 4); },
              {"position 16", "16 positions", "max_positions", "clamp"});
  EXPECT_EQ(x, std::vector<float>(8, 1.0f));
  std::vector<float> grad(8, 1.0f), grad_table(table.size(), 0.0f);
  ExpectError([&] { pe.AddToEmbeddingsBackward(positions, grad.data(), 4, grad_table); },
              {"position 16"});
  const std::vector<int64_t> huge = {1048573};
  ExpectError([&] { pe.AddToEmbeddings(huge, table, x.data(), 4); }, {"position 1048573", "16"});
}

TEST(LearnedTest, ClampUsesTheLastRow) {
  const PositionEncoding pe(LearnedSpec(3, 5, OutOfRange::kClamp));
  std::vector<float> table(15);
  for (int k = 0; k < 15; ++k) table[k] = static_cast<float>(k);
  const std::vector<int64_t> positions = {4, 5, 131101, 0};
  std::vector<float> x(12, 0.0f);
  pe.AddToEmbeddings(positions, table, x.data(), 3);
  const std::vector<float> expected = {12, 13, 14, 12, 13, 14, 12, 13, 14, 0, 1, 2};
  EXPECT_EQ(x, expected);
  std::vector<float> grad(12, 1.0f), grad_table(15, 0.0f);
  pe.AddToEmbeddingsBackward(positions, grad.data(), 3, grad_table);
  const std::vector<float> expected_grad = {1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3};
  EXPECT_EQ(grad_table, expected_grad);
  const std::vector<int64_t> negative = {-3};
  ExpectError([&] { pe.AddToEmbeddings(negative, table, x.data(), 3); }, {"position -3"});
}

// ----------------------------------------------------------------------------------------------
// Backward passes against central finite differences.
//
// Loss L = sum_k w_k y_k^2 / 2 over the hook's float outputs y, evaluated in double. L is a
// quadratic in each input, so the central difference with step h has no truncation error; what
// remains is the float rounding of y (|dy| <= 2^-24 |y|) amplified by 1/(2h):
// |FD - exact| <= sum_k |w_k y_k| 2^-24 |y_k| / h. The tolerances below use that bound.

double QuadLoss(const std::vector<float>& y, const std::vector<double>& w) {
  double loss = 0;
  for (size_t k = 0; k < y.size(); ++k) loss += 0.5 * w[k] * static_cast<double>(y[k]) * y[k];
  return loss;
}

double RoundingBound(const std::vector<float>& y, const std::vector<double>& w, double h) {
  double bound = 0;
  for (size_t k = 0; k < y.size(); ++k) bound += std::fabs(w[k]) * y[k] * y[k];
  return 4.0 * bound * std::ldexp(1.0, -24) / h + 1e-12;
}

std::vector<double> Weights(size_t n, double seed) {
  std::vector<double> w(n);
  for (size_t k = 0; k < n; ++k) w[k] = std::cos(seed + 1.7 * k);
  return w;
}

TEST(GradientTest, EmbeddingHooksMatchFiniteDifferences) {
  const int dim = 5;
  const std::vector<int64_t> positions = {3, 0, 3, 7, 9};  // repeats; 7, 9 clamp for learned
  const size_t n = positions.size() * dim;
  const std::vector<double> w = Weights(n, 0.3);
  for (auto kind : {PositionEncodingKind::kSinusoidal, PositionEncodingKind::kLearned}) {
    for (EmbeddingScale scale : {EmbeddingScale::kNone, EmbeddingScale::kSqrtDim}) {
      PositionEncodingSpec spec;
      spec.kind = kind;
      spec.dim = dim;
      spec.embedding_scale = scale;
      spec.max_positions = kind == PositionEncodingKind::kLearned ? 6 : 4;
      spec.out_of_range = OutOfRange::kClamp;
      spec.init_std = 0.5;
      const PositionEncoding pe(spec);
      std::vector<float> table(pe.num_parameters());
      pe.InitParameters(99, table);
      std::vector<float> x(n);
      for (size_t k = 0; k < n; ++k) x[k] = static_cast<float>(std::sin(2.1 * k));

      auto forward = [&](const std::vector<float>& xin, const std::vector<float>& tab) {
        std::vector<float> y = xin;
        pe.AddToEmbeddings(positions, tab, y.data(), dim);
        return y;
      };
      const std::vector<float> y = forward(x, table);
      // Analytic: dL/dy = w * y.
      std::vector<float> grad(n);
      for (size_t k = 0; k < n; ++k) grad[k] = static_cast<float>(w[k] * y[k]);
      std::vector<float> grad_table(table.size(), 0.0f);
      pe.AddToEmbeddingsBackward(positions, grad.data(), dim, grad_table);

      const double h = 1.0 / 64;                             // exactly representable
      const double tol = RoundingBound(y, w, h) * 4 + 1e-6;  // + float rounding of the grads
      for (size_t k = 0; k < n; ++k) {
        std::vector<float> xp = x, xm = x;
        xp[k] += static_cast<float>(h);
        xm[k] -= static_cast<float>(h);
        const double fd = (QuadLoss(forward(xp, table), w) - QuadLoss(forward(xm, table), w)) /
                          (static_cast<double>(xp[k]) - xm[k]);
        EXPECT_NEAR(grad[k], fd, tol) << PositionEncodingKindName(kind) << " x[" << k << "]";
      }
      for (size_t k = 0; k < table.size(); ++k) {
        std::vector<float> tp = table, tm = table;
        tp[k] += static_cast<float>(h);
        tm[k] -= static_cast<float>(h);
        const double fd = (QuadLoss(forward(x, tp), w) - QuadLoss(forward(x, tm), w)) /
                          (static_cast<double>(tp[k]) - tm[k]);
        EXPECT_NEAR(grad_table[k], fd, tol) << "table[" << k << "]";
      }
    }
  }
}

TEST(GradientTest, LogitBiasHooksMatchFiniteDifferences) {
  const int heads = 2;
  // A KV-cache-like setting: queries at large positions, keys before and at them.
  const std::vector<int64_t> queries = {131101, 131140};
  std::vector<int64_t> keys;
  for (int64_t j = 131101 - 300; j <= 131140; j += 7) keys.push_back(j);
  for (auto kind : {PositionEncodingKind::kT5, PositionEncodingKind::kAlibi}) {
    PositionEncodingSpec spec;
    spec.kind = kind;
    spec.num_heads = heads;
    spec.num_buckets = 16;
    spec.max_distance = 64;
    spec.init_std = 0.7;
    const PositionEncoding pe(spec);
    std::vector<float> table(pe.num_parameters());
    pe.InitParameters(5, table);
    const size_t n = queries.size() * heads * keys.size();
    std::vector<float> logits(n);
    for (size_t k = 0; k < n; ++k) logits[k] = static_cast<float>(std::cos(0.9 * k));
    const std::vector<double> w = Weights(n, 1.1);

    auto forward = [&](const std::vector<float>& lin, const std::vector<float>& tab) {
      std::vector<float> y = lin;
      for (size_t q = 0; q < queries.size(); ++q) {
        for (int h = 0; h < heads; ++h) {
          pe.AddLogitBias(queries[q], keys, h, tab, y.data() + (q * heads + h) * keys.size());
        }
      }
      return y;
    };
    const std::vector<float> y = forward(logits, table);
    std::vector<float> grad(n);
    for (size_t k = 0; k < n; ++k) grad[k] = static_cast<float>(w[k] * y[k]);
    std::vector<float> grad_table(table.size(), 0.0f);
    for (size_t q = 0; q < queries.size(); ++q) {
      for (int h = 0; h < heads; ++h) {
        pe.AddLogitBiasBackward(queries[q], keys, h, grad.data() + (q * heads + h) * keys.size(),
                                grad_table);
      }
    }
    const double h = 1.0 / 64;
    const double tol = RoundingBound(y, w, h) * 4 + 1e-5;
    for (size_t k = 0; k < table.size(); ++k) {
      std::vector<float> tp = table, tm = table;
      tp[k] += static_cast<float>(h);
      tm[k] -= static_cast<float>(h);
      const double fd = (QuadLoss(forward(logits, tp), w) - QuadLoss(forward(logits, tm), w)) /
                        (static_cast<double>(tp[k]) - tm[k]);
      EXPECT_NEAR(grad_table[k], fd, tol) << "t5 table[" << k << "]";
    }
    // The logit gradient passes through the additive bias unchanged (ALiBi and T5).
    for (size_t k = 0; k < n; k += 13) {
      std::vector<float> lp = logits, lm = logits;
      lp[k] += static_cast<float>(h);
      lm[k] -= static_cast<float>(h);
      const double fd = (QuadLoss(forward(lp, table), w) - QuadLoss(forward(lm, table), w)) /
                        (static_cast<double>(lp[k]) - lm[k]);
      EXPECT_NEAR(grad[k], fd, tol) << PositionEncodingKindName(kind) << " logit " << k;
    }
  }
}

TEST(PositionEncodingTest, LogitHookArgumentErrors) {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kT5;
  spec.num_heads = 4;
  const PositionEncoding pe(spec);
  std::vector<float> table(pe.num_parameters(), 0.0f), row(3, 0.0f);
  const std::vector<int64_t> keys = {0, 1, 2};
  ExpectError([&] { pe.AddLogitBias(2, keys, 4, table, row.data()); }, {"head", "0 to 3"});
  ExpectError([&] { pe.AddLogitBias(-1, keys, 0, table, row.data()); }, {"query", "-1"});
  const std::vector<float> short_table(5);
  ExpectError([&] { pe.AddLogitBias(2, keys, 0, short_table, row.data()); },
              {"params", "5", "128"});
  const std::vector<int64_t> bad_keys = {0, -7};
  ExpectError([&] { pe.AddLogitBias(2, bad_keys, 0, table, row.data()); }, {"key", "-7"});
  ExpectError([] { MakeAlibi(2).Bucket(0); }, {"alibi"});
}

}  // namespace
}  // namespace ropekit
