// Highway per-target kernel for inference engines (included once per SIMD target by
// foreach_target.h through rope_kernels.cc): RotateHeads rotates the heads of one token of one
// operand with one table row, which the caller has looked up (or computed) already. Decode
// calls (RopePlan), the fused KV-cache append, multimodal rows and context shift are built on
// it in src/rope/; the caller resolves the per-target function once (ResolveRotateHeads).
//
// Loop order: pairs outer, heads inner (RotateHeads; RotateHeadsStream below runs heads outer for
// calls of many tokens). Each vector of cos/sin is loaded once and kept in
// registers for every head, and the inner loop only advances two pointers by the head strides,
// so a decode-size call (40 heads of 64 pairs) runs as a few long loops with no per-head setup.
// Every output element is formed by the same operations as RotateOperandToken in rope-inl.h
// (Rotate, then the storage adapter's rounding), so the bits are the same.
//
// Dimension legend: H = heads, D = head_dim, R = rotary_dim, N = R / 2 = pairs.

#if defined(ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#undef ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#else
#define ROPEKIT_SRC_KERNELS_ROPE_ENGINE_INL_H_
#endif

#include <cstring>

#include "hwy/highway.h"
#include "src/kernels/rope-inl.h"
#include "src/kernels/rope_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {

// Pairs [i, i + Lanes(d)) of every head, with the cos/sin vectors c, s of those pairs.
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE void RotatePairsAllHeads(D d, const HeadRows& heads, hn::Vec<D> c, hn::Vec<D> s,
                                    size_t n, size_t i) {
  using T = typename Io::T;
  const T* x = static_cast<const T*>(heads.in);
  T* y = static_cast<T*>(heads.out);
  const int64_t xs = heads.in_head_stride, ys = heads.out_head_stride;
  for (int64_t h = heads.num_heads; h > 0; --h, x += xs, y += ys) {
    RotatePairs<Io, kInterleaved, kBackward>(d, x, y, c, s, n, i);
  }
}

// Pairs [i, i + 2 Lanes(d)) of every head: two independent rotations per head and iteration.
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE void RotatePairsAllHeads2(D d, const HeadRows& heads, const float* cos, const float* sin,
                                     size_t n, size_t i) {
  using T = typename Io::T;
  const size_t lanes = hn::Lanes(d);
  const auto c0 = hn::LoadU(d, cos + i), c1 = hn::LoadU(d, cos + i + lanes);
  const auto s0 = hn::LoadU(d, sin + i), s1 = hn::LoadU(d, sin + i + lanes);
  const T* x = static_cast<const T*>(heads.in);
  T* y = static_cast<T*>(heads.out);
  const int64_t xs = heads.in_head_stride, ys = heads.out_head_stride;
  hn::Vec<D> a0, b0, a1, b1, ya0, yb0, ya1, yb1;
  for (int64_t h = heads.num_heads; h > 0; --h, x += xs, y += ys) {
    if constexpr (kInterleaved) {
      Io::LoadPairs(d, x + 2 * i, a0, b0);
      Io::LoadPairs(d, x + 2 * (i + lanes), a1, b1);
      Rotate<kBackward>(a0, b0, c0, s0, ya0, yb0);
      Rotate<kBackward>(a1, b1, c1, s1, ya1, yb1);
      Io::StorePairs(d, ya0, yb0, y + 2 * i);
      Io::StorePairs(d, ya1, yb1, y + 2 * (i + lanes));
    } else {
      a0 = Io::Load(d, x + i);
      a1 = Io::Load(d, x + i + lanes);
      b0 = Io::Load(d, x + n + i);
      b1 = Io::Load(d, x + n + i + lanes);
      Rotate<kBackward>(a0, b0, c0, s0, ya0, yb0);
      Rotate<kBackward>(a1, b1, c1, s1, ya1, yb1);
      Io::Store(d, ya0, y + i);
      Io::Store(d, ya1, y + i + lanes);
      Io::Store(d, yb0, y + n + i);
      Io::Store(d, yb1, y + n + i + lanes);
    }
  }
}

