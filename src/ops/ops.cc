// Float32 transformer ops; see ops.h for the contract and src/reference/ops.h for the oracle.
//
// Dimension legend: M = rows, K = input features, N = output features, d = model width,
// B = batch, Tq / Tk = query / key tokens, H / Hkv = query / key-value heads, D = head_dim.
#include "src/ops/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "ropekit/error.h"
#include "src/kernels/attention_kernels.h"
#include "src/kernels/swiglu_kernels.h"

namespace ropekit::ops {
namespace {

// Fixed tile sizes: the tiling (and so every BLAS call shape) is independent of the thread
// count, which makes the results bitwise reproducible across pools.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 256;
constexpr int64_t kElementBlock = 4096;  // elementwise ops
// Below this many multiply-adds an op runs on the calling thread: waking workers costs more than
// the work (decode steps). Each output is computed by the same tile either way, so results do
// not change.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

ThreadPool* PoolFor(ThreadPool* pool, int64_t work) {
  return work < kMinParallelWork ? nullptr : pool;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void ForTiles(ThreadPool* pool, int64_t rows, int64_t cols, int64_t inner, int64_t tile_rows,
              int64_t tile_cols,
              const std::function<void(int64_t r0, int64_t r1, int64_t c0, int64_t c1)>& body) {
  pool = PoolFor(pool, rows * cols * inner);
  const int64_t row_tiles = CeilDiv(rows, tile_rows);
  const int64_t col_tiles = CeilDiv(cols, tile_cols);
  ParallelFor(pool, static_cast<size_t>(row_tiles * col_tiles),
              [&](size_t begin, size_t end, size_t) {
                for (size_t t = begin; t < end; ++t) {
                  const int64_t rt = static_cast<int64_t>(t) / col_tiles;
                  const int64_t ct = static_cast<int64_t>(t) % col_tiles;
                  const int64_t r0 = rt * tile_rows, c0 = ct * tile_cols;
                  body(r0, std::min(rows, r0 + tile_rows), c0, std::min(cols, c0 + tile_cols));
                }
              });
}

void ForRows(ThreadPool* pool, int64_t rows, int64_t cols,
             const std::function<void(int64_t row)>& body) {
  ParallelFor(PoolFor(pool, rows * cols), static_cast<size_t>(rows),
              [&](size_t begin, size_t end, size_t) {
                for (size_t r = begin; r < end; ++r) body(static_cast<int64_t>(r));
              });
}

void ForElements(ThreadPool* pool, int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t blocks = CeilDiv(n, kElementBlock);
  ParallelFor(PoolFor(pool, n), static_cast<size_t>(blocks), [&](size_t begin, size_t end, size_t) {
    for (size_t b = begin; b < end; ++b) {
      const int64_t i0 = static_cast<int64_t>(b) * kElementBlock;
      body(i0, std::min(n, i0 + kElementBlock));
    }
  });
}

void CheckDims(int64_t m, int64_t k, int64_t n, const char* op) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || k < 0 || n < 0 || m > kMax || k > kMax || n > kMax) {
    throw Error(std::string(op) + ": dimensions M=" + std::to_string(m) + " K=" +
                std::to_string(k) + " N=" + std::to_string(n) + " must be in [0, 2^31 - 1]");
  }
}

// The shapes of out[rows, cols] = a sum of `inner` products that need no sgemm: an empty output,
// or no terms (zeros, or nothing to add when accumulating). Returns true when `out` is done.
bool TrivialProduct(float* out, int64_t rows, int64_t cols, int64_t inner, bool accumulate) {
  if (rows == 0 || cols == 0) return true;
  if (inner != 0) return false;
  if (!accumulate) std::fill(out, out + rows * cols, 0.0f);
  return true;
}

// Backward task `task` of the attention: batch b, kv head g, and the head's rows of k, v, dk, dv.
struct KvTask {
  int64_t b, g;
  const float* k;
  const float* v;
  float* dk;
  float* dv;
};

KvTask KvTaskAt(const AttentionArgs& a, float* dk, float* dv, size_t task) {
  const int64_t b = static_cast<int64_t>(task) / a.kv_heads;
  const int64_t g = static_cast<int64_t>(task) % a.kv_heads;
  const int64_t offset = b * a.kv_batch_stride + g * a.head_dim;
  return {b, g, a.k + offset, a.v + offset, dk + offset, dv + offset};
}

}  // namespace

void SetBlasSingleThreaded() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

void MatMul(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
            ThreadPool* pool, bool accumulate) {
  CheckDims(m, k, n, "MatMul");
  SetBlasSingleThreaded();
  if (TrivialProduct(y, m, n, k, accumulate)) return;
  ForTiles(pool, m, n, k, kTileRows, kTileCols,
           [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
             cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(r1 - r0), int(c1 - c0),
                         int(k), 1.0f, x + r0 * k, int(k), w + c0 * k, int(k),
                         accumulate ? 1.0f : 0.0f, y + r0 * n + c0, int(n));
           });
}

