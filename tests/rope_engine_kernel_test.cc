// Every compiled SIMD target of the engine kernel (rope_engine-inl.h) against the same target's
// RotateTokens, which rope_kernel_test.cc checks against the double reference: RotateHeads (the
// kernel of decode plans, the fused KV-cache append, multimodal rows and context shift) gives
// RotateTokens' bits for every dtype, both layouts, both directions, partial rotary, in place and
// out of place, token-major and head-major strides, and rows at any position, and for data at
// every offset from a cache-line boundary (RotateHeads rotates the pairs before the first
// boundary with narrower vectors, so that its full-width loop reads and writes whole lines).
// Both loop orders (pairs outer: RotateHeads; heads outer: RotateHeadsStream) are checked.
// GetRotateHeads returns the specialisation that matches its arguments.
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/rope_engine_kernel_test.cc"
#include "hwy/aligned_allocator.h"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "ropekit/half.h"
#include "src/kernels/rope_engine-inl.h"

#ifndef ROPEKIT_TESTS_ROPE_ENGINE_KERNEL_TEST_ONCE_
#define ROPEKIT_TESTS_ROPE_ENGINE_KERNEL_TEST_ONCE_
namespace ropekit::testing_engine {

inline RopeFrequencies Frequencies(int rotary_dim, double attention_factor) {
  RopeFrequencies f;
  f.numerics = Numerics::kExact;
  f.rotary_dim = rotary_dim;
  f.attention_factor = attention_factor;
  for (int i = 0; i < rotary_dim / 2; ++i)
    f.inv_freq.push_back(std::pow(1e4, -2.0 * i / rotary_dim));
  return f;
}

inline std::vector<uint8_t> RandomBytes(size_t elems, DType dtype, uint32_t seed) {
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

}  // namespace ropekit::testing_engine
#endif

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {

using testing_engine::Frequencies;
using testing_engine::RandomBytes;

RotateJob MakeJob(const float* rows, int64_t num_rows, int64_t row_stride, int n,
                  std::span<const RopeOperand> ops, const PositionSpan* positions, Layout layout,
                  Direction direction) {
  RotateJob job;
  job.ops = ops;
  job.positions = positions;
  job.rows = rows;
  job.num_rows = num_rows;
  job.row_stride = row_stride;
  job.num_pairs = n;
  job.layout = layout;
  job.direction = direction;
  return job;
}

// Heads of token t of a [T, H, D] view.
HeadRows HeadsOf(const TensorView& in, const TensorView& out, int64_t t) {
  const int64_t es = static_cast<int64_t>(DTypeSize(in.dtype));
  HeadRows heads;
  heads.in = static_cast<const uint8_t*>(in.data) + t * in.token_stride * es;
  heads.out = static_cast<uint8_t*>(out.data) + t * out.token_stride * es;
  heads.in_head_stride = in.head_stride;
  heads.out_head_stride = out.head_stride;
  heads.num_heads = in.num_heads;
  heads.head_dim = in.head_dim;
  return heads;
}

void TestRotateHeadsMatchesRotateTokens() {
  const int64_t T = 5, H = 3;
  // Rows of positions 0, 5, 63, 4097 and 2^31 - 1 (computed rows, as past a table).
  const std::vector<int64_t> pos = {0, 5, 63, 4097, 2147483647};
  // D = R = 64 (whole vectors), 40/24 (partial rotary, a tail), 130 (an odd pair count), 256.
  for (const auto& [D, R] :
       {std::pair<int, int>{64, 64}, {40, 24}, {130, 130}, {256, 256}, {6, 2}}) {
    const RopeTable table(Frequencies(R, R == 24 ? 1.2 : 1.0));
    const int n = R / 2;
    std::vector<float> rows(T * 2 * n);
    for (int64_t t = 0; t < T; ++t) {
      table.ComputeRow(pos[t], rows.data() + t * 2 * n, rows.data() + t * 2 * n + n);
    }
    std::vector<int64_t> identity(T);
    for (int64_t t = 0; t < T; ++t) identity[t] = t;
    const PositionSpan pid(identity);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        for (const auto& [dir, order] : {std::pair{Direction::kForward, HeadOrder::kPairsOuter},
                                         {Direction::kBackward, HeadOrder::kPairsOuter},
                                         {Direction::kForward, HeadOrder::kHeadsOuter},
                                         {Direction::kBackward, HeadOrder::kHeadsOuter}}) {
          const RotateHeadsFn fn = GetRotateHeads(dtype, layout, dir, order);
          for (bool head_major : {false, true}) {
            const std::string where =
                std::string(hwy::TargetName(HWY_TARGET)) + " " + std::string(DTypeName(dtype)) +
                " " + std::string(LayoutName(layout)) +
                (dir == Direction::kBackward ? " bwd" : "") +
                (order == HeadOrder::kHeadsOuter ? " heads-outer" : "") + " D " +
                std::to_string(D) + " R " + std::to_string(R) + (head_major ? " head-major" : "");
            std::vector<uint8_t> x = RandomBytes(T * H * D, dtype, 17 + D);
            TensorView xv = ContiguousView(x.data(), dtype, T, H, D);
            if (head_major) {
              xv.head_stride = T * D;
              xv.token_stride = D;
            }
            // Expected: RotateTokens out of place into a token-major buffer (poisoned, so the
            // pass-through copy is checked too).
            std::vector<uint8_t> want(x.size(), 0xA5);
            const RopeOperand want_op{xv, ContiguousView(want.data(), dtype, T, H, D)};
            RotateTokens(MakeJob(rows.data(), T, 2 * n, n, {&want_op, 1}, &pid, layout, dir), 0, T);
            // Out of place.
            std::vector<uint8_t> out(x.size(), 0xA5);
            const TensorView ov = ContiguousView(out.data(), dtype, T, H, D);
            for (int64_t t = 0; t < T; ++t) {
              fn(HeadsOf(xv, ov, t), rows.data() + t * 2 * n, rows.data() + t * 2 * n + n, n);
            }
            ASSERT_EQ(out, want) << "out of place " << where;
            // In place (the same view as input and output).
            for (int64_t t = 0; t < T; ++t) {
              fn(HeadsOf(xv, xv, t), rows.data() + t * 2 * n, rows.data() + t * 2 * n + n, n);
            }
            std::vector<uint8_t> in_place(x.size());
            const RopeOperand copy_op{xv, ContiguousView(in_place.data(), dtype, T, H, D)};
            // Token-major copy of the rotated x: a rotation by the zero angle (cos 1, sin 0) is
            // exact in every dtype.
            std::vector<float> identity_row(2 * n, 0.0f);
            std::fill(identity_row.begin(), identity_row.begin() + n, 1.0f);
            std::vector<int64_t> zeros(T, 0);
            const PositionSpan pz(zeros);
            RotateTokens(MakeJob(identity_row.data(), 1, 2 * n, n, {&copy_op, 1}, &pz, layout, dir),
                         0, T);
            ASSERT_EQ(in_place, want) << "in place " << where;
          }
        }
      }
    }
  }
  ASSERT_EQ(GetRotateHeads(DType::kSentinel, Layout::kHalfSplit, Direction::kForward,
                           HeadOrder::kPairsOuter),
            nullptr);
}

