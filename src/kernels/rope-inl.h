// Highway per-target RoPE rotation kernel (included once per SIMD target by foreach_target.h).
//
// The rotation is a memory-bound stream: per pair, load x_a, x_b and the table row's cos/sin,
//   forward:  y_a = x_a c - x_b s,  y_b = x_b c + x_a s     (RoFormer eq. 34)
//   backward: y_a = x_a c + x_b s,  y_b = x_b c - x_a s     (the transpose, R(p)^T = R(-p))
// with one FMA and one multiply per output, in float32 whatever the storage type. bf16/fp16 are
// widened to float32 on load and rounded to nearest-even on store: fp16 with the native F16C
// conversions on x86 targets that have them (AVX2, AVX-512), otherwise with integer operations
// (Highway 1.0.3's DemoteTo truncates bf16 and, on targets without F16C, fp16).
// Tails (N not a multiple of the vector length) run the same code with a one-lane tag, so no
// masked loads are needed and every element uses the same formula.
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
// Half-split pairs are (i, i + N); interleaved pairs are (2i, 2i + 1); channels [R, D) pass
// through unchanged.

#if defined(ROPEKIT_SRC_KERNELS_ROPE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ROPEKIT_SRC_KERNELS_ROPE_INL_H_
#undef ROPEKIT_SRC_KERNELS_ROPE_INL_H_
#else
#define ROPEKIT_SRC_KERNELS_ROPE_INL_H_
#endif

#include <cstring>
#include <type_traits>

#include "hwy/highway.h"
#include "src/kernels/rope_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace ropekit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---- Storage adapters: float32 lanes <-> memory ------------------------------------------

struct F32Io {
  using T = float;
  static constexpr bool kPacksTwo = false;
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D d, const T* p) {
    return hn::LoadU(d, p);
  }
  template <class D>
  static HWY_INLINE void Store(D d, hn::Vec<D> v, T* p) {
    hn::StoreU(v, d, p);
  }
  template <class D>
  static HWY_INLINE void LoadPairs(D d, const T* p, hn::Vec<D>& a, hn::Vec<D>& b) {
    hn::LoadInterleaved2(d, p, a, b);
  }
  template <class D>
  static HWY_INLINE void StorePairs(D d, hn::Vec<D> a, hn::Vec<D> b, T* p) {
    hn::StoreInterleaved2(a, b, d, p);
  }
};

// 16-bit storage: values travel in uint32 lanes. Conv supplies ToFloat(d, bits32) (16-bit value
// in the low half) and RoundBits(d, v) -> uint32 lanes holding the rounded 16-bit result in their
// high half (kHighHalf, bf16) or low half (fp16), so that two vectors pack into one with a
// single ConcatOdd/ConcatEven instead of a shift and a saturating demotion each.
template <class Conv>
struct Half16Io {
  using T = uint16_t;
  static constexpr bool kPacksTwo = HWY_TARGET != HWY_SCALAR;

  template <class D>
  static HWY_INLINE hn::Vec<hn::Rebind<uint32_t, D>> LowHalf(D d, hn::Vec<D> v) {
    const auto bits = Conv::RoundBits(d, v);
    if constexpr (Conv::kHighHalf) {
      return hn::ShiftRight<16>(bits);
    } else {
      return bits;
    }
  }
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D d, const T* p) {
    const hn::Rebind<uint16_t, D> d16;
    const hn::Rebind<uint32_t, D> d32;
    return Conv::ToFloat(d, hn::PromoteTo(d32, hn::LoadU(d16, p)));
  }
  template <class D>
  static HWY_INLINE void Store(D d, hn::Vec<D> v, T* p) {
    const hn::Rebind<uint16_t, D> d16;
    const hn::Rebind<int32_t, D> di32;
    hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di32, LowHalf(d, v))), d16, p);
  }
#if HWY_TARGET != HWY_SCALAR
  // Stores v0 to p[0, L) and v1 to p[L, 2L) with one permute.
  template <class D>
  static HWY_INLINE void StoreTwo(D d, hn::Vec<D> v0, hn::Vec<D> v1, T* p) {
    const hn::Repartition<uint16_t, D> d16;  // 2L lanes
    const auto lo = hn::BitCast(d16, Conv::RoundBits(d, v0));
    const auto hi = hn::BitCast(d16, Conv::RoundBits(d, v1));
    if constexpr (Conv::kHighHalf) {
      hn::StoreU(hn::ConcatOdd(d16, hi, lo), d16, p);  // little-endian: high half = odd lane
    } else {
      hn::StoreU(hn::ConcatEven(d16, hi, lo), d16, p);
    }
  }