void MatMulBackwardInput(const float* dy, const float* w, float* dx, int64_t m, int64_t k,
                         int64_t n, ThreadPool* pool, bool accumulate) {
  CheckDims(m, k, n, "MatMulBackwardInput");
  SetBlasSingleThreaded();
  if (TrivialProduct(dx, m, k, n, accumulate)) return;
  ForTiles(pool, m, k, n, kTileRows, kTileCols,
           [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
             cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(r1 - r0), int(c1 - c0),
                         int(n), 1.0f, dy + r0 * n, int(n), w + c0, int(k),
                         accumulate ? 1.0f : 0.0f, dx + r0 * k + c0, int(k));
           });
}

void MatMulBackwardWeight(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                          int64_t n, ThreadPool* pool) {
  CheckDims(m, k, n, "MatMulBackwardWeight");
  SetBlasSingleThreaded();
  if (m == 0 || n == 0 || k == 0) return;
  ForTiles(
      pool, n, k, m, kTileRows, kTileCols, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(r1 - r0), int(c1 - c0), int(m),
                    1.0f, dy + r0, int(n), x + c0, int(k), 1.0f, dw + r0 * k + c0, int(k));
      });
}

void RmsNorm(const float* x, const float* w, float* y, float* inv_rms, int64_t m, int64_t d,
             double eps, ThreadPool* pool) {
  ForRows(pool, m, d, [&](int64_t r) {
    const float* xr = x + r * d;
    double sum = 0.0;
    for (int64_t c = 0; c < d; ++c) sum += double{xr[c]} * xr[c];
    const double inv = 1.0 / std::sqrt(sum / static_cast<double>(d) + eps);
    const float inv_f = static_cast<float>(inv);
    if (inv_rms) inv_rms[r] = inv_f;
    float* yr = y + r * d;
    for (int64_t c = 0; c < d; ++c) yr[c] = (xr[c] * inv_f) * w[c];
  });
}

void RmsNormBackward(const float* x, const float* w, const float* inv_rms, const float* dy,
                     float* dx, float* dw, int64_t m, int64_t d, ThreadPool* pool,
                     bool accumulate) {
  ForRows(pool, m, d, [&](int64_t r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    const double inv = inv_rms[r];
    double dot = 0.0;  // sum_c w_c dy_c x_c
    for (int64_t c = 0; c < d; ++c) dot += double{w[c]} * dyr[c] * xr[c];
    const double coef = inv * inv * inv * dot / static_cast<double>(d);
    float* dxr = dx + r * d;
    for (int64_t c = 0; c < d; ++c) {
      const float g = static_cast<float>(inv * (double{w[c]} * dyr[c]) - coef * xr[c]);
      dxr[c] = accumulate ? dxr[c] + g : g;
    }
  });
  if (dw == nullptr) return;
  // dw_c += sum_r dy_rc * x_rc * inv_r, rows ascending, in double: independent of threads.
  std::vector<double> acc(static_cast<size_t>(d), 0.0);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    const double inv = inv_rms[r];
    for (int64_t c = 0; c < d; ++c) acc[c] += double{dyr[c]} * xr[c] * inv;
  }
  for (int64_t c = 0; c < d; ++c) dw[c] += static_cast<float>(acc[c]);
}

void SwiGlu(const float* g, const float* u, float* h, int64_t n, ThreadPool* pool) {
  ForElements(pool, n,
              [&](int64_t i0, int64_t i1) { SwiGluSimd(g + i0, u + i0, h + i0, i1 - i0); });
}

void SwiGluBackward(const float* g, const float* u, const float* dh, float* dg, float* du,
                    int64_t n, ThreadPool* pool) {
  ForElements(pool, n, [&](int64_t i0, int64_t i1) {
    SwiGluBackwardSimd(g + i0, u + i0, dh + i0, dg + i0, du + i0, i1 - i0);
  });
}

void Softmax(float* x, int64_t m, int64_t n, ThreadPool* pool) {
  ForRows(pool, m, n, [&](int64_t r) {
    float* xr = x + r * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, xr[c]);
    double sum = 0.0;
    for (int64_t c = 0; c < n; ++c) sum += std::exp(double{xr[c]} - mx);
    const double inv = 1.0 / sum;
    for (int64_t c = 0; c < n; ++c) xr[c] = static_cast<float>(std::exp(double{xr[c]} - mx) * inv);
  });
}

void SoftmaxBackward(const float* p, const float* dp, float* dx, int64_t m, int64_t n,
                     ThreadPool* pool) {
  ForRows(pool, m, n, [&](int64_t r) {
    const float* pr = p + r * n;
    const float* dpr = dp + r * n;
    double dot = 0.0;
    for (int64_t c = 0; c < n; ++c) dot += double{pr[c]} * dpr[c];
    float* dxr = dx + r * n;
    for (int64_t c = 0; c < n; ++c) dxr[c] = static_cast<float>(pr[c] * (dpr[c] - dot));
  });
}

