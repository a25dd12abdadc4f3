// ApplyRope through the public API: backends agree, results are bitwise identical for every
// thread count, q and k with different head counts in one call, fused-QKV slices, head-major
// views, int32/int64 positions, and every validation error names its field.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "ropekit/half.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

RopeTable MakeTable(int head_dim, int rotary_dim, RopeType type = RopeType::kDefault) {
  RopeParams p;
  p.type = type;
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  p.base = 500000.0;
  if (type == RopeType::kYarn) {
    p.factor = 4;
    p.original_max_position_embeddings = 8192;
    p.max_position_embeddings = 32768;
  }
  return RopeTable(ComputeFrequencies(p, Numerics::kExact));
}

std::vector<int64_t> Positions(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> p(n);
  for (auto& x : p) x = rng() % 200000;
  if (n > 3) {
    p[0] = 0;
    p[1] = 131101;
    p[2] = 1048573;
  }
  return p;
}

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(ApplyRopeTest, BitwiseIdenticalForEveryThreadCount) {
  const RopeTable table = MakeTable(128, 128, RopeType::kYarn);
  const int64_t T = 97, H = 32, D = 128;
  const std::vector<int64_t> pos = Positions(T, 1);
  const std::vector<float> x = RandomFloats(T * H * D, 2);
  std::vector<float> first;
  for (size_t threads : {1, 2, 3, 4, 7}) {
    ThreadPool pool(threads);
    for (int repeat = 0; repeat < 2; ++repeat) {
      std::vector<float> y = x;
      RotateOptions options;
      options.pool = &pool;
      options.min_parallel_bytes = 0;  // split even this small call
      ApplyRopeInPlace(table, pos, ContiguousView(y.data(), DType::kF32, T, H, D), options);
      if (first.empty()) first = y;
      ASSERT_EQ(std::memcmp(y.data(), first.data(), y.size() * 4), 0) << threads << " threads";
    }
  }
  EXPECT_NE(std::memcmp(first.data(), x.data(), x.size() * 4), 0);
}

TEST(ApplyRopeTest, SimdAgreesWithReferenceBackend) {
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
      const RopeTable table = MakeTable(80, 32);
      const int64_t T = 19, H = 3, D = 80;
      const std::vector<int64_t> pos = Positions(T, 3);
      const std::vector<float> xf = RandomFloats(T * H * D, 4);
      std::vector<uint8_t> a(T * H * D * DTypeSize(dtype)), b;
      for (size_t k = 0; k < xf.size(); ++k) {
        if (dtype == DType::kF32) {
          std::memcpy(&a[k * 4], &xf[k], 4);
        } else {
          const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(xf[k]) : FloatToF16(xf[k]);
          std::memcpy(&a[k * 2], &h, 2);
        }
      }
      b = a;
      RotateOptions simd, ref;
      simd.layout = ref.layout = layout;
      simd.backend = Backend::kSimd;
      ref.backend = Backend::kReference;
      ApplyRopeInPlace(table, pos, ContiguousView(a.data(), dtype, T, H, D), simd);
      ApplyRopeInPlace(table, pos, ContiguousView(b.data(), dtype, T, H, D), ref);
      size_t differ = 0;
      for (size_t k = 0; k < xf.size(); ++k) {
        double va, vb;
        if (dtype == DType::kF32) {
          float fa, fb;
          std::memcpy(&fa, &a[k * 4], 4);
          std::memcpy(&fb, &b[k * 4], 4);
          va = fa;
          vb = fb;
        } else {
          uint16_t ha, hb;
          std::memcpy(&ha, &a[k * 2], 2);
          std::memcpy(&hb, &b[k * 2], 2);
          va = dtype == DType::kBF16 ? Bf16ToFloat(ha) : F16ToFloat(ha);
          vb = dtype == DType::kBF16 ? Bf16ToFloat(hb) : F16ToFloat(hb);
        }
        // Same table row; float32 FMA arithmetic vs double: the results differ by at most one
        // unit in the last place of the storage type (at |y| <= 8 for these inputs).
        const double ulp = dtype == DType::kF32    ? 0x1.0p-20
                           : dtype == DType::kBF16 ? 0x1.0p-4
                                                   : 0x1.0p-7;
        ASSERT_LE(std::abs(va - vb), ulp) << DTypeName(dtype) << " element " << k;
        differ += va != vb;
      }
      EXPECT_LT(differ, xf.size() / 4) << "SIMD and reference should mostly agree bitwise";
    }
  }
}

