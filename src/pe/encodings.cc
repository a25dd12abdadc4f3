// Position encodings other than RoPE: names, ALiBi slopes, T5 buckets, sinusoidal rows, seeded
// normal initialisation. The per-token hooks are in position_encoding.cc.
//
// Dimension legend: T = tokens, H = heads, d = embedding width.
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>

#include "ropekit/position_encoding.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {

// Slopes for a power-of-two head count P (Press et al. 2022, sec. 3): a geometric sequence whose
// first term and ratio are both s = 2^(-8/P), i.e. m_h = 2^(-8(h+1)/P). Formed as s * s^h in
// double, the way the paper's reference code does.
std::vector<double> PowerOfTwoSlopes(int p) {
  const double s = std::pow(2.0, -8.0 / p);
  std::vector<double> slopes(p);
  for (int h = 0; h < p; ++h) slopes[h] = s * std::pow(s, h);
  return slopes;
}

}  // namespace

std::string_view PositionEncodingKindName(PositionEncodingKind kind) {
  switch (kind) {
    case PositionEncodingKind::kNone:
      return "none";
    case PositionEncodingKind::kRope:
      return "rope";
    case PositionEncodingKind::kSinusoidal:
      return "sinusoidal";
    case PositionEncodingKind::kLearned:
      return "learned";
    case PositionEncodingKind::kAlibi:
      return "alibi";
    case PositionEncodingKind::kT5:
      return "t5";
    case PositionEncodingKind::kSentinel:
      break;
  }
  throw Error("position encoding kind: invalid enum value");
}

PositionEncodingKind ParsePositionEncodingKind(std::string_view name) {
  if (name == "nope") return PositionEncodingKind::kNone;
  for (int k = 0; k < static_cast<int>(PositionEncodingKind::kSentinel); ++k) {
    const auto kind = static_cast<PositionEncodingKind>(k);
    if (name == PositionEncodingKindName(kind)) return kind;
  }
  throw Error("position encoding kind: unknown name '" + std::string(name) +
              "' (accepted: none, nope, rope, sinusoidal, learned, alibi, t5)");
}

bool ActsOnEmbeddings(PositionEncodingKind kind) {
  return kind == PositionEncodingKind::kSinusoidal || kind == PositionEncodingKind::kLearned;
}
bool ActsOnQueryKey(PositionEncodingKind kind) { return kind == PositionEncodingKind::kRope; }
bool ActsOnLogits(PositionEncodingKind kind) {
  return kind == PositionEncodingKind::kAlibi || kind == PositionEncodingKind::kT5;
}

std::string_view EmbeddingScaleName(EmbeddingScale scale) {
  switch (scale) {
    case EmbeddingScale::kNone:
      return "none";
    case EmbeddingScale::kSqrtDim:
      return "sqrt_dim";
    case EmbeddingScale::kSentinel:
      break;
  }
  throw Error("embedding_scale: invalid enum value");
}

EmbeddingScale ParseEmbeddingScale(std::string_view name) {
  if (name == "none") return EmbeddingScale::kNone;
  if (name == "sqrt_dim" || name == "sqrt_d") return EmbeddingScale::kSqrtDim;
  throw Error("embedding_scale: unknown name '" + std::string(name) +
              "' (accepted: none, sqrt_dim, sqrt_d)");
}

std::string_view OutOfRangeName(OutOfRange mode) {
  switch (mode) {
    case OutOfRange::kError:
      return "error";
    case OutOfRange::kClamp:
      return "clamp";
    case OutOfRange::kSentinel:
      break;
  }
  throw Error("out_of_range: invalid enum value");
}

OutOfRange ParseOutOfRange(std::string_view name) {
  if (name == "error") return OutOfRange::kError;
  if (name == "clamp") return OutOfRange::kClamp;
  throw Error("out_of_range: unknown name '" + std::string(name) + "' (accepted: error, clamp)");
}

std::vector<double> AlibiSlopes(int num_heads) {
  if (num_heads < 1 || num_heads > (1 << 20)) {
    throw Error("num_heads: " + std::to_string(num_heads) +
                " is out of range for ALiBi slopes (accepted: 1 to 1048576)");
  }
  int p = 1;  // largest power of two <= num_heads
  while (p * 2 <= num_heads) p *= 2;
  std::vector<double> slopes = PowerOfTwoSlopes(p);
  if (p == num_heads) return slopes;
  // Non-power-of-two H: interleave with the 2P sequence, whose even-indexed terms 2^(-8(2k+1)/2P)
  // lie half-way (in log space) between consecutive terms of the P sequence.
  const std::vector<double> finer = PowerOfTwoSlopes(2 * p);
  for (int k = 0; k < num_heads - p; ++k) slopes.push_back(finer[2 * k]);
  return slopes;
}

