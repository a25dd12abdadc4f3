// KV-cache entry points through the public API:
//  - ApplyRopeAndAppend is bit-identical to "ApplyRope, then copy k and v into the slots" for
//    contiguous, paged NHD and paged HND caches, every dtype, both layouts, in-place and
//    out-of-place q, padding slots, both backends and any thread count, with one-axis and
//    multimodal ([A, T]) positions, rows in the table and computed past it;
//  - ShiftKeys (context shift) agrees with rotating the unrotated keys at p + delta within the
//    bound derived below, and never applies the attention factor twice;
//  - RopePlan (prepared calls) is bit-identical to ApplyRope;
//  - every argument error names its argument.
#include "ropekit/kv_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ropekit/half.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

RopeTable MakeTable(int head_dim, int rotary_dim, RopeType type) {
  RopeParams p;
  p.type = type;
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  p.base = 10000.0;
  p.max_position_embeddings = 32768;
  if (type == RopeType::kYarn) {
    p.factor = 4;
    p.original_max_position_embeddings = 8192;  // A = 0.1 ln 4 + 1 = 1.1386
  }
  return RopeTable(ComputeFrequencies(p, Numerics::kExact), 256);
}

std::vector<uint8_t> RandomBytesOf(size_t elems, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<uint8_t> out(elems * DTypeSize(dtype));
  for (size_t k = 0; k < elems; ++k) {
    const float f = normal(rng);
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * k, &f, 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(f) : FloatToF16(f);
      std::memcpy(out.data() + 2 * k, &h, 2);
    }
  }
  return out;
}

double Load(const void* base, DType dtype, int64_t k) {
  if (dtype == DType::kF32) return static_cast<const float*>(base)[k];
  const uint16_t h = static_cast<const uint16_t*>(base)[k];
  return dtype == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
}

enum class CacheKind { kContiguous, kPagedNhd, kPagedHnd };

