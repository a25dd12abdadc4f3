// `ropekit generate`: text generation from a checkpoint with a KV cache (prefill + incremental
// decode), greedy or sampled (temperature, top-k, top-p, seed).
#include <chrono>
#include <cstdio>
#include <string>

#include "command.h"
#include "model_cli.h"
#include "ropekit/model.h"

namespace ropekit::cli {
namespace {

struct GenerateArgs {
  std::string model, prompt, prompt_file;
  int64_t max_new_tokens = 200;
  SamplerConfig sampler;
  int threads = 1;
  bool stats = false;
  RopeOverrideArgs rope;
  bool bf16 = false;
  AdapterArgs adapter;
  bool context_shift = false;
  ContextShiftConfig shift;
};

int RunGenerate(const GenerateArgs& a) {
  auto pool = MakePool(a.threads);
  Model model = LoadCliModel(a.model, a.rope, a.bf16, a.adapter);
  if (!a.prompt.empty() && !a.prompt_file.empty()) {
    throw Error("--prompt and --prompt-file cannot be combined");
  }
  const std::string prompt = a.prompt_file.empty() ? a.prompt : ReadTextFiles({a.prompt_file});
  if (prompt.empty()) throw Error("--prompt: the prompt must not be empty");
  if (a.max_new_tokens < 0 || a.max_new_tokens > kMaxGenerateTokens) {
    throw Error("--max-new-tokens " + std::to_string(a.max_new_tokens) + " is outside [0, " +
                std::to_string(kMaxGenerateTokens) + "]");
  }
  ByteTokenizer tok;
  const std::vector<int32_t> ids = tok.Encode(prompt);
  std::fwrite(prompt.data(), 1, prompt.size(), stdout);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = Generate(
      model, ids, a.max_new_tokens, a.sampler, pool.get(),
      [&](int32_t t) {
        const char c = static_cast<char>(t);
        std::fwrite(&c, 1, 1, stdout);
        std::fflush(stdout);
      },
      a.context_shift ? &a.shift : nullptr);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n");
  if (a.stats) {
    std::fprintf(stderr, "%zu prompt tokens, %zu new tokens in %.3f s (%.1f tokens/s)\n",
                 ids.size(), out.size(), s, static_cast<double>(out.size()) / std::max(s, 1e-9));
  }
  return 0;
}

const CommandRegistration kGenerate{
    "generate", "Generate text from a checkpoint with a KV cache (greedy or sampled)",
    [](CLI::App* sub) -> std::function<int()> {
      auto a = std::make_shared<GenerateArgs>();
      sub->add_option("--model", a->model, "Checkpoint directory")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub->add_option("--prompt", a->prompt, "Prompt text");
      sub->add_option("--prompt-file", a->prompt_file, "Read the prompt from a file")
          ->check(CLI::ExistingFile);
      sub->add_option("--max-new-tokens", a->max_new_tokens, "Tokens (bytes) to generate")
          ->capture_default_str();
      sub->add_option("--temperature", a->sampler.temperature, "0 = greedy (argmax)")
          ->capture_default_str();
      sub->add_option("--top-k", a->sampler.top_k, "Keep the k most likely tokens (0 = all)")
          ->capture_default_str();
      sub->add_option("--top-p", a->sampler.top_p, "Nucleus sampling mass in (0, 1]")
          ->capture_default_str();
      sub->add_option("--seed", a->sampler.seed, "Sampling seed")->capture_default_str();
      sub->add_option("--threads", a->threads, "Worker threads (0 = all cores)")
          ->capture_default_str();
      sub->add_flag("--stats", a->stats, "Print decode tokens/s on stderr");
      AddInferenceModelOptions(sub, a->rope, a->adapter, a->bf16);
      sub->add_flag("--context-shift", a->context_shift,
                    "keep generating past the context: drop the oldest non-sink tokens and "
                    "re-rotate the cached keys of the rest (llama.cpp context shift)");
      sub->add_option("--context", a->shift.context,
                      "KV cache size with --context-shift (0 = max_position_embeddings)")
          ->capture_default_str();
      sub->add_option("--n-keep", a->shift.n_keep,
                      "sink tokens kept at the start with --context-shift")
          ->capture_default_str();
      sub->add_option("--n-discard", a->shift.n_discard,
                      "tokens dropped per shift (0 = half of the non-sink tokens)")
          ->capture_default_str();
      return [a] { return RunGenerate(*a); };
    }};

}  // namespace
}  // namespace ropekit::cli
