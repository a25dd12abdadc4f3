// Tests of ComputeFrequencies and RopeParams::Validate.
//
// Dimension legend: D = head_dim, R = rotary_dim, N = R / 2 pairs.
// Expected values come from published tables (RoFormer wavelengths, the NTK-aware base formula;
// the YaRN (arXiv:2309.00071), Llama 3.1 and LongRoPE (arXiv:2402.13753) worked examples) or from
// closed forms evaluated independently in the test; none is produced by the code under test.
// Tolerances are derived from the number of roundings involved.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

constexpr double kEps32 = 5.9604644775390625e-08;  // 2^-24: unit roundoff of float32
constexpr double kEps64 = 1.1102230246251565e-16;  // 2^-53: unit roundoff of double
constexpr double kTwoPi = 2 * std::numbers::pi;

RopeParams Params(RopeType type, double base, int rotary_dim, int64_t mpe = 4096) {
  RopeParams p;
  p.type = type;
  p.base = base;
  p.head_dim = rotary_dim;
  p.rotary_dim = rotary_dim;
  p.max_position_embeddings = mpe;
  return p;
}

std::vector<double> InvFreq(const RopeParams& p, Numerics numerics, int64_t seq_len = 0) {
  return ComputeFrequencies(p, numerics, seq_len).inv_freq;
}

// Relative error bound of transformers' float32 inverse frequency against the real value caused by
// rounding the exponent 2i/R to float32: d(b^e)/b^e = ln(b) de.
double ExponentRoundingError(double base, int i, int rotary_dim) {
  const double e = 2.0 * i / rotary_dim;
  const double e32 =
      static_cast<double>(static_cast<float>(2 * i) / static_cast<float>(rotary_dim));
  return std::log(base) * std::fabs(e32 - e);
}

// ---- Enum names -----------------------------------------------------------------------------

TEST(RopeNames, RoundTrip) {
  for (int t = 0; t < static_cast<int>(RopeType::kSentinel); ++t) {
    const auto type = static_cast<RopeType>(t);
    EXPECT_EQ(ParseRopeType(RopeTypeName(type)), type);
  }
  EXPECT_EQ(RopeTypeName(RopeType::kLlama3), "llama3");
  EXPECT_EQ(RopeTypeName(RopeType::kLongRope), "longrope");
  EXPECT_EQ(ParseLayout("neox"), Layout::kHalfSplit);
  EXPECT_EQ(ParseLayout("half"), Layout::kHalfSplit);
  EXPECT_EQ(ParseLayout("halfsplit"), Layout::kHalfSplit);
  EXPECT_EQ(ParseLayout("half-split"), Layout::kHalfSplit);
  EXPECT_EQ(ParseLayout("gptj"), Layout::kInterleaved);
  EXPECT_EQ(ParseLayout("interleaved"), Layout::kInterleaved);
  EXPECT_EQ(LayoutName(Layout::kHalfSplit), "neox");
  EXPECT_EQ(LayoutName(Layout::kInterleaved), "gptj");
  EXPECT_EQ(ParseNumerics("exact"), Numerics::kExact);
  EXPECT_EQ(ParseNumerics("hf"), Numerics::kHf);
  EXPECT_EQ(NumericsName(Numerics::kHf), "hf");
  EXPECT_EQ(DTypeName(DType::kBF16), "bfloat16");
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
}

