// ropekit Python module: RopeConfig, the Python face of RopeParams plus the channel layout, the
// multimodal axes and the library's table cache.
#ifndef ROPEKIT_PYTHON_ROPE_CONFIG_H_
#define ROPEKIT_PYTHON_ROPE_CONFIG_H_

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "ropekit/rope.h"

namespace ropekit::python {

struct Config {
  RopeParams params;
  Layout layout = Layout::kHalfSplit;
  std::string model_type;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  RopeAxes axes;  // multimodal (M-RoPE) sections; empty: one position axis
  std::shared_ptr<RopeTableCache> tables;

  // The table for `numerics` ("exact" / "hf") and the current sequence length: seq_len when
  // given, else max_position + 1 (what transformers uses for each forward call of the
  // length-dependent types).
  std::shared_ptr<const RopeTable> Table(const std::string& numerics,
                                         std::optional<int64_t> seq_len,
                                         int64_t max_position) const;
  // The call's layout: `name` when given, else the config's.
  Layout LayoutOr(const std::optional<std::string>& name) const;
};

// Adds the RopeConfig class to `m`.
void AddRopeConfig(pybind11::module_& m);

}  // namespace ropekit::python

#endif  // ROPEKIT_PYTHON_ROPE_CONFIG_H_
