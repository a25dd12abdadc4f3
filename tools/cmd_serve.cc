// `ropekit serve`: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching
// (see ropekit/serve.h for the endpoints). Binds to 127.0.0.1 by default; prints
// "listening on http://HOST:PORT" once it accepts connections; SIGINT / SIGTERM stop it.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "command.h"
#include "model_cli.h"
#include "ropekit/model.h"
#include "ropekit/serve.h"

namespace ropekit::cli {
namespace {

volatile std::sig_atomic_t g_stop_requested = 0;

struct ServeArgs {
  std::string model;
  std::string adapter;
  serve::ServeOptions options;
  RopeOverrideArgs rope;
};

int RunServe(const ServeArgs& a) {
  const std::string cfg_path = a.model + "/config.json";
  LoadOptions lo;
  lo.rope_override = RopeOverride(ModelConfigFromJson(ReadTextFiles({cfg_path}), cfg_path), a.rope);
  serve::ServeOptions options = a.options;
  if (options.model_id.empty()) {
    options.model_id = std::filesystem::path(a.model).lexically_normal().filename().string();
    if (options.model_id.empty()) {
      options.model_id =
          std::filesystem::path(a.model).lexically_normal().parent_path().filename().string();
    }
    if (options.model_id.empty()) options.model_id = "ropekit";
  }
  // SIGINT / SIGTERM set a flag (the handler does nothing else); a watcher thread stops the
  // server when it sees it. Other libraries' threads (OpenBLAS) may receive the signal.
  struct sigaction action {};
  action.sa_handler = [](int) { g_stop_requested = 1; };
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  Model model = LoadModel(a.model, lo);
  if (!a.adapter.empty()) {
    // The adapter is folded into the weights once (as `ropekit merge` does), so batched
    // decoding serves base + adapter at the cost of the base alone.
    LoadLoraAdapter(model, a.adapter);
    if (model.num_virtual_tokens() > 0) {
      throw Error("--adapter " + a.adapter +
                  ": serve takes LoRA adapters only (merged into the weights for batched "
                  "decoding); a prompt-learning adapter (PROMPT_TUNING / PREFIX_TUNING) cannot "
                  "be merged: use it with generate --adapter");
    }
    model.MergeLora();
  }
  serve::Server server(std::move(model), options);
  std::atomic<bool> done{false};
  std::thread watcher([&server, &done] {
    while (!done.load()) {
      if (g_stop_requested) {
        server.Stop();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::printf("ropekit serve: model %s as \"%s\", listening on http://%s:%d\n", a.model.c_str(),
              options.model_id.c_str(), options.host.c_str(), server.port());
  std::fflush(stdout);
  server.Run();
  done = true;
  watcher.join();
  return 0;
}

const CommandRegistration kServe{
    "serve", "OpenAI-compatible HTTP server with continuous batching (completions, chat, SSE)",
    [](CLI::App* sub) -> std::function<int()> {
      auto a = std::make_shared<ServeArgs>();
      serve::ServeOptions& o = a->options;
      o.model_id.clear();
      sub->add_option("--model", a->model, "Checkpoint directory")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub->add_option("--adapter", a->adapter,
                      "A LoRA adapter (PEFT layout, the --out of train --lora-rank), merged into "
                      "--model's float weights at start, as `ropekit merge` does");
      sub->add_option("--host", o.host, "Address to bind (loopback by default)")
          ->capture_default_str();
      sub->add_option("--port", o.port, "TCP port (0 = any free port, printed at start)")
          ->capture_default_str();
      sub->add_option("--threads", o.threads, "Compute threads (0 = all cores)")
          ->capture_default_str();
      sub->add_option("--max-batch", o.max_batch, "Sequences decoded together")
          ->capture_default_str();
      sub->add_option("--kv-cache-tokens", o.kv_cache_tokens,
                      "Tokens of the KV page pool all sequences share (0 = --max-batch x "
                      "--ctx-size); a request waits until the pool can reserve min(prompt + "
                      "max_tokens, --ctx-size) tokens per choice, or gets 400 if it never can")
          ->capture_default_str();
      sub->add_option("--kv-page-size", o.kv_page_size, "Tokens per KV-cache page")
          ->capture_default_str();
      sub->add_option("--max-queue", o.max_queue,
                      "Sequences waiting for admission; beyond that requests get 503 + Retry-After")
          ->capture_default_str();
      sub->add_option("--api-key", o.api_key,
                      "Require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize");
      sub->add_option("--model-id", o.model_id,
                      "Model name clients must use (default: the checkpoint directory's name)");
      sub->add_option("--ctx-size", o.context,
                      "Tokens per sequence, prompt + completion (0 = max_position_embeddings)")
          ->capture_default_str();
      sub->add_option("--max-tokens", o.max_tokens,
                      "Cap on a request's max_tokens (0 = the context)")
          ->capture_default_str();
      sub->add_option("--timeout", o.timeout_s,
                      "Seconds per request, queueing included; then finish_reason 'length'")
          ->capture_default_str();
      sub->add_option("--max-body-bytes", o.max_body_bytes,
                      "Largest request body; larger ones get 413")
          ->capture_default_str();
      sub->add_flag("--context-shift", o.context_shift,
                    "keep generating past --ctx-size: drop the oldest non-sink tokens and "
                    "re-rotate the cached keys of the rest (llama.cpp context shift)");
      sub->add_option("--n-keep", o.n_keep, "sink tokens kept at the start with --context-shift")
          ->capture_default_str();
      sub->add_option("--n-discard", o.n_discard,
                      "tokens dropped per shift (0 = half of the non-sink tokens)")
          ->capture_default_str();
      AddRopeOverrideOptions(sub, a->rope);
      return [a] { return RunServe(*a); };
    }};

}  // namespace
}  // namespace ropekit::cli