TEST(RopeNames, UnknownNamesThrow) {
  EXPECT_THAT([] { ParseRopeType("su"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("rope_type must be one of")));
  EXPECT_THAT([] { ParseLayout("diagonal"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("layout must be one of")));
  EXPECT_THAT([] { ParseNumerics("fast"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("numerics must be one of")));
}

// ---- default ---------------------------------------------------------------------------------

TEST(Frequencies, DefaultExactMatchesClosedForm) {
  for (double base : {1e4, 5e5, 1e6}) {
    for (int r : {32, 64, 80, 96, 128, 256}) {
      const RopeParams p = Params(RopeType::kDefault, base, r);
      const RopeFrequencies f = ComputeFrequencies(p, Numerics::kExact);
      ASSERT_EQ(f.inv_freq.size(), static_cast<size_t>(r / 2));
      EXPECT_EQ(f.attention_factor, 1.0);
      EXPECT_EQ(f.inv_freq[0], 1.0);
      for (int i = 0; i < r / 2; ++i) {
        // Double reference exp(-(2i/R) ln b): error <= (|ln b| + 3) eps (argument and exp
        // roundings); ropekit's value is within half an ulp plus extended-precision noise.
        const double ref = std::exp(-(2.0 * i / r) * std::log(base));
        const double tol = (std::log(base) + 4) * kEps64 * 2 * ref;
        EXPECT_NEAR(f.inv_freq[i], ref, tol) << "base " << base << " R " << r << " i " << i;
      }
      if (r % 4 == 0) {
        // i = R/4: base^(-1/2) exactly representable as a closed form.
        EXPECT_NEAR(f.inv_freq[r / 4], 1 / std::sqrt(base), 2 * kEps64 / std::sqrt(base));
      }
    }
  }
}

TEST(Frequencies, DefaultHfIsFloat32AndCloseToExact) {
  for (double base : {1e4, 5e5, 1e6, 1.5e5}) {
    for (int r : {64, 80, 96, 128}) {
      const RopeParams p = Params(RopeType::kDefault, base, r);
      const std::vector<double> hf = InvFreq(p, Numerics::kHf);
      const std::vector<double> ex = InvFreq(p, Numerics::kExact);
      for (int i = 0; i < r / 2; ++i) {
        EXPECT_EQ(hf[i], static_cast<double>(static_cast<float>(hf[i]))) << "not a float32 value";
        // Roundings: fl32(base), the exponent, pow, reciprocal.
        const double tol =
            (ExponentRoundingError(base, i, r) + std::log(base) * kEps32 * 2 + 2 * kEps32) * ex[i];
        EXPECT_NEAR(hf[i], ex[i], tol) << "base " << base << " R " << r << " i " << i;
      }
    }
  }
}

TEST(Frequencies, ReferenceWavelengthsHeadDim32) {
  // RoFormer wavelengths (Su et al. 2021, arXiv:2104.09864): lambda_i = 2 pi base^(2i/d), d = 32,
  // base 1e4, printed to 1 decimal.
  const std::vector<double> lambda = {6.3,    11.2,    19.9,    35.3,   62.8,   111.7,
                                      198.7,  353.3,   628.3,   1117.3, 1986.9, 3533.3,
                                      6283.2, 11173.3, 19869.2, 35332.9};
  for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
    const std::vector<double> w = InvFreq(Params(RopeType::kDefault, 1e4, 32), numerics);
    int over128 = 0, over256 = 0, over1024 = 0;
    for (int i = 0; i < 16; ++i) {
      const double l = kTwoPi / w[i];
      EXPECT_NEAR(l, lambda[i], 0.05 + 1e-6 * l) << i;
      over128 += l > 128;
      over256 += l > 256;
      over1024 += l > 1024;
    }
    EXPECT_EQ(over128, 10);
    EXPECT_EQ(over256, 9);
    EXPECT_EQ(over1024, 7);
  }
}

// ---- linear and ntk ----------------------------------------------------------------------------

TEST(Frequencies, LinearDividesByFactor) {
  RopeParams p = Params(RopeType::kLinear, 1e6, 128);
  p.factor = 8;  // Gemma-3 global layers
  const std::vector<double> def = InvFreq(Params(RopeType::kDefault, 1e6, 128), Numerics::kHf);
  const std::vector<double> lin = InvFreq(p, Numerics::kHf);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(lin[i], def[i] / 8) << i;  // power of two: exact
  p.factor = 3;
  const std::vector<double> lin3 = InvFreq(p, Numerics::kHf);
  const std::vector<double> lin3x = InvFreq(p, Numerics::kExact);
  const std::vector<double> defx = InvFreq(Params(RopeType::kDefault, 1e6, 128), Numerics::kExact);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(lin3[i], static_cast<double>(static_cast<float>(def[i]) / 3.0f)) << i;
    EXPECT_NEAR(lin3x[i], defx[i] / 3, 2 * kEps64 * lin3x[i]) << i;
  }
}

TEST(Frequencies, NtkBaseMatchesPublishedValues) {
  // NTK-aware base (bloc97 2023; YaRN paper arXiv:2309.00071 eq. 16), d = 32: b' = b * s^(d/(d-2)).
  const std::vector<std::pair<double, double>> cases = {{2, 20945.9}, {4, 43873.0}, {8, 91895.9}};
  for (const auto& [alpha, expected_base] : cases) {
    RopeParams p = Params(RopeType::kNtk, 1e4, 32);
    p.ntk_alpha = alpha;
    const std::vector<double> w = InvFreq(p, Numerics::kExact);
    // w_1 = b'^(-2/32), so b' = w_1^(-16); the printed values carry one decimal.
    EXPECT_NEAR(std::pow(w[1], -16.0), expected_base, 0.05 + 1e-9 * expected_base) << alpha;
    const std::vector<double> hf = InvFreq(p, Numerics::kHf);
    EXPECT_NEAR(std::pow(hf[1], -16.0), expected_base, expected_base * 16 * 4 * kEps32) << alpha;
  }
}

// ---- dynamic -----------------------------------------------------------------------------------

TEST(Frequencies, DynamicEqualsDefaultUpToMaxPosition) {
  for (double factor : {1.0, 1.3, 2.0, 2.1, 8.0}) {
    for (int64_t mpe : {int64_t{128}, int64_t{4097}, int64_t{32771}}) {
      RopeParams p = Params(RopeType::kDynamic, 1e4, 96, mpe);
      p.factor = factor;
      RopeParams d = p;
      d.type = RopeType::kDefault;
      for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
        const std::vector<double> def = InvFreq(d, numerics);
        for (int64_t s : {int64_t{0}, int64_t{1}, mpe - 1, mpe}) {
          EXPECT_EQ(InvFreq(p, numerics, s), def) << factor << " " << mpe << " " << s;
        }
        if (factor > 1) {
          const std::vector<double> grown = InvFreq(p, numerics, mpe + 1);
          EXPECT_EQ(grown[0], 1.0);
          EXPECT_LT(grown[47], def[47]) << "longer sequences must lower the frequencies";
        }
      }
    }
  }
}

