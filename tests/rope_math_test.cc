// RoPE against its mathematics (RoFormer, arXiv:2104.09864, section 3.4), through the public
// API: the complex-multiplication form, the relative-position property, norm preservation,
// inverse and composition, and the long-term decay curve. Non-power-of-two large positions
// throughout, since powers of two hide float angle errors.
#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <random>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

constexpr double kU = 0x1.0p-24;  // unit roundoff of float32

RopeFrequencies Freqs(int rotary_dim, double base = 10000.0) {
  RopeParams p;
  p.base = base;
  p.head_dim = p.rotary_dim = rotary_dim;
  return ComputeFrequencies(p, Numerics::kExact);
}

std::vector<float> RandomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Rotates one head (H = 1, T = 1) at position p.
std::vector<float> Rotate(const RopeTable& table, std::vector<float> x, int64_t p, Layout layout,
                          Direction direction = Direction::kForward) {
  const std::vector<int64_t> pos = {p};
  RotateOptions options;
  options.layout = layout;
  options.direction = direction;
  ApplyRopeInPlace(table, pos, ContiguousView(x.data(), DType::kF32, 1, 1, x.size()), options);
  return x;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double{a[i]} * b[i];
  return s;
}

double Norm(const std::vector<float>& a) { return std::sqrt(Dot(a, a)); }

class RopeMathTest : public ::testing::TestWithParam<Layout> {};

TEST_P(RopeMathTest, EqualsComplexMultiplication) {
  // Pair i as the complex number x_a + i x_b, multiplied by e^{i p w_i} (RoFormer eq. 34).
  const Layout layout = GetParam();
  const int d = 128;
  const RopeTable table(Freqs(d));
  const std::vector<float> x = RandomVector(d, 1);
  for (int64_t p : {1, 7, 4097, 32771, 131101, 1048573}) {
    const std::vector<float> y = Rotate(table, x, p, layout);
    for (int i = 0; i < d / 2; ++i) {
      const int a = layout == Layout::kHalfSplit ? i : 2 * i;
      const int b = layout == Layout::kHalfSplit ? i + d / 2 : 2 * i + 1;
      const long double angle = p * std::pow(10000.0L, -2.0L * i / d);
      const std::complex<long double> z(x[a], x[b]);
      const std::complex<long double> r = z * std::polar(1.0L, angle);
      // Table entries are within 1.2e-7 of cos/sin; float32 arithmetic adds 2u (|a|+|b|).
      const double tol = (1.2e-7 + 2 * kU) * (std::abs(x[a]) + std::abs(x[b])) + 1e-12;
      EXPECT_NEAR(y[a], static_cast<double>(r.real()), tol) << "p " << p << " pair " << i;
      EXPECT_NEAR(y[b], static_cast<double>(r.imag()), tol) << "p " << p << " pair " << i;
    }
  }
}

TEST_P(RopeMathTest, InnerProductDependsOnlyOnRelativePosition) {
  const Layout layout = GetParam();
  const int d = 128;
  const RopeTable table(Freqs(d));
  const std::vector<float> q = RandomVector(d, 2), k = RandomVector(d, 3);
  const double scale = Norm(q) * Norm(k);
  for (int64_t delta : {0, 1, 5, 37, 1001}) {
    const double base_dot = Dot(Rotate(table, q, 11 + delta, layout), Rotate(table, k, 11, layout));
    for (int64_t m : {4097, 32771, 131101, 1048573, 99999989}) {
      const double dot = Dot(Rotate(table, q, m + delta, layout), Rotate(table, k, m, layout));
      // Each rotated vector is within ~(1.2e-7 + 2u) relative of exact.
      EXPECT_NEAR(dot, base_dot, 4 * (1.2e-7 + 2 * kU) * scale) << "m " << m << " delta " << delta;
    }
  }
  // And it does depend on the relative position.
  EXPECT_GT(std::abs(Dot(Rotate(table, q, 5, layout), Rotate(table, k, 0, layout)) -
                     Dot(Rotate(table, q, 6, layout), Rotate(table, k, 0, layout))),
            1e-3);
}

