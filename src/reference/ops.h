// Scalar double-precision references of the transformer ops in src/ops/ops.h: plain loops, no
// threading, no BLAS. They are the oracle for the float32 ops and are themselves checked against
// finite differences and an independent PyTorch model in the tests.
//
//  * RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4.
//  * SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 (Swish_1 = SiLU).
//  * Attention: Vaswani et al. 2017, eq. 1, with a causal mask by position and grouped KV heads
//    (Ainslie et al. 2023, GQA).
//
// Dimension legend: M = rows, K = in, N = out, d = width, Tq / Tk = query / key tokens,
// H / Hkv = query / key-value heads, D = head_dim. Layouts as in src/ops/ops.h, batch 1,
// contiguous rows (q: [Tq, H*D], k, v: [Tk, Hkv*D]).
#ifndef ROPEKIT_SRC_REFERENCE_OPS_H_
#define ROPEKIT_SRC_REFERENCE_OPS_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "ropekit/position_encoding.h"

namespace ropekit::reference {

// out[i, j] = sum_c a[i * a_row + c * a_inner] b[j * b_row + c * b_inner] for i < rows,
// j < cols, c < inner ascending (out row-major [rows, cols]): every product below is this sum.
template <typename T>
void StridedProduct(const T* a, int64_t a_row, int64_t a_inner, const T* b, int64_t b_row,
                    int64_t b_inner, T* out, int64_t rows, int64_t cols, int64_t inner) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      T s = 0;
      for (int64_t c = 0; c < inner; ++c)
        s += a[i * a_row + c * a_inner] * b[j * b_row + c * b_inner];
      out[i * cols + j] = s;
    }
  }
}

// y[M, N] = x[M, K] w[N, K]^T
template <typename T>
void MatMul(const T* x, const T* w, T* y, int64_t m, int64_t k, int64_t n) {
  StridedProduct(x, k, 1, w, k, 1, y, m, n, k);
}

// dx[M, K] = dy w;  dw[N, K] = dy^T x.
template <typename T>
void MatMulBackward(const T* x, const T* w, const T* dy, T* dx, T* dw, int64_t m, int64_t k,
                    int64_t n) {
  StridedProduct(dy, n, 1, w, 1, k, dx, m, k, n);
  StridedProduct(dy, 1, n, x, 1, k, dw, n, k, m);
}

// y = x / sqrt(mean(x^2) + eps) * w, per row.
template <typename T>
void RmsNorm(const T* x, const T* w, T* y, int64_t m, int64_t d, double eps) {
  for (int64_t r = 0; r < m; ++r) {
    T ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += x[r * d + c] * x[r * d + c];
    const T inv = T(1) / std::sqrt(ss / T(d) + T(eps));
    for (int64_t c = 0; c < d; ++c) y[r * d + c] = x[r * d + c] * inv * w[c];
  }
}

// dx = r (w dy) - r^3 / d x sum(w dy x);  dw = sum_rows dy x r.
template <typename T>
void RmsNormBackward(const T* x, const T* w, const T* dy, T* dx, T* dw, int64_t m, int64_t d,
                     double eps) {
  for (int64_t c = 0; c < d; ++c) dw[c] = 0;
  for (int64_t r = 0; r < m; ++r) {
    T ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += x[r * d + c] * x[r * d + c];
    const T inv = T(1) / std::sqrt(ss / T(d) + T(eps));
    T dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += w[c] * dy[r * d + c] * x[r * d + c];
    for (int64_t c = 0; c < d; ++c) {
      dx[r * d + c] = inv * w[c] * dy[r * d + c] - inv * inv * inv / T(d) * dot * x[r * d + c];
      dw[c] += dy[r * d + c] * x[r * d + c] * inv;
    }
  }
}

template <typename T>
T Sigmoid(T g) {
  return T(1) / (T(1) + std::exp(-g));
}

// h = silu(g) u.
template <typename T>
void SwiGlu(const T* g, const T* u, T* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * Sigmoid(g[i]) * u[i];
}

template <typename T>
void SwiGluBackward(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = Sigmoid(g[i]);
    dg[i] = dh[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    du[i] = dh[i] * g[i] * s;
  }
}

// losses[r] = log(sum exp(x)) - x[target]; dlogits = scale (softmax - onehot).
template <typename T>
void CrossEntropy(const T* logits, const int32_t* targets, T* losses, T* dlogits, double scale,
                  int64_t m, int64_t v) {
  for (int64_t r = 0; r < m; ++r) {
    T mx = logits[r * v];
    for (int64_t c = 1; c < v; ++c) mx = std::max(mx, logits[r * v + c]);
    T sum = 0;
    for (int64_t c = 0; c < v; ++c) sum += std::exp(logits[r * v + c] - mx);
    const T lse = mx + std::log(sum);
    losses[r] = lse - logits[r * v + targets[r]];
    if (dlogits) {
      for (int64_t c = 0; c < v; ++c) {
        dlogits[r * v + c] =
            T(scale) * (std::exp(logits[r * v + c] - lse) - (c == targets[r] ? T(1) : T(0)));
      }
    }
  }
}

// The bias the PositionEncoding adds to the logit of (query position qp, key position kp, head h).
inline double LogitBias(const PositionEncoding* pe, std::span<const float> params, int64_t qp,
                        int64_t kp, int h) {
  if (pe == nullptr || !pe->acts_on_logits()) return 0.0;
  float value = 0.0f;
  const int64_t key[1] = {kp};
  pe->AddLogitBias(qp, PositionSpan(std::span<const int64_t>(key, 1)), h, params, &value);
  return value;
}

