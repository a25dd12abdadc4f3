// Decode throughput of batched decoding (BatchDecoder, as `ropekit serve` runs it) against
// decoding one sequence at a time with the KV-cache forward (as `ropekit generate` runs it), on
// the default model, without HTTP: aggregate tokens/s at B = 1, 8, 32 sequences and the ratio to
// the single-sequence path, measured in the same run (medians of --repeats). Each batch size runs
// twice: with one contiguous KVCache per sequence, and with every sequence's cache in one shared
// KvPagePool of --page-size tokens per page (the server's layout; 0 skips it).
//
// Usage: bench_batch_decode [--threads N] [--tokens T] [--repeats R] [--page-size P]
//                           [--profile 1]
// --profile 1 adds one more B = 32 run with the per-op profile on (ropekit/profile.h) and prints
// each op's time per step, the sampler's included.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "ropekit/model.h"
#include "ropekit/profile.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU seconds of the whole process (all threads): on a shared machine, time spent waiting for a
// core does not count, so tokens per CPU second varies less with the load than tokens per second.
double CpuNow() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Tokens per wall-clock second and per CPU second.
struct Rate {
  double wall = 0.0, cpu = 0.0;
};

struct Timer {
  double wall0 = Now(), cpu0 = CpuNow();
  Rate Of(int64_t tokens) const {
    const double n = static_cast<double>(tokens);
    return {n / (Now() - wall0), n / (CpuNow() - cpu0)};
  }
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

const std::vector<int32_t> kPrompt = {'t', 'h', 'e', ' ', 'q', 'u', 'i', 'c', 'k', ' '};

// One sequence at a time: prefill, then one ForwardCached per token (greedy).
Rate SingleRate(ropekit::Model& model, int64_t tokens, ropekit::ThreadPool* pool) {
  ropekit::KVCache cache(model.config(), static_cast<int64_t>(kPrompt.size()) + tokens);
  std::vector<float> logits(model.config().vocab_size);
  ropekit::Sampler sampler({});
  model.ForwardCached(kPrompt, cache, logits.data(), true, pool);
  const Timer timer;
  for (int64_t i = 0; i < tokens; ++i) {
    const int32_t next = sampler.Sample(logits);
    model.ForwardCached(std::span<const int32_t>(&next, 1), cache, logits.data(), true, pool);
  }
  return timer.Of(tokens);
}

// B sequences decoded together: one BatchDecoder::Step per token position.
// page_size > 0: the caches share one KvPagePool with pages of page_size tokens.
Rate BatchRate(ropekit::Model& model, int64_t batch, int64_t tokens, ropekit::ThreadPool* pool,
               double& sample_seconds, int64_t page_size = 0) {
  const int64_t V = model.config().vocab_size;
  const int64_t capacity = static_cast<int64_t>(kPrompt.size()) + tokens + 1;
  std::unique_ptr<ropekit::KvPagePool> kv_pool;
  if (page_size > 0) {
    kv_pool = std::make_unique<ropekit::KvPagePool>(
        model.config(), batch * ((capacity + page_size - 1) / page_size), page_size);
  }
  std::vector<std::unique_ptr<ropekit::KVCache>> caches;
  std::vector<ropekit::KVCache*> ptrs;
  std::vector<int32_t> next(batch);
  std::vector<float> logits(batch * V);
  ropekit::Sampler sampler({});
  for (int64_t b = 0; b < batch; ++b) {
    caches.push_back(kv_pool ? std::make_unique<ropekit::KVCache>(*kv_pool, capacity)
                             : std::make_unique<ropekit::KVCache>(model.config(), capacity));
    ptrs.push_back(caches.back().get());
    model.ForwardCached(kPrompt, *caches.back(), logits.data(), true, pool);
    next[b] = sampler.Sample(std::span<const float>(logits.data(), V));
  }
  ropekit::BatchDecoder decoder(model);
  const Timer timer;
  for (int64_t i = 0; i < tokens; ++i) {
    decoder.Step(ptrs, next, logits.data(), pool);
    const double s0 = Now();
    for (int64_t b = 0; b < batch; ++b) {
      next[b] = sampler.Sample(std::span<const float>(logits.data() + b * V, V));
    }
    sample_seconds += Now() - s0;
  }
  return timer.Of(batch * tokens);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  int64_t tokens = 200, repeats = 5, page_size = 16;
  bool profile = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (k == "--tokens") {
      tokens = std::atoll(argv[i + 1]);
    } else if (k == "--page-size") {
      page_size = std::max(0LL, std::atoll(argv[i + 1]));
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
    // (batch, page size) of each batched row: contiguous caches, then paged ones.
    std::vector<std::pair<int64_t, int64_t>> batches;
    for (int64_t b : {1, 8, 32}) {
      batches.emplace_back(b, 0);
      if (page_size > 0) batches.emplace_back(b, page_size);
    }
    // rows[0]: one at a time; rows[1 + i]: batches[i]. Each holds the repeats' wall and CPU
    // rates.
    std::vector<std::vector<double>> wall(batches.size() + 1), cpu(batches.size() + 1);
    auto add = [&](size_t row, Rate r) {
      wall[row].push_back(r.wall);
      cpu[row].push_back(r.cpu);
    };
    for (int64_t r = 0; r < repeats; ++r) {
      add(0, SingleRate(model, tokens, &pool));
      for (size_t i = 0; i < batches.size(); ++i) {
        double sample_seconds = 0.0;
        add(1 + i,
            BatchRate(model, batches[i].first, tokens, &pool, sample_seconds, batches[i].second));
      }
    }
    const double base = Median(wall[0]), base_cpu = Median(cpu[0]);
    std::printf("threads %d, %lld new tokens per sequence, medians of %lld\n", threads,
                static_cast<long long>(tokens), static_cast<long long>(repeats));
    std::printf("%-26s %10s %7s %14s %7s\n", "decoding", "tokens/s", "ratio", "tokens/CPU-s",
                "ratio");
    for (size_t row = 0; row <= batches.size(); ++row) {
      char name[64];
      if (row == 0) {
        std::snprintf(name, sizeof(name), "one at a time (generate)");
      } else {
        const auto [b, p] = batches[row - 1];
        if (p == 0) {
          std::snprintf(name, sizeof(name), "batched, %lld sequences", static_cast<long long>(b));
        } else {
          std::snprintf(name, sizeof(name), "  paged (P = %lld)", static_cast<long long>(p));
        }
      }
      const double w = Median(wall[row]), c = Median(cpu[row]);
      std::printf("%-26s %10.0f %6.2fx %14.0f %6.2fx\n", name, w, w / base, c, c / base_cpu);
    }
    if (profile) {
      constexpr int64_t kBatch = 32;
      double sample_seconds = 0.0;
      ropekit::ResetOpProfile();
      ropekit::SetOpProfiling(true);
      const double t0 = Now();
      BatchRate(model, kBatch, tokens, &pool, sample_seconds, page_size);
      const double total = Now() - t0;  // wall time, as the op totals
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
