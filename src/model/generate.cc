// Sampling (greedy, temperature, top-k, top-p / nucleus: Holtzman et al. 2020) and KV-cache
// generation: one prefill of the prompt, then one cached step per new token.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "ropekit/model.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {}  // namespace

Sampler::Sampler(const SamplerConfig& config) : config_(config), state_(config.seed) {
  if (!(config.temperature >= 0.0) || !std::isfinite(config.temperature)) {
    throw Error("temperature: must be finite and >= 0 (0 = greedy)");
  }
  if (config.top_k < 0) throw Error("top_k: must be >= 0 (0 = all tokens)");
  if (!(config.top_p > 0.0 && config.top_p <= 1.0)) throw Error("top_p: must be in (0, 1]");
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (logits.empty()) throw Error("Sampler: no logits");
  const int64_t v = static_cast<int64_t>(logits.size());
  if (config_.temperature == 0.0) {
    int64_t best = 0;
    for (int64_t i = 1; i < v; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    return static_cast<int32_t>(best);
  }
  std::vector<int32_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = config_.top_k > 0 ? std::min<int64_t>(config_.top_k, v) : v;
  const double mx = logits[order[0]];
  std::vector<double> p(keep);
  double sum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    p[i] = std::exp((logits[order[i]] - mx) / config_.temperature);
    sum += p[i];
  }
  if (config_.top_p < 1.0) {
    double cum = 0.0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cum += p[i] / sum;
      if (cum >= config_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = 0.0;
    for (int64_t i = 0; i < keep; ++i) sum += p[i];
  }
  const double u = UnitInterval53(SplitMix64(state_)) * sum;
  double cum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
}

std::vector<int32_t> Generate(Model& model, std::span<const int32_t> prompt, int64_t max_new_tokens,
                              const SamplerConfig& sampler_config, ThreadPool* pool,
                              const std::function<void(int32_t)>& on_token,
                              const ContextShiftConfig* shift) {
  if (prompt.empty()) throw Error("generate: the prompt must hold at least one token");
  if (max_new_tokens < 0) throw Error("generate: max_new_tokens must be >= 0");
  // A prompt-learning adapter's K virtual tokens occupy the cache entries 0..K-1 before the
  // prompt (ForwardCached puts them there); they count as part of the prompt here and are never
  // dropped by a context shift (kept as extra sink tokens).
  const int64_t virtual_tokens = model.num_virtual_tokens();
  const int64_t prompt_size = static_cast<int64_t>(prompt.size()) + virtual_tokens;
  // Without a context shift, prompt + new tokens is the KV cache's capacity: bounded before the
  // sum is formed. With one, the cache holds at most the context, and the sum saturates.
  if (shift == nullptr &&
      (max_new_tokens > kMaxGenerateTokens || prompt_size > kMaxGenerateTokens - max_new_tokens)) {
    throw Error("generate: max_new_tokens (--max-new-tokens) " + std::to_string(max_new_tokens) +
                " with a prompt of " + std::to_string(prompt_size) +
                " tokens: prompt + new tokens must be in [1, " +
                std::to_string(kMaxGenerateTokens) + "]");
  }
  int64_t capacity = max_new_tokens > std::numeric_limits<int64_t>::max() - prompt_size
                         ? std::numeric_limits<int64_t>::max()
                         : prompt_size + max_new_tokens;
  if (shift != nullptr) {
    const int64_t context =
        shift->context > 0 ? shift->context : model.config().max_position_embeddings;
    if (shift->n_keep < 0 || shift->n_discard < 0) {
      throw Error("context shift: n_keep and n_discard must be >= 0");
    }
    if (context < shift->n_keep + 2) {
      throw Error("context shift: the context (" + std::to_string(context) +
                  ") must hold the n_keep sink tokens (" + std::to_string(shift->n_keep) +
                  ") plus at least 2");
    }
    if (prompt_size > context) {
      throw Error("context shift: the prompt (" + std::to_string(prompt.size()) + " tokens" +
                  (virtual_tokens > 0
                       ? " plus the adapter's " + std::to_string(virtual_tokens) + " virtual tokens"
                       : std::string()) +
                  ") is longer than the context (" + std::to_string(context) + ")");
    }
    if (virtual_tokens + shift->n_keep + 2 > context) {
      throw Error("context shift: the context (" + std::to_string(context) +
                  ") must hold the adapter's " + std::to_string(virtual_tokens) +
                  " virtual tokens, the n_keep sink tokens (" + std::to_string(shift->n_keep) +
                  ") and at least 2 more");
    }
    if (shift->n_discard >= context - shift->n_keep) {
      throw Error("context shift: n_discard (" + std::to_string(shift->n_discard) +
                  ") must be below context - n_keep (" + std::to_string(context - shift->n_keep) +
                  ")");
    }
    capacity = std::min(capacity, context);
  }
  Sampler sampler(sampler_config);
  KVCache cache(model.config(), std::max<int64_t>(capacity, 1));
  std::vector<float> logits(model.config().vocab_size);
  std::vector<int32_t> out;
  if (max_new_tokens == 0) return out;
  model.ForwardCached(prompt, cache, logits.data(), /*last_only=*/true, pool);
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    const int32_t next = sampler.Sample(logits);
    out.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 < max_new_tokens) {
      if (cache.size() == cache.capacity() && shift != nullptr) {
        const int64_t keep = virtual_tokens + shift->n_keep;
        const int64_t n_discard = shift->n_discard > 0
                                      ? std::min(shift->n_discard, cache.size() - keep)
                                      : std::max<int64_t>(1, (cache.size() - keep) / 2);
        model.ContextShift(cache, keep, n_discard, pool);
      }
      model.ForwardCached(std::span<const int32_t>(&next, 1), cache, logits.data(), true, pool);
    }
  }
  return out;
}

}  // namespace ropekit
