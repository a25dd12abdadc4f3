// Scalar float32 <-> bfloat16 / float16 conversions with round-to-nearest-even.
//
// These define the rounding that every ropekit kernel must reproduce (and that PyTorch uses):
// bf16 keeps the top 16 bits of a float32 after adding 0x7FFF + lsb; fp16 is IEEE binary16 with
// subnormals, overflow to infinity and NaN preserved (GCC's _Float16 conversions are correctly
// rounded).
#ifndef ROPEKIT_HALF_H_
#define ROPEKIT_HALF_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ropekit {

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

#if defined(__clang__) && __clang_major__ < 15
// clang before 15 has no _Float16 on x86 (the libFuzzer build uses Debian's clang 14): the same
// IEEE binary16 conversions in integer arithmetic, rounding to nearest even.
inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u | ((x >> 13) & 0x3ffu);  // NaN, quieted
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (halfway past 65504): infinity
  if (x < 0x38800000u) {                        // below 2^-14: subnormal or zero
    float v;
    std::memcpy(&v, &x, 4);
    // v * 2^24 is exact; nearbyint rounds half to even in the default rounding mode.
    return sign | static_cast<uint16_t>(std::nearbyint(v * 16777216.0f));
  }
  x += 0xfffu + ((x >> 13) & 1u);  // round the 13 dropped mantissa bits to nearest even
  return sign | static_cast<uint16_t>((x - 0x38000000u) >> 13);  // exponent bias 127 -> 15
}
#else
inline float F16ToFloat(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline uint16_t FloatToF16(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
#endif

}  // namespace ropekit

#endif  // ROPEKIT_HALF_H_
