// ropekit: the one pseudo-random generator of the library, splitmix64 (Steele, Lea & Flood 2014,
// "Fast splittable pseudorandom number generators", OOPSLA): a full-period 64-bit generator whose
// output is fixed by the seed on every platform. Weight initialisation, data order, dropout-free
// sampling and seeded hashing all draw from it, so results are reproducible bit for bit.
#ifndef ROPEKIT_SRC_UTIL_RNG_H_
#define ROPEKIT_SRC_UTIL_RNG_H_

#include <cstdint>

namespace ropekit {

// The golden-ratio increment of splitmix64's Weyl sequence.
inline constexpr uint64_t kSplitMixGamma = 0x9E3779B97F4A7C15ull;

// splitmix64's output function (a variant of MurmurHash3's fmix64 finaliser).
constexpr uint64_t SplitMixFinalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One generator step: advances `state` and returns the next 64 random bits.
constexpr uint64_t SplitMix64(uint64_t& state) { return SplitMixFinalize(state += kSplitMixGamma); }

// Output `index` (0-based) of the splitmix64 stream started at `seed`, without stepping through
// the earlier ones: a seed for each of many independent streams.
constexpr uint64_t SplitMixAt(uint64_t seed, uint64_t index) {
  return SplitMixFinalize(seed + kSplitMixGamma * (index + 1));
}

// The top 53 bits of `bits` as a double in [0, 1).
constexpr double UnitInterval53(uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

}  // namespace ropekit

#endif  // ROPEKIT_SRC_UTIL_RNG_H_
