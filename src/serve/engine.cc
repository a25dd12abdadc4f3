// Continuous-batching scheduler; see engine.h.
//
// Dimension legend: B = running generations in a step, V = vocab.
#include "src/serve/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace ropekit::serve {
namespace {

// log softmax of logits[V] in double: logprob_i = z_i - max - log(sum_j exp(z_j - max)).
std::vector<double> LogSoftmax(const float* logits, int64_t v) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < v; ++i) mx = std::max(mx, double{logits[i]});
  double sum = 0.0;
  for (int64_t i = 0; i < v; ++i) sum += std::exp(double{logits[i]} - mx);
  const double lse = mx + std::log(sum);
  std::vector<double> out(v);
  for (int64_t i = 0; i < v; ++i) out[i] = double{logits[i]} - lse;
  return out;
}

TokenLogprob Score(const float* logits, int64_t v, int32_t token, int top) {
  const std::vector<double> lp = LogSoftmax(logits, v);
  TokenLogprob t;
  t.token = std::string(1, static_cast<char>(token));
  t.logprob = lp[token];
  std::vector<int32_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  const int64_t keep = std::min<int64_t>(std::max(top, 0), v);
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int32_t a, int32_t b) {
    return lp[a] > lp[b] || (lp[a] == lp[b] && a < b);
  });
  for (int64_t i = 0; i < keep; ++i) {
    t.top.emplace_back(std::string(1, static_cast<char>(order[i])), lp[order[i]]);
  }
  return t;
}

// Bytes of an incomplete UTF-8 sequence at the end of s (0 if it ends on a boundary or with
// bytes that can never complete, which are released as they are).
size_t IncompleteUtf8Tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= std::min<size_t>(3, n); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    size_t need = 0;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    }
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

