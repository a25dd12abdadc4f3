// The library services the Python binding (and any other caller) builds on: float64 rotation
// inside ApplyRope, the strided-array distinctness check, the per-sequence-length table cache and
// leased thread pools.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

RopeParams Params(RopeType type) {
  RopeParams p;
  p.type = type;
  p.head_dim = 16;
  p.rotary_dim = 12;
  p.max_position_embeddings = 100;
  if (type == RopeType::kDynamic) p.factor = 2;
  if (type == RopeType::kLongRope) {
    p.original_max_position_embeddings = 50;
    p.short_factor.assign(6, 1.0);
    p.long_factor.assign(6, 3.0);
  }
  return p;
}

// Every float64 output element against the rotation written out here, with the table's float32
// cos/sin widened to double: a' = a c - b s, b' = b c + a s (RoFormer, arXiv:2104.09864, eq. 34;
// s negated backward). Both sides evaluate the same two products and one subtraction in double
// (no contraction: -ffp-contract=off), so they agree bit for bit; pass-through channels copy.
TEST(ApplyRopeF64Test, MatchesTheFormulaWithTheTableValues) {
  const RopeTable table(ComputeFrequencies(Params(RopeType::kDefault), Numerics::kExact));
  const int64_t T = 5, H = 3, D = 16, N = 6;
  const std::vector<int64_t> pos = {0, 7, 99, 4096, 2147483647};
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  std::vector<double> x(T * H * D);
  for (double& v : x) v = normal(rng);
  for (const Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
    for (const Direction dir : {Direction::kForward, Direction::kBackward}) {
      std::vector<double> y(x.size()), in_place = x;
      RotateOptions o;
      o.layout = layout;
      o.direction = dir;
      const RopeOperand op{ContiguousView(x.data(), DType::kF64, T, H, D),
                           ContiguousView(y.data(), DType::kF64, T, H, D)};
      ApplyRope(table, pos, std::span<const RopeOperand>(&op, 1), o);
      ApplyRopeInPlace(table, pos, ContiguousView(in_place.data(), DType::kF64, T, H, D), o);
      EXPECT_EQ(y, in_place);
      std::vector<float> cos(N), sin(N);
      for (int64_t t = 0; t < T; ++t) {
        table.ComputeRow(pos[t], cos.data(), sin.data());
        for (int64_t h = 0; h < H; ++h) {
          const double* a = &x[(t * H + h) * D];
          const double* b = &y[(t * H + h) * D];
          for (int64_t i = 0; i < N; ++i) {
            const int64_t ia = layout == Layout::kHalfSplit ? i : 2 * i;
            const int64_t ib = layout == Layout::kHalfSplit ? i + N : 2 * i + 1;
            const double c = cos[i];
            const double s = dir == Direction::kForward ? double{sin[i]} : -double{sin[i]};
            EXPECT_EQ(b[ia], a[ia] * c - a[ib] * s);
            EXPECT_EQ(b[ib], a[ib] * c + a[ia] * s);
          }
          for (int64_t d = 2 * N; d < D; ++d) EXPECT_EQ(b[d], a[d]);
        }
      }
    }
  }
}

TEST(ApplyRopeF64Test, OtherEntryPointsAndOverlapsAreRejected) {
  const RopeTable table(ComputeFrequencies(Params(RopeType::kDefault), Numerics::kExact));
  std::vector<double> x(4 * 2 * 16);
  const std::vector<int64_t> pos = {0, 1, 2, 3};
  const TensorView v = ContiguousView(x.data(), DType::kF64, 4, 2, 16);
  // Output one token after the input: overlapping, not the same view.
  const TensorView shifted = ContiguousView(x.data() + 32, DType::kF64, 3, 2, 16);
  const TensorView first = ContiguousView(x.data(), DType::kF64, 3, 2, 16);
  const RopeOperand op{first, shifted};
  EXPECT_THAT(
      [&] {
        ApplyRope(table, std::vector<int64_t>{0, 1, 2}, {&op, 1});
      },
      testing::ThrowsMessage<Error>(HasSubstr("overlaps input")));
  const std::vector<PositionSpan> axes = {PositionSpan(pos)};
  RopeAxes one_axis;
  const RopeOperand in_place{v, v};
  EXPECT_THAT(
      [&] {
        ApplyRope(table, AxisPositions{axes}, one_axis, {&in_place, 1});
      },
      testing::ThrowsMessage<Error>(HasSubstr("float32, bfloat16 or float16")));
  EXPECT_THAT(
      [&] {
        RopePlan(table, {&in_place, 1}, 4);
      },
      testing::ThrowsMessage<Error>(HasSubstr("dtype")));
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeName(DType::kF64), "float64");
}