TEST(ApplyRopeAndAppend, BitIdenticalToRotateThenCopy) {
  const int64_t T = 5, H = 4, Hkv = 2;
  ThreadPool pool(2);
  for (const auto& [D, R] : {std::pair<int, int>{64, 64}, {80, 48}}) {
    const RopeTable table = MakeTable(D, R, RopeType::kYarn);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        for (CacheKind kind :
             {CacheKind::kContiguous, CacheKind::kPagedNhd, CacheKind::kPagedHnd}) {
          for (bool in_place : {true, false}) {
            for (Backend backend : {Backend::kSimd, Backend::kReference}) {
              for (bool multimodal : {false, true}) {
                const int64_t pages = 6, page = 4, slots_total = pages * page;
                const size_t esize = DTypeSize(dtype);
                std::vector<uint8_t> cache_k = RandomBytesOf(slots_total * Hkv * D, dtype, 1);
                std::vector<uint8_t> cache_v = RandomBytesOf(slots_total * Hkv * D, dtype, 2);
                std::vector<uint8_t> want_k = cache_k, want_v = cache_v;
                KvCacheView cache;
                KvCacheView want;
                if (kind == CacheKind::kContiguous) {
                  cache =
                      ContiguousKvCache(cache_k.data(), cache_v.data(), dtype, slots_total, Hkv, D);
                  want =
                      ContiguousKvCache(want_k.data(), want_v.data(), dtype, slots_total, Hkv, D);
                } else {
                  const bool hnd = kind == CacheKind::kPagedHnd;
                  cache =
                      PagedKvCache(cache_k.data(), cache_v.data(), dtype, pages, page, Hkv, D, hnd);
                  want =
                      PagedKvCache(want_k.data(), want_v.data(), dtype, pages, page, Hkv, D, hnd);
                }
                // Positions 5..9 of a sequence whose block table is {3, 0, 5}: slots 1, 2, 3, 20,
                // 21; the third token is padding.
                const std::vector<int32_t> block_table = {3, 0, 5};
                std::vector<int64_t> slots = SlotsFromBlockTable(block_table, page, 5, T);
                if (kind == CacheKind::kContiguous) slots = {7, 0, 3, 12, 23};
                slots[2] = -1;
                // 300 grows the table; 2^31 - 1 is past its largest size (a computed row).
                const std::vector<int64_t> positions = {5, 6, 7, 300, kMaxPosition};
                // Multimodal: three axes (chunked, Qwen2-VL style) with distinct positions.
                const std::vector<int64_t> pos_h = {2, 6, 1, 40, 9}, pos_w = {0, 3, 7, 299, 8};
                const PositionSpan axis_spans[] = {PositionSpan(positions), PositionSpan(pos_h),
                                                   PositionSpan(pos_w)};
                const AxisPositions axis_positions{axis_spans};
                const int n = R / 2;
                const RopeAxes axes{{n - 2 * (n / 3), n / 3, n / 3}, false};
                const std::vector<uint8_t> q0 = RandomBytesOf(T * H * D, dtype, 3);
                const std::vector<uint8_t> k = RandomBytesOf(T * Hkv * D, dtype, 4);
                const std::vector<uint8_t> v = RandomBytesOf(T * Hkv * D, dtype, 5);
                RotateOptions options;
                options.layout = layout;
                options.backend = backend;
                options.pool = &pool;
                options.min_parallel_bytes = 0;  // split even these small calls

                // Fused.
                std::vector<uint8_t> q = q0, q_out(q0.size());
                const TensorView q_in = ContiguousView(q.data(), dtype, T, H, D);
                const RopeOperand q_op{
                    q_in, in_place ? q_in : ContiguousView(q_out.data(), dtype, T, H, D)};
                const TensorView k_view =
                    ContiguousView(const_cast<uint8_t*>(k.data()), dtype, T, Hkv, D);
                const TensorView v_view =
                    ContiguousView(const_cast<uint8_t*>(v.data()), dtype, T, Hkv, D);
                if (multimodal) {
                  ApplyRopeAndAppend(table, axis_positions, axes, q_op, k_view, v_view, cache,
                                     slots, options);
                } else {
                  ApplyRopeAndAppend(table, PositionSpan(positions), q_op, k_view, v_view, cache,
                                     slots, options);
                }

                // Unfused: rotate q and k, then copy k and v row by row.
                std::vector<uint8_t> q_ref = q0, k_rot(k.size());
                const RopeOperand ops[] = {
                    {ContiguousView(q_ref.data(), dtype, T, H, D),
                     ContiguousView(q_ref.data(), dtype, T, H, D)},
                    {k_view, ContiguousView(k_rot.data(), dtype, T, Hkv, D)}};
                RotateOptions plain = options;
                if (multimodal) {
                  ApplyRope(table, axis_positions, axes, ops, plain);
                } else {
                  ApplyRope(table, PositionSpan(positions), ops, plain);
                }
                for (int64_t t = 0; t < T; ++t) {
                  if (slots[t] < 0) continue;
                  for (int64_t h = 0; h < Hkv; ++h) {
                    const int64_t dst = (want.SlotOffset(slots[t]) + h * want.head_stride) * esize;
                    const int64_t src = (t * Hkv + h) * D * esize;
                    std::memcpy(want_k.data() + dst, k_rot.data() + src, D * esize);
                    std::memcpy(want_v.data() + dst, v.data() + src, D * esize);
                  }
                }
                const std::string where =
                    std::string(DTypeName(dtype)) + " " + std::string(LayoutName(layout)) +
                    " kind " + std::to_string(static_cast<int>(kind)) + " D " + std::to_string(D) +
                    " backend " + std::to_string(static_cast<int>(backend)) +
                    (multimodal ? " axes" : "");
                ASSERT_EQ(cache_k, want_k) << where;
                ASSERT_EQ(cache_v, want_v) << where;
                ASSERT_EQ(in_place ? q : q_out, q_ref) << where;
                if (!in_place) {
                  ASSERT_EQ(q, q0) << "q input changed";
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(ApplyRopeAndAppend, ArgumentErrors) {
  const RopeTable table = MakeTable(8, 8, RopeType::kDefault);
  std::vector<float> q(2 * 2 * 8), k(2 * 8), v(2 * 8), ck(4 * 8), cv(4 * 8);
  const TensorView qv = ContiguousView(q.data(), DType::kF32, 2, 2, 8);
  const RopeOperand q_op{qv, qv};
  const TensorView kv = ContiguousView(k.data(), DType::kF32, 2, 1, 8);
  const TensorView vv = ContiguousView(v.data(), DType::kF32, 2, 1, 8);
  const KvCacheView cache = ContiguousKvCache(ck.data(), cv.data(), DType::kF32, 4, 1, 8);
  const std::vector<int64_t> pos = {0, 1};
  auto call = [&](std::vector<int64_t> slots, KvCacheView c, TensorView kk) {
    ApplyRopeAndAppend(table, PositionSpan(pos), q_op, kk, vv, c, slots);
  };
  EXPECT_THAT(([&] {
                call({0, 4}, cache, kv);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("slots[1] = 4 is out of range")));
  EXPECT_THAT(([&] {
                call({2, 2}, cache, kv);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("repeats an earlier slot")));
  EXPECT_THAT(([&] { call({0}, cache, kv); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("slots has 1 entries")));
  KvCacheView wrong_heads = cache;
  wrong_heads.num_heads = 2;
  wrong_heads.token_stride = 16;
  EXPECT_THAT(([&] {
                call({0, 1}, wrong_heads, kv);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("k must have the cache's dtype")));
  KvCacheView overlapping = cache;
  overlapping.token_stride = 4;
  EXPECT_THAT(([&] {
                call({0, 1}, overlapping, kv);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("cache strides make rows overlap")));
  const TensorView k_in_cache = ContiguousView(ck.data(), DType::kF32, 2, 1, 8);
  EXPECT_THAT(([&] {
                call({2, 3}, cache, k_in_cache);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("k overlaps the KV cache")));
  EXPECT_THAT(([&] { SlotsFromBlockTable(std::vector<int32_t>{0}, 4, 3, 2); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("needs block_table[1]")));
  // Multimodal positions: the axis count must match the sections, and slots are checked as for
  // one-axis positions.
  const PositionSpan one_axis[] = {PositionSpan(pos)};
  const RopeAxes axes{{2, 1, 1}, false};
  EXPECT_THAT(([&] {
                ApplyRopeAndAppend(table, AxisPositions{one_axis}, axes, q_op, kv, vv, cache,
                                   std::vector<int64_t>{0, 1});
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("positions have 1 axes")));
  const PositionSpan three_axes[] = {PositionSpan(pos), PositionSpan(pos), PositionSpan(pos)};
  EXPECT_THAT(([&] {
                ApplyRopeAndAppend(table, AxisPositions{three_axes}, axes, q_op, kv, vv, cache,
                                   std::vector<int64_t>{1, 1});
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("repeats an earlier slot")));
}

// Context shift: keys rotated at p, shifted by delta, against the same keys rotated at p + delta.
// Bound (float32 arithmetic, exact-numerics table, pair (a, b) with r = |(a, b)|, magnitude A):
//  - each table entry is A cos / A sin rounded once: |err| <= 2^-24 A (shift row: 2^-24, A = 1);
//  - one rotation in float32 errs by <= 2^-23 (|a c| + |b s|) <= 2^-23 sqrt(2) A r per component
//    plus the table error 2^-24 (|a| + |b|) A <= 2^-24 sqrt(2) A r;
//  - from scratch: <= 3 sqrt(2) 2^-24 A r. Shifted: the first rotation's error (3 sqrt(2) 2^-24 A r
//    per component) is carried through the second (a rotation mixes two components: x2), plus the
//    shift row's and the second rotation's own errors (sqrt(2) 2^-24 A r + 2 sqrt(2) 2^-24 A r):
//    <= 9 sqrt(2) 2^-24 A r. Difference <= 12 sqrt(2) 2^-24 A r.
//  - 16-bit storage with unit roundoff u (2^-8 bf16, 2^-11 fp16): the stored rotated key errs by u
//  A r
//    per component, carried x2 by the shift, plus the final stores of both results: + 4 u A r.
TEST(ShiftKeys, MatchesRotationAtShiftedPositionsWithinBound) {
  const int64_t T = 9, Hkv = 2;
  for (RopeType type : {RopeType::kDefault, RopeType::kYarn}) {
    for (const auto& [D, R] : {std::pair<int, int>{64, 64}, {72, 40}}) {
      const RopeTable table = MakeTable(D, R, type);
      const double A = table.frequencies().attention_factor;
      const int n = R / 2;
      for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
          for (int64_t delta : {int64_t{37}, int64_t{-1000}, int64_t{65000}}) {
            for (bool paged : {false, true}) {
              const std::vector<uint8_t> x = RandomBytesOf(T * Hkv * D, dtype, 9);
              std::vector<int64_t> pos(T), shifted(T);
              for (int64_t t = 0; t < T; ++t) {
                pos[t] = 1000 + 977 * t;
                shifted[t] = pos[t] + delta;
              }
              RotateOptions options;
              options.layout = layout;
              std::vector<uint8_t> cache(x.size()), want(x.size());
              const TensorView xv =
                  ContiguousView(const_cast<uint8_t*>(x.data()), dtype, T, Hkv, D);
              const RopeOperand rotate{xv, ContiguousView(cache.data(), dtype, T, Hkv, D)};
              ApplyRope(table, PositionSpan(pos), {&rotate, 1}, options);
              const RopeOperand scratch{xv, ContiguousView(want.data(), dtype, T, Hkv, D)};
              ApplyRope(table, PositionSpan(shifted), {&scratch, 1}, options);
              if (paged) {
                // The cache as 3 pages of 3 slots; shift every slot, in shuffled order.
                const KvCacheView view = PagedKvCache(cache.data(), nullptr, dtype, 3, 3, Hkv, D);
                const std::vector<int64_t> slots = {4, 0, 8, 1, 7, 2, 6, 3, 5};
                ShiftKeys(table, view, slots, delta, options);
              } else {
                ShiftKeys(table, ContiguousView(cache.data(), dtype, T, Hkv, D), delta, options);
              }
              const double u =
                  dtype == DType::kF32 ? 0 : std::ldexp(1.0, dtype == DType::kBF16 ? -8 : -11);
              for (int64_t t = 0; t < T; ++t) {
                for (int64_t h = 0; h < Hkv; ++h) {
                  const int64_t off = (t * Hkv + h) * D;
                  for (int i = 0; i < n; ++i) {
                    const int ia = layout == Layout::kHalfSplit ? i : 2 * i;
                    const int ib = layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
                    const double a = Load(x.data(), dtype, off + ia),
                                 b = Load(x.data(), dtype, off + ib);
                    const double r = std::hypot(a, b);
                    const double tol =
                        A * r * (12 * std::sqrt(2.0) * std::ldexp(1.0, -24) + 4 * u) +
                        (dtype == DType::kF16 ? 4 * std::ldexp(1.0, -25) : 0);
                    for (int c : {ia, ib}) {
                      ASSERT_NEAR(Load(cache.data(), dtype, off + c),
                                  Load(want.data(), dtype, off + c), tol)
                          << DTypeName(dtype) << " " << LayoutName(layout) << " delta " << delta
                          << " type " << RopeTypeName(type) << " t " << t << " ch " << c;
                    }
                  }
                  for (int c = R; c < D; ++c) {
                    ASSERT_EQ(Load(cache.data(), dtype, off + c), Load(x.data(), dtype, off + c));
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(ShiftKeys, ZeroDeltaAndInverseShiftAndErrors) {
  const RopeTable table = MakeTable(64, 64, RopeType::kYarn);
  const std::vector<uint8_t> x = RandomBytesOf(3 * 64, DType::kF32, 2);
  std::vector<uint8_t> k = x;
  const TensorView view = ContiguousView(k.data(), DType::kF32, 3, 1, 64);
  ShiftKeys(table, view, 0, {});
  EXPECT_EQ(k, x);
  // +d then -d: R(d)^T R(d) = I up to rounding (the attention factor is not applied: A > 1
  // would grow the norm by A^2).
  ShiftKeys(table, view, 500, {});
  ShiftKeys(table, view, -500, {});
  for (int c = 0; c < 3 * 64; ++c) {
    EXPECT_NEAR(Load(k.data(), DType::kF32, c), Load(x.data(), DType::kF32, c), 1e-5);
  }
  RotateOptions backward;
  backward.direction = Direction::kBackward;
  EXPECT_THAT(([&] { ShiftKeys(table, view, 5, backward); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("direction must be forward")));
  const KvCacheView cache = ContiguousKvCache(k.data(), nullptr, DType::kF32, 3, 1, 64);
  EXPECT_THAT(([&] { ShiftKeys(table, cache, std::vector<int64_t>{3}, 1); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("slots[0] = 3 is out of range")));
}

TEST(RopePlan, BitIdenticalToApplyRopeAndChecksPositions) {
  const RopeTable table = MakeTable(128, 128, RopeType::kYarn);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const std::vector<uint8_t> q0 = RandomBytesOf(32 * 128, dtype, 1);
    const std::vector<uint8_t> k0 = RandomBytesOf(8 * 128, dtype, 2);
    std::vector<uint8_t> q = q0, k = k0, q2 = q0, k2 = k0;
    const RopeOperand ops[] = {
        {ContiguousView(q.data(), dtype, 1, 32, 128), ContiguousView(q.data(), dtype, 1, 32, 128)},
        {ContiguousView(k.data(), dtype, 1, 8, 128), ContiguousView(k.data(), dtype, 1, 8, 128)}};
    const RopeOperand ops2[] = {
        {ContiguousView(q2.data(), dtype, 1, 32, 128),
         ContiguousView(q2.data(), dtype, 1, 32, 128)},
        {ContiguousView(k2.data(), dtype, 1, 8, 128), ContiguousView(k2.data(), dtype, 1, 8, 128)}};
    RopePlan plan(table, ops, 1);
    // Decoding past the table's rows (256), a far row computed on the fly, and the last position.
    for (int64_t p :
         {int64_t{3}, int64_t{255}, int64_t{256}, int64_t{5000}, int64_t{40000000}, kMaxPosition}) {
      const std::vector<int64_t> pos = {p};
      plan.Run(PositionSpan(pos));
      ApplyRope(table, PositionSpan(pos), ops2);
      ASSERT_EQ(q, q2) << p;
      ASSERT_EQ(k, k2) << p;
    }
    const std::vector<int64_t> two = {1, 2}, negative = {-3};
    EXPECT_THAT(([&] { plan.Run(PositionSpan(two)); }),
                ::testing::ThrowsMessage<Error>(HasSubstr("made for 1 tokens")));
    EXPECT_THAT(([&] { plan.Run(PositionSpan(negative)); }),
                ::testing::ThrowsMessage<Error>(HasSubstr("positions[0] = -3")));
  }
  // Several tokens per call (prefill chunks, batched decode), on one and on two threads, with
  // rows in the table, rows it grows to and a computed row past it.
  for (size_t threads : {1, 2}) {
    ThreadPool pool(threads);
    const int64_t T = 24;
    const std::vector<uint8_t> x0 = RandomBytesOf(T * 32 * 128, DType::kBF16, 7);
    std::vector<uint8_t> x = x0, x2 = x0;
    const TensorView xv = ContiguousView(x.data(), DType::kBF16, T, 32, 128);
    const TensorView xv2 = ContiguousView(x2.data(), DType::kBF16, T, 32, 128);
    const RopeOperand op{xv, xv}, op2{xv2, xv2};
    RotateOptions options;
    options.pool = &pool;
    options.min_parallel_bytes = 0;  // split even these small calls
    options.layout = Layout::kInterleaved;
    RopePlan plan(table, std::span<const RopeOperand>(&op, 1), T, options);
    std::vector<int64_t> pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = 900 + 37 * t;
    pos[5] = kMaxPosition;
    plan.Run(PositionSpan(pos));
    ApplyRope(table, PositionSpan(pos), std::span<const RopeOperand>(&op2, 1), options);
    ASSERT_EQ(x, x2) << threads << " threads";
    ASSERT_NE(x, x0);
  }
  std::vector<float> x(4 * 128);
  const TensorView a = ContiguousView(x.data(), DType::kF32, 1, 2, 128);
  TensorView b = a;
  b.data = x.data() + 128;  // overlaps a's second head
  const RopeOperand bad[] = {{a, a}, {b, b}};
  EXPECT_THAT(([&] { RopePlan(table, bad, 1); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("overlaps the output of operand 0")));
}

}  // namespace
}  // namespace ropekit
