// Decode throughput of batched decoding (BatchDecoder, as `ropekit serve` runs it) against
// decoding one sequence at a time with the KV-cache forward (as `ropekit generate` runs it), on
// the default model, without HTTP: aggregate tokens/s at B = 1, 8, 32 sequences and the ratio to
// the single-sequence path, measured in the same run (medians of --repeats).
//
// Usage: bench_batch_decode [--threads N] [--tokens T] [--repeats R] [--profile 1]
// --profile 1 adds one more B = 32 run with the per-op profile on (ropekit/profile.h) and prints
// each op's time per step, the sampler's included.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "ropekit/model.h"
#include "ropekit/profile.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

const std::vector<int32_t> kPrompt = {'t', 'h', 'e', ' ', 'q', 'u', 'i', 'c', 'k', ' '};

// One sequence at a time: prefill, then one ForwardCached per token (greedy).
double SingleRate(ropekit::Model& model, int64_t tokens, ropekit::ThreadPool* pool) {
  ropekit::KVCache cache(model.config(), static_cast<int64_t>(kPrompt.size()) + tokens);
  std::vector<float> logits(model.config().vocab_size);
  ropekit::Sampler sampler({});
  model.ForwardCached(kPrompt, cache, logits.data(), true, pool);
  const double t0 = Now();
  for (int64_t i = 0; i < tokens; ++i) {
    const int32_t next = sampler.Sample(logits);
    model.ForwardCached(std::span<const int32_t>(&next, 1), cache, logits.data(), true, pool);
  }
  return static_cast<double>(tokens) / (Now() - t0);
}

// B sequences decoded together: one BatchDecoder::Step per token position.
double BatchRate(ropekit::Model& model, int64_t batch, int64_t tokens, ropekit::ThreadPool* pool,
                 double& sample_seconds) {
  const int64_t V = model.config().vocab_size;
  std::vector<std::unique_ptr<ropekit::KVCache>> caches;
  std::vector<ropekit::KVCache*> ptrs;
  std::vector<int32_t> next(batch);
  std::vector<float> logits(batch * V);
  ropekit::Sampler sampler({});
  for (int64_t b = 0; b < batch; ++b) {
    caches.push_back(std::make_unique<ropekit::KVCache>(
        model.config(), static_cast<int64_t>(kPrompt.size()) + tokens + 1));
    ptrs.push_back(caches.back().get());
    model.ForwardCached(kPrompt, *caches.back(), logits.data(), true, pool);
    next[b] = sampler.Sample(std::span<const float>(logits.data(), V));
  }
  ropekit::BatchDecoder decoder(model);
  const double t0 = Now();
  for (int64_t i = 0; i < tokens; ++i) {
    decoder.Step(ptrs, next, logits.data(), pool);
    const double s0 = Now();
    for (int64_t b = 0; b < batch; ++b) {
      next[b] = sampler.Sample(std::span<const float>(logits.data() + b * V, V));
    }
    sample_seconds += Now() - s0;
  }
  return static_cast<double>(batch * tokens) / (Now() - t0);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t tokens = 200, repeats = 5;
  bool profile = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (k == "--tokens") {
      tokens = std::atoll(argv[i + 1]);
    } else if (k == "--profile") {
      profile = std::atoi(argv[i + 1]) != 0;
    } else if (k == "--repeats") {
      repeats = std::max(1LL, std::atoll(argv[i + 1]));
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    ropekit::ModelConfig config;  // the default tiny model
    config.max_position_embeddings = 512;
    ropekit::Model model(config, 1);
    ropekit::ThreadPool pool(threads);
    // The repeats are interleaved (one-at-a-time, B = 1, 8, 32, then again), so that a change
    // in the load of a shared machine touches every configuration alike.
    const std::vector<int64_t> batches = {1, 8, 32};
    std::vector<double> single;
    std::vector<std::vector<double>> rates(batches.size());
    for (int64_t r = 0; r < repeats; ++r) {
      single.push_back(SingleRate(model, tokens, &pool));
      for (size_t i = 0; i < batches.size(); ++i) {
        double sample_seconds = 0.0;
        rates[i].push_back(BatchRate(model, batches[i], tokens, &pool, sample_seconds));
      }
    }
    const double base = Median(single);
    std::printf("threads %d, %lld new tokens per sequence, medians of %lld\n", threads,
                static_cast<long long>(tokens), static_cast<long long>(repeats));
    std::printf("%-28s %12s %8s\n", "decoding", "tokens/s", "ratio");
    std::printf("%-28s %12.0f %7.2fx\n", "one at a time (generate)", base, 1.0);
    for (size_t i = 0; i < batches.size(); ++i) {
      const double rate = Median(rates[i]);
      std::printf("batched, %2lld sequences %14.0f %7.2fx\n", static_cast<long long>(batches[i]),
                  rate, rate / base);
    }
    if (profile) {
      constexpr int64_t kBatch = 32;
      double sample_seconds = 0.0;
      ropekit::ResetOpProfile();
      ropekit::SetOpProfiling(true);
      const double t0 = Now();
      BatchRate(model, kBatch, tokens, &pool, sample_seconds);
      const double total = Now() - t0;
      ropekit::SetOpProfiling(false);
      std::printf(
          "\nprofile at B = %lld: microseconds per step (%lld steps; prefill included "
          "in the total)\n",
          static_cast<long long>(kBatch), static_cast<long long>(tokens));
      const double per = 1e6 / static_cast<double>(tokens);
      for (const ropekit::OpTime& op : ropekit::OpProfile()) {
        std::printf("  %-22s %10.1f\n", op.name.c_str(), op.seconds * per);
      }
      std::printf("  %-22s %10.1f\n", "sampler", sample_seconds * per);
      std::printf("  %-22s %10.1f\n", "total", total * per);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_batch_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}
