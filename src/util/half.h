// Scalar float32 <-> bfloat16 / float16 conversions with round-to-nearest-even.
//
// These define the rounding that every ropekit kernel must reproduce (and that PyTorch uses):
// bf16 keeps the top 16 bits of a float32 after adding 0x7FFF + lsb; fp16 is IEEE binary16 with
// subnormals, overflow to infinity and NaN preserved (GCC's _Float16 conversions are correctly
// rounded).
#ifndef ROPEKIT_SRC_UTIL_HALF_H_
#define ROPEKIT_SRC_UTIL_HALF_H_

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

}  // namespace ropekit

#endif  // ROPEKIT_SRC_UTIL_HALF_H_