// Pairs [i, end) of every head with vectors of tag D, two at a time while they fit, then one at a
// time; returns the first pair not rotated (end minus fewer than Lanes(d) pairs).
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE size_t RotateRange(D d, const HeadRows& heads, const float* cos, const float* sin,
                              size_t n, size_t i, size_t end) {
  const size_t lanes = hn::Lanes(d);
#if HWY_TARGET != HWY_SCALAR
  if constexpr (Io::kPacksTwo && !kInterleaved) {
    using T = typename Io::T;
    // 16-bit half-split: two vectors per row half, packed with one permute (RotateStepTwo).
    for (; i + 2 * lanes <= end; i += 2 * lanes) {
      const auto c0 = hn::LoadU(d, cos + i), c1 = hn::LoadU(d, cos + i + lanes);
      const auto s0 = hn::LoadU(d, sin + i), s1 = hn::LoadU(d, sin + i + lanes);
      const T* x = static_cast<const T*>(heads.in);
      T* y = static_cast<T*>(heads.out);
      for (int64_t h = heads.num_heads; h > 0;
           --h, x += heads.in_head_stride, y += heads.out_head_stride) {
        const auto a0 = Io::Load(d, x + i), a1 = Io::Load(d, x + i + lanes);
        const auto b0 = Io::Load(d, x + n + i), b1 = Io::Load(d, x + n + i + lanes);
        hn::Vec<D> ya0, yb0, ya1, yb1;
        Rotate<kBackward>(a0, b0, c0, s0, ya0, yb0);
        Rotate<kBackward>(a1, b1, c1, s1, ya1, yb1);
        Io::StoreTwo(d, ya0, ya1, y + i);
        Io::StoreTwo(d, yb0, yb1, y + n + i);
      }
    }
  }
#endif
  if constexpr (!Io::kPacksTwo || kInterleaved) {
    for (; i + 2 * lanes <= end; i += 2 * lanes) {
      RotatePairsAllHeads2<Io, kInterleaved, kBackward>(d, heads, cos, sin, n, i);
    }
  }
  for (; i + lanes <= end; i += lanes) {
    RotatePairsAllHeads<Io, kInterleaved, kBackward>(d, heads, hn::LoadU(d, cos + i),
                                                     hn::LoadU(d, sin + i), n, i);
  }
  return i;
}

// Pairs [i, end) with vectors of at most 8, then 4 lanes, then single lanes (the few pairs
// before the first cache-line boundary, and the tail).
template <class Io, bool kInterleaved, bool kBackward, size_t kMaxLanes = 8>
HWY_INLINE void RotateRangeNarrow(const HeadRows& heads, const float* cos, const float* sin,
                                  size_t n, size_t i, size_t end) {
  const hn::CappedTag<float, kMaxLanes> d;
  for (; i + hn::Lanes(d) <= end; i += hn::Lanes(d)) {
    RotatePairsAllHeads<Io, kInterleaved, kBackward>(d, heads, hn::LoadU(d, cos + i),
                                                     hn::LoadU(d, sin + i), n, i);
  }
  if constexpr (kMaxLanes > 1) {
    RotateRangeNarrow<Io, kInterleaved, kBackward, kMaxLanes / 2>(heads, cos, sin, n, i, end);
  }
}

// Pairs to rotate before the full-width loop so that its loads and stores of every head start
// on a 64-byte (cache-line) boundary: a vector access that straddles two lines costs about
// twice as much (malloc'ed buffers are often only 16-byte aligned). fp32 only: a 16-bit vector
// of 16 lanes spans 32 bytes and straddles a line at most every other access, and the narrow
// conversions of the lead cost more than they save (a decode step at a 16-byte offset took 1.7x
// longer with the lead, AMD EPYC with AVX-512). 0 also when the heads do not share one
// alignment (strides or in/out offsets that are not multiples of 64 bytes, or a b half at a
// different offset) or when the lead would leave no full vector.
template <class Io, bool kInterleaved>
HWY_INLINE size_t LeadPairs(const HeadRows& heads, size_t n, size_t lanes) {
  using T = typename Io::T;
  if constexpr (sizeof(T) != sizeof(float)) return 0;
  constexpr size_t kLine = 64;
  const size_t es = sizeof(T), pair_elems = kInterleaved ? 2 : 1;
  const auto in = reinterpret_cast<uintptr_t>(heads.in);
  const auto out = reinterpret_cast<uintptr_t>(heads.out);
  const auto line_multiple = [&](int64_t elems) {
    return (static_cast<uint64_t>(elems) * es) % kLine == 0;
  };
  if (in % kLine == 0 || in % (pair_elems * es) != 0 || (in - out) % kLine != 0) return 0;
  if (!line_multiple(heads.in_head_stride) || !line_multiple(heads.out_head_stride)) return 0;
  if (!kInterleaved && !line_multiple(static_cast<int64_t>(n))) return 0;
  const size_t lead = (kLine - in % kLine) / (pair_elems * es);
  return lead + lanes <= n ? lead : 0;
}