TEST(Frequencies, DynamicBaseMatchesPublishedValues) {
  // transformers' _compute_dynamic_ntk_parameters: b' = b ((s L / MPE) - (s - 1))^(d/(d-2)), L =
  // 128, factor 1, d = 32.
  const std::vector<std::pair<int64_t, double>> cases = {
      {128, 10000.0}, {256, 20945.9}, {512, 43873.0}, {1024, 91895.9}};
  RopeParams p = Params(RopeType::kDynamic, 1e4, 32, 128);
  p.factor = 1;
  for (const auto& [len, expected_base] : cases) {
    const std::vector<double> w = InvFreq(p, Numerics::kExact, len);
    EXPECT_NEAR(std::pow(w[1], -16.0), expected_base, 0.05 + 1e-9 * expected_base) << len;
    const std::vector<double> hf = InvFreq(p, Numerics::kHf, len);
    EXPECT_NEAR(std::pow(hf[1], -16.0), expected_base, expected_base * 16 * 6 * kEps32) << len;
  }
}

TEST(Frequencies, DynamicHfBaseChainIsFloat32) {
  // The runtime base is a float32 chain with one double pow (transformers'
  // _compute_dynamic_ntk_parameters); recompute it here from its step list with factor 2.1 (not
  // exact in binary) and a non-power-of-two length.
  RopeParams p = Params(RopeType::kDynamic, 1e4, 128, 4096);
  p.factor = 2.1;
  const int64_t s = 32771;
  const float t1 = 2.1f * static_cast<float>(s);
  const float t2 = t1 / 4096.0f;
  const float t3 = t2 - static_cast<float>(2.1 - 1);
  const float t4 = static_cast<float>(std::pow(static_cast<double>(t3), 128.0 / 126.0));
  const float base = 1e4f * t4;
  const std::vector<double> hf = InvFreq(p, Numerics::kHf, s);
  for (int i = 0; i < 64; ++i) {
    const float e = static_cast<float>(2 * i) / 128.0f;
    const float expected =
        1.0f / static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
    EXPECT_EQ(hf[i], static_cast<double>(expected)) << i;
  }
}

// ---- yarn -------------------------------------------------------------------------------------