// Scores of query row i, head h (kv head g) against every visible key (k_pos[j] <= q_pos[i]):
// p[j] = scale q.k + bias (0 for invisible keys), their maximum mx and sum = sum_j e^(p_j - mx).
template <typename T>
void CausalScores(const T* q, const T* k, int64_t i, int64_t h, int64_t g, int64_t tk,
                  int64_t heads, int64_t kv_heads, int64_t d, std::span<const int64_t> q_pos,
                  std::span<const int64_t> k_pos, double scale, const PositionEncoding* pe,
                  std::span<const float> params, std::vector<T>& p, T& mx, T& sum) {
  mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < tk; ++j) {
    p[j] = 0;
    if (k_pos[j] > q_pos[i]) continue;
    T s = 0;
    for (int64_t c = 0; c < d; ++c) s += q[(i * heads + h) * d + c] * k[(j * kv_heads + g) * d + c];
    p[j] = T(scale) * s + T(LogitBias(pe, params, q_pos[i], k_pos[j], int(h)));
    mx = std::max(mx, p[j]);
  }
  sum = 0;
  for (int64_t j = 0; j < tk; ++j) {
    if (k_pos[j] <= q_pos[i]) sum += std::exp(p[j] - mx);
  }
}

// Calls row(h, g, i, p, mx, sum) for every head h (kv head g) and query row i, with the row's
// scores from CausalScores.
template <typename T, class RowFn>
void ForEachScoreRow(const T* q, const T* k, int64_t tq, int64_t tk, int64_t heads,
                     int64_t kv_heads, int64_t d, std::span<const int64_t> q_pos,
                     std::span<const int64_t> k_pos, double scale, const PositionEncoding* pe,
                     std::span<const float> params, const RowFn& row) {
  const int64_t group = heads / kv_heads;
  std::vector<T> p(static_cast<size_t>(tk));
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < tq; ++i) {
      T mx, sum;
      CausalScores(q, k, i, h, g, tk, heads, kv_heads, d, q_pos, k_pos, scale, pe, params, p, mx,
                   sum);
      row(h, g, i, p, mx, sum);
    }
  }
}

// out[Tq, H*D]: softmax over visible keys (k_pos[j] <= q_pos[i]) of scale q.k + bias, times v.
template <typename T>
void Attention(const T* q, const T* k, const T* v, T* out, int64_t tq, int64_t tk, int64_t heads,
               int64_t kv_heads, int64_t d, std::span<const int64_t> q_pos,
               std::span<const int64_t> k_pos, double scale, const PositionEncoding* pe,
               std::span<const float> params) {
  ForEachScoreRow(q, k, tq, tk, heads, kv_heads, d, q_pos, k_pos, scale, pe, params,
                  [&](int64_t h, int64_t g, int64_t i, const std::vector<T>& p, T mx, T sum) {
                    for (int64_t c = 0; c < d; ++c) {
                      T acc = 0;
                      for (int64_t j = 0; j < tk; ++j) {
                        if (k_pos[j] <= q_pos[i])
                          acc += std::exp(p[j] - mx) / sum * v[(j * kv_heads + g) * d + c];
                      }
                      out[(i * heads + h) * d + c] = acc;
                    }
                  });
}

// Gradients of Attention: dq, dk, dv (written), dparams += (T5 table).
template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv,
                       int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t d,
                       std::span<const int64_t> q_pos, std::span<const int64_t> k_pos, double scale,
                       const PositionEncoding* pe, std::span<const float> params,
                       std::span<double> dparams) {
  for (int64_t i = 0; i < tq * heads * d; ++i) dq[i] = 0;
  for (int64_t i = 0; i < tk * kv_heads * d; ++i) dk[i] = dv[i] = 0;
  std::vector<T> dp(static_cast<size_t>(tk));
  const auto row = [&](int64_t h, int64_t g, int64_t i, std::vector<T>& p, T mx, T sum) {
    T dot = 0;
    for (int64_t j = 0; j < tk; ++j) {
      if (k_pos[j] > q_pos[i]) {
        p[j] = 0;
        dp[j] = 0;
        continue;
      }
      p[j] = std::exp(p[j] - mx) / sum;
      T s = 0;
      for (int64_t c = 0; c < d; ++c)
        s += dout[(i * heads + h) * d + c] * v[(j * kv_heads + g) * d + c];
      dp[j] = s;
      dot += p[j] * s;
    }
    for (int64_t j = 0; j < tk; ++j) {
      if (k_pos[j] > q_pos[i]) continue;
      const T ds = p[j] * (dp[j] - dot);
      for (int64_t c = 0; c < d; ++c) {
        dq[(i * heads + h) * d + c] += T(scale) * ds * k[(j * kv_heads + g) * d + c];
        dk[(j * kv_heads + g) * d + c] += T(scale) * ds * q[(i * heads + h) * d + c];
        dv[(j * kv_heads + g) * d + c] += p[j] * dout[(i * heads + h) * d + c];
      }
      if (pe != nullptr && pe->kind() == PositionEncodingKind::kT5 && !dparams.empty()) {
        dparams[pe->Bucket(k_pos[j] - q_pos[i]) * heads + h] += double(ds);
      }
    }
  };
  ForEachScoreRow(q, k, tq, tk, heads, kv_heads, d, q_pos, k_pos, scale, pe, params, row);
}

}  // namespace ropekit::reference

#endif  // ROPEKIT_SRC_REFERENCE_OPS_H_