// Positions past the table's largest size get rows computed by the caller of the kernel; a call
// mixing them with table rows must give, token by token, the bits of one-token calls and agree
// with the double reference within the bound above.
TEST(ApplyRopeTest, PositionsPastTheTableInsideACall) {
  const RopeTable table = MakeTable(64, 64);
  const int64_t T = 6, H = 5, D = 64;
  ASSERT_LT(table.max_capacity(), int64_t{1} << 30);
  const std::vector<int64_t> pos = {5, kMaxPosition, 7, int64_t{1} << 30, 9, kMaxPosition - 2};
  const std::vector<float> x = RandomFloats(T * H * D, 8);
  std::vector<float> y = x, ref = x, one = x;
  RotateOptions simd, reference;
  simd.backend = Backend::kSimd;
  reference.backend = Backend::kReference;
  ApplyRopeInPlace(table, pos, ContiguousView(y.data(), DType::kF32, T, H, D), simd);
  ApplyRopeInPlace(table, pos, ContiguousView(ref.data(), DType::kF32, T, H, D), reference);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int64_t> p1 = {pos[t]};
    ApplyRopeInPlace(table, p1, ContiguousView(one.data() + t * H * D, DType::kF32, 1, H, D), simd);
  }
  ASSERT_EQ(y, one);
  for (size_t k = 0; k < y.size(); ++k) {
    ASSERT_LE(std::abs(y[k] - ref[k]), 0x1.0p-20) << "element " << k;  // as above: 1 ulp at 8
  }
  EXPECT_NE(y, x);
}

TEST(ApplyRopeTest, ReferenceBackendFromEnvironment) {
  const RopeTable table = MakeTable(64, 64);
  const std::vector<int64_t> pos = Positions(8, 5);
  std::vector<float> x = RandomFloats(8 * 2 * 64, 6), y = x, z = x;
  RotateOptions ref;
  ref.backend = Backend::kReference;
  ApplyRopeInPlace(table, pos, ContiguousView(y.data(), DType::kF32, 8, 2, 64), ref);
  ::setenv("ROPEKIT_BACKEND", "reference", 1);
  ApplyRopeInPlace(table, pos, ContiguousView(z.data(), DType::kF32, 8, 2, 64));
  ::unsetenv("ROPEKIT_BACKEND");
  EXPECT_EQ(y, z);
}

TEST(ApplyRopeTest, QueryAndKeyWithDifferentHeadCountsInOneCall) {
  const RopeTable table = MakeTable(128, 128);
  const int64_t T = 33, H = 32, Hkv = 8, D = 128;
  const std::vector<int64_t> pos = Positions(T, 7);
  std::vector<float> q = RandomFloats(T * H * D, 8), k = RandomFloats(T * Hkv * D, 9);
  std::vector<float> q_sep = q, k_sep = k, q_out(q.size()), k_out(k.size());
  const RopeOperand ops[] = {{ContiguousView(q.data(), DType::kF32, T, H, D),
                              ContiguousView(q_out.data(), DType::kF32, T, H, D)},
                             {ContiguousView(k.data(), DType::kF32, T, Hkv, D),
                              ContiguousView(k_out.data(), DType::kF32, T, Hkv, D)}};
  ThreadPool pool(2);
  RotateOptions options;
  options.pool = &pool;
  options.min_parallel_bytes = 0;
  ApplyRope(table, pos, ops, options);
  ApplyRopeInPlace(table, pos, ContiguousView(q_sep.data(), DType::kF32, T, H, D));
  ApplyRopeInPlace(table, pos, ContiguousView(k_sep.data(), DType::kF32, T, Hkv, D));
  EXPECT_EQ(q_out, q_sep);
  EXPECT_EQ(k_out, k_sep);
}

TEST(ApplyRopeTest, FusedQkvSlicesAndHeadMajorViews) {
  // A fused [T, (H + 2 Hkv) * D] buffer: q and k rotate in place, v is untouched.
  const RopeTable table = MakeTable(64, 32);
  const int64_t T = 21, H = 4, Hkv = 2, D = 64, W = (H + 2 * Hkv) * D;
  const std::vector<int32_t> pos32 = {5,    0,     131101, 7,  4097, 32771, 1,  2,  3,  99, 100,
                                      1001, 65537, 12,     13, 14,   15,    16, 17, 18, 19};
  const std::vector<int64_t> pos64(pos32.begin(), pos32.end());
  const std::vector<float> fused = RandomFloats(T * W, 10);
  std::vector<float> work = fused;
  TensorView q{work.data(), DType::kF32, T, H, D, W, D};
  TensorView k{work.data() + H * D, DType::kF32, T, Hkv, D, W, D};
  const RopeOperand ops[] = {{q, q}, {k, k}};
  ApplyRope(table, pos32, ops);
  // Expected: contiguous copies rotated with int64 positions.
  std::vector<float> qc(T * H * D), kc(T * Hkv * D);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(&qc[t * H * D], &fused[t * W], H * D * 4);
    std::memcpy(&kc[t * Hkv * D], &fused[t * W + H * D], Hkv * D * 4);
  }
  ApplyRopeInPlace(table, pos64, ContiguousView(qc.data(), DType::kF32, T, H, D));
  ApplyRopeInPlace(table, pos64, ContiguousView(kc.data(), DType::kF32, T, Hkv, D));
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(std::memcmp(&work[t * W], &qc[t * H * D], H * D * 4), 0);
    ASSERT_EQ(std::memcmp(&work[t * W + H * D], &kc[t * Hkv * D], Hkv * D * 4), 0);
    ASSERT_EQ(std::memcmp(&work[t * W + (H + Hkv) * D], &fused[t * W + (H + Hkv) * D], Hkv * D * 4),
              0)
        << "v changed";
  }
  // Head-major [H, T, D] view of a transposed copy gives the same numbers.
  std::vector<float> hm(H * T * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) std::memcpy(&hm[(h * T + t) * D], &fused[t * W + h * D], D * 4);
  ApplyRopeInPlace(table, pos64, TensorView{hm.data(), DType::kF32, T, H, D, D, T * D});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      ASSERT_EQ(std::memcmp(&hm[(h * T + t) * D], &qc[(t * H + h) * D], D * 4), 0);
}