void CrossEntropy(const float* logits, const int32_t* targets, float* losses, float* dlogits,
                  float grad_scale, int64_t m, int64_t v, ThreadPool* pool) {
  for (int64_t r = 0; r < m; ++r) {
    if (targets[r] >= v) {
      throw Error("CrossEntropy: target " + std::to_string(targets[r]) + " at row " +
                  std::to_string(r) + " must be < vocab_size " + std::to_string(v));
    }
  }
  ForRows(pool, m, v, [&](int64_t r) {
    const float* xr = logits + r * v;
    const int32_t t = targets[r];
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < v; ++c) mx = std::max(mx, xr[c]);
    double sum = 0.0;
    for (int64_t c = 0; c < v; ++c) sum += std::exp(double{xr[c]} - mx);
    const double lse = mx + std::log(sum);
    if (losses) losses[r] = t < 0 ? 0.0f : static_cast<float>(lse - xr[t]);
    if (dlogits) {
      float* dr = dlogits + r * v;
      for (int64_t c = 0; c < v; ++c) {
        const double p = t < 0 ? 0.0 : std::exp(double{xr[c]} - lse);
        dr[c] = static_cast<float>(grad_scale * (p - (c == t ? 1.0 : 0.0)));
      }
    }
  });
}

namespace {

void CheckAttention(const AttentionArgs& a, bool paged_ok = false) {
  if (!paged_ok && !a.block_table.empty()) {
    throw Error("attention: a paged KV cache (block_table) is read by DecodeAttention only");
  }
  if (a.heads < 1 || a.kv_heads < 1 || a.heads % a.kv_heads != 0) {
    throw Error("attention: num_kv_heads " + std::to_string(a.kv_heads) +
                " must divide num_heads " + std::to_string(a.heads) + " (both >= 1)");
  }
  if (static_cast<int64_t>(a.q_positions.size()) != a.tq ||
      static_cast<int64_t>(a.k_positions.size()) != a.tk) {
    throw Error("attention: q_positions / k_positions sizes must equal Tq / Tk");
  }
  if (a.head_dim < 1 || a.tq < 0 || a.tk < 0 || a.batch < 0) {
    throw Error("attention: head_dim must be >= 1 and token counts >= 0");
  }
}

bool HasBias(const AttentionArgs& a) {
  return a.logit_bias != nullptr && a.logit_bias->acts_on_logits();
}

// True when key j sits at position k_positions[0] + j (every model pass): the bias hooks then use
// their contiguous-range form, which is bitwise identical and skips per-key position reads.
bool ContiguousKeys(const AttentionArgs& a) {
  for (int64_t j = 1; j < a.tk; ++j) {
    if (a.k_positions[j] != a.k_positions[0] + j) return false;
  }
  return a.tk > 0;
}

// Number of keys visible to a query at `qp` when the keys are contiguous from k0.
int64_t VisibleKeys(int64_t qp, int64_t k0, int64_t tk) {
  return std::clamp<int64_t>(qp - k0 + 1, 0, tk);
}

}  // namespace

void AttentionForward(const AttentionArgs& a, ThreadPool* pool) {
  CheckAttention(a);
  SetBlasSingleThreaded();
  const int64_t group = a.heads / a.kv_heads;
  const int64_t D = a.head_dim, Tq = a.tq, Tk = a.tk;
  if (Tq == 0) return;
  const PositionSpan kpos(a.k_positions);
  const bool contiguous = ContiguousKeys(a);
  pool = PoolFor(pool, a.batch * a.heads * Tq * Tk * D);
  ParallelFor(pool, static_cast<size_t>(a.batch * a.heads), [&](size_t begin, size_t end, size_t) {
    std::vector<float> scratch;
    for (size_t task = begin; task < end; ++task) {
      const int64_t b = static_cast<int64_t>(task) / a.heads;
      const int64_t h = static_cast<int64_t>(task) % a.heads;
      const int64_t g = h / group;
      const float* q = a.q + b * a.q_batch_stride + h * D;
      const float* k = a.k + b * a.kv_batch_stride + g * D;
      const float* v = a.v + b * a.kv_batch_stride + g * D;
      float* o = a.out + b * a.out_batch_stride + h * D;
      float* s;
      if (a.probs) {
        s = a.probs + (b * a.heads + h) * Tq * Tk;
      } else {
        scratch.resize(static_cast<size_t>(Tq * Tk));
        s = scratch.data();
      }
      if (Tk == 0) {
        for (int64_t i = 0; i < Tq; ++i)
          std::fill(o + i * a.out_row_stride, o + i * a.out_row_stride + D, 0.0f);
        continue;
      }
      // S = scale * Q K^T  [Tq, Tk]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(Tq), int(Tk), int(D), a.scale, q,
                  int(a.q_row_stride), k, int(a.kv_row_stride), 0.0f, s, int(Tk));
      for (int64_t i = 0; i < Tq; ++i) {
        float* row = s + i * Tk;
        const int64_t qp = a.q_positions[i];
        if (HasBias(a)) {
          if (contiguous) {
            const int64_t k0 = a.k_positions[0];
            a.logit_bias->AddLogitBias(qp, k0, VisibleKeys(qp, k0, Tk), int(h), a.bias_params, row);
          } else {
            a.logit_bias->AddLogitBias(qp, kpos, int(h), a.bias_params, row);
          }
        }
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < Tk; ++j) {
          if (a.k_positions[j] <= qp) mx = std::max(mx, row[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < Tk; ++j) {
          if (a.k_positions[j] <= qp) sum += std::exp(double{row[j]} - mx);
        }
        const double inv = sum > 0.0 ? 1.0 / sum : 0.0;
        for (int64_t j = 0; j < Tk; ++j) {
          row[j] = a.k_positions[j] <= qp ? static_cast<float>(std::exp(double{row[j]} - mx) * inv)
                                          : 0.0f;
        }
      }
      // O = P V  [Tq, D]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(Tq), int(D), int(Tk), 1.0f, s,
                  int(Tk), v, int(a.kv_row_stride), 0.0f, o, int(a.out_row_stride));
    }
  });
}