// Data starting at every element offset from a 64-byte boundary (in place, and out of place into
// an output at the same or at another offset): the lead pairs before the boundary, the
// full-width loop and the tail give RotateTokens' bits.
void TestRotateHeadsAtEveryAlignment() {
  const int64_t T = 2, H = 3;
  for (const int D : {128, 256, 136}) {  // 136: head stride not a multiple of 64 bytes in fp32
    const RopeTable table(Frequencies(D, 1.0));
    const int n = D / 2;
    std::vector<float> rows(T * 2 * n);
    for (int64_t t = 0; t < T; ++t) {
      table.ComputeRow(1000 + 7 * t, rows.data() + t * 2 * n, rows.data() + t * 2 * n + n);
    }
    const std::vector<int64_t> identity = {0, 1};
    const PositionSpan pid(identity);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      const size_t es = DTypeSize(dtype), bytes = T * H * D * es;
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        const RotateHeadsFn fn =
            GetRotateHeads(dtype, layout, Direction::kForward, HeadOrder::kPairsOuter);
        for (size_t offset = 0; offset < 64; offset += es) {
          const std::string where = std::string(hwy::TargetName(HWY_TARGET)) + " " +
                                    std::string(DTypeName(dtype)) + " " +
                                    std::string(LayoutName(layout)) + " D " + std::to_string(D) +
                                    " offset " + std::to_string(offset);
          const std::vector<uint8_t> x = RandomBytes(T * H * D, dtype, 5 + offset);
          auto in_buf = hwy::AllocateAligned<uint8_t>(bytes + 64);
          auto out_buf = hwy::AllocateAligned<uint8_t>(bytes + 64);
          uint8_t* in = in_buf.get() + offset;
          std::memcpy(in, x.data(), bytes);
          const TensorView xv = ContiguousView(in, dtype, T, H, D);
          std::vector<uint8_t> want(bytes);
          const RopeOperand want_op{xv, ContiguousView(want.data(), dtype, T, H, D)};
          RotateTokens(
              MakeJob(rows.data(), T, 2 * n, n, {&want_op, 1}, &pid, layout, Direction::kForward),
              0, T);
          for (const size_t out_offset : {offset, (offset + 16) % 64}) {
            uint8_t* out = out_buf.get() + out_offset;
            const TensorView ov = ContiguousView(out, dtype, T, H, D);
            for (int64_t t = 0; t < T; ++t) {
              fn(HeadsOf(xv, ov, t), rows.data() + t * 2 * n, rows.data() + t * 2 * n + n, n);
            }
            ASSERT_EQ(std::vector<uint8_t>(out, out + bytes), want)
                << "out of place at offset " << out_offset << ", " << where;
          }
          for (int64_t t = 0; t < T; ++t) {
            fn(HeadsOf(xv, xv, t), rows.data() + t * 2 * n, rows.data() + t * 2 * n + n, n);
          }
          ASSERT_EQ(std::vector<uint8_t>(in, in + bytes), want) << "in place, " << where;
        }
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ropekit {
HWY_BEFORE_TEST(RopeEngineKernelTest);
HWY_EXPORT_AND_TEST_P(RopeEngineKernelTest, TestRotateHeadsMatchesRotateTokens);
HWY_EXPORT_AND_TEST_P(RopeEngineKernelTest, TestRotateHeadsAtEveryAlignment);
}  // namespace ropekit
#endif
