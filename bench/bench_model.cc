// Throughput of the default model (the study's model, docs/study.md: d = 128, 4 layers, 4 query / 2 KV
// heads, head_dim 32, SwiGLU 352, tied embeddings, RoPE): training tokens/s (forward + backward
// + AdamW, batch 16 x 128) and KV-cache decode tokens/s (greedy, one token per step after a
// 128-token prefill). Prints one JSON line, for bench/run_model_bench.sh to set beside the
// PyTorch figures of bench/bench_model_torch.py.
//
// Usage: bench_model [--threads N] [--steps S] [--decode TOKENS] [--pe KIND]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ropekit/model.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t steps = 10, decode = 256, batch = 16, seq_len = 128;
  std::string pe = "rope";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--threads")
      threads = std::atoi(argv[i + 1]);
    else if (k == "--steps")
      steps = std::atoll(argv[i + 1]);
    else if (k == "--decode")
      decode = std::atoll(argv[i + 1]);
    else if (k == "--pe")
      pe = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    ropekit::ModelConfig config;  // the defaults are the protocol's model
    config.position_encoding.kind = ropekit::ParsePositionEncodingKind(pe);
    if (config.position_encoding.kind == ropekit::PositionEncodingKind::kSinusoidal ||
        config.position_encoding.kind == ropekit::PositionEncodingKind::kLearned) {
      config.position_encoding.embedding_scale = ropekit::EmbeddingScale::kSqrtDim;
    }
    ropekit::Model model(config, 1);
    ropekit::ThreadPool pool(threads);
    std::mt19937 gen(1);
    std::uniform_int_distribution<int> dist(0, 255);
    std::vector<int32_t> text(200000);
    for (auto& t : text) t = dist(gen);
    ropekit::TrainConfig tc;
    tc.steps = 2;  // warm-up run (allocations, page faults)
    tc.batch_size = batch;
    tc.seq_len = seq_len;
    tc.eval_interval = 0;
    ropekit::OptimizerState state;
    ropekit::Train(model, state, tc, text, {}, &pool);
    tc.steps = 2 + steps;
    const double t0 = Now();
    ropekit::Train(model, state, tc, text, {}, &pool);
    const double train_s = Now() - t0;
    const double train_tok_s = static_cast<double>(steps * batch * seq_len) / train_s;

    std::vector<int32_t> prompt(text.begin(), text.begin() + seq_len);
    ropekit::SamplerConfig greedy;
    ropekit::Generate(model, prompt, 8, greedy, &pool);  // warm-up
    ropekit::KVCache cache(model.config(), seq_len + decode);
    std::vector<float> logits(model.config().vocab_size);
    const double t1 = Now();
    model.ForwardCached(prompt, cache, logits.data(), true, &pool);
    const double prefill_s = Now() - t1;
    ropekit::Sampler sampler(greedy);
    const double t2 = Now();
    for (int64_t i = 0; i < decode; ++i) {
      const int32_t next = sampler.Sample(logits);
      model.ForwardCached(std::span<const int32_t>(&next, 1), cache, logits.data(), true, &pool);
    }
    const double decode_s = Now() - t2;
    std::printf(
        "{\"impl\": \"ropekit\", \"threads\": %d, \"pe\": \"%s\", \"params\": %lld, "
        "\"train_tokens_per_s\": %.1f, \"train_step_ms\": %.2f, \"prefill_tokens_per_s\": %.1f, "
        "\"decode_tokens_per_s\": %.1f}\n",
        threads, pe.c_str(), static_cast<long long>(model.num_parameters()), train_tok_s,
        1e3 * train_s / steps, seq_len / prefill_s, decode / decode_s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 1;
  }
  return 0;
}