void AttentionBackward(const AttentionArgs& a, const float* dout, float* dq, float* dk, float* dv,
                       std::span<float> grad_bias_params, ThreadPool* pool) {
  CheckAttention(a);
  SetBlasSingleThreaded();
  if (a.probs == nullptr) throw Error("AttentionBackward: the forward probabilities are required");
  const int64_t group = a.heads / a.kv_heads;
  const int64_t D = a.head_dim, Tq = a.tq, Tk = a.tk;
  const PositionSpan kpos(a.k_positions);
  const bool contiguous = ContiguousKeys(a);
  const bool bias_grad = HasBias(a) && !grad_bias_params.empty();
  const size_t num_bias = grad_bias_params.size();
  // One partial bias gradient per (batch, kv head) task, folded in task order below: the tasks of
  // one sequence may run on different threads at once.
  std::vector<float> partial(bias_grad ? static_cast<size_t>(a.batch * a.kv_heads) * num_bias : 0,
                             0.0f);
  ParallelFor(
      pool, static_cast<size_t>(a.batch * a.kv_heads), [&](size_t begin, size_t end, size_t) {
        std::vector<float> ds(static_cast<size_t>(Tq * Tk));
        for (size_t task = begin; task < end; ++task) {
          const auto [b, g, k, v, dkg, dvg] = KvTaskAt(a, dk, dv, task);
          if (Tq == 0 || Tk == 0) {
            for (int64_t j = 0; j < Tk; ++j) {
              std::fill(dkg + j * a.kv_row_stride, dkg + j * a.kv_row_stride + D, 0.0f);
              std::fill(dvg + j * a.kv_row_stride, dvg + j * a.kv_row_stride + D, 0.0f);
            }
            for (int64_t hh = 0; hh < group && Tk == 0; ++hh) {
              float* dqh = dq + b * a.q_batch_stride + (g * group + hh) * D;
              for (int64_t i = 0; i < Tq; ++i)
                std::fill(dqh + i * a.q_row_stride, dqh + i * a.q_row_stride + D, 0.0f);
            }
            continue;
          }
          for (int64_t hh = 0; hh < group; ++hh) {
            const int64_t h = g * group + hh;
            const float* q = a.q + b * a.q_batch_stride + h * D;
            const float* p = a.probs + (b * a.heads + h) * Tq * Tk;
            const float* dO = dout + b * a.out_batch_stride + h * D;
            float* dqh = dq + b * a.q_batch_stride + h * D;
            const float beta = hh == 0 ? 0.0f : 1.0f;
            // dV_g (+)= P^T dO_h
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(Tk), int(D), int(Tq), 1.0f, p,
                        int(Tk), dO, int(a.out_row_stride), beta, dvg, int(a.kv_row_stride));
            // dP = dO_h V_g^T
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(Tq), int(Tk), int(D), 1.0f, dO,
                        int(a.out_row_stride), v, int(a.kv_row_stride), 0.0f, ds.data(), int(Tk));
            // dS = P (dP - sum(P dP)): gradient of the (biased) logits.
            for (int64_t i = 0; i < Tq; ++i) {
              const float* pr = p + i * Tk;
              float* dr = ds.data() + i * Tk;
              double dot = 0.0;
              for (int64_t j = 0; j < Tk; ++j) dot += double{pr[j]} * dr[j];
              for (int64_t j = 0; j < Tk; ++j) dr[j] = static_cast<float>(pr[j] * (dr[j] - dot));
              if (bias_grad) {
                const std::span<float> grad(partial.data() + task * num_bias, num_bias);
                const int64_t qp = a.q_positions[i];
                if (contiguous) {
                  // Masked keys have zero gradient: only the visible range contributes.
                  const int64_t k0 = a.k_positions[0];
                  a.logit_bias->AddLogitBiasBackward(qp, k0, VisibleKeys(qp, k0, Tk), int(h), dr,
                                                     grad);
                } else {
                  a.logit_bias->AddLogitBiasBackward(qp, kpos, int(h), dr, grad);
                }
              }
            }
            // dQ_h = scale * dS K_g
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(Tq), int(D), int(Tk),
                        a.scale, ds.data(), int(Tk), k, int(a.kv_row_stride), 0.0f, dqh,
                        int(a.q_row_stride));
            // dK_g (+)= scale * dS^T Q_h
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(Tk), int(D), int(Tq), a.scale,
                        ds.data(), int(Tk), q, int(a.q_row_stride), beta, dkg,
                        int(a.kv_row_stride));
          }
        }
      });
  if (bias_grad) {
    for (int64_t t = 0; t < a.batch * a.kv_heads; ++t) {
      for (size_t i = 0; i < num_bias; ++i) grad_bias_params[i] += partial[t * num_bias + i];
    }
  }
}

