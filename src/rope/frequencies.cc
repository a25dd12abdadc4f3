// ropekit: inverse frequencies w_i and attention factor A for every rope type.
//
// Dimension legend: D = head_dim, R = rotary_dim, N = R / 2 pairs, i in [0, N) the pair index.
//
// Formulas (Hugging Face transformers v5 semantics; see docs/frequencies.md):
//   default  w_i = base^(-2i/R)                          (RoFormer, arXiv:2104.09864)
//   linear   w_i / factor                                 (PI, arXiv:2306.15595)
//   ntk      base' = base * alpha^(R/(R-2))               (NTK-aware, bloc97 2023)
//   dynamic  base' = base * (f*s/L - (f-1))^(R/(R-2)) for s > L, else default
//   yarn     ramp between w_i (extrapolation) and w_i/s (interpolation), A = 0.1 ln s + 1
//                                                         (YaRN, arXiv:2309.00071)
//   longrope w_i / ext_i, A = sqrt(1 + ln s / ln L0)     (LongRoPE, arXiv:2402.13753)
//   llama3   w_i kept / smoothed / divided by f by wavelength band (Llama 3, Meta 2024)
//
// Two numerics policies:
//   kHf    transformers' float32 order of operations (modeling_rope_utils.py's
//          _compute_*_parameters and LlamaRotaryEmbedding.forward): every
//          intermediate that torch holds in a float32 tensor is a float here, each operation rounds
//          once. This file is compiled with -ffp-contract=off so no product is fused into an FMA.
//   kExact the same formulas carried in long double (64-bit mantissa on x86-64) and rounded once
//          to double at the end, so every w_i is within about one double ulp of the real-number
//          value. Configuration-level constants that transformers forms in Python doubles (YaRN's
//          correction range, llama3's band edges, A) are computed in double in both policies.
#include <cmath>
#include <cstdio>
#include <numbers>
#include <string>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

using Real = long double;

constexpr double kPi = std::numbers::pi;

// ---- Shared pieces -------------------------------------------------------------------------

int64_t OriginalMax(const RopeParams& p) {
  return p.original_max_position_embeddings > 0 ? p.original_max_position_embeddings
                                                : p.max_position_embeddings;
}

// YaRN attention factor g(s, m) = 0.1 m ln s + 1 (1 for s <= 1), in Python's operation order.
double YarnMscale(double scale, double m) {
  if (scale <= 1) return 1.0;
  return 0.1 * m * std::log(scale) + 1.0;
}

double YarnAttentionFactor(const RopeParams& p) {
  if (p.attention_factor) return *p.attention_factor;
  if (p.mscale != 0 && p.mscale_all_dim != 0) {
    return YarnMscale(p.factor, p.mscale) / YarnMscale(p.factor, p.mscale_all_dim);
  }
  return YarnMscale(p.factor, 1.0);
}

// YaRN correction range in pair-index units, formed in Python double math exactly as
// transformers does: D(r) = R ln(L0 / (2 pi r)) / (2 ln base).
struct YarnRange {
  double low;
  double high;
};

double YarnCorrectionDim(double rotations, int rotary_dim, double base, double original_max) {
  return (rotary_dim * std::log(original_max / (rotations * 2 * kPi))) / (2 * std::log(base));
}

YarnRange YarnCorrectionRange(const RopeParams& p) {
  const double l0 = static_cast<double>(OriginalMax(p));
  double low = YarnCorrectionDim(p.beta_fast, p.rotary_dim, p.base, l0);
  double high = YarnCorrectionDim(p.beta_slow, p.rotary_dim, p.base, l0);
  if (p.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(p.rotary_dim - 1));
  if (low == high) high += 0.001;  // avoids a zero-width ramp
  return {low, high};
}

double LongRopeScale(const RopeParams& p) {
  if (p.factor != 0) return p.factor;
  return static_cast<double>(p.max_position_embeddings) / static_cast<double>(OriginalMax(p));
}

double LongRopeAttentionFactor(const RopeParams& p) {
  if (p.attention_factor) return *p.attention_factor;
  const double s = LongRopeScale(p);
  if (s <= 1.0) return 1.0;
  return std::sqrt(1 + std::log(s) / std::log(static_cast<double>(OriginalMax(p))));
}

const std::vector<double>& LongRopeFactors(const RopeParams& p, int64_t seq_len) {
  return (seq_len > 0 && seq_len > OriginalMax(p)) ? p.long_factor : p.short_factor;
}

// Dynamic NTK is active only past max_position_embeddings.
bool DynamicActive(const RopeParams& p, int64_t seq_len) {
  return seq_len > p.max_position_embeddings;
}

// ---- kHf: transformers' float32 operation order -----------------------------------------------

float F32(double v) { return static_cast<float>(v); }

// e_i = fl32(2i) / fl32(R) (int64 arange -> float32, one float32 division).
float ExponentF32(int i, int rotary_dim) {
  return static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
}

// P_i = pow32(fl32(base), e_i) (torch.pow on float32 tensors in _compute_default_rope_parameters),
// formed as a double pow rounded once.
float PowF32(float base, float e) {
  return static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
}

