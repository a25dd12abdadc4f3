// Throughput of the default model (the study's model, docs/study.md: d = 128, 4 layers, 4 query / 2
// KV heads, head_dim 32, SwiGLU 352, tied embeddings, RoPE): training tokens/s (forward + backward
// + AdamW, batch 16 x 128) and KV-cache decode tokens/s (greedy, one token per step after a
// 128-token prefill). Prints one JSON line, for bench/run_model_bench.sh to set beside the
// PyTorch figures of bench/bench_model_torch.py. --size large is the shape where attention's
// share grows: d = 256, 8 layers, 8 query / 4 KV heads, head_dim 32, SwiGLU 704, batch 4 x 512.
// Training tokens/s is the median over --repeats timed runs of --steps steps each; the machine
// (CPU, caches) is printed first as "# " lines.
//
// Usage: bench_model [--threads N] [--steps S] [--decode TOKENS] [--pe KIND] [--size default|large]
//                    [--repeats R] [--bf16] [--profile] [--unfused]
// --unfused: the earlier attention (full [B, H, T, T] probabilities) instead of the fused one.
// --profile: after the timed runs, --steps more steps with the per-op timers on
// (ropekit/profile.h); prints ms per step and share of the step for every op as "# " lines;
// "other" is the rest of the step (optimizer, batch assembly).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_support.h"
#include "ropekit/model.h"
#include "ropekit/profile.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t steps = 10, decode = 256, batch = 16, seq_len = 128;
  int64_t repeats = 3;
  bool large = false, bf16 = false, profile = false, unfused = false;
  std::string pe = "rope";
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--bf16" || k == "--profile" || k == "--unfused") {
      (k == "--bf16" ? bf16 : k == "--profile" ? profile : unfused) = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "option %s needs a value\n", k.c_str());
      return 2;
    }
    if (k == "--threads")
      threads = std::atoi(argv[i + 1]);
    else if (k == "--steps")
      steps = std::atoll(argv[i + 1]);
    else if (k == "--decode")
      decode = std::atoll(argv[i + 1]);
    else if (k == "--pe")
      pe = argv[i + 1];
    else if (k == "--repeats")
      repeats = std::max<int64_t>(1, std::atoll(argv[i + 1]));
    else if (k == "--size" &&
             (std::string(argv[i + 1]) == "large" || std::string(argv[i + 1]) == "default"))
      large = std::string(argv[i + 1]) == "large";
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    ropekit::bench::PrintMachine("bench_model");
    ropekit::ModelConfig config;  // the defaults are the protocol's model
    if (large) {
      config.hidden_size = 256;
      config.num_layers = 8;
      config.num_heads = 8;
      config.num_kv_heads = 4;
      config.intermediate_size = 704;
      batch = 4;
      seq_len = 512;
    }
    config.position_encoding.kind = ropekit::ParsePositionEncodingKind(pe);
    if (config.position_encoding.kind == ropekit::PositionEncodingKind::kSinusoidal ||
        config.position_encoding.kind == ropekit::PositionEncodingKind::kLearned) {
      config.position_encoding.embedding_scale = ropekit::EmbeddingScale::kSqrtDim;
    }
    ropekit::Model model(config, 1);
    if (bf16) model.set_matmul_precision(ropekit::MatmulPrecision::kBf16);
    if (unfused) model.set_attention_kernel(ropekit::AttentionKernel::kUnfused);
    ropekit::ThreadPool pool(threads);
    const std::vector<int32_t> text = ropekit::bench::RandomBytes(200000);
    ropekit::TrainConfig tc;
    tc.batch_size = batch;
    tc.seq_len = seq_len;
    tc.bf16 = bf16;  // Train sets the model's matmul precision from its config
    ropekit::OptimizerState state;
    const double train_s =
        ropekit::bench::TimeTraining(model, state, tc, text, steps, repeats, &pool);
    if (profile) {
      ropekit::ResetOpProfile();
      ropekit::SetOpProfiling(true);
      tc.steps = state.step + steps;
      const double t0 = Now();
      ropekit::Train(model, state, tc, text, {}, &pool);
      const double step_ms = 1e3 * (Now() - t0) / steps;
      ropekit::SetOpProfiling(false);
      double accounted = 0.0;
      std::printf("# per-op profile, %lld steps: op, ms/step, share\n",
                  static_cast<long long>(steps));
      for (const ropekit::OpTime& t : ropekit::OpProfile()) {
        const double ms = 1e3 * t.seconds / steps;
        accounted += ms;
        std::printf("#   %-18s %8.2f %5.1f%%\n", t.name.c_str(), ms, 100 * ms / step_ms);
      }
      std::printf("#   %-18s %8.2f %5.1f%%\n#   %-18s %8.2f\n", "other", step_ms - accounted,
                  100 * (step_ms - accounted) / step_ms, "step", step_ms);
    }
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
        "{\"impl\": \"ropekit\", \"threads\": %d, \"size\": \"%s\", \"precision\": \"%s\", "
        "\"attention\": \"%s\", "
        "\"pe\": \"%s\", \"params\": %lld, "
        "\"train_tokens_per_s\": %.1f, \"train_step_ms\": %.2f, \"prefill_tokens_per_s\": %.1f, "
        "\"decode_tokens_per_s\": %.1f}\n",
        threads, large ? "large" : "default", bf16 ? "bf16" : "fp32", unfused ? "unfused" : "fused",
        pe.c_str(), static_cast<long long>(model.num_parameters()), train_tok_s,
        1e3 * train_s / steps, seq_len / prefill_s, decode / decode_s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 1;
  }
  return 0;
}
