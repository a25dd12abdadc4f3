// Fine-tuning throughput and memory: full fine-tuning, LoRA, QLoRA, prompt and prefix tuning on the
// same model in one run. Each method runs in its own forked child process, so that its peak
// resident memory (getrusage ru_maxrss) is its own; the children run one after the other. Tokens/s
// is the median over --repeats timed runs of --steps steps (after a 2-step warm-up). Also printed:
// the trainable parameters, the bytes of model state (frozen weights + trainable weights + their
// gradients + the two AdamW moments) and, for QLoRA, the bits per frozen projection weight.
// The ratios (LoRA / full throughput, QLoRA / LoRA step time) are of the same run.
//
// Sizes: default = the study's model (d 128, 4 layers, 4 / 2 heads, SwiGLU 352, batch 16 x 128);
// large = d 512, 8 layers, 8 / 4 heads, SwiGLU 1408, batch 4 x 256.
// LoRA: r = 8, alpha = 16, PEFT's llama default targets q_proj, v_proj (--targets all: every
// projection). QLoRA adds NF4 base projections (the float base is loaded first and quantized,
// so the peak RSS includes that float copy; the state bytes are those held while training).
// Prompt tuning: 20 virtual tokens prepended to every sequence (the run is 20 rows longer;
// tokens/s counts the real tokens). Prefix tuning: 20 key / value prefix entries per layer.
//
// Usage: bench_finetune [--size default|large] [--threads N] [--steps S] [--repeats R]
//                       [--targets qv|all]
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_support.h"
#include "ropekit/model.h"

namespace {

struct Result {
  double tok_s = 0, step_ms = 0;
  long long trainable = 0, state_bytes = 0, peak_kib = 0;
  double proj_bits = 0;
};

Result RunMethod(const ropekit::ModelConfig& config, int method, bool all_targets, int threads,
                 int64_t batch, int64_t seq_len, int64_t steps, int64_t repeats) {
  ropekit::Model model(config, 1);
  if (method >= 3) {
    // Prompt / prefix tuning: 20 virtual tokens (Lester et al. 2021 use 5 to 150; 20 is PEFT's
    // example).
    ropekit::LoraConfig lc;
    lc.type = method == 3 ? ropekit::PeftType::kPromptTuning : ropekit::PeftType::kPrefixTuning;
    lc.num_virtual_tokens = 20;
    model.AddLora(lc, 1);
  } else if (method > 0) {
    ropekit::LoraConfig lc;
    lc.rank = 8;
    lc.alpha = 16;
    if (all_targets) {
      lc.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                           "gate_proj", "up_proj", "down_proj"};
    }
    lc.qlora = method == 2;
    model.AddLora(lc, 1);
  }
  ropekit::ThreadPool pool(threads);
  const std::vector<int32_t> text = ropekit::bench::RandomBytes(200000);
  ropekit::TrainConfig tc;
  tc.batch_size = batch;
  tc.seq_len = seq_len;
  ropekit::OptimizerState state;
  Result res;
  const double s = ropekit::bench::TimeTraining(model, state, tc, text, steps, repeats, &pool);
  res.tok_s = static_cast<double>(steps * batch * seq_len) / s;
  res.step_ms = 1e3 * s / static_cast<double>(steps);
  res.trainable = static_cast<long long>(model.trainable_parameters().size());
  const long long frozen_float =
      method == 0 ? 0 : static_cast<long long>(model.parameters().size());
  const long long proj = method == 2 ? model.projection_bytes() : 0;  // (prompt: float base)
  res.state_bytes = 4 * (frozen_float + 4 * res.trainable) + proj;    // w, grad, m, v
  res.proj_bits = 8.0 * static_cast<double>(model.projection_bytes()) /
                  static_cast<double>(model.projection_parameters());
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  res.peak_kib = ru.ru_maxrss;
  return res;
}

// Runs RunMethod in a child process and reads its Result back through a pipe.
Result InChild(const ropekit::ModelConfig& config, int method, bool all, int threads, int64_t batch,
               int64_t seq_len, int64_t steps, int64_t repeats) {
  int fd[2];
  if (pipe(fd) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    close(fd[0]);
    int code = 0;
    try {
      const Result r = RunMethod(config, method, all, threads, batch, seq_len, steps, repeats);
      code = write(fd[1], &r, sizeof(r)) == static_cast<ssize_t>(sizeof(r)) ? 0 : 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_finetune: %s\n", e.what());
      code = 1;
    }
    _exit(code);
  }
  close(fd[1]);
  Result r;
  const ssize_t n = read(fd[0], &r, sizeof(r));
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (n != static_cast<ssize_t>(sizeof(r)) || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("a benchmark child failed");
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t steps = 5, repeats = 3;
  bool large = false, all = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--threads") {
      threads = std::atoi(v.c_str());
    } else if (k == "--steps") {
      steps = std::max<int64_t>(1, std::atoll(v.c_str()));
    } else if (k == "--repeats") {
      repeats = std::max<int64_t>(1, std::atoll(v.c_str()));
    } else if (k == "--size" && (v == "default" || v == "large")) {
      large = v == "large";
    } else if (k == "--targets" && (v == "qv" || v == "all")) {
      all = v == "all";
    } else {
      std::fprintf(stderr, "unknown option %s %s\n", k.c_str(), v.c_str());
      return 2;
    }
  }
  if (argc % 2 == 0) {
    std::fprintf(stderr, "every option needs a value\n");
    return 2;
  }
  try {
    ropekit::bench::PrintMachine("bench_finetune");
    ropekit::ModelConfig config;
    int64_t batch = 16, seq_len = 128;
    if (large) {
      config.hidden_size = 512;
      config.num_layers = 8;
      config.num_heads = 8;
      config.num_kv_heads = 4;
      config.intermediate_size = 1408;
      batch = 4;
      seq_len = 256;
    }
    config.max_position_embeddings = seq_len;
    const char* names[5] = {"full", "lora", "qlora", "prompt", "prefix"};
    Result r[5];
    for (int m = 0; m < 5; ++m) {
      r[m] = InChild(config, m, all, threads, batch, seq_len, steps, repeats);
      std::printf(
          "{\"size\": \"%s\", \"method\": \"%s\", \"targets\": \"%s\", \"threads\": %d, "
          "\"tokens_per_s\": %.1f, \"step_ms\": %.2f, \"trainable_params\": %lld, "
          "\"state_mib\": %.3f, \"peak_rss_mib\": %.1f, \"projection_bits\": %.4f}\n",
          large ? "large" : "default", names[m], all ? "all" : "q_proj,v_proj", threads, r[m].tok_s,
          r[m].step_ms, r[m].trainable, r[m].state_bytes / 1048576.0, r[m].peak_kib / 1024.0,
          r[m].proj_bits);
      std::fflush(stdout);
    }
    std::printf(
        "# ratios: lora / full throughput %.2fx (goal >= 1.3); qlora / lora step time %.2fx "
        "(goal <= 1.5); qlora %.3f bits per frozen projection weight (goal <= 4.2); prompt "
        "tuning (K = 20; tokens/s counts the real tokens) / lora throughput %.2fx; prefix "
        "tuning (K = 20) / lora throughput %.2fx\n",
        r[1].tok_s / r[0].tok_s, r[2].step_ms / r[1].step_ms, r[2].proj_bits,
        r[3].tok_s / r[1].tok_s, r[4].tok_s / r[1].tok_s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_finetune: %s\n", e.what());
    return 1;
  }
  return 0;
}
