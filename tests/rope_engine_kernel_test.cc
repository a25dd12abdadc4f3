// Every compiled SIMD target of the engine kernels (rope_engine-inl.h) against the same
// target's RotateTokens, which rope_kernel_test.cc checks against the double reference:
//  - RotateTokensAxes (M-RoPE) equals RotateTokens over a table whose row t is the per-pair
//    gather of the axes' rows, bit for bit, and equals RotateTokens itself when all axes agree;
//  - RotateAppendTokens equals RotateTokens followed by a copy into the slots, bit for bit;
//  - RotateSlots equals RotateTokens with one row for every key;
//  - RotateTokensPlanned equals RotateTokens.
// All dtypes, both layouts, both directions, partial rotary, rows in the table and on the fly.
#include <cstring>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tests/rope_engine_kernel_test.cc"
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

RotateJob MakeJob(const RopeTable& table, const RopeTable::Rows& rows,
                  std::span<const RopeOperand> ops, const PositionSpan* positions, Layout layout,
                  Direction direction) {
  RotateJob job;
  job.ops = ops;
  job.positions = positions;
  job.rows = rows.data.get();
  job.num_rows = rows.num_positions;
  job.row_stride = rows.row_stride;
  job.table = &table;
  job.num_pairs = table.num_pairs();
  job.layout = layout;
  job.direction = direction;
  return job;
}