// ---- Fused causal attention (FlashAttention-2, Dao 2023, arXiv:2307.08691) ------------------
//
// Forward (alg. 1) per (b, h, query tile i): for each visible key tile j,
//   S = scale Q_i K_j^T + bias, m' = max(m, rowmax S), P = exp(S - m'), l = e^(m - m') l + rowsum
//   P, O_acc = e^(m - m') O_acc + P V_j;  finally O_i = O_acc / l, lse_i = m + log l.
// Backward (alg. 2) per (b, kv head g), over its query heads, key tiles j and query tiles i:
//   P = exp(S - lse), dV_j += P^T dO_i, dP = dO_i V_j^T, dS = P o (dP - delta_i),
//   dQ_i += scale dS K_j, dK_j += scale dS^T Q_i,  with delta_i = rowsum(dO_i o O_i).
// One task owns every output it writes (O rows of one head; dQ of its heads, dK / dV of its kv
// head), and every sum runs in a fixed tile order, so threads never change a result.
namespace {

constexpr int64_t kBr = kFlashQueryTile, kBc = kFlashKeyTile;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Read-only facts of one fused call.
struct FlashPlan {
  const AttentionArgs& a;
  int64_t group, D, num_key_tiles;
  bool bias, contiguous;
  std::vector<int64_t> tile_min;  // smallest key position of each key tile
  std::vector<int64_t> tile_max;  // largest

  explicit FlashPlan(const AttentionArgs& args)
      : a(args),
        group(args.heads / args.kv_heads),
        D(args.head_dim),
        num_key_tiles(CeilDiv(args.tk, kBc)),
        bias(HasBias(args)),
        contiguous(ContiguousKeys(args)) {
    for (int64_t jt = 0; jt < num_key_tiles; ++jt) {
      const auto keys = args.k_positions.subspan(jt * kBc, std::min(kBc, args.tk - jt * kBc));
      tile_min.push_back(*std::min_element(keys.begin(), keys.end()));
      tile_max.push_back(*std::max_element(keys.begin(), keys.end()));
    }
  }
  // Largest query position of rows [i0, i0 + rows).
  int64_t MaxQuery(int64_t i0, int64_t rows) const {
    const auto qs = a.q_positions.subspan(i0, rows);
    return *std::max_element(qs.begin(), qs.end());
  }
  int64_t KeyCols(int64_t jt) const { return std::min(kBc, a.tk - jt * kBc); }
  // Keys of tile jt visible to a query at qp when the keys are contiguous (a prefix of the tile).
  int64_t VisiblePrefix(int64_t qp, int64_t jt) const {
    return std::clamp<int64_t>(qp - (a.k_positions[0] + jt * kBc) + 1, 0, KeyCols(jt));
  }
};

// s[r * kBc + c] = scale * q_(i0+r) . k_(j0+c) + bias for visible keys, -inf for the others.
void ScoreTile(const FlashPlan& P, const float* q, const float* k, int64_t h, int64_t i0,
               int64_t rows, int64_t jt, float* s) {
  const AttentionArgs& a = P.a;
  const int64_t j0 = jt * kBc, cols = P.KeyCols(jt);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(P.D), a.scale,
              q + i0 * a.q_row_stride, int(a.q_row_stride), k + j0 * a.kv_row_stride,
              int(a.kv_row_stride), 0.0f, s, int(kBc));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * kBc;
    const int64_t qp = a.q_positions[i0 + r];
    if (P.contiguous) {
      const int64_t visible = P.VisiblePrefix(qp, jt);
      if (P.bias && visible > 0) {
        a.logit_bias->AddLogitBias(qp, a.k_positions[0] + j0, visible, int(h), a.bias_params, row);
      }
      std::fill(row + visible, row + cols, kNegInf);
    } else {
      if (P.bias) {
        a.logit_bias->AddLogitBias(qp, PositionSpan(a.k_positions.subspan(j0, cols)), int(h),
                                   a.bias_params, row);
      }
      if (P.tile_max[jt] > qp) {
        for (int64_t c = 0; c < cols; ++c) {
          if (a.k_positions[j0 + c] > qp) row[c] = kNegInf;
        }
      }
    }
  }
}

