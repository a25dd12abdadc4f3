// Limits every JSON reader in ropekit applies before parsing (config.json, trainer_state.json,
// checkpoint manifests, safetensors headers, --rope-scaling, study files). The scan is iterative,
// so deeply nested input is rejected before any recursive code (parser, destructor, dump) runs.
#ifndef ROPEKIT_JSON_LIMITS_H_
#define ROPEKIT_JSON_LIMITS_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace ropekit {

// Deeper nesting than this is not one of our files (the deepest real one, a per-layer-type HF
// rope_parameters dict, has 3 levels).
constexpr int kMaxJsonDepth = 64;
// Larger JSON text than this is not one of our files either (a safetensors header of a model
// with thousands of tensors is well under 1 MiB).
constexpr uint64_t kMaxJsonBytes = uint64_t{64} << 20;

// Throws Error "<name>: JSON nesting deeper than 64 levels at byte N" or
// "<name>: N bytes of JSON, more than the limit of M" when the text exceeds a limit.
void CheckJsonLimits(std::string_view text, const std::string& name);

}  // namespace ropekit

#endif  // ROPEKIT_JSON_LIMITS_H_
