// Every compiled SIMD target of the rotation kernel against the double-precision reference:
// all dtypes, both layouts, both directions, odd head dims, partial rotary, misaligned and
// strided views, table rows and on-the-fly rows. Also the 16-bit rounding rules of the kernel
// against the scalar conversions (which follow IEEE / PyTorch round-to-nearest-even).
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/rope_kernel_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "ropekit/half.h"
#include "src/kernels/rope-inl.h"
#include "src/reference/rope.h"

#ifndef ROPEKIT_TESTS_ROPE_KERNEL_TEST_ONCE_
#define ROPEKIT_TESTS_ROPE_KERNEL_TEST_ONCE_
namespace ropekit::testing_kernel {

// The mathematical inverse frequencies base^(-2i/R), evaluated in long double.
inline RopeFrequencies MathFrequencies(int rotary_dim, double base, double attention_factor) {
  RopeFrequencies f;
  f.numerics = Numerics::kExact;
  f.rotary_dim = rotary_dim;
  f.attention_factor = attention_factor;
  for (int i = 0; i < rotary_dim / 2; ++i) {
    f.inv_freq.push_back(static_cast<double>(std::pow(
        static_cast<long double>(base), -2.0L * i / static_cast<long double>(rotary_dim))));
  }
  return f;
}

// Half an ulp of a value of magnitude v in a format with `mantissa_bits` (incl. implicit bit)
// and minimum normal exponent `min_exp`.
inline double HalfUlp(double v, int mantissa_bits, int min_exp) {
  int e = v > 0 ? std::ilogb(v) : min_exp;
  e = std::max(e, min_exp);
  return std::ldexp(1.0, e - mantissa_bits);
}

inline double DTypeHalfUlp(DType dtype, double v) {
  switch (dtype) {
    case DType::kF32:
      return HalfUlp(v, 24, -126);
    case DType::kBF16:
      return HalfUlp(v, 8, -126);
    default:
      return HalfUlp(v, 11, -14);
  }
}

}  // namespace ropekit::testing_kernel
#endif

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {

using testing_kernel::DTypeHalfUlp;
using testing_kernel::MathFrequencies;

struct Case {
  DType dtype;
  Layout layout;
  Direction direction;
  int head_dim;
  int rotary_dim;
  int heads;
  bool head_major;
  int misalign;  // elements
};

void RunCase(const Case& c, const RopeTable& table, const std::vector<int64_t>& positions,
             std::mt19937& rng) {
  const int64_t T = static_cast<int64_t>(positions.size());
  const int64_t H = c.heads, D = c.head_dim;
  const int n = c.rotary_dim / 2;
  const size_t esize = DTypeSize(c.dtype);
  // Padded strides: token-major [T][H][D + 3] or head-major [H][T][D + 5].
  const int64_t pad = c.head_major ? 5 : 3;
  TensorView in{};
  in.dtype = c.dtype;
  in.num_tokens = T;
  in.num_heads = H;
  in.head_dim = D;
  if (c.head_major) {
    in.token_stride = D + pad;
    in.head_stride = T * (D + pad);
  } else {
    in.head_stride = D + pad;
    in.token_stride = H * (D + pad);
  }
  const size_t elems = static_cast<size_t>(T * H * (D + pad)) + c.misalign;
  std::vector<uint8_t> in_buf(elems * esize + 64), out_buf(elems * esize + 64);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t k = 0; k < elems; ++k) {
    const float v = normal(rng);
    if (c.dtype == DType::kF32) {
      std::memcpy(in_buf.data() + k * 4, &v, 4);
    } else {
      const uint16_t h = c.dtype == DType::kBF16 ? FloatToBf16(v) : FloatToF16(v);
      std::memcpy(in_buf.data() + k * 2, &h, 2);
    }
  }
  in.data = in_buf.data() + c.misalign * esize;
  TensorView out = in;
  out.data = out_buf.data() + c.misalign * esize;

  // The kernel reads rows only: row t holds the table row of positions[t] (the caller computes
  // rows past the table, e.g. 2^31 - 1, with the same function).
  std::vector<float> rows(static_cast<size_t>(T * 2 * n));
  for (int64_t t = 0; t < T; ++t) {
    table.ComputeRow(positions[t], rows.data() + t * 2 * n, rows.data() + t * 2 * n + n);
  }
  std::vector<int64_t> row_index(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) row_index[t] = t;
  const RopeOperand op{in, out};
  const PositionSpan pos(row_index);
  RotateJob job;
  job.ops = std::span<const RopeOperand>(&op, 1);
  job.positions = &pos;
  job.rows = rows.data();
  job.num_rows = T;
  job.row_stride = 2 * n;
  job.num_pairs = n;
  job.layout = c.layout;
  job.direction = c.direction;
  RotateTokens(job, 0, T);

  // In-place must give the same bits.
  std::vector<uint8_t> inplace_buf = in_buf;
  RopeOperand op_inplace{in, in};
  op_inplace.in.data = op_inplace.out.data = inplace_buf.data() + c.misalign * esize;
  job.ops = std::span<const RopeOperand>(&op_inplace, 1);
  RotateTokens(job, 0, T);

  std::vector<float> cos(n), sin(n);
  std::vector<double> x(D), y(D);
  for (int64_t t = 0; t < T; ++t) {
    table.ComputeRow(positions[t], cos.data(), sin.data());
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = t * in.token_stride + h * in.head_stride;
      for (int64_t k = 0; k < D; ++k) x[k] = reference::LoadAsDouble(in.data, c.dtype, off + k);
      reference::RotateHead(x.data(), y.data(), cos.data(), sin.data(), n, static_cast<int>(D),
                            c.layout, c.direction);
      for (int i = 0; i < n; ++i) {
        const int ia = c.layout == Layout::kHalfSplit ? i : 2 * i;
        const int ib = c.layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
        // Float32 arithmetic: one rounding of a product and one of the fused (or separate)
        // multiply-add: |err| <= 2^-23 (|x_a c| + |x_b s|); then the storage rounding.
        const double mag = std::abs(x[ia] * cos[i]) + std::abs(x[ib] * sin[i]);
        const double mag_b = std::abs(x[ib] * cos[i]) + std::abs(x[ia] * sin[i]);
        for (const auto& [k, m] : {std::pair<int, double>{ia, mag}, {ib, mag_b}}) {
          const double arith = std::ldexp(m, -23);
          const double tol = arith + DTypeHalfUlp(c.dtype, std::abs(y[k]) + arith);
          const double got = reference::LoadAsDouble(out.data, c.dtype, off + k);
          ASSERT_LE(std::abs(got - y[k]), tol)
              << "target " << hwy::TargetName(HWY_TARGET) << " dtype " << DTypeName(c.dtype)
              << " layout " << LayoutName(c.layout) << " D " << D << " R " << c.rotary_dim << " t "
              << t << " pos " << positions[t] << " h " << h << " channel " << k;
        }
      }
      for (int64_t k = c.rotary_dim; k < D; ++k) {
        ASSERT_EQ(std::memcmp(static_cast<const uint8_t*>(out.data) + (off + k) * esize,
                              static_cast<const uint8_t*>(in.data) + (off + k) * esize, esize),
                  0)
            << "pass-through channel " << k << " changed";
      }
    }
  }
  // In-place result equals out-of-place on every element the view covers.
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = (t * in.token_stride + h * in.head_stride + c.misalign) * esize;
      ASSERT_EQ(std::memcmp(inplace_buf.data() + off, out_buf.data() + off, D * esize), 0)
          << "in-place differs from out-of-place at t " << t << " h " << h;
    }
  }
}