TEST(Frequencies, YarnRatiosMatchOfficialImplementation) {
  // YaRN (arXiv:2309.00071) find_correction_range / transformers' _compute_yarn_parameters:
  // d = 32, base 1e4, L0 = 128, beta 32/1 -> low 0, high 6.
  const std::vector<std::vector<double>> ratios = {
      {1.0, 0.9167, 0.8333, 0.75, 0.6667, 0.5833, 0.5},
      {1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25},
      {1.0, 0.8542, 0.7083, 0.5625, 0.4167, 0.2708, 0.125}};
  const std::vector<double> mscale = {1.069315, 1.138629, 1.207944};
  const std::vector<double> factors = {2, 4, 8};
  const std::vector<double> def = InvFreq(Params(RopeType::kDefault, 1e4, 32), Numerics::kExact);
  for (size_t k = 0; k < factors.size(); ++k) {
    RopeParams p = Params(RopeType::kYarn, 1e4, 32, 128);
    p.factor = factors[k];
    p.original_max_position_embeddings = 128;
    for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
      const RopeFrequencies f = ComputeFrequencies(p, numerics);
      EXPECT_NEAR(f.attention_factor, mscale[k], 5e-7);
      for (int i = 0; i < 16; ++i) {
        const double expected = i < 7 ? ratios[k][i] : 1 / factors[k];
        EXPECT_NEAR(f.inv_freq[i] / def[i], expected, 5e-5 + 1e-6) << factors[k] << " " << i;
      }
    }
  }
}

TEST(Frequencies, YarnLlama2Check) {
  // d = 128, L0 = 4096, s = 16 -> low 20, high 46, A = 0.1 ln 16 + 1 = 1.2773.
  RopeParams p = Params(RopeType::kYarn, 1e4, 128, 65536);
  p.factor = 16;
  p.original_max_position_embeddings = 4096;
  const RopeFrequencies f = ComputeFrequencies(p, Numerics::kExact);
  const std::vector<double> def = InvFreq(Params(RopeType::kDefault, 1e4, 128), Numerics::kExact);
  EXPECT_NEAR(f.attention_factor, 1.2773, 5e-5);
  for (int i = 0; i < 64; ++i) {
    const double r = std::clamp((i - 20.0) / 26.0, 0.0, 1.0);
    const double expected = (1 - r) + r / 16;
    EXPECT_NEAR(f.inv_freq[i] / def[i], expected, 8 * kEps64) << i;
  }
}

struct YarnCase {
  const char* name;
  double base;
  int r;
  double factor;
  int64_t omp;
  int64_t mpe;
  double mscale, mscale_all_dim;
  bool truncate;
  double low, high;  // published correction range
  double a;          // published attention factor
  double a_tol;
};

TEST(Frequencies, YarnPublishedModels) {
  const std::vector<YarnCase> cases = {
      {"Qwen2.5-7B", 1e6, 128, 4, 32768, 131072, 0, 0, true, 23, 40, 1.1386294361, 1e-10},
      {"DeepSeek-V3", 1e4, 64, 40, 4096, 163840, 1.0, 1.0, true, 10, 23, 1.0, 0},
      {"gpt-oss", 1.5e5, 64, 32, 4096, 131072, 0, 0, false, 8.0928, 17.3980, 1.3465736, 1e-7},
  };
  for (const YarnCase& c : cases) {
    RopeParams p = Params(RopeType::kYarn, c.base, c.r, c.mpe);
    p.factor = c.factor;
    p.original_max_position_embeddings = c.omp;
    p.mscale = c.mscale;
    p.mscale_all_dim = c.mscale_all_dim;
    p.truncate = c.truncate;
    const RopeParams d = Params(RopeType::kDefault, c.base, c.r);
    for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
      const RopeFrequencies f = ComputeFrequencies(p, numerics);
      const std::vector<double> def = InvFreq(d, numerics);
      const double a_tol = numerics == Numerics::kHf ? std::max(c.a_tol, c.a * kEps32) : c.a_tol;
      EXPECT_NEAR(f.attention_factor, c.a, a_tol) << c.name;
      for (int i = 0; i < c.r / 2; ++i) {
        if (i <= c.low) {
          EXPECT_EQ(f.inv_freq[i], def[i]) << c.name << " pair " << i << " must be kept";
        } else if (i >= c.high + (c.truncate ? 0 : 1e-4)) {
          // Fully interpolated: w / s (kHf forms 1/(s P), within one float32 rounding).
          const double tol = numerics == Numerics::kHf ? 2 * kEps32 : 4 * kEps64;
          EXPECT_NEAR(f.inv_freq[i], def[i] / c.factor, tol * def[i] / c.factor)
              << c.name << " pair " << i;
        } else {
          const double r = (i - c.low) / (c.high - c.low);
          const double expected = (1 - r) + r / c.factor;
          // The published range carries 4 decimals when fractional.
          const double tol = c.truncate ? 4e-7 : 2e-5;
          EXPECT_NEAR(f.inv_freq[i] / def[i], expected, tol) << c.name << " pair " << i;
        }
      }
    }
  }
}

