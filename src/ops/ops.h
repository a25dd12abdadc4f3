// Transformer ops in float32 with hand-written backward passes: matrix products (OpenBLAS
// cblas_sgemm), RMSNorm, SwiGLU, softmax cross-entropy and causal attention with grouped KV heads
// and a logit-bias hook. The ops know nothing about the model that calls them.
//
// Dimension legend: M = rows (tokens), K = input features, N = output features, d = model width,
// F = MLP width, V = vocabulary, B = batch, Tq = query tokens, Tk = key tokens, H = query heads,
// Hkv = key/value heads (H % Hkv == 0), D = head_dim.
//
// Determinism: every op splits its work into fixed-size tiles that do not depend on the thread
// count; each output element is computed by exactly one tile with the same BLAS call shape, and
// every reduction over rows (weight gradients) runs in a fixed order. Results are therefore
// bitwise identical for any ThreadPool size. OpenBLAS itself is set to one thread
// (SetBlasSingleThreaded) so that its internal splitting cannot change the summation order.
//
// Scalar double-precision references of every op live in src/reference/ops.h.
#ifndef ROPEKIT_SRC_OPS_OPS_H_
#define ROPEKIT_SRC_OPS_OPS_H_

#include <cstdint>
#include <span>

#include "ropekit/logit_bias.h"
#include "ropekit/thread_pool.h"