std::vector<float> DefaultInvFreqF32(float base, int rotary_dim) {
  const int n = rotary_dim / 2;
  std::vector<float> w(n);
  for (int i = 0; i < n; ++i) w[i] = 1.0f / PowF32(base, ExponentF32(i, rotary_dim));
  return w;
}

std::vector<float> HfInvFreq(const RopeParams& p, int64_t seq_len) {
  const int r = p.rotary_dim;
  const int n = r / 2;
  switch (p.type) {
    case RopeType::kDefault:
      return DefaultInvFreqF32(F32(p.base), r);
    case RopeType::kLinear: {
      std::vector<float> w = DefaultInvFreqF32(F32(p.base), r);
      const float f = F32(p.factor);
      for (float& x : w) x = x / f;
      return w;
    }
    case RopeType::kNtk: {
      // Static NTK: the base is rescaled in Python double math, then used like rope_theta.
      const double base = p.base * std::pow(p.ntk_alpha, static_cast<double>(r) / (r - 2));
      return DefaultInvFreqF32(F32(base), r);
    }
    case RopeType::kDynamic: {
      if (!DynamicActive(p, seq_len)) return DefaultInvFreqF32(F32(p.base), r);
      // Runtime recomputation: the base is a 0-d float32 tensor chain; its pow by the Python
      // float R/(R-2) takes torch's scalar path (float)pow(double, double).
      const float t1 = F32(p.factor) * F32(static_cast<double>(seq_len));
      const float t2 = t1 / F32(static_cast<double>(p.max_position_embeddings));
      const float t3 = t2 - F32(p.factor - 1);
      const float t4 =
          static_cast<float>(std::pow(static_cast<double>(t3), static_cast<double>(r) / (r - 2)));
      const float base = F32(p.base) * t4;
      return DefaultInvFreqF32(base, r);
    }
    case RopeType::kYarn: {
      const YarnRange range = YarnCorrectionRange(p);
      const float low = F32(range.low);
      const float width = F32(range.high - range.low);
      const float s = F32(p.factor);
      const float base = F32(p.base);
      std::vector<float> w(n);
      for (int i = 0; i < n; ++i) {
        const float pw = PowF32(base, ExponentF32(i, r));
        const float extrapolation = 1.0f / pw;
        const float interpolation = 1.0f / (s * pw);
        float ramp = (static_cast<float>(i) - low) / width;
        ramp = std::min(std::max(ramp, 0.0f), 1.0f);
        const float keep = 1.0f - ramp;  // weight of the unscaled frequency
        w[i] = (interpolation * (1.0f - keep)) + (extrapolation * keep);
      }
      return w;
    }
    case RopeType::kLongRope: {
      const std::vector<double>& ext = LongRopeFactors(p, seq_len);
      const float base = F32(p.base);
      std::vector<float> w(n);
      for (int i = 0; i < n; ++i) {
        w[i] = 1.0f / (F32(ext[i]) * PowF32(base, ExponentF32(i, r)));
      }
      return w;
    }
    case RopeType::kLlama3: {
      std::vector<float> w = DefaultInvFreqF32(F32(p.base), r);
      const double l0 = static_cast<double>(OriginalMax(p));
      const float low_wavelen = F32(l0 / p.low_freq_factor);
      const float high_wavelen = F32(l0 / p.high_freq_factor);
      const float two_pi = F32(2 * kPi);
      const float f = F32(p.factor);
      const float l0f = F32(l0);
      const float alpha = F32(p.low_freq_factor);
      const float band = F32(p.high_freq_factor - p.low_freq_factor);
      for (float& x : w) {
        // Python scalar / tensor is reciprocal then multiply: two roundings.
        const float wavelen = (1.0f / x) * two_pi;
        const float scaled = wavelen > low_wavelen ? x / f : x;
        const float smooth_factor = (((1.0f / wavelen) * l0f) - alpha) / band;
        const float smoothed = (((1.0f - smooth_factor) * scaled) / f) + (smooth_factor * scaled);
        const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        x = medium ? smoothed : scaled;
      }
      return w;
    }
    case RopeType::kSentinel:
      break;
  }
  throw Error("rope_type: invalid enum value");
}

// ---- kExact: the same formulas in extended precision ----------------------------------------

std::vector<Real> DefaultInvFreqExact(Real base, int rotary_dim) {
  const int n = rotary_dim / 2;
  std::vector<Real> w(n);
  for (int i = 0; i < n; ++i) {
    const Real e = static_cast<Real>(2 * i) / static_cast<Real>(rotary_dim);
    w[i] = 1 / std::pow(base, e);
  }
  return w;
}

