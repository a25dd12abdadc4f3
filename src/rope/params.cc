// ropekit: names of the enums and validation of RopeParams.
//
// Dimension legend: D = head_dim, R = rotary_dim (even, 2 <= R <= D), N = R / 2 pairs.
// Field names in the messages are the Hugging Face config keys (rope_theta, rope_scaling.*), so a
// message points at the line of config.json to fix.
#include <cmath>
#include <cstdio>
#include <string>

#include "ropekit/rope.h"

namespace ropekit {
namespace {

// Largest rotary dimension accepted: far above any published model (head dims are <= 512), small
// enough that N-sized tables and int arithmetic on R can never overflow.
constexpr int kMaxRotaryDim = 65536;

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

[[noreturn]] void Fail(const std::string& field, const std::string& range, const std::string& got) {
  throw Error(field + " must be " + range + " (got " + got + ")");
}

void RequireFiniteAtLeast(const char* field, double v, double min) {
  if (!std::isfinite(v) || v < min) Fail(field, "a finite number >= " + Num(min), Num(v));
}

void RequirePositiveLength(const char* field, int64_t v) {
  if (v <= 0 || v > kMaxPosition) {
    Fail(field, "an integer in [1, " + std::to_string(kMaxPosition) + "]", std::to_string(v));
  }
}

void RequireFactorList(const char* field, const std::vector<double>& list, int n) {
  if (static_cast<int64_t>(list.size()) != n) {
    Fail(field, "a list of rotary_dim / 2 = " + std::to_string(n) + " numbers",
         std::to_string(list.size()) + " entries");
  }
  for (size_t i = 0; i < list.size(); ++i) {
    if (!std::isfinite(list[i]) || !(list[i] > 0)) {
      Fail(std::string(field) + "[" + std::to_string(i) + "]", "a finite number > 0", Num(list[i]));
    }
  }
}

}  // namespace

std::string_view RopeTypeName(RopeType type) {
  switch (type) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kYarn:
      return "yarn";
    case RopeType::kLongRope:
      return "longrope";
    case RopeType::kLlama3:
      return "llama3";
    case RopeType::kNtk:
      return "ntk";
    case RopeType::kSentinel:
      break;
  }
  throw Error("rope_type: invalid enum value " + std::to_string(static_cast<int>(type)));
}

RopeType ParseRopeType(std::string_view name) {
  const std::string lower = Lower(name);
  for (int t = 0; t < static_cast<int>(RopeType::kSentinel); ++t) {
    const auto type = static_cast<RopeType>(t);
    if (lower == RopeTypeName(type)) return type;
  }
  throw Error(
      "rope_type must be one of default, linear, dynamic, yarn, longrope, llama3, ntk (got \"" +
      std::string(name) + "\")");
}

std::string_view LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kHalfSplit:
      return "neox";
    case Layout::kInterleaved:
      return "gptj";
    case Layout::kSentinel:
      break;
  }
  throw Error("layout: invalid enum value " + std::to_string(static_cast<int>(layout)));
}

Layout ParseLayout(std::string_view name) {
  const std::string lower = Lower(name);
  if (lower == "neox" || lower == "half" || lower == "halfsplit" || lower == "half-split" ||
      lower == "half_split") {
    return Layout::kHalfSplit;
  }
  if (lower == "gptj" || lower == "interleaved") return Layout::kInterleaved;
  throw Error(
      "layout must be one of neox (half, halfsplit, half-split), gptj (interleaved) (got \"" +
      std::string(name) + "\")");
}

std::string_view NumericsName(Numerics numerics) {
  switch (numerics) {
    case Numerics::kExact:
      return "exact";
    case Numerics::kHf:
      return "hf";
    case Numerics::kSentinel:
      break;
  }
  throw Error("numerics: invalid enum value " + std::to_string(static_cast<int>(numerics)));
}

Numerics ParseNumerics(std::string_view name) {
  const std::string lower = Lower(name);
  if (lower == "exact") return Numerics::kExact;
  if (lower == "hf") return Numerics::kHf;
  throw Error("numerics must be one of exact, hf (got \"" + std::string(name) + "\")");
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    case DType::kF64:
      return "float64";
    case DType::kSentinel:
      break;
  }
  throw Error("dtype: invalid enum value " + std::to_string(static_cast<int>(dtype)));
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kF64:
      return 8;
    case DType::kSentinel:
      break;
  }
  throw Error("dtype: invalid enum value " + std::to_string(static_cast<int>(dtype)));
}

