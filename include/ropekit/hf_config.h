// ropekit: building RopeParams from a Hugging Face `config.json`.
//
// Reads rope_theta (or GPT-NeoX's rotary_emb_base), head_dim (or hidden_size /
// num_attention_heads), partial_rotary_factor / rotary_pct (GPT-J: rotary_dim),
// max_position_embeddings, and the scaling dict under `rope_scaling` or the newer
// `rope_parameters` (key `rope_type` or its alias `type`; Phi-3 `su`/`yarn` map to longrope,
// Qwen2-VL `mrope` to default, its mrope_section into `axes`). Vision-language configs whose
// language fields sit in `text_config` (Qwen3-VL) are read from there. A top-level
// original_max_position_embeddings (Phi-3) takes priority, as in transformers v5. Every problem is
// reported as ropekit::Error naming the field.
#ifndef ROPEKIT_HF_CONFIG_H_
#define ROPEKIT_HF_CONFIG_H_

#include <string>
#include <string_view>

#include "ropekit/rope.h"

namespace ropekit {

struct HfRopeConfig {
  RopeParams params;
  Layout layout = Layout::kHalfSplit;  // the checkpoint convention of the model type
  std::string model_type;              // "" when absent
  int num_attention_heads = 0;         // 0 when absent
  int num_key_value_heads = 0;         // 0 when absent (then equal to num_attention_heads)
  // Multimodal RoPE (M-RoPE): Qwen2-VL `mrope_section` (chunked), Qwen3-VL `mrope_section` +
  // `mrope_interleaved`; empty sections for text-only models.
  RopeAxes axes;
};

// Parses config.json text. `layer_type` selects one entry of a per-layer-type rope_parameters
// dict (Gemma-3 style, e.g. "full_attention"); empty selects "full_attention" when nested.
HfRopeConfig ParseHfConfig(std::string_view json_text, std::string_view layer_type = {});
// Reads and parses a file (at most 64 MiB; a pipe works too); errors name the path.
HfRopeConfig LoadHfConfig(const std::string& path, std::string_view layer_type = {});

// The rope_scaling dict of a config.json for `params` as compact JSON text, "null" for
// RopeType::kDefault: rope_type and the fields of that type under their Hugging Face keys
// (rope_theta, head_dim, partial_rotary_factor and max_position_embeddings are top-level keys of
// a config.json, not part of the dict). ParseRopeScaling and ParseHfConfig read it back to the
// same RopeParams.
std::string RopeScalingToJson(const RopeParams& params);

// Reads a rope_scaling dict alone (JSON text: an object, or null for plain RoPE) onto `base`:
// the rope type and its fields come from the dict, exactly as ParseHfConfig reads them (a
// rope_theta inside the dict replaces base.base, as in transformers v5); head_dim, rotary_dim
// and max_position_embeddings stay base's. The result is validated. Errors are
// "<source>: <field> ..." (e.g. source "--rope-scaling").
RopeParams ParseRopeScaling(std::string_view json_text, const RopeParams& base,
                            const std::string& source = "rope_scaling");

}  // namespace ropekit

#endif  // ROPEKIT_HF_CONFIG_H_