TEST(ElementsDistinctTest, StridedArrays) {
  using V = std::vector<int64_t>;
  EXPECT_TRUE(ElementsDistinct(V{4, 2, 8}, V{16, 8, 1}));   // C-contiguous
  EXPECT_TRUE(ElementsDistinct(V{4, 2, 8}, V{8, 32, 1}));   // transposed
  EXPECT_TRUE(ElementsDistinct(V{4, 2, 8}, V{-16, 8, 1}));  // reversed
  EXPECT_TRUE(ElementsDistinct(V{4, 1, 8}, V{8, 0, 1}));    // size-1 stride is free
  EXPECT_TRUE(ElementsDistinct(V{0, 2, 8}, V{0, 0, 0}));    // empty
  EXPECT_FALSE(ElementsDistinct(V{4, 2, 8}, V{0, 8, 1}));   // broadcast
  EXPECT_FALSE(ElementsDistinct(V{4, 2, 8}, V{8, 4, 1}));   // heads overlap
  EXPECT_FALSE(ElementsDistinct(V{3, 8}, V{7, 1}));         // rows overlap by one element
  EXPECT_TRUE(ElementsDistinct(V{3, 8}, V{8, 1}));
  EXPECT_THROW(ElementsDistinct(V{3, 8}, V{8}), Error);
}

// transformers' _compute_dynamic_ntk_parameters grows the base only for s > mpe, and
// _compute_longrope_parameters switches to long factors only for s > original: every other
// length must share one key (and give the frequencies of that key).
TEST(RopeTableCacheTest, KeysFollowWhatChangesTheFrequencies) {
  const RopeParams dyn = Params(RopeType::kDynamic);
  EXPECT_EQ(FrequencySeqLen(dyn, 0), 0);
  EXPECT_EQ(FrequencySeqLen(dyn, 100), 0);
  EXPECT_EQ(FrequencySeqLen(dyn, 101), 101);
  const RopeParams longrope = Params(RopeType::kLongRope);
  EXPECT_EQ(FrequencySeqLen(longrope, 50), 0);
  EXPECT_EQ(FrequencySeqLen(longrope, 51), 51);
  EXPECT_EQ(FrequencySeqLen(longrope, 5000), 51);
  EXPECT_EQ(FrequencySeqLen(Params(RopeType::kDefault), 5000), 0);
  EXPECT_THAT([&] { FrequencySeqLen(dyn, -1); },
              testing::ThrowsMessage<Error>(HasSubstr("seq_len must be >= 0")));
  for (const RopeParams& p : {dyn, longrope}) {
    for (const int64_t s : {0, 1, 50, 51, 100, 101, 300}) {
      EXPECT_EQ(ComputeFrequencies(p, Numerics::kExact, s).inv_freq,
                ComputeFrequencies(p, Numerics::kExact, FrequencySeqLen(p, s)).inv_freq)
          << s;
    }
  }
}

TEST(RopeTableCacheTest, SharesTablesPerKeyAndNumerics) {
  RopeTableCache cache(Params(RopeType::kDynamic));
  const auto a = cache.Get(Numerics::kExact, 10);
  EXPECT_EQ(a, cache.Get(Numerics::kExact, 100));  // both below mpe: one table
  EXPECT_NE(a, cache.Get(Numerics::kHf, 10));
  const auto far = cache.Get(Numerics::kExact, 300);
  EXPECT_NE(a, far);
  EXPECT_EQ(far->frequencies().inv_freq,
            ComputeFrequencies(cache.params(), Numerics::kExact, 300).inv_freq);
  // The bound: more lengths than it holds still give correct, live tables.
  for (int64_t s = 101; s < 150; ++s) {
    EXPECT_EQ(cache.Get(Numerics::kExact, s)->frequencies().inv_freq,
              ComputeFrequencies(cache.params(), Numerics::kExact, s).inv_freq);
  }
  EXPECT_EQ(far->frequencies().inv_freq,
            ComputeFrequencies(cache.params(), Numerics::kExact, 300).inv_freq);
  RopeParams bad = Params(RopeType::kDefault);
  bad.rotary_dim = 17;
  EXPECT_THROW(RopeTableCache{bad}, Error);
}

TEST(ThreadPoolLeaseTest, LeasesDistinctPoolsAndReusesIdleOnes) {
  EXPECT_EQ(ThreadPoolLease(1).get(), nullptr);
  ThreadPool* returned = nullptr;
  {
    ThreadPoolLease a(2), b(2);
    ASSERT_NE(a.get(), nullptr);
    EXPECT_NE(a.get(), b.get());
    EXPECT_EQ(a.get()->num_threads(), 2u);
    returned = a.get();  // destroyed last (after b), so released last
  }
  // The last pool returned is the first one leased again.
  ThreadPoolLease again(2);
  EXPECT_EQ(again.get(), returned);
  // Leases on several threads at once each run their own ParallelFor.
  std::vector<std::thread> threads;
  std::vector<size_t> sums(4);
  for (size_t i = 0; i < sums.size(); ++i) {
    threads.emplace_back([&, i] {
      ThreadPoolLease lease(3);
      std::vector<size_t> hits(100);
      ParallelFor(lease.get(), hits.size(), [&](size_t begin, size_t end, size_t) {
        for (size_t k = begin; k < end; ++k) hits[k] += k;
      });
      for (size_t h : hits) sums[i] += h;
    });
  }
  for (auto& t : threads) t.join();
  for (size_t s : sums) EXPECT_EQ(s, 4950u);
}

}  // namespace
}  // namespace ropekit
