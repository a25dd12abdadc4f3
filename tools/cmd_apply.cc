// `ropekit apply`: rotates a [T, H, D] tensor stored as .npy by per-token positions, with the
// frequencies of a Hugging Face config.json.
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim (channels [R, D) pass
// through unchanged).
//
// Everything is read and validated before anything is written; the output is written atomically
// (temporary file + rename), so a failed run never leaves a partial or temporary file behind.
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "command.h"
#include "ropekit/error.h"
#include "ropekit/hf_config.h"
#include "ropekit/npy.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit::cli {
namespace {

struct ApplyArgs {
  std::string config;
  std::string input;
  std::string positions;
  std::string output;
  std::string layout;  // empty: the config's layout
  std::string numerics = "exact";
  std::optional<int64_t> seq_len;
  bool backward = false;
  int threads = 1;
  std::string layer_type;
};

// Reads the positions as int64 and checks dtype, shape, count and range: [T] for a one-axis
// config, [A, T] (axis-major) for a multimodal (M-RoPE) one.
std::vector<int64_t> LoadPositions(const std::string& path, int64_t num_tokens, int num_axes) {
  const NpyArray p = ReadNpy(path);
  if (p.dtype != NpyDType::kI32 && p.dtype != NpyDType::kI64) {
    throw Error("--positions " + path + ": dtype " + NpyDTypeName(p.dtype) +
                " is not accepted (accepted: int32, int64)");
  }
  std::string got = "[";
  for (size_t k = 0; k < p.shape.size(); ++k) got += (k ? ", " : "") + std::to_string(p.shape[k]);
  got += "]";
  const std::string T = std::to_string(num_tokens);
  if (num_axes == 1 && p.shape.size() != 1) {
    throw Error("--positions " + path + ": expected a 1-d array of shape [T] = [" + T +
                "] for this config's one-axis RoPE, got " + got +
                (p.shape.size() == 2 ? " (multimodal [A, T] positions need a config with "
                                       "mrope_section)"
                                     : ""));
  }
  if (num_axes > 1 && (p.shape.size() != 2 || p.shape[0] != num_axes || p.shape[1] != num_tokens)) {
    throw Error("--positions " + path + ": expected shape [A, T] = [" + std::to_string(num_axes) +
                ", " + T + "] for this config's M-RoPE (" + std::to_string(num_axes) +
                " position axes), got " + got);
  }
  if (num_axes == 1 && p.shape[0] != num_tokens) {
    throw Error("--positions " + path + ": has " + std::to_string(p.shape[0]) +
                " entries but --input has T = " + T + " tokens");
  }
  std::vector<int64_t> out(static_cast<size_t>(num_tokens * num_axes));
  for (size_t t = 0; t < out.size(); ++t) {
    if (p.dtype == NpyDType::kI32) {
      int32_t v;
      std::memcpy(&v, p.bytes.data() + 4 * t, 4);
      out[t] = v;
    } else {
      std::memcpy(&out[t], p.bytes.data() + 8 * t, 8);
    }
    if (out[t] < 0 || out[t] > kMaxPosition) {
      throw Error("--positions " + path + ": entry " + std::to_string(t) + " is " +
                  std::to_string(out[t]) + ", outside the accepted range [0, " +
                  std::to_string(kMaxPosition) + "]");
    }
  }
  return out;
}

int RunApply(const ApplyArgs& args) {
  if (args.threads < 0 || args.threads > static_cast<int>(kMaxThreads)) {
    throw Error("--threads " + std::to_string(args.threads) + " is outside [0, " +
                std::to_string(kMaxThreads) + "] (0 = all hardware threads)");
  }
  const Numerics numerics = ParseNumerics(args.numerics);
  std::optional<Layout> layout_override;
  if (!args.layout.empty()) layout_override = ParseLayout(args.layout);

  // The output must be a file path; catching a directory here gives a clearer message than the
  // failed rename would.
  struct stat st {};
  if (::stat(args.output.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Error("--output " + args.output + ": is a directory, expected a .npy file path");
  }

  const HfRopeConfig config = LoadHfConfig(args.config, args.layer_type);
  const RopeParams& params = config.params;

  const NpyArray x = ReadNpy(args.input);
  DType dtype;
  if (x.dtype == NpyDType::kF32) {
    dtype = DType::kF32;
  } else if (x.dtype == NpyDType::kF16) {
    dtype = DType::kF16;
  } else {
    throw Error("--input " + args.input + ": dtype " + NpyDTypeName(x.dtype) +
                " is not accepted (accepted: float32, float16)");
  }
  if (x.shape.size() != 3) {
    throw Error("--input " + args.input +
                ": expected 3 dimensions [tokens, heads, head_dim], got " +
                std::to_string(x.shape.size()));
  }
  const int64_t num_tokens = x.shape[0], num_heads = x.shape[1], head_dim = x.shape[2];
  if (head_dim < params.rotary_dim) {
    throw Error("--input " + args.input + ": head_dim " + std::to_string(head_dim) +
                " is smaller than the rotary dimension " + std::to_string(params.rotary_dim) +
                " of " + args.config);
  }
  if (head_dim != params.head_dim) {
    throw Error("--input " + args.input + ": head_dim " + std::to_string(head_dim) +
                " does not match head_dim " + std::to_string(params.head_dim) + " of " +
                args.config);
  }

  const int num_axes = config.axes.num_axes();
  const std::vector<int64_t> positions = LoadPositions(args.positions, num_tokens, num_axes);
  const int64_t max_position =
      positions.empty() ? -1 : *std::max_element(positions.begin(), positions.end());

  // The current sequence length decides dynamic NTK's base and LongRoPE's short/long factors;
  // like transformers we take max(position) + 1 of this call unless told otherwise.
  int64_t seq_len = max_position + 1;  // 0 (no tokens) means "not given"
  if (args.seq_len) {
    if (*args.seq_len < 1 || *args.seq_len > kMaxPosition + 1) {
      throw Error("--seq-len " + std::to_string(*args.seq_len) + " is outside [1, " +
                  std::to_string(kMaxPosition + 1) + "]");
    }
    seq_len = *args.seq_len;
  }

  RotateOptions options;
  options.layout = layout_override.value_or(config.layout);
  options.direction = args.backward ? Direction::kBackward : Direction::kForward;

  const RopeTable table(ComputeFrequencies(params, numerics, seq_len));

  NpyArray y;
  y.dtype = x.dtype;
  y.shape = x.shape;
  y.bytes.resize(x.bytes.size());
  if (x.NumElements() > 0) {
    std::unique_ptr<ThreadPool> pool;
    if (args.threads != 1) pool = std::make_unique<ThreadPool>(static_cast<size_t>(args.threads));
    options.pool = pool.get();
    // ApplyRope only reads the input view.
    void* in_data = const_cast<uint8_t*>(x.bytes.data());
    const RopeOperand op{ContiguousView(in_data, dtype, num_tokens, num_heads, head_dim),
                         ContiguousView(y.bytes.data(), dtype, num_tokens, num_heads, head_dim)};
    if (config.axes.multimodal()) {
      std::vector<PositionSpan> axes;
      for (int a = 0; a < num_axes; ++a) {
        axes.emplace_back(std::span<const int64_t>(positions).subspan(
            static_cast<size_t>(a * num_tokens), static_cast<size_t>(num_tokens)));
      }
      ApplyRope(table, AxisPositions{axes}, config.axes, std::span<const RopeOperand>(&op, 1),
                options);
    } else {
      ApplyRope(table, PositionSpan(positions), std::span<const RopeOperand>(&op, 1), options);
    }
  }
  WriteNpy(args.output, y);
  return 0;
}

const CommandRegistration kApply(
    "apply", "Rotate a [tokens, heads, head_dim] .npy tensor by RoPE at given positions",
    [](CLI::App* sub) -> std::function<int()> {
      auto args = std::make_shared<ApplyArgs>();
      sub->footer(
          "X is float32 or float16 in C order; P is int32 or int64 with one position in\n"
          "[0, 2^31-1] per token, in any order; for a multimodal config (mrope_section) P is\n"
          "[A, T], one row per position axis. The output has X's dtype and shape.\n"
          "--seq-len defaults to max(P)+1, the current length transformers uses: it selects\n"
          "dynamic NTK's base (grown when it exceeds max_position_embeddings) and LongRoPE's\n"
          "long factors (when it exceeds original_max_position_embeddings).");
      sub->add_option("--config", args->config, "Hugging Face config.json")->required();
      sub->add_option("--input", args->input, "X.npy, shape [tokens, heads, head_dim]")->required();
      sub->add_option("--positions", args->positions,
                      "P.npy, shape [tokens] ([3, tokens] for M-RoPE configs), int32 or int64")
          ->required();
      sub->add_option("--output", args->output, "Y.npy to write (atomically)")->required();
      sub->add_option("--layout", args->layout,
                      "neox (rotate_half) or gptj (interleaved); default: the config's");
      sub->add_option("--numerics", args->numerics,
                      "exact (double angles, one rounding) or hf (transformers' float32 order)")
          ->capture_default_str();
      sub->add_option("--seq-len", args->seq_len,
                      "current sequence length for dynamic/longrope; default max(P)+1");
      sub->add_flag("--backward", args->backward,
                    "apply the inverse rotation R(p)^T (the gradient of the forward)");
      sub->add_option("--threads", args->threads, "worker threads, 0 = all hardware threads")
          ->capture_default_str();
      sub->add_option("--layer-type", args->layer_type,
                      "entry of a per-layer-type rope_parameters dict (e.g. sliding_attention)");
      return [args] { return RunApply(*args); };
    });

}  // namespace
}  // namespace ropekit::cli