#endif
  // An interleaved pair (a, b) is one little-endian uint32: a in the low half, b in the high.
  template <class D>
  static HWY_INLINE void LoadPairs(D d, const T* p, hn::Vec<D>& a, hn::Vec<D>& b) {
    const hn::Rebind<uint32_t, D> d32;
    const auto w = hn::LoadU(d32, reinterpret_cast<const uint32_t*>(p));
    if constexpr (Conv::kHighHalf) {  // bf16: a float32 is the bf16 bits in its high half
      a = hn::BitCast(d, hn::ShiftLeft<16>(w));
      b = hn::BitCast(d, hn::And(w, hn::Set(d32, 0xFFFF0000u)));
    } else {
      a = Conv::ToFloat(d, hn::And(w, hn::Set(d32, 0xFFFFu)));
      b = Conv::ToFloat(d, hn::ShiftRight<16>(w));
    }
  }
  template <class D>
  static HWY_INLINE void StorePairs(D d, hn::Vec<D> a, hn::Vec<D> b, T* p) {
    const hn::Rebind<uint32_t, D> d32;
    const auto ra = Conv::RoundBits(d, a), rb = Conv::RoundBits(d, b);
    hn::Vec<decltype(d32)> w;
    if constexpr (Conv::kHighHalf) {
      w = hn::Or(hn::ShiftRight<16>(ra), hn::And(rb, hn::Set(d32, 0xFFFF0000u)));
    } else {
      w = hn::Or(ra, hn::ShiftLeft<16>(rb));
    }
    hn::StoreU(w, d32, reinterpret_cast<uint32_t*>(p));
  }
};

struct Bf16Conv {
  static constexpr bool kHighHalf = true;
  template <class D, class VU>
  static HWY_INLINE hn::Vec<D> ToFloat(D d, VU bits) {
    return hn::BitCast(d, hn::ShiftLeft<16>(bits));
  }
  // Round to nearest even: add 0x7FFF + lsb; the result is the high half. A NaN keeps its high
  // half with the quiet bit set.
  template <class D>
  static HWY_INLINE hn::Vec<hn::Rebind<uint32_t, D>> RoundBits(D d, hn::Vec<D> v) {
    const hn::Rebind<uint32_t, D> du;
    const auto bits = hn::BitCast(du, v);
    const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
    const auto rounded = hn::Add(bits, hn::Add(hn::Set(du, 0x7FFFu), lsb));
    const auto quiet_nan = hn::Or(bits, hn::Set(du, 0x00400000u));
    return hn::IfThenElse(hn::RebindMask(du, hn::IsNaN(v)), quiet_nan, rounded);
  }
};

