// A matrix product whose every output element is computed by one fixed sequence of floating-point
// operations that depends only on K: y[i, j] is a function of x[i, :] and w[j, :] alone. The
// number of rows M, the other rows, the row's index, the tiling and the thread count do not
// change a single bit of it. Batched decoding (one row per sequence) relies on this: a sequence's
// tokens are the same whether it decodes alone or beside any other sequences. BLAS sgemm makes
// no such promise (its kernels and K blocking may change with M).
//
// Dimension legend: M = rows (sequences), K = input features, N = output features.
//
// Arithmetic of one element (the order is part of the contract): the K products are summed in
// L lane-wise partial sums (L = min(8, float lanes of the dispatched target): 8 on AVX2 and
// AVX-512 alike, so both give the same bits, and the final reduction stays short; lane l takes
// k = l, l + L, l + 2L, ... in ascending order, a missing tail lane adds 0), each product
// accumulated with a fused multiply-add where the target has one; then the L partial sums are
// reduced by the target's fixed SumOfLanes; with `accumulate`, y + sum is one final addition.
// Error bound (Higham 2002, eq. 3.5): |y - x.w| <= gamma_(K/L + log2 L + 1) * sum_k |x_k w_k|,
// gamma_n = n u / (1 - n u), u = 2^-24.
#ifndef ROPEKIT_SRC_OPS_ROWWISE_MATMUL_H_
#define ROPEKIT_SRC_OPS_ROWWISE_MATMUL_H_

#include <cstdint>
#include <span>

#include "ropekit/thread_pool.h"

namespace ropekit::ops {

// y[M, N] = x[M, K] w[N, K]^T (+ y when accumulate). w is row-major [out, in] as in PyTorch.
void MatMulRowwise(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                   ThreadPool* pool, bool accumulate = false);

// Several products of the same x at once, as one parallel loop over all their column blocks: for
// each output o, y_o[M, n_o] = x[M, K] w_o[n_o, K]^T written with row stride ldy (outputs may be
// column ranges of one [M, ldy] buffer, e.g. q | k | v). Every element has the arithmetic above.
struct RowwiseOutput {
  const float* w;  // [n, K]
  int64_t n;
  float* y;  // [M rows of stride ldy]
};
void MatMulRowwiseMulti(const float* x, std::span<const RowwiseOutput> outputs, int64_t m,
                        int64_t k, int64_t ldy, ThreadPool* pool);

// Lanes L of the dispatched SIMD target (the partial sums of the contract above).
int64_t MatMulRowwiseLanes();

}  // namespace ropekit::ops

#endif  // ROPEKIT_SRC_OPS_ROWWISE_MATMUL_H_