size_t HoldBack(const std::string& s, const std::vector<std::string>& stop) {
  size_t hold = IncompleteUtf8Tail(s);
  for (const std::string& st : stop) {
    for (size_t len = std::min(st.size() - 1, s.size()); len > hold; --len) {
      if (s.compare(s.size() - len, len, st, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

std::vector<std::string> SplitCharacters(const std::string& text) {
  std::vector<std::string> pieces;
  int pending = 0;  // continuation bytes the current piece's lead byte still expects
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (pending > 0 && (c & 0xC0) == 0x80) {
      pieces.back().push_back(ch);
      --pending;
      continue;
    }
    pieces.emplace_back(1, ch);
    pending = (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 0;
  }
  return pieces;
}

Engine::Engine(Model& model, const EngineOptions& options, ThreadPool* pool)
    : model_(model), options_(options), pool_(pool), decoder_(model) {
  if (options.context < 2) throw Error("serve: the context must be >= 2 tokens");
  if (options.max_batch < 1 || options.max_batch > 4096) {
    throw Error("--max-batch " + std::to_string(options.max_batch) + " is outside [1, 4096]");
  }
  if (options.max_queue < 0 || options.max_queue > 1000000) {
    throw Error("--max-queue " + std::to_string(options.max_queue) + " is outside [0, 1000000]");
  }
  if (options.context_shift) {
    if (model.config().position_encoding.kind == PositionEncodingKind::kSinusoidal ||
        model.config().position_encoding.kind == PositionEncodingKind::kLearned) {
      throw Error(
          "--context-shift: the model's position encoding is added to the token embeddings, so "
          "cached keys cannot move to new positions (use rope, alibi, t5 or none)");
    }
    if (options.n_keep < 0 || options.context < options.n_keep + 2) {
      throw Error("--n-keep " + std::to_string(options.n_keep) +
                  " must be in [0, context - 2 = " + std::to_string(options.context - 2) + "]");
    }
    if (options.n_discard < 0 || options.n_discard >= options.context - options.n_keep) {
      throw Error("--n-discard " + std::to_string(options.n_discard) +
                  " must be in [0, context - n_keep) = [0, " +
                  std::to_string(options.context - options.n_keep) + ") (0 = half)");
    }
  }
  if (options.kv_page_size < 1 || options.kv_page_size > 65536) {
    throw Error("--kv-page-size " + std::to_string(options.kv_page_size) +
                " is outside [1, 65536]");
  }
  // Default: the memory of max_batch full-context caches.
  const int64_t pool_tokens =
      options.kv_cache_tokens > 0 ? options.kv_cache_tokens : options.max_batch * options.context;
  if (options.kv_cache_tokens < 0) {
    throw Error("--kv-cache-tokens " + std::to_string(options.kv_cache_tokens) +
                " must be >= 0 (0 = --max-batch x --ctx-size)");
  }
  if (options.context_shift && pool_tokens < options.context) {
    throw Error("--kv-cache-tokens " + std::to_string(pool_tokens) +
                " must hold at least one context (--ctx-size " + std::to_string(options.context) +
                ") with --context-shift: every sequence reserves its whole context");
  }
  const int64_t pages = (pool_tokens + options.kv_page_size - 1) / options.kv_page_size;
  if (pages > (int64_t{1} << 31) - 1) {
    throw Error("--kv-cache-tokens " + std::to_string(pool_tokens) +
                " needs more than 2^31 - 1 "
                "pages of " +
                std::to_string(options.kv_page_size) + " tokens");
  }
  kv_pool_ = std::make_unique<KvPagePool>(model.config(), pages, options.kv_page_size);
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (Active& a : queue_) Finish(a, "", "the server is shutting down");
}

int64_t Engine::CacheTokens(const Generation& gen) const {
  if (options_.context_shift) return options_.context;
  const int64_t n = static_cast<int64_t>(gen.prompt.size());
  return std::max<int64_t>(1, std::min(options_.context, n + std::max<int64_t>(gen.max_tokens, 0)));
}

SubmitResult Engine::Submit(const std::shared_ptr<Job>& job) {
  for (const auto& g : job->gens) {
    if (kv_pool_->PagesFor(CacheTokens(*g)) > kv_pool_->num_pages()) return SubmitResult::kTooLarge;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return SubmitResult::kBusy;
    // Generations beyond the free batch positions wait in the queue, which holds at most max_queue.
    const int64_t free_now = options_.max_batch - running_count_.load();
    const int64_t waiting = static_cast<int64_t>(queue_.size() + job->gens.size()) - free_now;
    if (waiting > options_.max_queue) return SubmitResult::kBusy;
    for (auto& g : job->gens) {
      g->job = job.get();
      queue_.push_back({job, g.get()});
    }
  }
  cv_.notify_all();
  return SubmitResult::kQueued;
}

EngineStats Engine::Stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queued = static_cast<int64_t>(queue_.size());
  }
  s.running = running_count_.load();
  s.steps = steps_.load();
  s.tokens = tokens_.load();
  s.kv_pages = kv_pool_->num_pages();
  s.kv_page_size = kv_pool_->page_size();
  s.kv_bytes = kv_pool_->bytes();
  s.kv_pages_reserved = pages_reserved_.load();
  s.kv_pages_used = pages_used_.load();
  return s;
}

void Engine::PublishPool() {
  pages_reserved_.store(kv_pool_->reserved_pages());
  pages_used_.store(kv_pool_->used_pages());
}

void Engine::ReleaseSlot(Generation* gen) {
  if (gen->cache) {
    gen->cache.reset();  // its pages go back to the pool
    PublishPool();
  }
}

void Engine::ShiftIfFull(Generation& g) {
  KVCache& cache = *g.cache;
  if (cache.size() < cache.capacity()) return;
  // The rule of ropekit generate --context-shift (Generate in src/model/generate.cc).
  const int64_t n_discard = options_.n_discard > 0
                                ? options_.n_discard
                                : std::max<int64_t>(1, (cache.size() - options_.n_keep) / 2);
  model_.ContextShift(cache, options_.n_keep, n_discard, pool_);
}

void Engine::Finish(Active& a, const std::string& reason, const std::string& error) {
  Generation& g = *a.gen;
  ReleaseSlot(&g);
  {
    std::lock_guard<std::mutex> lock(a.job->mu);
    if (error.empty()) {
      // Cut at the earliest stop string; release the rest.
      size_t cut = g.raw.size();
      std::string why = reason;
      for (const std::string& st : g.stop) {
        const size_t at = g.raw.find(st);
        if (at != std::string::npos && at < cut) {
          cut = at;
          why = "stop";
        }
      }
      g.text = g.raw.substr(0, cut);
      g.finish_reason = why;
    } else {
      g.error = error;
    }
    g.finish_time = Clock::now();
    g.finished = true;
  }
  a.job->cv.notify_all();
}

void Engine::Accept(Active& a, const float* logits) {
  Generation& g = *a.gen;
  const int64_t V = model_.config().vocab_size;
  const int32_t token = g.rng->Sample(std::span<const float>(logits, static_cast<size_t>(V)));
  TokenLogprob lp;
  if (g.top_logprobs >= 0) lp = Score(logits, V, token, g.top_logprobs);
  g.raw.push_back(static_cast<char>(token));
  g.next = token;
  tokens_.fetch_add(1);
  bool stopped = false;
  for (const std::string& st : g.stop) {
    // Only a match that ends in the new byte can be new.
    if (g.raw.size() >= st.size() && g.raw.compare(g.raw.size() - st.size(), st.size(), st) == 0) {
      stopped = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(a.job->mu);
    if (g.completion_tokens == 0) g.first_token_time = Clock::now();
    g.completion_tokens += 1;
    if (g.top_logprobs >= 0) g.logprobs.push_back(std::move(lp));
    // Released text matters to streams only; Finish sets the final text of every generation.
    if (!stopped && a.job->streaming) {
      g.text = g.raw.substr(0, g.raw.size() - HoldBack(g.raw, g.stop));
    }
  }
  if (a.job->streaming) a.job->cv.notify_all();
  if (stopped) {
    Finish(a, "stop");
  } else if (g.completion_tokens >= g.max_tokens ||
             (!options_.context_shift && g.cache->size() >= g.cache->capacity())) {
    Finish(a, "length");
  }
}

void Engine::Admit(Active a) {
  Generation& g = *a.gen;
  if (a.job->cancelled.load()) return Finish(a, "", "cancelled");
  if (Clock::now() > a.job->deadline) return Finish(a, "length");
  if (g.max_tokens == 0) return Finish(a, "length");
  const int64_t room = options_.context_shift ? options_.context + 1 : options_.context;
  if (static_cast<int64_t>(g.prompt.size()) >= room || g.prompt.empty()) {
    return Finish(a, "", "the prompt does not fit the context");
  }
  {
    std::lock_guard<std::mutex> lock(a.job->mu);
    g.admit_time = Clock::now();
  }
  if (!g.cache) throw Error("internal: a generation was admitted without a KV cache");
  g.rng = std::make_unique<Sampler>(g.sampler);
  const int64_t n = static_cast<int64_t>(g.prompt.size());
  const int64_t V = model_.config().vocab_size;
  std::vector<float> logits(g.prompt_logprobs ? n * V : V);
  model_.ForwardCached(g.prompt, *g.cache, logits.data(), !g.prompt_logprobs, pool_);
  if (g.prompt_logprobs) {
    std::vector<TokenLogprob> lps(n);
    lps[0].token = std::string(1, static_cast<char>(g.prompt[0]));
    lps[0].logprob = std::numeric_limits<double>::quiet_NaN();
    for (int64_t i = 1; i < n; ++i) {
      lps[i] = Score(logits.data() + (i - 1) * V, V, g.prompt[i], std::max(g.top_logprobs, 0));
    }
    std::lock_guard<std::mutex> lock(a.job->mu);
    g.prompt_lp = std::move(lps);
  }
  running_.push_back(a);
  running_count_.store(static_cast<int64_t>(running_.size()));
  Accept(running_.back(), logits.data() + (g.prompt_logprobs ? (n - 1) * V : 0));
}

void Engine::Loop() {
  const int64_t V = model_.config().vocab_size;
  std::vector<KVCache*> caches;
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  std::vector<Active> admitted;
  for (;;) {
    admitted.clear();
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !running_.empty(); });
      if (stop_) break;
      // First come, first served: the head of the queue waits until the pool can reserve its
      // cache (those behind it wait too). Cancelled or expired generations leave at once.
      while (!queue_.empty() &&
             static_cast<int64_t>(running_.size() + admitted.size()) < options_.max_batch) {
        Active& head = queue_.front();
        if (!head.job->cancelled.load() && Clock::now() <= head.job->deadline &&
            head.gen->max_tokens > 0) {
          const int64_t tokens = CacheTokens(*head.gen);
          if (kv_pool_->PagesFor(tokens) > kv_pool_->available_pages()) break;
          head.gen->cache = std::make_unique<KVCache>(*kv_pool_, tokens);
        }
        admitted.push_back(std::move(head));
        queue_.pop_front();
      }
    }
    PublishPool();
    for (Active& a : admitted) {
      try {
        Admit(a);
      } catch (const std::exception& e) {
        Finish(a, "", e.what());
      }
    }
    // Drop what finished at admission; cancel / time out the rest before the step.
    // (Compacted in place: no allocation per step.)
    const auto now = Clock::now();
    size_t kept = 0;
    for (Active& a : running_) {
      if (a.gen->finished) continue;
      if (a.job->cancelled.load()) {
        Finish(a, "", "cancelled");
      } else if (now > a.job->deadline) {
        Finish(a, "length");
      } else {
        try {
          ShiftIfFull(*a.gen);
          if (&running_[kept] != &a) running_[kept] = std::move(a);
          ++kept;
        } catch (const std::exception& e) {
          Finish(a, "", e.what());
        }
      }
    }
    running_.resize(kept);
    running_count_.store(static_cast<int64_t>(running_.size()));
    if (running_.empty()) continue;
    caches.clear();
    tokens.clear();
    for (Active& a : running_) {
      caches.push_back(a.gen->cache.get());
      tokens.push_back(a.gen->next);
    }
    logits.resize(running_.size() * V);
    try {
      decoder_.Step(caches, tokens, logits.data(), pool_);
    } catch (const std::exception& e) {
      for (Active& a : running_) Finish(a, "", e.what());
      running_.clear();
      continue;
    }
    steps_.fetch_add(1);
    PublishPool();
    for (size_t b = 0; b < running_.size(); ++b) {
      try {
        Accept(running_[b], logits.data() + b * V);
      } catch (const std::exception& e) {
        Finish(running_[b], "", e.what());
      }
    }
  }
  for (Active& a : running_) {
    if (!a.gen->finished) Finish(a, "", "the server is shutting down");
  }
  running_.clear();
}

}  // namespace ropekit::serve
