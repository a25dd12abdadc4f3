// Plain declarations of the SwiGLU kernels used by src/ops (per-target code and dispatch in
// swiglu_kernels.cc).
//
// Dimension legend: n = elements.
#ifndef ROPEKIT_SRC_KERNELS_SWIGLU_KERNELS_H_
#define ROPEKIT_SRC_KERNELS_SWIGLU_KERNELS_H_

#include <cstdint>

namespace ropekit {

// h = silu(g) * u over n elements, float32 (see swiglu_kernels.cc for the formula).
void SwiGluSimd(const float* g, const float* u, float* h, int64_t n);
// dg = dh * u * silu'(g), du = dh * silu(g).
void SwiGluBackwardSimd(const float* g, const float* u, const float* dh, float* dg, float* du,
                        int64_t n);

}  // namespace ropekit

#endif  // ROPEKIT_SRC_KERNELS_SWIGLU_KERNELS_H_
