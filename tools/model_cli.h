// Shared pieces of the model subcommands (train, eval, generate): RoPE scaling overrides given
// as Hugging Face rope_scaling JSON, thread pools, number formatting.
#ifndef ROPEKIT_TOOLS_MODEL_CLI_H_
#define ROPEKIT_TOOLS_MODEL_CLI_H_

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "ropekit/hf_config.h"
#include "ropekit/model.h"
#include "ropekit/thread_pool.h"

namespace ropekit::cli {

struct RopeOverrideArgs {
  std::string scaling;  // JSON object, or "none" for plain RoPE; empty = keep
  std::optional<double> theta;
};

inline void AddRopeOverrideOptions(CLI::App* sub, RopeOverrideArgs& args) {
  sub->add_option("--rope-scaling", args.scaling,
                  "Replace the checkpoint's RoPE scaling: a Hugging Face rope_scaling JSON object, "
                  "e.g. '{\"rope_type\":\"yarn\",\"factor\":4,"
                  "\"original_max_position_embeddings\":128}' (types: linear, dynamic, yarn, "
                  "longrope, llama3, ntk), or 'none' for plain RoPE");
  sub->add_option("--rope-theta", args.theta, "Replace the RoPE base (rope_theta)");
}

// RoPE parameters for `config` with the override applied (the dict read by ParseRopeScaling,
// exactly as from a config.json); nullopt when nothing is overridden.
inline std::optional<RopeParams> RopeOverride(const ModelConfig& config,
                                              const RopeOverrideArgs& args) {
  if (args.scaling.empty() && !args.theta) return std::nullopt;
  if (config.position_encoding.kind != PositionEncodingKind::kRope) {
    throw Error("--rope-scaling / --rope-theta: the model's position encoding is " +
                std::string(PositionEncodingKindName(config.position_encoding.kind)) +
                ", not rope");
  }
  RopeParams params = config.Resolved().position_encoding.rope;
  if (args.theta) params.base = *args.theta;
  if (!args.scaling.empty()) {
    return ParseRopeScaling(args.scaling == "none" ? "null" : args.scaling, params,
                            "--rope-scaling");
  }
  try {
    params.Validate();
  } catch (const Error& e) {
    throw Error(std::string("--rope-theta: ") + e.what());
  }
  return params;
}

// --adapter / --qlora of eval and generate: a PEFT adapter on top of --model.
struct AdapterArgs {
  std::string dir;
  bool qlora = false;
};

inline void AddAdapterOptions(CLI::App* sub, AdapterArgs& args) {
  sub->add_option("--adapter", args.dir,
                  "A PEFT adapter directory (LORA, PROMPT_TUNING or PREFIX_TUNING: "
                  "adapter_config.json + adapter_model.safetensors, e.g. the --out of train "
                  "--lora-rank / --prompt-tuning / --prefix-tuning) applied to --model without "
                  "merging");
  sub->add_flag("--qlora", args.qlora,
                "With --adapter: run the base projections as NF4 (4-bit NormalFloat, double "
                "quantized), as the adapter was trained with train --qlora");
}

inline void ApplyAdapterArgs(Model& model, const AdapterArgs& args) {
  if (args.dir.empty()) {
    if (args.qlora) throw Error("--qlora: needs --adapter");
    return;
  }
  LoadLoraAdapter(model, args.dir, args.qlora);
}

// The options every inference subcommand (eval, generate) takes to load its model: the RoPE
// override, the adapter and --bf16.
inline void AddInferenceModelOptions(CLI::App* sub, RopeOverrideArgs& rope, AdapterArgs& adapter,
                                     bool& bf16) {
  AddRopeOverrideOptions(sub, rope);
  AddAdapterOptions(sub, adapter);
  sub->add_flag("--bf16", bf16,
                "bfloat16 matmul operands, float32 accumulation (faster on CPUs with "
                "AVX512-BF16, else float32 sgemm on the rounded operands). Here: " +
                    Bf16MatmulSupport());
}

// Loads the model directory `dir` with the --rope override (checked against its config.json),
// the --adapter (if any) and, with --bf16, bf16 matrix products.
inline Model LoadCliModel(const std::string& dir, const RopeOverrideArgs& rope, bool bf16,
                          const AdapterArgs& adapter = {}) {
  const std::string cfg_path = dir + "/config.json";
  LoadOptions lo;
  lo.rope_override = RopeOverride(ModelConfigFromJson(ReadTextFiles({cfg_path}), cfg_path), rope);
  Model model = LoadModel(dir, lo);
  ApplyAdapterArgs(model, adapter);
  if (bf16) {
    model.set_matmul_precision(MatmulPrecision::kBf16);
    std::fprintf(stderr, "%s\n", Bf16MatmulSupport().c_str());
  }
  return model;
}

inline std::unique_ptr<ThreadPool> MakePool(int threads) {
  if (threads < 0 || threads > static_cast<int>(kMaxThreads)) {
    throw Error("--threads " + std::to_string(threads) + " is outside [0, " +
                std::to_string(kMaxThreads) + "] (0 = all hardware threads)");
  }
  auto pool = std::make_unique<ThreadPool>(static_cast<size_t>(threads));
  return pool;
}

}  // namespace ropekit::cli

#endif  // ROPEKIT_TOOLS_MODEL_CLI_H_
