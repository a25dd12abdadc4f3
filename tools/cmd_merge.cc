// `ropekit merge`: folds a LoRA adapter into its base checkpoint (W += (alpha / r) B A, the
// trained embeddings and norm gains copied in) and saves an ordinary model checkpoint.
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "command.h"
#include "model_cli.h"
#include "ropekit/file.h"
#include "ropekit/model.h"

namespace ropekit::cli {
namespace {

struct MergeArgs {
  std::string model, adapter, out;
  bool overwrite = false;
  RopeOverrideArgs rope;
};

int RunMerge(const MergeArgs& a) {
  std::error_code ec;
  if (std::filesystem::exists(a.out, ec) && (std::filesystem::equivalent(a.out, a.model, ec) ||
                                             std::filesystem::equivalent(a.out, a.adapter, ec))) {
    throw Error("--out " + a.out +
                " is the --model or --adapter directory; merge writes a new one");
  }
  LoadOptions lo;
  const std::string cfg_path = (std::filesystem::path(a.model) / "config.json").string();
  lo.rope_override = RopeOverride(ModelConfigFromJson(ReadTextFiles({cfg_path}), cfg_path), a.rope);
  Model model = LoadModel(a.model, lo);
  LoadLoraAdapter(model, a.adapter, /*qlora=*/false);
  model.MergeLora();
  CheckDirectoryWritable(a.out, "--out");
  DirectoryLock lock(a.out, "--out");
  CleanCheckpointDirectory(a.out);
  std::optional<int64_t> existing;
  try {
    existing = FindCheckpoint(a.out);
  } catch (const Error&) {
    existing = -1;
  }
  if (existing) {
    if (!a.overwrite) {
      throw Error("--out " + a.out + " already holds a checkpoint; pass --overwrite to replace it");
    }
    RemoveCheckpoint(a.out);
  }
  SaveCheckpoint(a.out, model);
  std::printf("merged %s into %s: %s\n", a.adapter.c_str(), a.model.c_str(), a.out.c_str());
  return 0;
}

const CommandRegistration kMerge{
    "merge", "Fold a LoRA adapter into its base checkpoint (a plain Hugging Face model directory)",
    [](CLI::App* sub) -> std::function<int()> {
      auto a = std::make_shared<MergeArgs>();
      sub->add_option("--model", a->model, "Base checkpoint directory")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub->add_option("--adapter", a->adapter, "LoRA adapter directory (PEFT layout)")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub->add_option("--out", a->out, "Directory of the merged checkpoint")->required();
      sub->add_flag("--overwrite", a->overwrite, "Replace a checkpoint already in --out");
      AddRopeOverrideOptions(sub, a->rope);
      return [a] { return RunMerge(*a); };
    }};

}  // namespace
}  // namespace ropekit::cli
