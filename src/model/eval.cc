// Evaluation at any context length: non-overlapping windows (mean loss, per-position curve) and
// the tail protocol of Kazemnejad et al. 2023 (App. F): the same last `tail` target tokens are
// scored at every context length, which removes the early-token confound of full-window loss.
#include <algorithm>
#include <cmath>
#include <functional>

#include "ropekit/model.h"

namespace ropekit {
namespace {

// Scores `count` windows, the w-th starting at input index start_of(w) (computed as they are
// scored, so long evaluations stream); each window has `context` inputs and `context` targets.
// Adds loss(t) to sum_by_position[t] for every position t.
void ScoreWindows(Model& model, std::span<const int32_t> tokens, int64_t count,
                  const std::function<int64_t(int64_t)>& start_of, int64_t context, int64_t batch,
                  ThreadPool* pool, std::vector<double>& sum_by_position) {
  std::vector<int32_t> inputs, targets;
  std::vector<float> losses;
  for (int64_t w0 = 0; w0 < count; w0 += batch) {
    const int64_t b = std::min<int64_t>(batch, count - w0);
    inputs.resize(b * context);
    targets.resize(b * context);
    losses.resize(b * context);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t s = start_of(w0 + i);
      std::copy(tokens.begin() + s, tokens.begin() + s + context, inputs.begin() + i * context);
      std::copy(tokens.begin() + s + 1, tokens.begin() + s + 1 + context,
                targets.begin() + i * context);
    }
    model.Forward(inputs, b, context, nullptr, targets.data(), losses.data(), pool);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t t = 0; t < context; ++t) sum_by_position[t] += losses[i * context + t];
    }
  }
}

}  // namespace

std::vector<EvalResult> Evaluate(Model& model, std::span<const int32_t> tokens,
                                 const EvalOptions& options, ThreadPool* pool) {
  if (options.contexts.empty()) throw Error("eval: no context lengths given");
  if (options.batch < 1 || options.batch > 4096) {
    throw Error("eval: batch (--batch) " + std::to_string(options.batch) + " must be in [1, 4096]");
  }
  if (options.bucket_size < 1) throw Error("eval: bucket size (--bucket) must be >= 1");
  if (options.max_windows < 0 || options.num_tail_windows < 0) {
    throw Error("eval: window counts (--max-windows, --tail-windows) must be >= 0");
  }
  if (options.num_tail_windows > 0 && options.tail < 1) {
    throw Error("eval: tail (--tail) " + std::to_string(options.tail) +
                " must be >= 1 when tail windows are scored (--tail-windows 0 skips them)");
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t cmax = *std::max_element(options.contexts.begin(), options.contexts.end());
  for (int64_t c : options.contexts) {
    if (c < 1) throw Error("eval: context length " + std::to_string(c) + " must be >= 1");
    if (c > n - 1) {  // not c + 1 > n: c may be near INT64_MAX
      throw Error("eval: context length (--context) " + std::to_string(c) +
                  " needs more tokens of text than that (one more target), got " +
                  std::to_string(n) + "; the accepted range here is [1, " +
                  std::to_string(std::max<int64_t>(n - 1, 0)) + "]");
    }
    if (options.num_tail_windows > 0 && options.tail > c) {
      throw Error("eval: tail " + std::to_string(options.tail) + " exceeds context length " +
                  std::to_string(c));
    }
  }
  // Tail protocol end offsets e_k (exclusive end of the targets), fixed by the largest context:
  // e_k = lo + (n - lo) k / (K - 1), in 128-bit arithmetic (the product can exceed 2^63).
  const int64_t num_tail = options.num_tail_windows;
  if (num_tail > n - cmax) {
    throw Error("eval: tail windows (--tail-windows) " + std::to_string(num_tail) + " exceed the " +
                std::to_string(n - cmax) + " distinct end offsets that " + std::to_string(n) +
                " tokens of text allow at context " + std::to_string(cmax));
  }
  auto end_of = [&](int64_t k) {
    const int64_t lo = cmax + 1;
    const int64_t denom = std::max<int64_t>(num_tail - 1, 1);
    return lo + static_cast<int64_t>(static_cast<__int128>(n - lo) * k / denom);
  };
  std::vector<EvalResult> results;
  for (int64_t c : options.contexts) {
    EvalResult r;
    r.context = c;
    r.bucket_size = options.bucket_size;
    // Non-overlapping windows starting at 0, c, 2c, ... while s + c + 1 <= n.
    int64_t windows = (n - 1) / c;
    if (options.max_windows > 0) windows = std::min(windows, options.max_windows);
    std::vector<double> by_pos(c, 0.0);
    ScoreWindows(
        model, tokens, windows, [c](int64_t w) { return w * c; }, c, options.batch, pool, by_pos);
    double total = 0.0;
    for (double v : by_pos) total += v;
    r.windows = windows;
    r.mean_loss = total / static_cast<double>(r.windows * c);
    r.perplexity = std::exp(r.mean_loss);
    for (int64_t b0 = 0; b0 < c; b0 += options.bucket_size) {
      const int64_t b1 = std::min(c, b0 + options.bucket_size);
      double s = 0.0;
      for (int64_t t = b0; t < b1; ++t) s += by_pos[t];
      r.position_loss.push_back(s / static_cast<double>((b1 - b0) * r.windows));
    }
    if (num_tail > 0) {
      std::vector<double> tail_pos(c, 0.0);
      ScoreWindows(
          model, tokens, num_tail, [&](int64_t k) { return end_of(k) - c - 1; }, c, options.batch,
          pool, tail_pos);
      double s = 0.0;
      for (int64_t t = c - options.tail; t < c; ++t) s += tail_pos[t];
      r.tail_loss = s / (static_cast<double>(options.tail) * static_cast<double>(num_tail));
    }
    results.push_back(std::move(r));
  }
  return results;
}

}  // namespace ropekit
