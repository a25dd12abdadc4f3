// Dispatch table of the RoPE rotation kernel: compiles rope-inl.h once per SIMD target and picks
// the best one for this CPU at run time (Highway dynamic dispatch; no -march flags needed).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/rope_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/rope-inl.h"
#include "src/kernels/rope_engine-inl.h"

#if HWY_ONCE
#include "hwy/targets.h"

namespace ropekit {

HWY_EXPORT(RotateTokens);

void RotateTokensSimd(const RotateJob& job, int64_t t_begin, int64_t t_end) {
  HWY_DYNAMIC_DISPATCH(RotateTokens)(job, t_begin, t_end);
}

HWY_EXPORT(GetRotateHeads);

RotateHeadsFn ResolveRotateHeads(DType dtype, Layout layout, Direction direction, HeadOrder order) {
  return HWY_DYNAMIC_DISPATCH(GetRotateHeads)(dtype, layout, direction, order);
}

std::string SimdTargetName() {
  // Dynamic dispatch picks the best target that is both compiled and supported; targets are
  // ordered best first, i.e. the lowest set bit.
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);
}

}  // namespace ropekit
#endif  // HWY_ONCE