struct F16Conv {
  static constexpr bool kHighHalf = false;
  // binary16 -> float32: shift exponent+mantissa into place and rescale by 2^112, which also
  // normalises subnormals exactly; infinities and NaNs get the float32 all-ones exponent.
  template <class D, class VU>
  static HWY_INLINE hn::Vec<D> ToFloat(D d, VU h) {
    const hn::Rebind<uint32_t, D> du;
    const hn::Rebind<int32_t, D> di;
    const auto sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
    const auto em = hn::And(h, hn::Set(du, 0x7FFFu));
    const auto finite = hn::Mul(hn::BitCast(d, hn::ShiftLeft<13>(em)), hn::Set(d, 0x1.0p112f));
    const auto special = hn::BitCast(
        d, hn::Or(hn::Set(du, 0x7F800000u), hn::ShiftLeft<13>(hn::And(em, hn::Set(du, 0x3FFu)))));
    const auto is_special = hn::RebindMask(d, hn::Gt(hn::BitCast(di, em), hn::Set(di, 0x7BFF)));
    return hn::Or(hn::IfThenElse(is_special, special, finite), hn::BitCast(d, sign));
  }
  // float32 -> binary16 bits (low half) with round-to-nearest-even, subnormals, overflow to
  // infinity: scale the magnitude so that the float32 adder performs the rounding at the
  // binary16 precision, then read exponent and mantissa bits (Maratyszcza's FP16 algorithm).
  template <class D>
  static HWY_INLINE hn::Vec<hn::Rebind<uint32_t, D>> RoundBits(D d, hn::Vec<D> v) {
    const hn::Rebind<uint32_t, D> du;
    const hn::Rebind<int32_t, D> di;
    auto base = hn::Mul(hn::Mul(hn::Abs(v), hn::Set(d, 0x1.0p112f)), hn::Set(d, 0x1.0p-110f));
    const auto w = hn::BitCast(du, v);
    const auto shl1_w = hn::Add(w, w);
    const auto bias =
        hn::Max(hn::BitCast(di, hn::ShiftRight<1>(hn::And(shl1_w, hn::Set(du, 0xFF000000u)))),
                hn::Set(di, 0x38800000));
    base = hn::Add(hn::BitCast(d, hn::Add(hn::BitCast(du, bias), hn::Set(du, 0x07800000u))), base);
    const auto bits = hn::BitCast(du, base);
    const auto nonsign = hn::Add(hn::And(hn::ShiftRight<13>(bits), hn::Set(du, 0x7C00u)),
                                 hn::And(bits, hn::Set(du, 0x0FFFu)));
    const auto magnitude =
        hn::IfThenElse(hn::RebindMask(du, hn::IsNaN(v)), hn::Set(du, 0x7E00u), nonsign);
    return hn::Or(hn::ShiftRight<16>(hn::And(w, hn::Set(du, 0x80000000u))), magnitude);
  }
};

using Bf16Io = Half16Io<Bf16Conv>;

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
// fp16 on x86 targets with F16C (AVX2, AVX-512): Highway's PromoteTo / DemoteTo are the native
// VCVTPH2PS / VCVTPS2PH (rounding immediate 0: round to nearest even, subnormals kept), one
// instruction per vector instead of F16Conv's integer sequence. Identical bits to F16Conv for
// every non-NaN value (a NaN stays a NaN; VCVTPS2PH keeps the payload's top mantissa bits where
// F16Conv writes the canonical quiet NaN).
struct F16Io {
  using T = uint16_t;
  static constexpr bool kPacksTwo = true;
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D d, const T* p) {
    const hn::Rebind<hwy::float16_t, D> dh;
    return hn::PromoteTo(d, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
  }
  template <class D>
  static HWY_INLINE void Store(D d, hn::Vec<D> v, T* p) {
    const hn::Rebind<hwy::float16_t, D> dh;
    hn::StoreU(hn::DemoteTo(dh, v), dh, reinterpret_cast<hwy::float16_t*>(p));
  }
  template <class D>
  static HWY_INLINE void StoreTwo(D d, hn::Vec<D> v0, hn::Vec<D> v1, T* p) {
    Store(d, v0, p);
    Store(d, v1, p + hn::Lanes(d));
  }
  // An interleaved pair (a, b) is one little-endian uint32: a in the low half, b in the high.
  template <class D>
  static HWY_INLINE void LoadPairs(D d, const T* p, hn::Vec<D>& a, hn::Vec<D>& b) {
    const hn::Rebind<uint32_t, D> d32;
    const hn::Rebind<uint16_t, D> d16;
    const hn::Rebind<int32_t, D> di32;
    const hn::Rebind<hwy::float16_t, D> dh;
    const auto w = hn::LoadU(d32, reinterpret_cast<const uint32_t*>(p));
    // The saturating demotions of the low / high halves are exact (each fits 16 bits).
    const auto lo = hn::DemoteTo(d16, hn::BitCast(di32, hn::And(w, hn::Set(d32, 0xFFFFu))));
    const auto hi = hn::DemoteTo(d16, hn::BitCast(di32, hn::ShiftRight<16>(w)));
    a = hn::PromoteTo(d, hn::BitCast(dh, lo));
    b = hn::PromoteTo(d, hn::BitCast(dh, hi));
  }
  template <class D>
  static HWY_INLINE void StorePairs(D d, hn::Vec<D> a, hn::Vec<D> b, T* p) {
    const hn::Rebind<uint32_t, D> d32;
    const hn::Rebind<uint16_t, D> d16;
    const hn::Rebind<hwy::float16_t, D> dh;
    const auto ha = hn::PromoteTo(d32, hn::BitCast(d16, hn::DemoteTo(dh, a)));
    const auto hb = hn::PromoteTo(d32, hn::BitCast(d16, hn::DemoteTo(dh, b)));
    hn::StoreU(hn::Or(ha, hn::ShiftLeft<16>(hb)), d32, reinterpret_cast<uint32_t*>(p));
  }
};
#else
using F16Io = Half16Io<F16Conv>;
#endif