int T5RelativeBucket(int64_t relative_position, bool bidirectional, int num_buckets,
                     int max_distance) {
  const int min_buckets = bidirectional ? 4 : 2;
  if (num_buckets < min_buckets || num_buckets > (1 << 20)) {
    throw Error("num_buckets: " + std::to_string(num_buckets) +
                " is out of range (accepted: " + std::to_string(min_buckets) + " to 1048576" +
                (bidirectional ? " when bidirectional)" : ")"));
  }
  int buckets = num_buckets;
  int offset = 0;
  int64_t n;
  if (bidirectional) {
    buckets /= 2;
    if (relative_position > 0) offset = buckets;  // key after the query: upper half
    n = relative_position < 0 ? -relative_position : relative_position;
  } else {
    n = relative_position < 0 ? -relative_position : 0;  // future keys share bucket 0
  }
  const int max_exact = buckets / 2;
  if (max_distance <= max_exact) {
    throw Error("max_distance: " + std::to_string(max_distance) + " must exceed the " +
                std::to_string(max_exact) + " exact buckets (num_buckets / " +
                (bidirectional ? "4" : "2") + ")");
  }
  if (n < max_exact) return offset + static_cast<int>(n);
  if (n >= max_distance) return offset + buckets - 1;  // the formula gives >= buckets - 1 here
  // Float32, in T5's order: log(n / E) / log(max_distance / E) * (B - E), truncated. The divisor
  // is a Python float (double) in T5, rounded to float32 when it meets the float32 tensor.
  const float ratio = static_cast<float>(n) / static_cast<float>(max_exact);
  const float log_max = static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact));
  const float scaled = std::log(ratio) / log_max * static_cast<float>(buckets - max_exact);
  const int64_t large = max_exact + static_cast<int64_t>(scaled);
  return offset + static_cast<int>(large < buckets - 1 ? large : buckets - 1);
}

void SinusoidalRow(int64_t position, int dim, double base, float* row) {
  if (position < 0 || position > kMaxPosition) {
    throw Error("position: " + std::to_string(position) + " is out of range (accepted: 0 to " +
                std::to_string(kMaxPosition) + ")");
  }
  const double k = static_cast<double>(position);
  // Pair i uses the frequency 1 / n^(2i/d) with the full width d (also when d is odd).
  for (int i = 0; i < dim / 2; ++i) {
    const double angle = k / std::pow(base, 2.0 * i / dim);
    row[2 * i] = static_cast<float>(std::sin(angle));
    row[2 * i + 1] = static_cast<float>(std::cos(angle));
  }
  if (dim % 2 == 1) row[dim - 1] = 0.0f;  // odd d: no pair for the last column
}

std::vector<float> SinusoidalTable(int64_t num_positions, int dim, double base) {
  if (num_positions < 0 || dim < 1) {
    throw Error("sinusoidal table: num_positions (>= 0) and dim (>= 1) required, got " +
                std::to_string(num_positions) + " and " + std::to_string(dim));
  }
  if (!(base > 1.0) || !std::isfinite(base)) {
    throw Error("sinusoidal_base: " + std::to_string(base) + " must be finite and > 1");
  }
  std::vector<float> table(static_cast<size_t>(num_positions) * dim);
  for (int64_t k = 0; k < num_positions; ++k) SinusoidalRow(k, dim, base, table.data() + k * dim);
  return table;
}

void FillNormal(uint64_t seed, double std, std::span<float> out) {
  if (!(std >= 0.0) || !std::isfinite(std)) {
    throw Error("init_std: " + std::to_string(std) + " must be finite and >= 0");
  }
  uint64_t state = seed;
  constexpr double kTwoPi = 2.0 * std::numbers::pi;
  for (size_t k = 0; k < out.size(); k += 2) {
    // u1 in (0, 1] keeps log(u1) finite (the sum is exact: both terms are multiples of 2^-53 and
    // the result is at most 1); u2 in [0, 1).
    const double u1 = UnitInterval53(SplitMix64(state)) + 0x1.0p-53;
    const double u2 = UnitInterval53(SplitMix64(state));
    const double radius = std::sqrt(-2.0 * std::log(u1));
    out[k] = static_cast<float>(std * radius * std::cos(kTwoPi * u2));
    if (k + 1 < out.size()) out[k + 1] = static_cast<float>(std * radius * std::sin(kTwoPi * u2));
  }
}

}  // namespace ropekit