TEST_P(RopeMathTest, PreservesNormAndScalesByAttentionFactor) {
  const Layout layout = GetParam();
  for (double attention : {1.0, 1.1902380714238083}) {
    RopeFrequencies f = Freqs(96);
    f.attention_factor = attention;
    const RopeTable table(f);
    const std::vector<float> x = RandomVector(96, 4);
    for (int64_t p : {0, 3, 32771, 2147483647}) {
      const double ratio = Norm(Rotate(table, x, p, layout)) / Norm(x);
      EXPECT_NEAR(ratio, attention, 4e-7 * attention) << "p " << p;
    }
  }
}

TEST_P(RopeMathTest, BackwardInvertsForward) {
  const Layout layout = GetParam();
  const RopeTable table(Freqs(80));
  const std::vector<float> x = RandomVector(80, 5);
  for (int64_t p : {1, 4097, 131101, 2147483647}) {
    const std::vector<float> y =
        Rotate(table, Rotate(table, x, p, layout), p, layout, Direction::kBackward);
    for (int i = 0; i < 80; ++i) {
      // R^T R = I up to the table's |c^2 + s^2 - 1| <= 2.4e-7 and float32 roundings.
      EXPECT_NEAR(y[i], x[i], (2.4e-7 + 6 * kU) * 2 * Norm(x) / std::sqrt(2.0)) << "p " << p;
    }
  }
}

TEST_P(RopeMathTest, RotationsCompose) {
  const Layout layout = GetParam();
  const RopeTable table(Freqs(64, 500000.0));
  const std::vector<float> x = RandomVector(64, 6);
  for (auto [a, b] : {std::pair<int64_t, int64_t>{4097, 32771}, {131101, 1048573}, {3, 5}}) {
    const std::vector<float> ab = Rotate(table, Rotate(table, x, b, layout), a, layout);
    const std::vector<float> sum = Rotate(table, x, a + b, layout);
    for (int i = 0; i < 64; ++i) {
      EXPECT_NEAR(ab[i], sum[i], 3 * (1.2e-7 + 2 * kU) * Norm(x)) << a << "+" << b;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, RopeMathTest,
                         ::testing::Values(Layout::kHalfSplit, Layout::kInterleaved),
                         [](const auto& info) { return std::string(LayoutName(info.param)); });

TEST(RopeMathTest, LongTermDecay) {
  // RoFormer section 3.4.3: with h_i = 1, |sum_{i<j} e^{i r theta_i}| averaged over j = 1..d/2
  // bounds the attention logit and decays with the relative distance r. Evaluated from the
  // table row at position r (cos/sin of r * w_i).
  const int d = 128;
  const RopeTable table(Freqs(d));
  std::vector<float> cos(d / 2), sin(d / 2);
  auto curve = [&](int64_t r) {
    table.ComputeRow(r, cos.data(), sin.data());
    double total = 0;
    std::complex<double> partial = 0;
    for (int j = 1; j <= d / 2; ++j) {
      partial += std::complex<double>(cos[j - 1], sin[j - 1]);
      total += std::abs(partial);
    }
    return total / (d / 2);
  };
  // Values evaluated independently from RoFormer's bound (arXiv:2104.09864 sec. 3.4.3, d = 128).
  const std::pair<int, double> published[] = {
      {0, 32.5},    {1, 31.538},   {2, 28.956},  {5, 20.845},  {10, 17.954}, {20, 15.242},
      {50, 12.629}, {100, 10.227}, {150, 7.588}, {200, 7.245}, {250, 6.548}};
  for (const auto& [r, value] : published) EXPECT_NEAR(curve(r), value, 1e-3) << "r " << r;
  auto window = [&](int lo, int hi) {
    double s = 0;
    for (int r = lo; r < hi; ++r) s += curve(r);
    return s / (hi - lo);
  };
  // Window means over integer r, evaluated independently in numpy (float64, complex exp).
  const double w1 = window(5, 25), w2 = window(100, 125), w3 = window(225, 250);
  EXPECT_NEAR(w1, 16.87729, 1e-4);
  EXPECT_NEAR(w2, 9.63409, 1e-4);
  EXPECT_NEAR(w3, 8.05736, 1e-4);
  EXPECT_GT(w1, w2);
  EXPECT_GT(w2, w3);
}

}  // namespace
}  // namespace ropekit