// grad_params += the logit-bias gradient of one tile's dS (masked entries of dS are 0).
void BiasGradTile(const FlashPlan& P, int64_t h, int64_t i0, int64_t rows, int64_t jt,
                  const float* ds, std::span<float> grad) {
  const AttentionArgs& a = P.a;
  const int64_t j0 = jt * kBc, cols = P.KeyCols(jt);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t qp = a.q_positions[i0 + r];
    if (P.contiguous) {
      const int64_t visible = P.VisiblePrefix(qp, jt);
      if (visible > 0) {
        a.logit_bias->AddLogitBiasBackward(qp, a.k_positions[0] + j0, visible, int(h), ds + r * kBc,
                                           grad);
      }
    } else {
      a.logit_bias->AddLogitBiasBackward(qp, PositionSpan(a.k_positions.subspan(j0, cols)), int(h),
                                         ds + r * kBc, grad);
    }
  }
}

// Scratch of one worker: a score tile, a gradient tile and the query tile's running state.
struct FlashScratch {
  std::vector<float> s, dp, acc, m, l, delta;
  FlashScratch(int64_t D, int64_t tq)
      : s(kBr * kBc), dp(kBr * kBc), acc(kBr * D), m(kBr), l(kBr), delta(tq) {}
};

// Forward of query rows [i0, i0 + rows) of head h in batch b.
void FlashForwardTile(const FlashPlan& P, int64_t b, int64_t h, int64_t i0, int64_t rows,
                      float* lse, FlashScratch& w) {
  const AttentionArgs& a = P.a;
  const int64_t D = P.D, g = h / P.group;
  const float* q = a.q + b * a.q_batch_stride + h * D;
  const float* k = a.k + b * a.kv_batch_stride + g * D;
  const float* v = a.v + b * a.kv_batch_stride + g * D;
  float* o = a.out + b * a.out_batch_stride + h * D;
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const int64_t max_q = P.MaxQuery(i0, rows);
  for (int64_t jt = 0; jt < P.num_key_tiles; ++jt) {
    if (P.tile_min[jt] > max_q) continue;  // above the causal diagonal
    const int64_t cols = P.KeyCols(jt);
    ScoreTile(P, q, k, h, i0, rows, jt, w.s.data());
    for (int64_t r = 0; r < rows; ++r) {
      float* row = w.s.data() + r * kBc;
      float tile_max = kNegInf;
      for (int64_t c = 0; c < cols; ++c) tile_max = std::max(tile_max, row[c]);
      if (tile_max == kNegInf) {  // no visible key in this tile
        std::fill(row, row + cols, 0.0f);
        continue;
      }
      const float m_new = std::max(w.m[r], tile_max);
      const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first visible tile
      w.l[r] = alpha * w.l[r] + ExpShiftSumSimd(row, cols, m_new);
      w.m[r] = m_new;
      if (alpha != 1.0f) {
        float* acc = w.acc.data() + r * D;
        for (int64_t c = 0; c < D; ++c) acc[c] *= alpha;
      }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(D), int(cols), 1.0f,
                w.s.data(), int(kBc), v + jt * kBc * a.kv_row_stride, int(a.kv_row_stride), 1.0f,
                w.acc.data(), int(D));
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = o + (i0 + r) * a.out_row_stride;
    const float* acc = w.acc.data() + r * D;
    const bool any = w.l[r] > 0.0f;
    const float inv = any ? 1.0f / w.l[r] : 0.0f;
    for (int64_t c = 0; c < D; ++c) out[c] = acc[c] * inv;
    if (lse) lse[i0 + r] = any ? w.m[r] + std::log(w.l[r]) : kNegInf;
  }
}

}  // namespace

namespace {

// s[j] = scale * (q_h . k_j) for the first n keys of kv head g: one ScoreRowSimd call over
// contiguous keys, or one per page of a block table (each score is one row's dot product, so the
// bits are the same).
void ScoreKeys(const AttentionArgs& a, int64_t h, int64_t g, int64_t n, float* s) {
  const int64_t D = a.head_dim;
  const float* q = a.q + h * D;
  if (a.block_table.empty()) {
    ScoreRowSimd(q, a.k + g * D, a.kv_row_stride, n, D, a.scale, s);
    return;
  }
  const int64_t P = a.page_size;
  for (int64_t j0 = 0, page = 0; j0 < n; j0 += P, ++page) {
    const float* k = a.k + (int64_t{a.block_table[page]} * P) * a.kv_row_stride + g * D;
    ScoreRowSimd(q, k, a.kv_row_stride, std::min(P, n - j0), D, a.scale, s + j0);
  }
}

}  // namespace