TEST(Frequencies, YarnFactorOneIsDefault) {
  RopeParams p = Params(RopeType::kYarn, 1e4, 128, 4096);
  p.factor = 1;
  const RopeFrequencies f = ComputeFrequencies(p, Numerics::kExact);
  EXPECT_EQ(f.attention_factor, 1.0);
  const std::vector<double> def = InvFreq(Params(RopeType::kDefault, 1e4, 128), Numerics::kExact);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(f.inv_freq[i], def[i], kEps64 * def[i]) << i;
}

TEST(Frequencies, YarnAttentionFactorRules) {
  RopeParams p = Params(RopeType::kYarn, 1e4, 64, 163840);
  p.factor = 40;
  p.original_max_position_embeddings = 4096;
  p.mscale = 0.707;
  p.mscale_all_dim = 0.707;  // DeepSeek-V2: ratio of equal corrections
  EXPECT_EQ(ComputeFrequencies(p, Numerics::kExact).attention_factor, 1.0);
  p.mscale = 1.0;
  p.mscale_all_dim = 0.5;
  EXPECT_NEAR(ComputeFrequencies(p, Numerics::kExact).attention_factor,
              (0.1 * std::log(40.0) + 1) / (0.05 * std::log(40.0) + 1), 4 * kEps64);
  p.mscale_all_dim = 0;  // falls back to g(s, 1), as transformers does
  EXPECT_NEAR(ComputeFrequencies(p, Numerics::kExact).attention_factor, 0.1 * std::log(40.0) + 1,
              4 * kEps64);
  p.attention_factor = 1.25;  // explicit value wins
  EXPECT_EQ(ComputeFrequencies(p, Numerics::kExact).attention_factor, 1.25);
  p.attention_factor = 1.1;
  EXPECT_EQ(ComputeFrequencies(p, Numerics::kHf).attention_factor,
            static_cast<double>(static_cast<float>(1.1)));
}

// ---- longrope ---------------------------------------------------------------------------------

TEST(Frequencies, LongRopeAttentionFactorPublished) {
  // LongRoPE (arXiv:2402.13753) A = sqrt(1 + ln s / ln L0), and the Phi-3-mini-128k config's value.
  struct Case {
    double s;
    int64_t l0;
    double a;
    double tol;
  };
  for (const Case& c : {Case{4, 128, 1.133893, 5e-7}, Case{8, 128, 1.195229, 5e-7},
                        Case{32, 4096, 1.1902380714238083, 2 * kEps64}}) {
    RopeParams p = Params(RopeType::kLongRope, 1e4, 96, static_cast<int64_t>(c.s * c.l0));
    p.original_max_position_embeddings = c.l0;
    p.short_factor.assign(48, 1.0);
    p.long_factor.assign(48, 2.0);
    EXPECT_NEAR(ComputeFrequencies(p, Numerics::kExact).attention_factor, c.a, c.tol);
    p.factor = c.s;  // explicit factor: same value
    EXPECT_NEAR(ComputeFrequencies(p, Numerics::kExact).attention_factor, c.a, c.tol);
  }
}

TEST(Frequencies, LongRopeSwitchesAtOriginalLength) {
  RopeParams p = Params(RopeType::kLongRope, 1e4, 96, 131072);
  p.original_max_position_embeddings = 4096;
  for (int i = 0; i < 48; ++i) {
    p.short_factor.push_back(1.0 + 0.01 * i);
    p.long_factor.push_back(1.0 + 1.5 * i);
  }
  const std::vector<double> def = InvFreq(Params(RopeType::kDefault, 1e4, 96), Numerics::kExact);
  for (int64_t s : {int64_t{0}, int64_t{1}, int64_t{4096}, int64_t{4097}, int64_t{131101}}) {
    const bool use_long = s > 4096;
    const std::vector<double>& ext = use_long ? p.long_factor : p.short_factor;
    const RopeFrequencies f = ComputeFrequencies(p, Numerics::kExact, s);
    EXPECT_NEAR(f.attention_factor, 1.1902380714238083, 2 * kEps64);
    for (int i = 0; i < 48; ++i) {
      EXPECT_NEAR(f.inv_freq[i], def[i] / ext[i], 3 * kEps64 * def[i] / ext[i]) << s << " " << i;
    }
    const std::vector<double> hf = InvFreq(p, Numerics::kHf, s);
    for (int i = 0; i < 48; ++i) {
      const float e = static_cast<float>(2 * i) / 96.0f;
      const float pw = static_cast<float>(std::pow(10000.0, static_cast<double>(e)));
      EXPECT_EQ(hf[i], static_cast<double>(1.0f / (static_cast<float>(ext[i]) * pw))) << s << i;
    }
  }
}

