// The cos/sin table: the kExact policy against a truth evaluated in long double (64-bit
// mantissa on x86-64, quad precision on aarch64), at positions up to 2^31 - 1; table rows equal
// on-the-fly rows; concurrent growth is safe and never changes a value.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

static_assert(LDBL_MANT_DIG >= 64 || LDBL_MANT_DIG == 53, "unexpected long double");

RopeFrequencies ExactDefault(int rotary_dim, double base, double attention_factor) {
  RopeParams p;
  p.base = base;
  p.head_dim = rotary_dim;
  p.rotary_dim = rotary_dim;
  RopeFrequencies f = ComputeFrequencies(p, Numerics::kExact);
  f.attention_factor = attention_factor;
  return f;
}

// Truth: A * cos(p * base^(-2i/R)) with the angle formed and reduced in long double.
long double TruthAngle(int64_t p, double base, int i, int rotary_dim) {
  const long double w =
      std::pow(static_cast<long double>(base), -2.0L * i / static_cast<long double>(rotary_dim));
  return static_cast<long double>(p) * w;
}

class ExactTableTest : public ::testing::TestWithParam<std::tuple<int, double, double>> {};

TEST_P(ExactTableTest, WithinStatedBoundOfTruth) {
  if (LDBL_MANT_DIG < 64) GTEST_FAIL() << "this platform's long double is not wider than double";
  const auto [rotary_dim, base, attention] = GetParam();
  const RopeTable table(ExactDefault(rotary_dim, base, attention));
  const int n = rotary_dim / 2;
  std::vector<int64_t> positions = {0,        1,       7,          4095,       4097,
                                    32771,    131101,  1048573,    16777215,   16777217,
                                    99999989, 1 << 30, 2147483629, 2147483646, 2147483647};
  std::mt19937_64 rng(7);
  for (int k = 0; k < 200; ++k) positions.push_back(static_cast<int64_t>(rng() % 2147483648ull));
  std::vector<float> cos(n), sin(n);
  double worst_small = 0, worst_large = 0;
  for (int64_t p : positions) {
    table.ComputeRow(p, cos.data(), sin.data());
    for (int i = 0; i < n; ++i) {
      const long double angle = TruthAngle(p, base, i, rotary_dim);
      const double c = static_cast<double>(attention * std::cos(angle));
      const double s = static_cast<double>(attention * std::sin(angle));
      const double err = std::max(std::abs(cos[i] - c), std::abs(sin[i] - s));
      // The stated bounds scale with A: half an ulp of float32 at |A| plus the angle error.
      const double bound = (p < (int64_t{1} << 24) ? 1.2e-7 : 4e-7) * std::max(1.0, attention / 2);
      ASSERT_LE(err, bound) << "p " << p << " pair " << i;
      (p < (int64_t{1} << 24) ? worst_small : worst_large) =
          std::max(p < (int64_t{1} << 24) ? worst_small : worst_large, err);
    }
  }
  // The float32 rounding alone is up to half an ulp: the truth check is not vacuous.
  EXPECT_GT(worst_small, 1e-9);
  std::printf("R=%d base=%g A=%g: worst |error| %.3g (p < 2^24), %.3g (p < 2^31)\n", rotary_dim,
              base, attention, worst_small, worst_large);
}

INSTANTIATE_TEST_SUITE_P(Bases, ExactTableTest,
                         ::testing::Values(std::make_tuple(128, 10000.0, 1.0),
                                           std::make_tuple(96, 10000.0, 1.1902380714238083),
                                           std::make_tuple(64, 500000.0, 1.0),
                                           std::make_tuple(128, 1000000.0, 1.1386294361)));

TEST(RopeTableTest, FloatAnglesDriftButExactDoesNot) {
  // The motivation for kExact: forming p * w in float32 (as HF and ggml do) drifts with p.
  const RopeTable exact(ExactDefault(128, 10000.0, 1.0));
  RopeParams p;
  p.head_dim = p.rotary_dim = 128;
  const RopeTable hf(ComputeFrequencies(p, Numerics::kHf));
  std::vector<float> ce(64), se(64), ch(64), sh(64);
  const int64_t pos = 131101;
  exact.ComputeRow(pos, ce.data(), se.data());
  hf.ComputeRow(pos, ch.data(), sh.data());
  double hf_err = 0, exact_err = 0;
  for (int i = 0; i < 64; ++i) {
    const long double angle = TruthAngle(pos, 10000.0, i, 128);
    hf_err = std::max(hf_err, std::abs(ch[i] - static_cast<double>(std::cos(angle))));
    exact_err = std::max(exact_err, std::abs(ce[i] - static_cast<double>(std::cos(angle))));
  }
  EXPECT_LE(exact_err, 1.2e-7);
  EXPECT_GT(hf_err, 1e-4);  // float32 angle p*w: rounding error up to p * 2^-24 ~ 8e-3 at p ~ 131k
}

TEST(RopeTableTest, TableRowsEqualOnTheFlyRows) {
  for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
    RopeParams p;
    p.head_dim = 80;
    p.rotary_dim = 32;
    const RopeTable table(ComputeFrequencies(p, numerics), 5000);
    const RopeTable::Rows rows = table.Snapshot();
    ASSERT_GE(rows.num_positions, 5000);
    ASSERT_EQ(rows.row_stride % 16, 0);
    std::vector<float> cos(16), sin(16);
    for (int64_t pos : {0, 1, 17, 4097, 4999}) {
      table.ComputeRow(pos, cos.data(), sin.data());
      const float* row = rows.data.get() + pos * rows.row_stride;
      for (int i = 0; i < 16; ++i) {
        ASSERT_EQ(row[i], cos[i]);
        ASSERT_EQ(row[16 + i], sin[i]);
      }
    }
  }
}

TEST(RopeTableTest, ConcurrentGrowthKeepsSnapshotsValid) {
  RopeParams p;
  p.head_dim = p.rotary_dim = 64;
  const RopeTable table(ComputeFrequencies(p, Numerics::kExact));
  const RopeTable::Rows first = table.Snapshot();
  std::vector<std::thread> threads;
  std::vector<std::vector<float>> seen(4, std::vector<float>(64));
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int64_t n = 1; n < 3000; n += 97 * (k + 1)) table.Reserve(n);
      const RopeTable::Rows rows = table.Snapshot();
      const float* row = rows.data.get() + 1234 * rows.row_stride;
      std::copy(row, row + 64, seen[k].begin());
    });
  }
  for (auto& t : threads) t.join();
  for (int k = 1; k < 4; ++k) EXPECT_EQ(seen[k], seen[0]);
  EXPECT_GE(table.capacity(), 2900);
  EXPECT_LE(table.capacity(), table.max_capacity());
  EXPECT_EQ(first.num_positions, 0);
}

TEST(RopeTableTest, RejectsInvalidFrequencies) {
  RopeFrequencies f;
  f.rotary_dim = 3;
  f.inv_freq = {1.0};
  EXPECT_THROW(RopeTable{f}, Error);
  f.rotary_dim = 2;
  f.inv_freq = {NAN};
  EXPECT_THROW(RopeTable{f}, Error);
  f.inv_freq = {1.0};
  f.attention_factor = 0;
  EXPECT_THROW(RopeTable{f}, Error);
}

}  // namespace
}  // namespace ropekit