void DecodeAttention(const AttentionArgs& a, std::span<float> scratch) {
  CheckAttention(a, /*paged_ok=*/true);
  if (a.batch != 1 || a.tq != 1) throw Error("DecodeAttention: needs batch = 1 and Tq = 1");
  const int64_t D = a.head_dim, Tk = a.tk, group = a.heads / a.kv_heads;
  if (static_cast<int64_t>(scratch.size()) < Tk) {
    throw Error("DecodeAttention: scratch holds " + std::to_string(scratch.size()) +
                " floats, needs Tk = " + std::to_string(Tk));
  }
  const bool paged = !a.block_table.empty();
  if (paged && (a.page_size < 1 || static_cast<int64_t>(a.block_table.size()) * a.page_size < Tk)) {
    throw Error("DecodeAttention: a block table of " + std::to_string(a.block_table.size()) +
                " pages of " + std::to_string(a.page_size) +
                " tokens does not cover Tk = " + std::to_string(Tk));
  }
  const int64_t qp = a.q_positions[0];
  const bool contiguous = ContiguousKeys(a);
  // Keys at positions <= qp: a prefix when contiguous, else a mask.
  const int64_t visible = contiguous ? VisibleKeys(qp, a.k_positions[0], Tk) : Tk;
  float* s = scratch.data();
  for (int64_t h = 0; h < a.heads; ++h) {
    const int64_t g = h / group;
    float* o = a.out + h * D;
    ScoreKeys(a, h, g, visible, s);
    if (HasBias(a) && visible > 0) {
      if (contiguous) {
        a.logit_bias->AddLogitBias(qp, a.k_positions[0], visible, int(h), a.bias_params, s);
      } else {
        a.logit_bias->AddLogitBias(qp, PositionSpan(a.k_positions), int(h), a.bias_params, s);
      }
    }
    float mx = kNegInf;
    for (int64_t j = 0; j < visible; ++j) {
      if (!contiguous && a.k_positions[j] > qp) s[j] = kNegInf;
      mx = std::max(mx, s[j]);
    }
    if (mx == kNegInf) {  // no visible key
      std::fill(o, o + D, 0.0f);
      continue;
    }
    const float sum = ExpShiftSumSimd(s, visible, mx);
    if (paged) {
      WeightedRowSumPagedSimd(s, a.v + g * D, a.kv_row_stride, a.block_table.data(), a.page_size,
                              visible, D, 1.0f / sum, o);
    } else {
      WeightedRowSumSimd(s, a.v + g * D, a.kv_row_stride, visible, D, 1.0f / sum, o);
    }
  }
}

void FlashAttentionForward(const AttentionArgs& a, float* lse, ThreadPool* pool) {
  CheckAttention(a);
  SetBlasSingleThreaded();
  const int64_t Tq = a.tq, D = a.head_dim;
  if (Tq == 0) return;
  if (a.tk == 0) {
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t i = 0; i < Tq; ++i) {
        float* row = a.out + b * a.out_batch_stride + i * a.out_row_stride;
        std::fill(row, row + a.heads * D, 0.0f);
      }
    }
    if (lse) std::fill(lse, lse + a.batch * a.heads * Tq, kNegInf);
    return;
  }
  const FlashPlan plan(a);
  const int64_t q_tiles = CeilDiv(Tq, kBr);
  pool = PoolFor(pool, a.batch * a.heads * Tq * a.tk * D);
  ParallelFor(pool, static_cast<size_t>(a.batch * a.heads * q_tiles),
              [&](size_t begin, size_t end, size_t) {
                FlashScratch w(D, 0);
                for (size_t task = begin; task < end; ++task) {
                  const int64_t bh = static_cast<int64_t>(task) / q_tiles;
                  const int64_t i0 = static_cast<int64_t>(task) % q_tiles * kBr;
                  FlashForwardTile(plan, bh / a.heads, bh % a.heads, i0, std::min(kBr, Tq - i0),
                                   lse ? lse + bh * Tq : nullptr, w);
                }
              });
}