void TestEngineKernelsMatchRotateTokens() {
  const int64_t T = 7, H = 3;
  const std::vector<int64_t> pos = {0, 5, 63, 64, 4097, 2147483647, 12};
  const std::vector<int64_t> pos_h = {3, 5, 1, 900, 2, 7, 12};
  const std::vector<int64_t> pos_w = {9, 0, 63, 64, 100000, 8, 1};
  for (const auto& [D, R] : {std::pair<int, int>{64, 64}, {40, 24}, {130, 130}}) {
    const RopeTable table(Frequencies(R, R == 24 ? 1.2 : 1.0), 64);
    const RopeTable::Rows rows = table.Snapshot();
    const int n = R / 2;
    // Axes: chunked thirds-ish for 3 axes.
    const RopeAxes axes{{n - 2 * (n / 3), n / 3, n / 3}, (D % 4) != 0};
    const std::vector<uint8_t> pair_axis = axes.PairAxes(n);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      const size_t es = DTypeSize(dtype);
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        for (Direction dir : {Direction::kForward, Direction::kBackward}) {
          const std::string where = std::string(hwy::TargetName(HWY_TARGET)) + " " +
                                    std::string(DTypeName(dtype)) + " " +
                                    std::string(LayoutName(layout)) + " D " + std::to_string(D);
          const std::vector<uint8_t> x = RandomBytes(T * H * D, dtype, 17);
          const TensorView xv = ContiguousView(const_cast<uint8_t*>(x.data()), dtype, T, H, D);
          auto rotate_tokens = [&](const RotateJob& job) {
            std::vector<uint8_t> out(x.size());
            const RopeOperand op{xv, ContiguousView(out.data(), dtype, T, H, D)};
            RotateJob j = job;
            j.ops = std::span<const RopeOperand>(&op, 1);
            RotateTokens(j, 0, T);
            return out;
          };
          const PositionSpan p0(pos);
          const std::vector<uint8_t> plain =
              rotate_tokens(MakeJob(table, rows, {}, &p0, layout, dir));

          // Planned.
          {
            std::vector<uint8_t> out(x.size());
            const RopeOperand op{xv, ContiguousView(out.data(), dtype, T, H, D)};
            RotateTokensPlanned(MakeJob(table, rows, {&op, 1}, &p0, layout, dir), 0, T);
            ASSERT_EQ(out, plain) << "planned " << where;
          }
          // Axes, all equal.
          auto run_axes = [&](std::vector<PositionSpan> spans) {
            std::vector<uint8_t> out(x.size());
            const RopeOperand op{xv, ContiguousView(out.data(), dtype, T, H, D)};
            AxesJob job;
            job.base = MakeJob(table, rows, {&op, 1}, nullptr, layout, dir);
            job.axis_positions = spans;
            job.pair_axis = pair_axis.data();
            RotateTokensAxes(job, 0, T);
            return out;
          };
          ASSERT_EQ(run_axes({p0, p0, p0}), plain) << "equal axes " << where;
          // Axes, distinct: against RotateTokens over gathered rows [T, 2N].
          const PositionSpan ph(pos_h), pw(pos_w);
          std::vector<float> gathered(T * 2 * n), row(2 * n);
          const std::vector<int64_t>* axis_pos[] = {&pos, &pos_h, &pos_w};
          for (int64_t t = 0; t < T; ++t) {
            for (int i = 0; i < n; ++i) {
              table.ComputeRow((*axis_pos[pair_axis[i]])[t], row.data(), row.data() + n);
              gathered[t * 2 * n + i] = row[i];
              gathered[t * 2 * n + n + i] = row[n + i];
            }
          }
          std::vector<int64_t> identity(T);
          for (int64_t t = 0; t < T; ++t) identity[t] = t;
          const PositionSpan pid(identity);
          RotateJob gathered_job = MakeJob(table, rows, {}, &pid, layout, dir);
          gathered_job.rows = gathered.data();
          gathered_job.num_rows = T;
          gathered_job.row_stride = 2 * n;
          ASSERT_EQ(run_axes({p0, ph, pw}), rotate_tokens(gathered_job)) << "axes " << where;

          // Append into a paged HND cache (pages of 2 slots), one padding token.
          {
            const int64_t pages = 5, page = 2;
            const std::vector<int64_t> slots = {9, 0, -1, 4, 3, 8, 1};
            std::vector<uint8_t> ck = RandomBytes(pages * page * H * D, dtype, 3);
            std::vector<uint8_t> cv = RandomBytes(pages * page * H * D, dtype, 4);
            std::vector<uint8_t> want_k = ck, want_v = cv;
            const std::vector<uint8_t> v = RandomBytes(T * H * D, dtype, 5);
            std::vector<uint8_t> q = RandomBytes(T * H * D, dtype, 6);
            std::vector<uint8_t> q_want = q;
            const RopeOperand q_op{ContiguousView(q.data(), dtype, T, H, D),
                                   ContiguousView(q.data(), dtype, T, H, D)};
            AppendJob job;
            job.base = MakeJob(table, rows, {&q_op, 1}, &p0, layout, dir);
            job.k = xv;
            job.v = ContiguousView(const_cast<uint8_t*>(v.data()), dtype, T, H, D);
            job.cache = PagedKvCache(ck.data(), cv.data(), dtype, pages, page, H, D, true);
            job.slots = slots.data();
            RotateAppendTokens(job, 0, T);
            const RopeOperand q_ref{ContiguousView(q_want.data(), dtype, T, H, D),
                                    ContiguousView(q_want.data(), dtype, T, H, D)};
            RotateTokens(MakeJob(table, rows, {&q_ref, 1}, &p0, layout, dir), 0, T);
            ASSERT_EQ(q, q_want) << "append q " << where;
            for (int64_t t = 0; t < T; ++t) {
              if (slots[t] < 0) continue;
              for (int64_t h = 0; h < H; ++h) {
                const int64_t dst =
                    (job.cache.SlotOffset(slots[t]) + h * job.cache.head_stride) * es;
                const int64_t src = (t * H + h) * D * es;
                std::memcpy(want_k.data() + dst, plain.data() + src, D * es);
                std::memcpy(want_v.data() + dst, v.data() + src, D * es);
              }
            }
            ASSERT_EQ(ck, want_k) << "append k " << where;
            ASSERT_EQ(cv, want_v) << "append v " << where;
          }
          // Slots: every key by the row of position 4097 (in-place, slots shuffled).
          {
            std::vector<uint8_t> cache = x;
            const std::vector<int64_t> slots = {3, -1, 0, 6, 1, 5, 2, 4};
            std::vector<float> r(2 * n);
            table.ComputeRow(4097, r.data(), r.data() + n);
            SlotRotateJob job;
            job.cache = ContiguousKvCache(cache.data(), nullptr, dtype, T, H, D);
            job.slots = slots.data();
            job.cos = r.data();
            job.sin = r.data() + n;
            job.num_pairs = n;
            job.layout = layout;
            job.direction = dir;
            RotateSlots(job, 0, static_cast<int64_t>(slots.size()));
            const std::vector<int64_t> same(T, 4097);
            const PositionSpan ps(same);
            ASSERT_EQ(cache, rotate_tokens(MakeJob(table, rows, {}, &ps, layout, dir)))
                << "slots " << where;
          }
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
HWY_EXPORT_AND_TEST_P(RopeEngineKernelTest, TestEngineKernelsMatchRotateTokens);
}  // namespace ropekit
#endif