// ---- The rotation -------------------------------------------------------------------------

template <bool kBackward, class V>
HWY_INLINE void Rotate(V a, V b, V c, V s, V& ya, V& yb) {
  if constexpr (kBackward) {
    ya = hn::MulAdd(a, c, hn::Mul(b, s));
    yb = hn::MulSub(b, c, hn::Mul(a, s));
  } else {
    ya = hn::MulSub(a, c, hn::Mul(b, s));
    yb = hn::MulAdd(b, c, hn::Mul(a, s));
  }
}

// Pairs [i, i + Lanes(d)) of one head with the cos/sin vectors c, s of those pairs.
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE void RotatePairs(D d, const typename Io::T* x, typename Io::T* y, hn::Vec<D> c,
                            hn::Vec<D> s, size_t n, size_t i) {
  hn::Vec<D> a, b, ya, yb;
  if constexpr (kInterleaved) {
    Io::LoadPairs(d, x + 2 * i, a, b);
    Rotate<kBackward>(a, b, c, s, ya, yb);
    Io::StorePairs(d, ya, yb, y + 2 * i);
  } else {
    a = Io::Load(d, x + i);
    b = Io::Load(d, x + n + i);
    Rotate<kBackward>(a, b, c, s, ya, yb);
    Io::Store(d, ya, y + i);
    Io::Store(d, yb, y + n + i);
  }
}

// Pairs [i, i + Lanes(d)) of one head.
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE void RotateStep(D d, const typename Io::T* x, typename Io::T* y, const float* cos,
                           const float* sin, size_t n, size_t i) {
  RotatePairs<Io, kInterleaved, kBackward>(d, x, y, hn::LoadU(d, cos + i), hn::LoadU(d, sin + i), n,
                                           i);
}

#if HWY_TARGET != HWY_SCALAR
// Half-split pairs [i, i + 2 Lanes(d)) of one head, for 16-bit storage: both halves of each
// output row are packed with one permute.
template <class Io, bool kBackward, class D>
HWY_INLINE void RotateStepTwo(D d, const typename Io::T* x, typename Io::T* y, const float* cos,
                              const float* sin, size_t n, size_t i) {
  const size_t lanes = hn::Lanes(d);
  const auto c0 = hn::LoadU(d, cos + i), c1 = hn::LoadU(d, cos + i + lanes);
  const auto s0 = hn::LoadU(d, sin + i), s1 = hn::LoadU(d, sin + i + lanes);
  const auto a0 = Io::Load(d, x + i), a1 = Io::Load(d, x + i + lanes);
  const auto b0 = Io::Load(d, x + n + i), b1 = Io::Load(d, x + n + i + lanes);
  hn::Vec<D> ya0, yb0, ya1, yb1;
  Rotate<kBackward>(a0, b0, c0, s0, ya0, yb0);
  Rotate<kBackward>(a1, b1, c1, s1, ya1, yb1);
  Io::StoreTwo(d, ya0, ya1, y + i);
  Io::StoreTwo(d, yb0, yb1, y + n + i);
}
#endif

