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

void CheckDims(int64_t m, int64_t k, int64_t n) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || k < 0 || n < 0 || m > kMax || k > kMax || n > kMax) {
    throw Error("MatMulRowwise: dimensions M=" + std::to_string(m) + " K=" + std::to_string(k) +
                " N=" + std::to_string(n) + " must be in [0, 2^31 - 1]");
  }
}

// Column blocks of all outputs as one task list (task t: output o's block t - blocks before o);
// ldy = 0: each output's own width. No allocation: decoding calls this several times a step.
void RunRowwise(const float* x, std::span<const RowwiseOutput> outputs, int64_t m, int64_t k,
                int64_t ldy, ThreadPool* pool, bool accumulate) {
  int64_t tasks = 0, work = 0;
  for (const RowwiseOutput& out : outputs) {
    CheckDims(m, k, out.n);
    if (ldy != 0 && out.n > ldy) {
      throw Error("MatMulRowwiseMulti: an output of " + std::to_string(out.n) +
                  " columns is wider than the row stride " + std::to_string(ldy));
    }
    tasks += (out.n + kBlockCols - 1) / kBlockCols;
    work += m * out.n * k;
  }
  if (m == 0 || tasks == 0) return;
  ThreadPool* p = work < kMinParallelWork ? nullptr : pool;
  ParallelFor(p, static_cast<size_t>(tasks), [&](size_t begin, size_t end, size_t) {
    for (size_t t = begin; t < end; ++t) {
      int64_t block = static_cast<int64_t>(t);
      size_t o = 0;
      while (block >= (outputs[o].n + kBlockCols - 1) / kBlockCols) {
        block -= (outputs[o].n + kBlockCols - 1) / kBlockCols;
        ++o;
      }
      const RowwiseOutput& out = outputs[o];
      const int64_t c0 = block * kBlockCols;
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