// ---- llama3 -----------------------------------------------------------------------------------

RopeParams Llama3(double base, int r, double factor, int64_t l0) {
  RopeParams p = Params(RopeType::kLlama3, base, r, 131072);
  p.factor = factor;
  p.low_freq_factor = 1;
  p.high_freq_factor = 4;
  p.original_max_position_embeddings = l0;
  return p;
}

TEST(Frequencies, Llama3RatiosPublished) {
  // Llama 3.1's band rule (transformers' _compute_llama3_parameters), evaluated to 4 decimals.
  const std::vector<double> small = {1.0,  1.0,  1.0,  0.9057, 0.5093, 0.2864, 0.25, 0.25,
                                     0.25, 0.25, 0.25, 0.25,   0.25,   0.25,   0.25, 0.25};
  const std::vector<double> real = {1.0, 1.0, 1.0, 1.0, 0.3711, 0.125, 0.125, 0.125};
  for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
    const std::vector<double> w = InvFreq(Llama3(1e4, 32, 4, 128), numerics);
    const std::vector<double> d = InvFreq(Params(RopeType::kDefault, 1e4, 32), numerics);
    for (int i = 0; i < 16; ++i) EXPECT_NEAR(w[i] / d[i], small[i], 5e-5) << i;
    const std::vector<double> w8 = InvFreq(Llama3(5e5, 128, 8, 8192), numerics);
    const std::vector<double> d8 = InvFreq(Params(RopeType::kDefault, 5e5, 128), numerics);
    for (int k = 0; k < 8; ++k) EXPECT_NEAR(w8[8 * k] / d8[8 * k], real[k], 5e-5) << 8 * k;
  }
}

TEST(Frequencies, Llama31BandsPublished) {
  // Llama-3.1-8B: pairs 0-28 unchanged, 29-34 smoothed, 35-63 divided by 8.
  // Llama-3.2-1B (D = 64, factor 32): pairs 15-17 smoothed.
  struct Case {
    int r;
    double factor;
    int first_smooth, last_smooth;
  };
  for (const Case& c : {Case{128, 8, 29, 34}, Case{64, 32, 15, 17}}) {
    for (Numerics numerics : {Numerics::kExact, Numerics::kHf}) {
      const std::vector<double> w = InvFreq(Llama3(5e5, c.r, c.factor, 8192), numerics);
      const std::vector<double> d = InvFreq(Params(RopeType::kDefault, 5e5, c.r), numerics);
      for (int i = 0; i < c.r / 2; ++i) {
        if (i < c.first_smooth) {
          EXPECT_EQ(w[i], d[i]) << i;
        } else if (i > c.last_smooth) {
          // factor is a power of two: the division is exact in both policies.
          EXPECT_EQ(w[i], d[i] / c.factor) << i;
        } else {
          EXPECT_LT(w[i], d[i]) << i;
          EXPECT_GT(w[i], d[i] / c.factor) << i;
          // Exact smooth formula from the wavelength.
          const double lambda = kTwoPi / d[i];
          const double sigma = (8192 / lambda - 1) / 3;
          const double expected = (1 - sigma) / c.factor + sigma;
          const double tol = numerics == Numerics::kHf ? 64 * kEps32 : 16 * kEps64;
          EXPECT_NEAR(w[i] / d[i], expected, tol) << i;
        }
      }
    }
  }
}

// ---- hf vs exact, every type -------------------------------------------------------------------