std::vector<Real> ExactInvFreq(const RopeParams& p, int64_t seq_len) {
  const int r = p.rotary_dim;
  const int n = r / 2;
  const Real base = p.base;
  const Real ntk_exponent = static_cast<Real>(r) / static_cast<Real>(r - 2);
  switch (p.type) {
    case RopeType::kDefault:
      return DefaultInvFreqExact(base, r);
    case RopeType::kLinear: {
      std::vector<Real> w = DefaultInvFreqExact(base, r);
      for (Real& x : w) x /= static_cast<Real>(p.factor);
      return w;
    }
    case RopeType::kNtk:
      return DefaultInvFreqExact(base * std::pow(static_cast<Real>(p.ntk_alpha), ntk_exponent), r);
    case RopeType::kDynamic: {
      if (!DynamicActive(p, seq_len)) return DefaultInvFreqExact(base, r);
      const Real f = p.factor;
      const Real growth =
          f * static_cast<Real>(seq_len) / static_cast<Real>(p.max_position_embeddings) - (f - 1);
      return DefaultInvFreqExact(base * std::pow(growth, ntk_exponent), r);
    }
    case RopeType::kYarn: {
      const YarnRange range = YarnCorrectionRange(p);
      const Real low = range.low;
      const Real high = range.high;
      std::vector<Real> w = DefaultInvFreqExact(base, r);
      for (int i = 0; i < n; ++i) {
        Real ramp = (static_cast<Real>(i) - low) / (high - low);
        ramp = std::min(std::max(ramp, Real{0}), Real{1});
        const Real keep = 1 - ramp;
        w[i] = w[i] / static_cast<Real>(p.factor) * (1 - keep) + w[i] * keep;
      }
      return w;
    }
    case RopeType::kLongRope: {
      const std::vector<double>& ext = LongRopeFactors(p, seq_len);
      std::vector<Real> w = DefaultInvFreqExact(base, r);
      for (int i = 0; i < n; ++i) w[i] /= static_cast<Real>(ext[i]);
      return w;
    }
    case RopeType::kLlama3: {
      std::vector<Real> w = DefaultInvFreqExact(base, r);
      const Real l0 = static_cast<Real>(OriginalMax(p));
      const Real alpha = p.low_freq_factor;
      const Real beta = p.high_freq_factor;
      const Real f = p.factor;
      const Real low_wavelen = l0 / alpha;
      const Real high_wavelen = l0 / beta;
      const Real two_pi = 2 * std::numbers::pi_v<Real>;
      for (Real& x : w) {
        const Real wavelen = two_pi / x;
        if (wavelen < high_wavelen) continue;  // high frequency: kept
        if (wavelen > low_wavelen) {           // low frequency: interpolated
          x /= f;
          continue;
        }
        const Real smooth_factor = (l0 / wavelen - alpha) / (beta - alpha);
        x = (1 - smooth_factor) * x / f + smooth_factor * x;
      }
      return w;
    }
    case RopeType::kSentinel:
      break;
  }
  throw Error("rope_type: invalid enum value");
}

double AttentionFactor(const RopeParams& p) {
  switch (p.type) {
    case RopeType::kYarn:
      return YarnAttentionFactor(p);
    case RopeType::kLongRope:
      return LongRopeAttentionFactor(p);
    default:
      return 1.0;
  }
}

}  // namespace

RopeFrequencies ComputeFrequencies(const RopeParams& params, Numerics numerics, int64_t seq_len) {
  params.Validate();
  if (seq_len < 0 || seq_len > kMaxPosition + int64_t{1}) {
    throw Error("seq_len must be in [0, " + std::to_string(kMaxPosition + int64_t{1}) + "] (got " +
                std::to_string(seq_len) + ")");
  }
  RopeFrequencies out;
  out.numerics = numerics;
  out.rotary_dim = params.rotary_dim;
  const double a = AttentionFactor(params);
  switch (numerics) {
    case Numerics::kHf: {
      const std::vector<float> w = HfInvFreq(params, seq_len);
      out.inv_freq.assign(w.begin(), w.end());
      out.attention_factor = static_cast<float>(a);
      break;
    }
    case Numerics::kExact: {
      const std::vector<Real> w = ExactInvFreq(params, seq_len);
      out.inv_freq.resize(w.size());
      for (size_t i = 0; i < w.size(); ++i) out.inv_freq[i] = static_cast<double>(w[i]);
      out.attention_factor = a;
      break;
    }
    default:
      throw Error("numerics: invalid enum value " + std::to_string(static_cast<int>(numerics)));
  }
  // Extreme but finite parameters (rope_theta near the float32 limit, a factor of 1e300) can push
  // frequencies out of range; refuse them rather than produce zero or infinite angles.
  const double min_normal =
      numerics == Numerics::kHf ? 1.1754943508222875e-38 : 2.2250738585072014e-308;
  for (size_t i = 0; i < out.inv_freq.size(); ++i) {
    const double w = out.inv_freq[i];
    if (!std::isfinite(w) || !(w >= min_normal)) {
      char buf[96];
      std::snprintf(buf, sizeof(buf), "%.17g", w);
      throw Error("rope parameters (rope_theta, rope_scaling) give inverse frequency " +
                  std::string(buf) + " for pair " + std::to_string(i) + " under numerics " +
                  std::string(NumericsName(numerics)) +
                  "; it must be a finite positive normal number");
    }
  }
  const double fa = out.attention_factor;
  if (!std::isfinite(fa) || !(fa > 0)) {
    throw Error("rope_scaling.attention_factor must be a finite number > 0 (computed " +
                std::to_string(fa) + ")");
  }
  return out;
}

}  // namespace ropekit
