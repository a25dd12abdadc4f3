// The scalar conversions that define ropekit's rounding, against PyTorch's documented rules:
// bf16 and fp16 round to nearest, ties to even; fp16 overflows to infinity.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ropekit/half.h"

namespace ropekit {
namespace {

TEST(ScalarHalfTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3F80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3F82);
  uint32_t above_half = 0x3F808001u;  // just above the 1 + 2^-8 tie: rounds up
  float f;
  std::memcpy(&f, &above_half, 4);
  EXPECT_EQ(FloatToBf16(f), 0x3F81);
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
  EXPECT_EQ(FloatToBf16(INFINITY), 0x7F80);
}

TEST(ScalarHalfTest, F16RoundsToNearestEven) {
  EXPECT_EQ(FloatToF16(1.0f), 0x3C00);
  EXPECT_EQ(FloatToF16(65504.0f), 0x7BFF);
  EXPECT_EQ(FloatToF16(65520.0f), 0x7C00);        // halfway to 2^16 rounds to even: infinity
  EXPECT_EQ(FloatToF16(5.9604645e-8f), 0x0001);   // smallest subnormal 2^-24
  EXPECT_EQ(FloatToF16(2.98023224e-8f), 0x0000);  // 2^-25: halfway, ties to even (zero)
  EXPECT_EQ(F16ToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(FloatToF16(1.00048828125f), 0x3C00);  // 1 + 2^-11: halfway, even is 1.0
}

}  // namespace
}  // namespace ropekit
