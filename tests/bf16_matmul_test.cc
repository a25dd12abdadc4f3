// Tests of the bf16 matrix products (src/ops/bf16_matmul.h) against the scalar double-precision
// references (src/reference/ops.h), on the float32 inputs and on their bf16 roundings.
//
// Bounds (derivation in bf16_matmul.h): with u8 = 2^-8 (bf16 unit roundoff), u = 2^-24 and R the
// reduced length, an output y against the exact product of the float32 inputs satisfies
//   |y - sum a b| <= ((1 + u8)^2 (1 + gamma_(R+1)) - 1) S + R 2^-126,   S = sum |a b|,
// i.e. the relative error 2 u8 + u8^2 = 2 2^-8 + 2^-16 of each product of two bf16-rounded
// values, plus float32 summation. Against the exact product of the bf16-rounded inputs (rounded
// here by the scalar FloatToBf16, round to nearest even) the inputs' term vanishes and only
// gamma_(R+1) S' + R 2^-126 remains: this tighter check fails for any other rounding of the
// inputs (truncation moves a product by up to 2^-7 relative, far above gamma_(R+1)).
// The inputs here are normal floats in [-1, 1] (no subnormals, which the instruction flushes).
#include "src/ops/bf16_matmul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "ropekit/error.h"
#include "ropekit/half.h"
#include "ropekit/thread_pool.h"
#include "src/reference/ops.h"

namespace ropekit {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff
constexpr double kU8 = 1.0 / (1 << 8);  // bf16 unit roundoff
const double kTiny = std::ldexp(1.0, -126);

double Gamma(int64_t n) { return n * kU / (1 - n * kU); }

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<double> Bf16Double(const std::vector<float>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(FloatToBf16(v[i]));
  return out;
}
std::vector<double> Abs(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::abs(v[i]);
  return out;
}

struct Shape {
  int64_t m, k, n;
};

// Runs the three products and checks each element against both references.
void CheckShape(const Shape& s, ThreadPool* pool) {
  SCOPED_TRACE("M=" + std::to_string(s.m) + " K=" + std::to_string(s.k) +
               " N=" + std::to_string(s.n));
  const auto x = Random(s.m * s.k, 1), w = Random(s.n * s.k, 2), dy = Random(s.m * s.n, 3);
  ops::Bf16Weight pw;
  ops::PackBf16Weight(w.data(), s.n, s.k, /*backward=*/true, &pw, pool);
  std::vector<float> y(s.m * s.n), dx(s.m * s.k), dw(s.n * s.k, 0.0f);
  ops::MatMulBf16(x.data(), pw, y.data(), s.m, pool);
  ops::MatMulBackwardInputBf16(dy.data(), pw, dx.data(), s.m, pool);
  ops::MatMulBackwardWeightBf16(dy.data(), x.data(), dw.data(), s.m, s.k, s.n, pool);

  // References: exact (double) products of the float32 inputs, of their bf16 roundings, and of
  // the absolute values (S and S').
  const auto xd = ToDouble(x), wd = ToDouble(w), dyd = ToDouble(dy);
  const auto xb = Bf16Double(x), wb = Bf16Double(w), dyb = Bf16Double(dy);
  std::vector<double> y32(s.m * s.n), dx32(s.m * s.k), dw32(s.n * s.k);
  std::vector<double> yb(s.m * s.n), dxb(s.m * s.k), dwb(s.n * s.k);
  std::vector<double> ya(s.m * s.n), dxa(s.m * s.k), dwa(s.n * s.k);
  reference::MatMul(xd.data(), wd.data(), y32.data(), s.m, s.k, s.n);
  reference::MatMulBackward(xd.data(), wd.data(), dyd.data(), dx32.data(), dw32.data(), s.m, s.k,
                            s.n);
  reference::MatMul(xb.data(), wb.data(), yb.data(), s.m, s.k, s.n);
  reference::MatMulBackward(xb.data(), wb.data(), dyb.data(), dxb.data(), dwb.data(), s.m, s.k,
                            s.n);
  const auto xa = Abs(xb), wa = Abs(wb), dya = Abs(dyb);
  reference::MatMul(xa.data(), wa.data(), ya.data(), s.m, s.k, s.n);
  reference::MatMulBackward(xa.data(), wa.data(), dya.data(), dxa.data(), dwa.data(), s.m, s.k,
                            s.n);
  // S of the float32 inputs <= S' (1 + u8)^2 (each |a| <= |bf16(a)| (1 + u8)).
  auto check = [](const std::vector<float>& got, const std::vector<double>& exact32,
                  const std::vector<double>& exactb, const std::vector<double>& sum_abs, int64_t r,
                  const char* what) {
    const double g = Gamma(r + 1);
    const double rel32 = (1 + kU8) * (1 + kU8) * (1 + g) - 1;
    for (size_t i = 0; i < got.size(); ++i) {
      const double s_b = sum_abs[i], s_32 = s_b * (1 + kU8) * (1 + kU8);
      ASSERT_LE(std::abs(got[i] - exactb[i]), g * s_b + r * kTiny) << what << " " << i;
      ASSERT_LE(std::abs(got[i] - exact32[i]), rel32 * s_32 + r * kTiny) << what << " " << i;
    }
  };
  check(y, y32, yb, ya, s.k, "forward");
  check(dx, dx32, dxb, dxa, s.n, "backward input");
  check(dw, dw32, dwb, dwa, s.m, "backward weight");
}

class Bf16Matmul : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ops::Bf16MatmulAvailable()) {
      GTEST_SKIP() << ops::Bf16MatmulDescription();
    }
  }
};