TEST(ApplyRopeTest, ErrorsNameTheProblem) {
  const RopeTable table = MakeTable(64, 64);
  std::vector<float> x(4 * 2 * 64), y(4 * 2 * 64);
  const TensorView v = ContiguousView(x.data(), DType::kF32, 4, 2, 64);
  auto message = [&](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, -1, 2}, v);
              }),
              HasSubstr("positions[2] = -1 is out of range [0, 2147483647]"));
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, 2, 2147483648}, v);
              }),
              HasSubstr("positions[3]"));
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, 2}, v);
              }),
              HasSubstr("num_tokens (4) must equal the number of positions (3)"));
  TensorView narrow = ContiguousView(x.data(), DType::kF32, 4, 4, 32);
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, 2, 3}, narrow);
              }),
              HasSubstr("head_dim (32) must be >= rotary_dim (64)"));
  TensorView overlap = v;
  overlap.head_stride = 32;
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, 2, 3}, overlap);
              }),
              HasSubstr("head_stride"));
  TensorView shifted = v;
  shifted.data = x.data() + 1;
  shifted.num_tokens = 3;
  TensorView in3 = v;
  in3.num_tokens = 3;
  const RopeOperand partial[] = {{in3, shifted}};
  EXPECT_THAT(message([&] {
                ApplyRope(table, std::vector<int64_t>{0, 1, 2}, partial);
              }),
              HasSubstr("overlaps input"));
  const TensorView out = ContiguousView(y.data(), DType::kF32, 4, 2, 64);
  const RopeOperand twice[] = {{v, out}, {v, out}};
  EXPECT_THAT(message([&] {
                ApplyRope(table, std::vector<int64_t>{0, 1, 2, 3}, twice);
              }),
              HasSubstr("overlaps the output of operand 0"));
  TensorView null_view = v;
  null_view.data = nullptr;
  EXPECT_THAT(message([&] {
                ApplyRopeInPlace(table, std::vector<int64_t>{0, 1, 2, 3}, null_view);
              }),
              HasSubstr("data is null"));
  TensorView f16_out = out;
  f16_out.dtype = DType::kF16;
  const RopeOperand mixed[] = {{v, f16_out}};
  EXPECT_THAT(message([&] {
                ApplyRope(table, std::vector<int64_t>{0, 1, 2, 3}, mixed);
              }),
              HasSubstr("dtype"));
  // Nothing was written by any failing call.
  EXPECT_EQ(x, std::vector<float>(x.size(), 0.0f));
  EXPECT_EQ(y, std::vector<float>(y.size(), 0.0f));
}

TEST(ThreadPoolTest, EveryTaskRunsOnceInStaticRanges) {
  for (size_t threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (size_t n : {0, 1, 2, 7, 1000}) {
      std::vector<int> hits(n, 0);
      std::vector<size_t> owner(n, 99);
      pool.ParallelFor(n, [&](size_t begin, size_t end, size_t worker) {
        for (size_t i = begin; i < end; ++i) {
          ++hits[i];
          owner[i] = worker;
        }
      });
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(hits[i], 1);
        // Static partition: worker w owns [w n / W, (w + 1) n / W) (one range when n <= 1).
        if (n > 1) {
          ASSERT_GE(i, n * owner[i] / threads);
          ASSERT_LT(i, n * (owner[i] + 1) / threads);
        }
      }
    }
  }
}

TEST(ThreadPoolTest, RethrowsTaskExceptions) {
  ThreadPool pool(3);
  EXPECT_THROW(pool.ParallelFor(30,
                                [](size_t begin, size_t, size_t) {
                                  if (begin > 0) throw Error("task failed");
                                }),
               Error);
  // The pool is still usable afterwards.
  std::vector<int> hits(10, 0);
  pool.ParallelFor(10, [&](size_t b, size_t e, size_t) {
    for (size_t i = b; i < e; ++i) hits[i] = 1;
  });
  EXPECT_EQ(hits, std::vector<int>(10, 1));
}

}  // namespace
}  // namespace ropekit