namespace ropekit::ops {

// Pins OpenBLAS to one thread (idempotent); called by every matmul entry point.
void SetBlasSingleThreaded();

// y[M, N] = x[M, K] w[N, K]^T (+ y when accumulate). w is row-major [out, in] as in PyTorch.
void MatMul(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
            ThreadPool* pool, bool accumulate = false);
// dx[M, K] (+)= dy[M, N] w[N, K].
void MatMulBackwardInput(const float* dy, const float* w, float* dx, int64_t m, int64_t k,
                         int64_t n, ThreadPool* pool, bool accumulate = false);
// dw[N, K] += dy[M, N]^T x[M, K] (the sum over the M rows is done inside one BLAS call per tile).
void MatMulBackwardWeight(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                          int64_t n, ThreadPool* pool);

// RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * w, per row of d.
// inv_rms[M] receives 1 / sqrt(mean(x^2) + eps) (computed in double) for the backward.
void RmsNorm(const float* x, const float* w, float* y, float* inv_rms, int64_t m, int64_t d,
             double eps, ThreadPool* pool);
// dx (+)= d/dx, dw += d/dw (rows summed in ascending order, in double). With r = inv_rms and
// g = w * dy: dx = r * g - r^3 / d * x * sum(g * x).
void RmsNormBackward(const float* x, const float* w, const float* inv_rms, const float* dy,
                     float* dx, float* dw, int64_t m, int64_t d, ThreadPool* pool,
                     bool accumulate = false);

// SwiGLU (Shazeer 2020): h = silu(g) * u, silu(g) = g / (1 + exp(-g)); over n elements, in
// float32 SIMD (src/kernels/swiglu_kernels.cc: overflow- and cancellation-free sigmoid).
void SwiGlu(const float* g, const float* u, float* h, int64_t n, ThreadPool* pool);
// dg = dh * u * silu'(g), du = dh * silu(g), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
void SwiGluBackward(const float* g, const float* u, const float* dh, float* dg, float* du,
                    int64_t n, ThreadPool* pool);

// Row-wise softmax of x[M, N] in place (max subtracted, sum in double).
void Softmax(float* x, int64_t m, int64_t n, ThreadPool* pool);
// dx = p * (dp - sum(dp * p)) per row; dx may alias dp.
void SoftmaxBackward(const float* p, const float* dp, float* dx, int64_t m, int64_t n,
                     ThreadPool* pool);

// Cross-entropy of logits[M, V] against targets[M]: losses[m] = logsumexp - logit[target] (in
// double). When dlogits is non-null it receives grad_scale * (softmax - onehot) (may alias
// logits). A target < 0 is ignored (loss 0, gradient 0). Throws Error for targets >= V.
void CrossEntropy(const float* logits, const int32_t* targets, float* losses, float* dlogits,
                  float grad_scale, int64_t m, int64_t v, ThreadPool* pool);

// Causal scaled dot-product attention over a batch of B independent sequences.
// q: [B][Tq rows of H*D], k, v: [B][Tk rows of Hkv*D], out: [B][Tq rows of H*D]; each with a row
// stride and a batch stride in floats. Query head h reads key/value head h / (H / Hkv)
// (GQA; Hkv = 1 is MQA, Hkv = H is MHA). Key j is visible to query i iff
// k_positions[j] <= q_positions[i]. Logits: scale * q.k + bias, where the bias comes from
// `logit_bias` (ropekit/logit_bias.h: ALiBi / T5) when it acts on logits.
struct AttentionArgs {
  int64_t batch = 1, tq = 0, tk = 0, heads = 0, kv_heads = 0, head_dim = 0;
  const float* q = nullptr;
  int64_t q_row_stride = 0, q_batch_stride = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t kv_row_stride = 0, kv_batch_stride = 0;
  float* out = nullptr;
  int64_t out_row_stride = 0, out_batch_stride = 0;
  std::span<const int64_t> q_positions;  // [Tq], shared by the batch
  std::span<const int64_t> k_positions;  // [Tk]
  float scale = 1.0f;
  const LogitBias* logit_bias = nullptr;
  std::span<const float> bias_params;
  // Optional [B, H, Tq, Tk] buffer: receives the attention probabilities (masked entries 0),
  // which AttentionBackward needs.
  float* probs = nullptr;
  // Paged keys and values (DecodeAttention only; empty = contiguous rows): key j is row
  // block_table[j / page_size] * page_size + j % page_size of k and v, kv_row_stride floats
  // apart (vLLM's paged attention over one sequence's block table, Kwon et al. 2023,
  // arXiv:2309.06180). The table must cover Tk keys.
  std::span<const int32_t> block_table;
  int64_t page_size = 0;
};
void AttentionForward(const AttentionArgs& args, ThreadPool* pool);
// One decoding query per call (args.batch = 1, args.tq = 1), run on the calling thread without
// BLAS, for batched decoding where every sequence attends over its own cache: the contract of
// AttentionForward for that case (masking, GQA, logit-bias hooks), with scores from Highway dot
// products (ScoreRowSimd), float32 probabilities exp(s - max) (ExpShiftSumSimd, <= 1 ulp each)
// and out = (sum_j p_j v_j) / sum_j p_j summed in ascending j. The bits depend on the inputs and
// the SIMD target only. scratch: at least Tk floats. args.probs is ignored. With a block table
// the keys are read page by page with the same arithmetic, so the bits equal those of the same
// keys laid out contiguously.
void DecodeAttention(const AttentionArgs& args, std::span<float> scratch);
// Gradients from dout (laid out like out): dq (like q, written), dk and dv (like k / v,
// written), grad_bias_params += (T5 table; summed over the batch in ascending order).
// args.probs must hold the forward's probabilities.
void AttentionBackward(const AttentionArgs& args, const float* dout, float* dq, float* dk,
                       float* dv, std::span<float> grad_bias_params, ThreadPool* pool);

// Fused causal attention in the FlashAttention-2 manner (Dao 2023, arXiv:2307.08691, alg. 1
// and 2): the same contract as AttentionForward / AttentionBackward, computed in tiles of
// kFlashQueryTile queries x kFlashKeyTile keys with an online softmax. Tiles whose keys are all
// invisible to all their queries (above the causal diagonal) are skipped; the logit-bias hooks
// run inside each tile on the keys it holds. No [Tq, Tk] matrix exists at any time: the forward
// keeps only lse[B, H, Tq] = log sum_j exp(logit_ij) per query row (-inf for a row that sees no
// key), and the backward recomputes each tile's probabilities from it. Memory is O(Tq + Tk)
// per task. args.probs is ignored. Results are bitwise identical for any ThreadPool size; they
// differ from AttentionForward's in rounding only (float32 online sums, float32 exp).
inline constexpr int64_t kFlashQueryTile = 64;
inline constexpr int64_t kFlashKeyTile = 64;
// lse may be null when no backward follows.
void FlashAttentionForward(const AttentionArgs& args, float* lse, ThreadPool* pool);
// dout laid out like out; args.out must hold the forward's output and lse its log-sum-exp.
void FlashAttentionBackward(const AttentionArgs& args, const float* lse, const float* dout,
                            float* dq, float* dk, float* dv, std::span<float> grad_bias_params,
                            ThreadPool* pool);

}  // namespace ropekit::ops

#endif  // ROPEKIT_SRC_OPS_OPS_H_