TEST_F(Bf16Matmul, MatchesReferencesWithinBf16Bounds) {
  // Odd and even reduced lengths, row / column counts off the 8 x 32 register tile and the
  // 64 x 128 task block, a single row (decode), and the default model's MLP shape.
  for (const Shape& s : {Shape{1, 1, 1}, Shape{3, 5, 7}, Shape{9, 33, 17}, Shape{67, 45, 301},
                         Shape{130, 128, 96}, Shape{1, 128, 352}, Shape{256, 352, 128}}) {
    CheckShape(s, nullptr);
  }
  ThreadPool pool(3);
  CheckShape(Shape{200, 130, 260}, &pool);
}

// Small integers are exact in bf16, and every partial sum of their products is an integer below
// 2^24, so each output must equal the exact sum: any dropped, repeated or misplaced pair shows.
TEST_F(Bf16Matmul, IntegerProductsAreExact) {
  const int64_t m = 19, k = 37, n = 45;
  std::mt19937 gen(7);
  std::uniform_int_distribution<int> dist(-8, 8);
  std::vector<float> x(m * k), w(n * k), dy(m * n);
  for (float& v : x) v = static_cast<float>(dist(gen));
  for (float& v : w) v = static_cast<float>(dist(gen));
  for (float& v : dy) v = static_cast<float>(dist(gen));
  ops::Bf16Weight pw;
  ops::PackBf16Weight(w.data(), n, k, true, &pw, nullptr);
  std::vector<float> y(m * n, 1.0f), dx(m * k, 2.0f), dw(n * k, 3.0f);
  ops::MatMulBf16(x.data(), pw, y.data(), m, nullptr, /*accumulate=*/true);
  ops::MatMulBackwardInputBf16(dy.data(), pw, dx.data(), m, nullptr, /*accumulate=*/true);
  ops::MatMulBackwardWeightBf16(dy.data(), x.data(), dw.data(), m, k, n, nullptr);
  const auto xd = ToDouble(x), wd = ToDouble(w), dyd = ToDouble(dy);
  std::vector<double> yr(m * n), dxr(m * k), dwr(n * k);
  reference::MatMul(xd.data(), wd.data(), yr.data(), m, k, n);
  reference::MatMulBackward(xd.data(), wd.data(), dyd.data(), dxr.data(), dwr.data(), m, k, n);
  for (int64_t i = 0; i < m * n; ++i) ASSERT_EQ(y[i], yr[i] + 1.0) << i;
  for (int64_t i = 0; i < m * k; ++i) ASSERT_EQ(dx[i], dxr[i] + 2.0) << i;
  for (int64_t i = 0; i < n * k; ++i) ASSERT_EQ(dw[i], dwr[i] + 3.0) << i;
}

// Each output is one fixed instruction sequence: bitwise the same for any thread count, and a
// forward row is the same alone or among other rows.
TEST_F(Bf16Matmul, BitwiseIndependentOfThreadsAndOtherRows) {
  const int64_t m = 150, k = 96, n = 200;
  const auto x = Random(m * k, 4), w = Random(n * k, 5), dy = Random(m * n, 6);
  ops::Bf16Weight pw;
  ops::PackBf16Weight(w.data(), n, k, true, &pw, nullptr);
  auto run = [&](ThreadPool* pool) {
    std::vector<float> y(m * n), dx(m * k), dw(n * k, 0.5f);
    ops::MatMulBf16(x.data(), pw, y.data(), m, pool);
    ops::MatMulBackwardInputBf16(dy.data(), pw, dx.data(), m, pool);
    ops::MatMulBackwardWeightBf16(dy.data(), x.data(), dw.data(), m, k, n, pool);
    return std::vector<std::vector<float>>{y, dx, dw};
  };
  ThreadPool two(2), three(3);
  const auto one = run(nullptr);
  EXPECT_EQ(one, run(&two));
  EXPECT_EQ(one, run(&three));
  for (int64_t row : {int64_t{0}, int64_t{77}, m - 1}) {
    std::vector<float> y1(n);
    ops::MatMulBf16(x.data() + row * k, pw, y1.data(), 1, nullptr);
    for (int64_t j = 0; j < n; ++j) ASSERT_EQ(y1[j], one[0][row * n + j]) << row << " " << j;
  }
}

TEST_F(Bf16Matmul, RejectsAForwardOnlyWeightInTheBackward) {
  const auto w = Random(8 * 6, 1);
  ops::Bf16Weight pw;
  ops::PackBf16Weight(w.data(), 8, 6, /*backward=*/false, &pw, nullptr);
  std::vector<float> dy(2 * 8, 1.0f), dx(2 * 6);
  EXPECT_THROW(ops::MatMulBackwardInputBf16(dy.data(), pw, dx.data(), 2, nullptr), Error);
}

// The switch that forces the float32 fallback (and what callers then get).
TEST(Bf16MatmulFallback, EnvironmentSwitchDisablesTheKernel) {
  ASSERT_EQ(setenv("ROPEKIT_BF16_MATMUL", "off", 1), 0);
  EXPECT_FALSE(ops::Bf16MatmulAvailable());
  EXPECT_NE(ops::Bf16MatmulDescription().find("float32"), std::string::npos);
  const auto w = Random(4 * 4, 1);
  ops::Bf16Weight pw;
  EXPECT_THROW(ops::PackBf16Weight(w.data(), 4, 4, false, &pw, nullptr), Error);
  ASSERT_EQ(unsetenv("ROPEKIT_BF16_MATMUL"), 0);
}

}  // namespace
}  // namespace ropekit