// One head's pairs [0, N) with vectors of tag D, then single lanes; x and y may be the same
// memory (in place). Channels [R, D) are the caller's.
template <class Io, bool kInterleaved, bool kBackward, class D>
HWY_INLINE void RotateOneHead(D d, const typename Io::T* x, typename Io::T* y, const float* cos,
                              const float* sin, size_t n) {
  const hn::CappedTag<float, 1> d1;
  const size_t lanes = hn::Lanes(d);
  size_t i = 0;
#if HWY_TARGET != HWY_SCALAR
  if constexpr (Io::kPacksTwo && !kInterleaved) {
    for (; i + 2 * lanes <= n; i += 2 * lanes) {
      RotateStepTwo<Io, kBackward>(d, x, y, cos, sin, n, i);
    }
  } else if constexpr (Io::kPacksTwo) {  // 16-bit interleaved: two independent steps
    for (; i + 2 * lanes <= n; i += 2 * lanes) {
      RotateStep<Io, true, kBackward>(d, x, y, cos, sin, n, i);
      RotateStep<Io, true, kBackward>(d, x, y, cos, sin, n, i + lanes);
    }
  }
#endif
  for (; i + lanes <= n; i += lanes)
    RotateStep<Io, kInterleaved, kBackward>(d, x, y, cos, sin, n, i);
  for (; i < n; ++i) RotateStep<Io, kInterleaved, kBackward>(d1, x, y, cos, sin, n, i);
}

// The vector tag of the heads-outer loops. fp32 streams through memory with little arithmetic
// per byte. On AVX-512 CPUs 256-bit vectors rotate a 4096-token prompt faster than 512-bit ones:
// 1.7x with 16-byte aligned data (a NumPy array; every 512-bit access then straddles two cache
// lines) and 1.1x with 64-byte aligned data (AMD EPYC, Zen 5). The 16-bit paths are bound by the
// conversions and keep the full width. The bits do not depend on the width (the same operations
// per lane).
template <class Io>
using StreamTag =
    std::conditional_t<std::is_same_v<Io, F32Io>, hn::CappedTag<float, 8>, hn::ScalableTag<float>>;

// One operand, one token: every head, heads outer. x and y may be the same memory (in place).
template <class Io, bool kInterleaved, bool kBackward>
HWY_NOINLINE void RotateOperandToken(const RopeOperand& op, int64_t t, const float* cos,
                                     const float* sin, size_t n) {
  using T = typename Io::T;
  const StreamTag<Io> d;
  const T* in = static_cast<const T*>(op.in.data) + t * op.in.token_stride;
  T* out = static_cast<T*>(op.out.data) + t * op.out.token_stride;
  const size_t pass = static_cast<size_t>(op.in.head_dim) - 2 * n;
  const bool copy_pass = pass != 0 && op.in.data != op.out.data;
  for (int64_t h = 0; h < op.in.num_heads; ++h) {
    const T* x = in + h * op.in.head_stride;
    T* y = out + h * op.out.head_stride;
    RotateOneHead<Io, kInterleaved, kBackward>(d, x, y, cos, sin, n);
    if (copy_pass) std::memcpy(y + 2 * n, x + 2 * n, pass * sizeof(T));
  }
}

template <class Io>
HWY_INLINE void RotateOperandTokenIo(const RopeOperand& op, int64_t t, const float* cos,
                                     const float* sin, size_t n, Layout layout, bool backward) {
  if (layout == Layout::kInterleaved) {
    backward ? RotateOperandToken<Io, true, true>(op, t, cos, sin, n)
             : RotateOperandToken<Io, true, false>(op, t, cos, sin, n);
  } else {
    backward ? RotateOperandToken<Io, false, true>(op, t, cos, sin, n)
             : RotateOperandToken<Io, false, false>(op, t, cos, sin, n);
  }
}

static HWY_NOINLINE void RotateTokens(const RotateJob& job, int64_t t_begin, int64_t t_end) {
  const size_t n = static_cast<size_t>(job.num_pairs);
  const bool backward = job.direction == Direction::kBackward;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const float* cos = job.rows + (*job.positions)[t] * job.row_stride;
    const float* sin = cos + n;
    for (const RopeOperand& op : job.ops) {
      switch (op.in.dtype) {
        case DType::kF32:
          RotateOperandTokenIo<F32Io>(op, t, cos, sin, n, job.layout, backward);
          break;
        case DType::kBF16:
          RotateOperandTokenIo<Bf16Io>(op, t, cos, sin, n, job.layout, backward);
          break;
        case DType::kF16:
          RotateOperandTokenIo<F16Io>(op, t, cos, sin, n, job.layout, backward);
          break;
        default:
          break;
      }
    }
  }
}