void RopeParams::Validate() const {
  if (static_cast<int>(type) < 0 || type >= RopeType::kSentinel) {
    throw Error("rope_type: invalid enum value " + std::to_string(static_cast<int>(type)));
  }
  // base^(2i/R) must grow with i: base > 1 (base == 1 makes every pair rotate at the same speed,
  // base < 1 reverses the frequency order and breaks every scaling rule).
  if (!std::isfinite(base) || !(base > 1)) Fail("rope_theta", "a finite number > 1", Num(base));
  if (head_dim <= 0 || head_dim > kMaxRotaryDim) {
    Fail("head_dim", "an integer in [1, " + std::to_string(kMaxRotaryDim) + "]",
         std::to_string(head_dim));
  }
  if (rotary_dim < 2 || rotary_dim > head_dim || rotary_dim % 2 != 0) {
    Fail("rotary_dim", "an even integer in [2, head_dim = " + std::to_string(head_dim) + "]",
         std::to_string(rotary_dim));
  }
  RequirePositiveLength("max_position_embeddings", max_position_embeddings);
  const int n = rotary_dim / 2;

  switch (type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
    case RopeType::kDynamic:
      RequireFiniteAtLeast("rope_scaling.factor", factor, 1.0);
      break;
    case RopeType::kNtk:
      RequireFiniteAtLeast("rope_scaling.alpha", ntk_alpha, 1.0);
      break;
    case RopeType::kYarn:
      RequireFiniteAtLeast("rope_scaling.factor", factor, 1.0);
      if (original_max_position_embeddings != 0) {
        RequirePositiveLength("rope_scaling.original_max_position_embeddings",
                              original_max_position_embeddings);
      }
      if (!std::isfinite(beta_slow) || !(beta_slow > 0)) {
        Fail("rope_scaling.beta_slow", "a finite number > 0", Num(beta_slow));
      }
      if (!std::isfinite(beta_fast) || !(beta_fast > beta_slow)) {
        Fail("rope_scaling.beta_fast", "a finite number > beta_slow = " + Num(beta_slow),
             Num(beta_fast));
      }
      if (!std::isfinite(mscale) || mscale < 0) {
        Fail("rope_scaling.mscale", "a finite number >= 0", Num(mscale));
      }
      if (!std::isfinite(mscale_all_dim) || mscale_all_dim < 0) {
        Fail("rope_scaling.mscale_all_dim", "a finite number >= 0", Num(mscale_all_dim));
      }
      break;
    case RopeType::kLongRope:
      if (factor != 0) RequireFiniteAtLeast("rope_scaling.factor", factor, 1.0);
      if (original_max_position_embeddings != 0) {
        RequirePositiveLength("rope_scaling.original_max_position_embeddings",
                              original_max_position_embeddings);
      }
      RequireFactorList("rope_scaling.short_factor", short_factor, n);
      RequireFactorList("rope_scaling.long_factor", long_factor, n);
      break;
    case RopeType::kLlama3:
      RequireFiniteAtLeast("rope_scaling.factor", factor, 1.0);
      if (original_max_position_embeddings != 0) {
        RequirePositiveLength("rope_scaling.original_max_position_embeddings",
                              original_max_position_embeddings);
      }
      if (!std::isfinite(low_freq_factor) || !(low_freq_factor > 0)) {
        Fail("rope_scaling.low_freq_factor", "a finite number > 0", Num(low_freq_factor));
      }
      if (!std::isfinite(high_freq_factor) || !(high_freq_factor > low_freq_factor)) {
        Fail("rope_scaling.high_freq_factor",
             "a finite number > low_freq_factor = " + Num(low_freq_factor), Num(high_freq_factor));
      }
      break;
    case RopeType::kSentinel:
      break;
  }
  if (type == RopeType::kDynamic || type == RopeType::kNtk) {
    // The base exponent R / (R - 2) needs R > 2.
    if (rotary_dim < 4) {
      Fail("rotary_dim", "an even integer >= 4 for rope_type " + std::string(RopeTypeName(type)),
           std::to_string(rotary_dim));
    }
  }
  if (attention_factor.has_value()) {
    const double a = *attention_factor;
    if (!std::isfinite(a) || !(a > 0) || a > 65536.0) {  // the bound: see frequencies.cc
      Fail("rope_scaling.attention_factor", "a finite number > 0 and <= 65536", Num(a));
    }
  }
}

}  // namespace ropekit