void FlashAttentionBackward(const AttentionArgs& a, const float* lse, const float* dout, float* dq,
                            float* dk, float* dv, std::span<float> grad_bias_params,
                            ThreadPool* pool) {
  CheckAttention(a);
  SetBlasSingleThreaded();
  const int64_t D = a.head_dim, Tq = a.tq, Tk = a.tk;
  const FlashPlan plan(a);
  const bool bias_grad = plan.bias && !grad_bias_params.empty();
  const size_t num_bias = grad_bias_params.size();
  // One partial bias gradient per (batch, kv head) task, folded in task order below: the tasks of
  // one sequence may run on different threads at once.
  std::vector<float> partial(bias_grad ? static_cast<size_t>(a.batch * a.kv_heads) * num_bias : 0,
                             0.0f);
  const int64_t q_tiles = CeilDiv(Tq, kBr);
  pool = PoolFor(pool, a.batch * a.heads * Tq * Tk * D);
  ParallelFor(
      pool, static_cast<size_t>(a.batch * a.kv_heads), [&](size_t begin, size_t end, size_t) {
        FlashScratch w(D, Tq);
        for (size_t task = begin; task < end; ++task) {
          const auto [b, g, k, v, dkg, dvg] = KvTaskAt(a, dk, dv, task);
          for (int64_t j = 0; j < Tk; ++j) {
            std::fill(dkg + j * a.kv_row_stride, dkg + j * a.kv_row_stride + D, 0.0f);
            std::fill(dvg + j * a.kv_row_stride, dvg + j * a.kv_row_stride + D, 0.0f);
          }
          for (int64_t hh = 0; hh < plan.group; ++hh) {
            const int64_t h = g * plan.group + hh;
            const float* q = a.q + b * a.q_batch_stride + h * D;
            const float* o = a.out + b * a.out_batch_stride + h * D;
            const float* dO = dout + b * a.out_batch_stride + h * D;
            const float* lse_h = lse + (b * a.heads + h) * Tq;
            float* dqh = dq + b * a.q_batch_stride + h * D;
            for (int64_t i = 0; i < Tq; ++i) {
              const float* orow = o + i * a.out_row_stride;
              const float* drow = dO + i * a.out_row_stride;
              double dot = 0.0;  // delta_i = dO_i . O_i = sum_j P_ij dP_ij
              for (int64_t c = 0; c < D; ++c) dot += double{orow[c]} * drow[c];
              w.delta[i] = static_cast<float>(dot);
              std::fill(dqh + i * a.q_row_stride, dqh + i * a.q_row_stride + D, 0.0f);
            }
            for (int64_t jt = 0; jt < plan.num_key_tiles; ++jt) {
              const int64_t j0 = jt * kBc, cols = plan.KeyCols(jt);
              for (int64_t it = 0; it < q_tiles; ++it) {
                const int64_t i0 = it * kBr, rows = std::min(kBr, Tq - i0);
                if (plan.tile_min[jt] > plan.MaxQuery(i0, rows)) continue;  // above the diagonal
                float* s = w.s.data();
                float* ds = w.dp.data();
                ScoreTile(plan, q, k, h, i0, rows, jt, s);
                for (int64_t r = 0; r < rows; ++r) {
                  const float row_lse = lse_h[i0 + r];
                  if (row_lse == kNegInf) {
                    std::fill(s + r * kBc, s + r * kBc + cols, 0.0f);
                  } else {
                    ExpShiftSumSimd(s + r * kBc, cols, row_lse);
                  }
                }
                // dV_j += P^T dO_i
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(cols), int(D), int(rows),
                            1.0f, s, int(kBc), dO + i0 * a.out_row_stride, int(a.out_row_stride),
                            1.0f, dvg + j0 * a.kv_row_stride, int(a.kv_row_stride));
                // dP = dO_i V_j^T, then dS = P o (dP - delta) in place.
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(D),
                            1.0f, dO + i0 * a.out_row_stride, int(a.out_row_stride),
                            v + j0 * a.kv_row_stride, int(a.kv_row_stride), 0.0f, ds, int(kBc));
                for (int64_t r = 0; r < rows; ++r) {
                  SoftmaxGradRowSimd(s + r * kBc, ds + r * kBc, cols, w.delta[i0 + r]);
                }
                if (bias_grad) {
                  BiasGradTile(plan, h, i0, rows, jt, ds,
                               std::span<float>(partial.data() + task * num_bias, num_bias));
                }
                // dQ_i += scale dS K_j;  dK_j += scale dS^T Q_i
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(D), int(cols),
                            a.scale, ds, int(kBc), k + j0 * a.kv_row_stride, int(a.kv_row_stride),
                            1.0f, dqh + i0 * a.q_row_stride, int(a.q_row_stride));
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(cols), int(D), int(rows),
                            a.scale, ds, int(kBc), q + i0 * a.q_row_stride, int(a.q_row_stride),
                            1.0f, dkg + j0 * a.kv_row_stride, int(a.kv_row_stride));
              }
            }
          }
        }
      });
  if (bias_grad) {
    for (int64_t t = 0; t < a.batch * a.kv_heads; ++t) {
      for (size_t i = 0; i < num_bias; ++i) grad_bias_params[i] += partial[t * num_bias + i];
    }
  }
}

}  // namespace ropekit::ops
