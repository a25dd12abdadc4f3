// Plain declarations of the row kernels of the fused causal attention (src/ops/attention.cc);
// the per-target code and the dispatch table are in attention_kernels.cc.
//
// Dimension legend: n = keys in one row of a score tile, D = head_dim, P = page_size.
#ifndef ROPEKIT_SRC_KERNELS_ATTENTION_KERNELS_H_
#define ROPEKIT_SRC_KERNELS_ATTENTION_KERNELS_H_

#include <cstdint>

namespace ropekit {

// x[i] = exp(x[i] - shift) for i < n (float32, Highway's Exp: at most 1 ulp of error);
// returns the float32 sum of the new x. x[i] = -inf (a masked logit) gives 0. Requires
// x[i] - shift <= 104 (shift is the row maximum or the log-sum-exp, so x[i] - shift <= 0).
float ExpShiftSumSimd(float* x, int64_t n, float shift);

// dp[i] = p[i] * (dp[i] - delta): the softmax gradient dS = P o (dP - rowsum(dO o O)).
void SoftmaxGradRowSimd(const float* p, float* dp, int64_t n, float delta);

// One query against n keys (decoding): s[j] = scale * (q . k_j) for the rows k_j = k + j * stride
// of D floats (lane-wise partial sums in ascending d, one fixed lane reduction).
void ScoreRowSimd(const float* q, const float* k, int64_t stride, int64_t n, int64_t head_dim,
                  float scale, float* s);

// out[c] = inv * sum_j p[j] v_j[c] for the rows v_j = v + j * stride of D floats (ascending j).
void WeightedRowSumSimd(const float* p, const float* v, int64_t stride, int64_t n, int64_t head_dim,
                        float inv, float* out);

// The same over the rows of a paged cache: v_j = v + (block_table[j / P] * P + j % P) * stride
// (P = page_size), visited page by page with the arithmetic of WeightedRowSumSimd, so the result
// is bitwise that of the same rows laid out contiguously.
void WeightedRowSumPagedSimd(const float* p, const float* v, int64_t stride,
                             const int32_t* block_table, int64_t page_size, int64_t n,
                             int64_t head_dim, float inv, float* out);

}  // namespace ropekit

#endif  // ROPEKIT_SRC_KERNELS_ATTENTION_KERNELS_H_