// Conversion entry points for the tests of the rounding rules: the same store paths as the
// kernel (two vectors packed with one permute, one vector, one lane).
template <class Io>
HWY_INLINE void ConvertFloatTo16(const float* in, uint16_t* out, size_t count) {
  const hn::ScalableTag<float> d;
  const hn::CappedTag<float, 1> d1;
  const size_t lanes = hn::Lanes(d);
  size_t k = 0;
#if HWY_TARGET != HWY_SCALAR
  for (; k + 2 * lanes <= count / 2; k += 2 * lanes) {
    Io::StoreTwo(d, hn::LoadU(d, in + k), hn::LoadU(d, in + k + lanes), out + k);
  }
#endif
  for (; k + lanes <= count; k += lanes) Io::Store(d, hn::LoadU(d, in + k), out + k);
  for (; k < count; ++k) Io::Store(d1, hn::LoadU(d1, in + k), out + k);
}
HWY_MAYBE_UNUSED static HWY_NOINLINE void ConvertFloatToBf16(const float* in, uint16_t* out,
                                                             size_t count) {
  ConvertFloatTo16<Bf16Io>(in, out, count);
}
HWY_MAYBE_UNUSED static HWY_NOINLINE void ConvertFloatToF16(const float* in, uint16_t* out,
                                                            size_t count) {
  ConvertFloatTo16<F16Io>(in, out, count);
}
// The interleaved layout's paths: pair i = (a[i], b[i]) as out[2i], out[2i + 1] (StorePairs),
// and back (LoadPairs); full vectors, then one lane.
template <class Io>
HWY_INLINE void ConvertPairsTo16(const float* a, const float* b, uint16_t* out, size_t pairs) {
  const hn::ScalableTag<float> d;
  const hn::CappedTag<float, 1> d1;
  size_t k = 0;
  for (; k + hn::Lanes(d) <= pairs; k += hn::Lanes(d)) {
    Io::StorePairs(d, hn::LoadU(d, a + k), hn::LoadU(d, b + k), out + 2 * k);
  }
  for (; k < pairs; ++k)
    Io::StorePairs(d1, hn::LoadU(d1, a + k), hn::LoadU(d1, b + k), out + 2 * k);
}
template <class Io>
HWY_INLINE void Convert16PairsToFloat(const uint16_t* in, float* a, float* b, size_t pairs) {
  const hn::ScalableTag<float> d;
  const hn::CappedTag<float, 1> d1;
  size_t k = 0;
  hn::Vec<decltype(d)> va, vb;
  for (; k + hn::Lanes(d) <= pairs; k += hn::Lanes(d)) {
    Io::LoadPairs(d, in + 2 * k, va, vb);
    hn::StoreU(va, d, a + k);
    hn::StoreU(vb, d, b + k);
  }
  hn::Vec<decltype(d1)> va1, vb1;
  for (; k < pairs; ++k) {
    Io::LoadPairs(d1, in + 2 * k, va1, vb1);
    hn::StoreU(va1, d1, a + k);
    hn::StoreU(vb1, d1, b + k);
  }
}
HWY_MAYBE_UNUSED static HWY_NOINLINE void ConvertFloatPairsTo16(DType dtype, const float* a,
                                                                const float* b, uint16_t* out,
                                                                size_t pairs) {
  dtype == DType::kBF16 ? ConvertPairsTo16<Bf16Io>(a, b, out, pairs)
                        : ConvertPairsTo16<F16Io>(a, b, out, pairs);
}
HWY_MAYBE_UNUSED static HWY_NOINLINE void Convert16PairsToFloats(DType dtype, const uint16_t* in,
                                                                 float* a, float* b, size_t pairs) {
  dtype == DType::kBF16 ? Convert16PairsToFloat<Bf16Io>(in, a, b, pairs)
                        : Convert16PairsToFloat<F16Io>(in, a, b, pairs);
}
HWY_MAYBE_UNUSED static HWY_NOINLINE void ConvertF16ToFloat(const uint16_t* in, float* out,
                                                            size_t count) {
  const hn::ScalableTag<float> d;
  const hn::CappedTag<float, 1> d1;
  size_t k = 0;
  for (; k + hn::Lanes(d) <= count; k += hn::Lanes(d))
    hn::StoreU(F16Io::Load(d, in + k), d, out + k);
  for (; k < count; ++k) hn::StoreU(F16Io::Load(d1, in + k), d1, out + k);
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit
HWY_AFTER_NAMESPACE();

#endif  // include guard
