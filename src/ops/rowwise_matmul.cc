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
#include <utility>
#include <vector>

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

void CheckDims(int64_t m, int64_t k, int64_t n) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || k < 0 || n < 0 || m > kMax || k > kMax || n > kMax) {
    throw Error("MatMulRowwise: dimensions M=" + std::to_string(m) + " K=" + std::to_string(k) +
                " N=" + std::to_string(n) + " must be in [0, 2^31 - 1]");
  }
}

// Column blocks of all outputs as one task list; ldy = 0: each output's own width.
void RunRowwise(const float* x, std::span<const RowwiseOutput> outputs, int64_t m, int64_t k,
                int64_t ldy, ThreadPool* pool, bool accumulate) {
  std::vector<std::pair<size_t, int64_t>> tasks;  // (output, first column)
  int64_t work = 0;
  for (size_t o = 0; o < outputs.size(); ++o) {
    CheckDims(m, k, outputs[o].n);
    if (ldy != 0 && outputs[o].n > ldy) {
      throw Error("MatMulRowwiseMulti: an output of " + std::to_string(outputs[o].n) +
                  " columns is wider than the row stride " + std::to_string(ldy));
    }
    for (int64_t c0 = 0; c0 < outputs[o].n; c0 += kBlockCols) tasks.emplace_back(o, c0);
    work += m * outputs[o].n * k;
  }
  if (m == 0 || tasks.empty()) return;
  ThreadPool* p = work < kMinParallelWork ? nullptr : pool;
  ParallelFor(p, tasks.size(), [&](size_t begin, size_t end, size_t) {
    for (size_t t = begin; t < end; ++t) {
      const RowwiseOutput& out = outputs[tasks[t].first];
      const int64_t c0 = tasks[t].second;
      HWY_DYNAMIC_DISPATCH(RowwiseBlock)
      (x, out.w, out.y, k, ldy != 0 ? ldy : out.n, 0, m, c0, std::min(out.n, c0 + kBlockCols),
       accumulate);
    }
  });
}

}  // namespace

int64_t MatMulRowwiseLanes() { return HWY_DYNAMIC_DISPATCH(RowwiseLanes)(); }

void MatMulRowwise(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                   ThreadPool* pool, bool accumulate) {
  const RowwiseOutput out{w, n, y};
  RunRowwise(x, std::span<const RowwiseOutput>(&out, 1), m, k, 0, pool, accumulate);
}

void MatMulRowwiseMulti(const float* x, std::span<const RowwiseOutput> outputs, int64_t m,
                        int64_t k, int64_t ldy, ThreadPool* pool) {
  if (ldy < 1) throw Error("MatMulRowwiseMulti: the row stride must be >= 1");
  RunRowwise(x, outputs, m, k, ldy, pool, false);
}

}  // namespace ropekit::ops
#endif  // HWY_ONCE