void TestRotateMatchesReference() {
  std::mt19937 rng(1234);
  const std::vector<int64_t> positions = {0,      1,       7,          4097, 32771,
                                          131101, 1048573, 2147483647, 4095, 12};
  const std::pair<int, int> dims[] = {{2, 2},   {6, 6},   {30, 30},   {64, 64},  {80, 32},
                                      {96, 24}, {96, 96}, {128, 128}, {128, 96}, {130, 130}};
  for (const auto& [D, R] : dims) {
    const RopeTable table(MathFrequencies(R, 10000.0, R == 96 ? 1.19 : 1.0), 4098);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        for (Direction dir : {Direction::kForward, Direction::kBackward}) {
          const bool head_major = (D + R) % 4 == 0;
          const int misalign = D % 3 == 0 ? 1 : 0;
          RunCase({dtype, layout, dir, D, R, D >= 96 ? 3 : 2, head_major, misalign}, table,
                  positions, rng);
        }
      }
    }
  }
}

void TestConversionsRoundToNearestEven() {
  // Every binary16 value widens exactly.
  std::vector<uint16_t> halves(65536);
  for (uint32_t h = 0; h < 65536; ++h) halves[h] = static_cast<uint16_t>(h);
  std::vector<float> widened(65536);
  ConvertF16ToFloat(halves.data(), widened.data(), halves.size());
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = F16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(widened[h])) << h;
    } else {
      ASSERT_EQ(std::memcmp(&want, &widened[h], 4), 0) << "f16 bits " << h;
    }
  }
  // Narrowing: halfway cases, subnormals, overflow, specials and random bit patterns.
  std::vector<float> values = {
      0.0f,          -0.0f,          1.0f,     65504.0f,      65519.99f,    65520.0f,
      1e10f,         -1e10f,         INFINITY, -INFINITY,     NAN,          5.9604645e-8f,
      2.9802322e-8f, 2.98023259e-8f, 1e-9f,    6.1035156e-5f, 6.1035152e-5f};
  std::mt19937 rng(99);
  for (int k = 0; k < 200000; ++k) {
    uint32_t bits = rng();
    if (k % 2) bits = (bits & 0x8FFFFFFFu) | 0x30000000u;  // bias towards the fp16 range
    if (k % 7 == 0) bits = (bits & ~0x1FFFu) | 0x1000u;    // exact fp16 halfway cases
    if (k % 11 == 0) bits = (bits & ~0xFFFFu) | 0x8000u;   // exact bf16 halfway cases
    float f;
    std::memcpy(&f, &bits, 4);
    values.push_back(f);
  }
  std::vector<uint16_t> f16(values.size()), bf16(values.size());
  ConvertFloatToF16(values.data(), f16.data(), values.size());
  ConvertFloatToBf16(values.data(), bf16.data(), values.size());
  for (size_t k = 0; k < values.size(); ++k) {
    if (std::isnan(values[k])) {
      ASSERT_TRUE(std::isnan(F16ToFloat(f16[k])));
      ASSERT_TRUE(std::isnan(Bf16ToFloat(bf16[k])));
      continue;
    }
    ASSERT_EQ(f16[k], FloatToF16(values[k])) << "float " << values[k];
    ASSERT_EQ(bf16[k], FloatToBf16(values[k])) << "float " << values[k];
  }
  // The interleaved layout's pair paths (StorePairs / LoadPairs): the same rules. Pair i is
  // (values[i], values[P + i]); every 16-bit pattern is widened as both halves of a pair.
  const size_t P = values.size() / 2;
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const bool is_f16 = dtype == DType::kF16;
    std::vector<uint16_t> packed(2 * P);
    ConvertFloatPairsTo16(dtype, values.data(), values.data() + P, packed.data(), P);
    for (size_t i = 0; i < 2 * P; ++i) {
      const float v = values[i % 2 == 0 ? i / 2 : P + i / 2];
      const float got = is_f16 ? F16ToFloat(packed[i]) : Bf16ToFloat(packed[i]);
      if (std::isnan(v)) {
        ASSERT_TRUE(std::isnan(got));
        continue;
      }
      ASSERT_EQ(packed[i], is_f16 ? FloatToF16(v) : FloatToBf16(v)) << "pair path, float " << v;
    }
    std::vector<uint16_t> all(2 * 65536);
    for (uint32_t h = 0; h < 65536; ++h) {
      all[2 * h] = static_cast<uint16_t>(h);
      all[2 * h + 1] = static_cast<uint16_t>(65535 - h);
    }
    std::vector<float> a(65536), b(65536);
    Convert16PairsToFloats(dtype, all.data(), a.data(), b.data(), 65536);
    for (uint32_t i = 0; i < 2 * 65536; ++i) {
      const float got = i % 2 == 0 ? a[i / 2] : b[i / 2];
      const float want = is_f16 ? F16ToFloat(all[i]) : Bf16ToFloat(all[i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got)) << i;
      } else {
        ASSERT_EQ(std::memcmp(&want, &got, 4), 0) << "pair path, 16-bit pattern " << all[i];
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ropekit {
HWY_BEFORE_TEST(RopeKernelTest);
HWY_EXPORT_AND_TEST_P(RopeKernelTest, TestRotateMatchesReference);
HWY_EXPORT_AND_TEST_P(RopeKernelTest, TestConversionsRoundToNearestEven);
}  // namespace ropekit
#endif