TEST(Frequencies, HfAgreesWithExactWithinDerivedBound) {
  std::vector<RopeParams> all;
  for (double base : {1e4, 5e5, 1e6}) {
    for (int r : {64, 80, 96, 128}) {
      RopeParams p = Params(RopeType::kDefault, base, r, 4096);
      all.push_back(p);
      p.type = RopeType::kLinear;
      p.factor = 2.5;
      all.push_back(p);
      p.type = RopeType::kNtk;
      p.ntk_alpha = 3;
      all.push_back(p);
      p.type = RopeType::kYarn;
      p.factor = 8;
      p.original_max_position_embeddings = 2048;
      all.push_back(p);
      p.truncate = false;
      all.push_back(p);
      p.truncate = true;
      p.type = RopeType::kLongRope;
      p.factor = 0;
      p.short_factor.clear();
      p.long_factor.clear();
      for (int i = 0; i < r / 2; ++i) {
        p.short_factor.push_back(1 + 0.1 * i);
        p.long_factor.push_back(1 + 0.7 * i);
      }
      all.push_back(p);
      p.type = RopeType::kLlama3;
      p.factor = 8;
      all.push_back(p);
    }
  }
  for (const RopeParams& p : all) {
    const std::vector<double> hf = InvFreq(p, Numerics::kHf, 131101);
    const std::vector<double> ex = InvFreq(p, Numerics::kExact, 131101);
    double base = p.base;
    if (p.type == RopeType::kNtk)
      base *= std::pow(p.ntk_alpha, p.rotary_dim / (p.rotary_dim - 2.0));
    for (int i = 0; i < p.rotary_dim / 2; ++i) {
      // Default part: exponent rounding, fl32(base) (scaled by e ln b), pow, reciprocal.
      double rel =
          ExponentRoundingError(base, i, p.rotary_dim) + std::log(base) * kEps32 + 2 * kEps32;
      // Type-specific float32 steps: one or two more roundings; the YaRN blend weight's rounding
      // is amplified by s where the weight is small; llama3's smooth band amplifies input errors
      // by 1 + alpha (F - 1) / (beta - alpha) and adds ~6 roundings.
      if (p.type == RopeType::kLinear || p.type == RopeType::kLongRope) rel += 2 * kEps32;
      if (p.type == RopeType::kYarn) rel = rel + 4 * kEps32 * p.factor;
      if (p.type == RopeType::kLlama3) rel = rel * (1 + 7.0 / 3) + 8 * kEps32 * (1 + 7.0 / 3);
      EXPECT_NEAR(hf[i], ex[i], rel * ex[i])
          << RopeTypeName(p.type) << " base " << p.base << " R " << p.rotary_dim << " i " << i;
    }
  }
}

// ---- validation ---------------------------------------------------------------------------------

void ExpectInvalid(const RopeParams& p, const std::string& field) {
  EXPECT_THAT([&] { p.Validate(); }, ::testing::ThrowsMessage<Error>(HasSubstr(field)));
  EXPECT_THAT([&] { ComputeFrequencies(p, Numerics::kExact); },
              ::testing::ThrowsMessage<Error>(HasSubstr(field)));
}

TEST(Validate, AcceptsPublishedConfigs) {
  Params(RopeType::kDefault, 1e4, 128).Validate();
  Llama3(5e5, 128, 8, 8192).Validate();
}

