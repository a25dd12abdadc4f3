// Matrix products on bfloat16 operands with float32 accumulation, for MatmulPrecision::kBf16 on
// CPUs with the AVX512-BF16 dot-product instruction (VDPBF16PS: per float32 lane,
// acc += a[2i] b[2i] + a[2i+1] b[2i+1] on bf16 pairs). Where the CPU or the compiler lacks it,
// Bf16MatmulAvailable() is false and callers keep the float32 path (sgemm on bf16-rounded values).
//
// Dimension legend: M = rows (tokens), K = input features, N = output features, R = the reduced
// dimension of a product, K2 = ceil(K / 2) (bf16 pairs), Np / Kp = N / K rounded up to 32.
//
// Arithmetic of one output element (the same for every tiling and thread count, so results are
// bitwise identical for any ThreadPool size, and a forward row depends on its own input row only):
// both operands are rounded to bf16 (round to nearest even, as `vcvtne2ps2bf16`: float32
// subnormals become zero), the R products (exact in float32: 8 x 8 significant bits) are added
// pair by pair in ascending order of R into a float32 accumulator that starts at 0 (the
// instruction flushes subnormal results to zero); an odd R is padded with a zero product; with
// `accumulate`, y + sum is one final addition.
//
// Error bound against the exact product of the float32 inputs, with u = 2^-8 the unit roundoff of
// bf16 (8 significant bits) and g = gamma_(R+1) = (R+1) 2^-24 / (1 - (R+1) 2^-24) for the float32
// additions (Higham 2002, eq. 3.5):
//   |y - sum_r a_r b_r| <= ((1 + u)^2 (1 + g) - 1) sum_r |a_r b_r| + R 2^-126,
// since each bf16-rounded product is a_r b_r (1 + d1)(1 + d2), |d1|, |d2| <= u (relative error
// 2u + u^2 = 2 2^-8 + 2^-16), and the R products are summed with at most R + 1 float32 roundings;
// the last term bounds the flushed subnormals. For operands that are already bf16 values the
// (1 + u)^2 factor is 1.
#ifndef ROPEKIT_SRC_OPS_BF16_MATMUL_H_
#define ROPEKIT_SRC_OPS_BF16_MATMUL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ropekit/thread_pool.h"

namespace ropekit::ops {

// True when this build has the AVX512-BF16 kernel and the CPU (and OS) can run it, and the
// environment variable ROPEKIT_BF16_MATMUL is not "off".
bool Bf16MatmulAvailable();
// One line for logs and --help: which path MatmulPrecision::kBf16 takes on this machine and why.
std::string Bf16MatmulDescription();

// A weight w[N, K] (row-major [out, in]) packed as bf16 pairs for both products that read it:
// fwd[K2][Np]: pair (w[n, 2p], w[n, 2p + 1]) at [p][n] (for y = x w^T);
// bwd[ceil(N/2)][Kp]: pair (w[2p, k], w[2p + 1, k]) at [p][k] (for dx = dy w), packed on request.
// Padding holds zeros. Each pair is one uint32: the first element in the low 16 bits.
struct Bf16Weight {
  int64_t n = 0, k = 0;
  std::vector<uint32_t> fwd, bwd;
};

// Packs w (float32 master weights) into `out`, rounding to bf16; `backward` also fills bwd.
// Throws Error when the kernel is not available.
void PackBf16Weight(const float* w, int64_t n, int64_t k, bool backward, Bf16Weight* out,
                    ThreadPool* pool);

// y[M, N] (+)= bf16(x)[M, K] bf16(w)^T.
void MatMulBf16(const float* x, const Bf16Weight& w, float* y, int64_t m, ThreadPool* pool,
                bool accumulate = false);
// dx[M, K] (+)= bf16(dy)[M, N] bf16(w); needs w.bwd.
void MatMulBackwardInputBf16(const float* dy, const Bf16Weight& w, float* dx, int64_t m,
                             ThreadPool* pool, bool accumulate = false);
// dw[N, K] += bf16(dy)[M, N]^T bf16(x)[M, K] (reduced over the M rows in ascending order).
void MatMulBackwardWeightBf16(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                              int64_t n, ThreadPool* pool);

}  // namespace ropekit::ops

#endif  // ROPEKIT_SRC_OPS_BF16_MATMUL_H_