template <class Io, bool kInterleaved, bool kBackward>
HWY_NOINLINE void RotateHeads(const HeadRows& heads, const float* cos, const float* sin, size_t n) {
  using T = typename Io::T;
  const hn::ScalableTag<float> d;
  const size_t lead = LeadPairs<Io, kInterleaved>(heads, n, hn::Lanes(d));
  RotateRangeNarrow<Io, kInterleaved, kBackward>(heads, cos, sin, n, 0, lead);
  const size_t i = RotateRange<Io, kInterleaved, kBackward>(d, heads, cos, sin, n, lead, n);
  RotateRangeNarrow<Io, kInterleaved, kBackward>(heads, cos, sin, n, i, n);
  // Channels [R, D) pass through (nothing to do in place).
  const size_t pass = static_cast<size_t>(heads.head_dim) - 2 * n;
  if (pass == 0 || heads.in == heads.out) return;
  const T* x = static_cast<const T*>(heads.in) + 2 * n;
  T* y = static_cast<T*>(heads.out) + 2 * n;
  for (int64_t h = heads.num_heads; h > 0;
       --h, x += heads.in_head_stride, y += heads.out_head_stride) {
    std::memcpy(y, x, pass * sizeof(T));
  }
}

// Heads outer, pairs inner (RotateTokens' loop): each head is read and written front to back,
// which keeps the hardware prefetchers streaming when a call covers many tokens whose data come
// from memory (the fused append of a prompt: about 0.85x the time of the pairs-outer loop there,
// AMD EPYC with AVX-512).
template <class Io, bool kInterleaved, bool kBackward>
HWY_NOINLINE void RotateHeadsStream(const HeadRows& heads, const float* cos, const float* sin,
                                    size_t n) {
  using T = typename Io::T;
  const StreamTag<Io> d;
  const size_t pass = static_cast<size_t>(heads.head_dim) - 2 * n;
  const bool copy_pass = pass != 0 && heads.in != heads.out;
  const T* x = static_cast<const T*>(heads.in);
  T* y = static_cast<T*>(heads.out);
  for (int64_t h = heads.num_heads; h > 0;
       --h, x += heads.in_head_stride, y += heads.out_head_stride) {
    RotateOneHead<Io, kInterleaved, kBackward>(d, x, y, cos, sin, n);
    if (copy_pass) std::memcpy(y + 2 * n, x + 2 * n, pass * sizeof(T));
  }
}

template <class Io, bool kInterleaved, bool kBackward>
HWY_INLINE RotateHeadsFn RotateHeadsOrder(HeadOrder order) {
  return order == HeadOrder::kHeadsOuter ? &RotateHeadsStream<Io, kInterleaved, kBackward>
                                         : &RotateHeads<Io, kInterleaved, kBackward>;
}

template <class Io>
HWY_INLINE RotateHeadsFn RotateHeadsFor(Layout layout, Direction direction, HeadOrder order) {
  const bool backward = direction == Direction::kBackward;
  if (layout == Layout::kInterleaved) {
    return backward ? RotateHeadsOrder<Io, true, true>(order)
                    : RotateHeadsOrder<Io, true, false>(order);
  }
  return backward ? RotateHeadsOrder<Io, false, true>(order)
                  : RotateHeadsOrder<Io, false, false>(order);
}

// This target's RotateHeads for a dtype, layout, direction and loop order (null for an unknown
// dtype).
static HWY_NOINLINE RotateHeadsFn GetRotateHeads(DType dtype, Layout layout, Direction direction,
                                                 HeadOrder order) {
  switch (dtype) {
    case DType::kF32:
      return RotateHeadsFor<F32Io>(layout, direction, order);
    case DType::kBF16:
      return RotateHeadsFor<Bf16Io>(layout, direction, order);
    case DType::kF16:
      return RotateHeadsFor<F16Io>(layout, direction, order);
    default:
      return nullptr;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#endif  // include guard