TEST(Validate, RejectsEveryInvalidField) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const RopeParams ok = Params(RopeType::kDefault, 1e4, 64);
  for (double base : {0.0, -1.0, 1.0, 0.5, nan, inf}) {
    RopeParams p = ok;
    p.base = base;
    ExpectInvalid(p, "rope_theta must be a finite number > 1");
  }
  for (int head_dim : {0, -4, 1 << 20}) {
    RopeParams p = ok;
    p.head_dim = head_dim;
    ExpectInvalid(p, "head_dim");
  }
  for (int r : {0, 1, 3, 63, 66, -2}) {
    RopeParams p = ok;
    p.rotary_dim = r;
    ExpectInvalid(p, "rotary_dim must be an even integer in [2, head_dim = 64]");
  }
  {
    RopeParams p = ok;
    p.max_position_embeddings = 0;
    ExpectInvalid(p, "max_position_embeddings");
  }
  for (RopeType t : {RopeType::kLinear, RopeType::kDynamic, RopeType::kYarn, RopeType::kLlama3}) {
    for (double factor : {0.0, 0.5, nan, inf, -2.0}) {
      RopeParams p = t == RopeType::kLlama3 ? Llama3(5e5, 64, 8, 8192) : ok;
      p.type = t;
      p.factor = factor;
      ExpectInvalid(p, "rope_scaling.factor must be a finite number >= 1");
    }
  }
  {
    RopeParams p = ok;
    p.type = RopeType::kLinear;
    p.factor = 0.5;
    ExpectInvalid(p, "rope_scaling.factor must be a finite number >= 1 (got 0.5)");
  }
  for (double alpha : {0.5, nan, inf}) {
    RopeParams p = ok;
    p.type = RopeType::kNtk;
    p.ntk_alpha = alpha;
    ExpectInvalid(p, "rope_scaling.alpha");
  }
  {
    RopeParams p = ok;
    p.type = RopeType::kDynamic;
    p.factor = 2;
    p.head_dim = 2;
    p.rotary_dim = 2;
    ExpectInvalid(p, "rotary_dim must be an even integer >= 4");
  }
  RopeParams yarn = ok;
  yarn.type = RopeType::kYarn;
  yarn.factor = 4;
  {
    RopeParams p = yarn;
    p.beta_slow = 0;
    ExpectInvalid(p, "rope_scaling.beta_slow");
    p = yarn;
    p.beta_fast = 1;
    ExpectInvalid(p, "rope_scaling.beta_fast");
    p = yarn;
    p.beta_fast = nan;
    ExpectInvalid(p, "rope_scaling.beta_fast");
    p = yarn;
    p.mscale = -1;
    ExpectInvalid(p, "rope_scaling.mscale must");
    p = yarn;
    p.mscale_all_dim = inf;
    ExpectInvalid(p, "rope_scaling.mscale_all_dim");
    p = yarn;
    p.original_max_position_embeddings = -5;
    ExpectInvalid(p, "rope_scaling.original_max_position_embeddings");
    for (double a : {0.0, -1.0, nan, inf}) {
      p = yarn;
      p.attention_factor = a;
      ExpectInvalid(p, "rope_scaling.attention_factor");
    }
  }
  RopeParams longrope = ok;
  longrope.type = RopeType::kLongRope;
  longrope.short_factor.assign(32, 1.0);
  longrope.long_factor.assign(32, 4.0);
  longrope.Validate();
  {
    RopeParams p = longrope;
    p.short_factor.pop_back();
    ExpectInvalid(p, "rope_scaling.short_factor must be a list of rotary_dim / 2 = 32 numbers");
    p = longrope;
    p.long_factor.push_back(1);
    ExpectInvalid(p, "rope_scaling.long_factor must be a list");
    p = longrope;
    p.long_factor[7] = 0;
    ExpectInvalid(p, "rope_scaling.long_factor[7] must be a finite number > 0");
    p = longrope;
    p.short_factor[3] = nan;
    ExpectInvalid(p, "rope_scaling.short_factor[3]");
    p = longrope;
    p.factor = 0.5;
    ExpectInvalid(p, "rope_scaling.factor");
  }
  RopeParams llama3 = Llama3(5e5, 64, 8, 8192);
  {
    RopeParams p = llama3;
    p.low_freq_factor = 0;
    ExpectInvalid(p, "rope_scaling.low_freq_factor");
    p = llama3;
    p.high_freq_factor = 1;
    ExpectInvalid(p, "rope_scaling.high_freq_factor must be a finite number > low_freq_factor");
    p = llama3;
    p.high_freq_factor = nan;
    ExpectInvalid(p, "rope_scaling.high_freq_factor");
  }
}

TEST(Validate, RejectsOutOfRangeResults) {
  // Finite but absurd parameters must fail loudly instead of yielding zero frequencies.
  RopeParams p = Params(RopeType::kLinear, 1e4, 64);
  p.factor = 1e300;
  EXPECT_THAT([&] { ComputeFrequencies(p, Numerics::kHf); },
              ::testing::ThrowsMessage<Error>(HasSubstr("inverse frequency")));
  RopeParams q = Params(RopeType::kDefault, 1e300, 64);
  EXPECT_THAT([&] { ComputeFrequencies(q, Numerics::kHf); },
              ::testing::ThrowsMessage<Error>(HasSubstr("inverse frequency")));
  EXPECT_THAT(
      [&] { ComputeFrequencies(Params(RopeType::kDefault, 1e4, 64), Numerics::kExact, -1); },
      ::testing::ThrowsMessage<Error>(HasSubstr("seq_len")));
}

}  // namespace
}  // namespace ropekit
