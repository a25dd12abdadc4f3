// Highway per-target kernels for inference engines, built on the rotation of rope-inl.h
// (included once per SIMD target by foreach_target.h through rope_kernels.cc):
//  - RotateTokensAxes: multimodal / N-axis positions (M-RoPE). Pair i of token t takes the
//    cos/sin of position p_{a(i)}(t) from the shared table; the row is gathered per token and
//    the ordinary rotation runs on it, so equal positions on every axis give the same bits as
//    one-axis RoPE.
//  - RotateAppendTokens: rotate q (and k) of new tokens and write rotated k and raw v into a KV
//    cache slot per token (contiguous or paged), in one pass over k and v.
//  - RotateSlots: rotate cached keys in place at a list of slots by one fixed row (context
//    shift: R(p + delta) = R(delta) R(p)).
//  - RotateTokensPlanned: RotateTokens without the per-call heap scratch, for prepared calls.
//
// Dimension legend: T = tokens, H = heads (Hkv for the cache), D = head_dim, R = rotary_dim,
// N = R / 2, A = position axes, S = cache slots.

#if defined(ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#undef ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#else
#define ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#endif

#include <array>
#include <cstring>
#include <vector>

#include "hwy/highway.h"
#include "src/kernels/rope-inl.h"
#include "src/kernels/rope_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {

// Rotates one token of one operand with the row (cos, sin), dispatching on the dtype.
HWY_INLINE void RotateOperandTokenAnyType(const RopeOperand& op, int64_t t, const float* cos,
                                          const float* sin, size_t n, Layout layout,
                                          bool backward) {
  switch (op.in.dtype) {
    case DType::kF32:
      RotateOperandTokenIo<F32Io>(op, t, cos, sin, n, layout, backward);
      break;
    case DType::kBF16:
      RotateOperandTokenIo<Bf16Io>(op, t, cos, sin, n, layout, backward);
      break;
    case DType::kF16:
      RotateOperandTokenIo<F16Io>(op, t, cos, sin, n, layout, backward);
      break;
    default:
      break;
  }
}

// Scratch floats kept on the stack; larger rows use the heap.
constexpr size_t kStackScratchFloats = 1024;

class RowScratch {
 public:
  explicit RowScratch(size_t floats) {
    if (floats > kStackScratchFloats) heap_.resize(floats);
  }
  float* data() { return heap_.empty() ? stack_.data() : heap_.data(); }

 private:
  std::array<float, kStackScratchFloats> stack_;
  std::vector<float> heap_;
};

// The table row of `pos`: a pointer into the shared rows or, past them, computed into `scratch`.
HWY_INLINE const float* RowOf(const RotateJob& job, int64_t pos, float* scratch) {
  if (pos < job.num_rows) return job.rows + pos * job.row_stride;
  job.table->ComputeRow(pos, scratch, scratch + job.num_pairs);
  return scratch;
}

static HWY_NOINLINE void RotateTokensPlanned(const RotateJob& job, int64_t t_begin, int64_t t_end) {
  const size_t n = static_cast<size_t>(job.num_pairs);
  const bool backward = job.direction == Direction::kBackward;
  RowScratch scratch(2 * n);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const float* cos = RowOf(job, (*job.positions)[t], scratch.data());
    for (const RopeOperand& op : job.ops) {
      RotateOperandTokenAnyType(op, t, cos, cos + n, n, job.layout, backward);
    }
  }
}

static HWY_NOINLINE void RotateTokensAxes(const AxesJob& job, int64_t t_begin, int64_t t_end) {
  const RotateJob& base = job.base;
  const size_t n = static_cast<size_t>(base.num_pairs);
  const size_t num_axes = job.axis_positions.size();
  const bool backward = base.direction == Direction::kBackward;
  // [A] computed rows (2N each) for positions past the table, then the gathered row (2N).
  RowScratch scratch(2 * n * (num_axes + 1));
  float* gathered = scratch.data() + 2 * n * num_axes;
  std::array<const float*, kMaxPositionAxes> axis_rows{};
  for (int64_t t = t_begin; t < t_end; ++t) {
    for (size_t a = 0; a < num_axes; ++a) {
      axis_rows[a] = RowOf(base, job.axis_positions[a][t], scratch.data() + 2 * n * a);
    }
    for (size_t i = 0; i < n; ++i) {
      const float* row = axis_rows[job.pair_axis[i]];
      gathered[i] = row[i];
      gathered[n + i] = row[n + i];
    }
    for (const RopeOperand& op : base.ops) {
      RotateOperandTokenAnyType(op, t, gathered, gathered + n, n, base.layout, backward);
    }
  }
}

// A one-token view of `v` at token t, or of the cache at `slot`.
HWY_INLINE TensorView TokenView(const TensorView& v, int64_t t) {
  TensorView out = v;
  out.data =
      static_cast<uint8_t*>(v.data) + t * v.token_stride * static_cast<int64_t>(DTypeSize(v.dtype));
  out.num_tokens = 1;
  return out;
}
HWY_INLINE TensorView SlotView(const KvCacheView& cache, void* base, int64_t slot) {
  TensorView out;
  out.data = static_cast<uint8_t*>(base) +
             cache.SlotOffset(slot) * static_cast<int64_t>(DTypeSize(cache.dtype));
  out.dtype = cache.dtype;
  out.num_tokens = 1;
  out.num_heads = cache.num_heads;
  out.head_dim = cache.head_dim;
  out.token_stride = 0;
  out.head_stride = cache.head_stride;
  return out;
}

static HWY_NOINLINE void RotateAppendTokens(const AppendJob& job, int64_t t_begin, int64_t t_end) {
  const RotateJob& base = job.base;
  const size_t n = static_cast<size_t>(base.num_pairs);
  const bool backward = base.direction == Direction::kBackward;
  const size_t row_bytes = static_cast<size_t>(job.v.head_dim) * DTypeSize(job.v.dtype);
  RowScratch scratch(2 * n);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const float* cos = RowOf(base, (*base.positions)[t], scratch.data());
    const float* sin = cos + n;
    for (const RopeOperand& op : base.ops) {
      RotateOperandTokenAnyType(op, t, cos, sin, n, base.layout, backward);
    }
    const int64_t slot = job.slots[t];
    if (slot < 0) continue;  // padding token: nothing is written to the cache
    const RopeOperand k_op{TokenView(job.k, t), SlotView(job.cache, job.cache.k, slot)};
    RotateOperandTokenAnyType(k_op, 0, cos, sin, n, base.layout, backward);
    const TensorView v_in = TokenView(job.v, t);
    const TensorView v_out = SlotView(job.cache, job.cache.v, slot);
    const int64_t esize = static_cast<int64_t>(DTypeSize(job.v.dtype));
    for (int64_t h = 0; h < job.v.num_heads; ++h) {
      std::memcpy(static_cast<uint8_t*>(v_out.data) + h * v_out.head_stride * esize,
                  static_cast<const uint8_t*>(v_in.data) + h * v_in.head_stride * esize, row_bytes);
    }
  }
}

static HWY_NOINLINE void RotateSlots(const SlotRotateJob& job, int64_t s_begin, int64_t s_end) {
  const size_t n = static_cast<size_t>(job.num_pairs);
  const bool backward = job.direction == Direction::kBackward;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t slot = job.slots[s];
    if (slot < 0) continue;
    const TensorView view = SlotView(job.cache, job.cache.k, slot);
    const RopeOperand op{view, view};
    RotateOperandTokenAnyType(op, 0, job.cos, job.sin, n, job.layout, backward);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#endif  // include guard
