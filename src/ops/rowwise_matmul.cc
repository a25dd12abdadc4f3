// Dispatch and tiling of MatMulRowwise (rowwise_matmul.h): the kernel is compiled once per SIMD
// target (Highway dynamic dispatch) and the output is split into fixed column blocks.
//
// Dimension legend: M = rows, K = input features, N = output features.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/ops/rowwise_matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/ops/rowwise_matmul-inl.h"

#if HWY_ONCE
#include <algorithm>
#include <limits>
#include <string>

#include "ropekit/error.h"
#include "src/ops/rowwise_matmul.h"

namespace ropekit::ops {

HWY_EXPORT(RowwiseBlock);
HWY_EXPORT(RowwiseLanes);

namespace {
// Column block of one parallel task: 64 weight rows of K floats stay in L2 while all M rows
// stream past them. Below kMinParallelWork multiply-adds the product runs on the calling thread.
constexpr int64_t kBlockCols = 64;
constexpr int64_t kMinParallelWork = int64_t{1} << 16;
}  // namespace

int64_t MatMulRowwiseLanes() { return HWY_DYNAMIC_DISPATCH(RowwiseLanes)(); }

void MatMulRowwise(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                   ThreadPool* pool, bool accumulate) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || k < 0 || n < 0 || m > kMax || k > kMax || n > kMax) {
    throw Error("MatMulRowwise: dimensions M=" + std::to_string(m) + " K=" + std::to_string(k) +
                " N=" + std::to_string(n) + " must be in [0, 2^31 - 1]");
  }
  if (m == 0 || n == 0) return;
  const int64_t blocks = (n + kBlockCols - 1) / kBlockCols;
  ThreadPool* p = m * n * k < kMinParallelWork ? nullptr : pool;
  ParallelFor(p, static_cast<size_t>(blocks), [&](size_t begin, size_t end, size_t) {
    for (size_t b = begin; b < end; ++b) {
      const int64_t c0 = static_cast<int64_t>(b) * kBlockCols;
      HWY_DYNAMIC_DISPATCH(RowwiseBlock)
      (x, w, y, k, n, 0, m, c0, std::min(n, c0 + kBlockCols), accumulate);
    }
  });
}

}  // namespace ropekit::ops
#endif  // HWY_ONCE
