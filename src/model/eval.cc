// Evaluation at any context length: non-overlapping windows (mean loss, per-position curve) and
// the tail protocol of Kazemnejad et al. 2023 (App. F): the same last `tail` target tokens are
// scored at every context length, which removes the early-token confound of full-window loss.
#include <algorithm>
#include <cmath>

#include "ropekit/model.h"

namespace ropekit {
namespace {

// Scores windows given by their first input index; each window has `context` inputs and
// `context` targets. Adds loss(t) to sum_by_position[t] for every position t.
void ScoreWindows(Model& model, std::span<const int32_t> tokens, const std::vector<int64_t>& starts,
                  int64_t context, int64_t batch, ThreadPool* pool,
                  std::vector<double>& sum_by_position) {
  std::vector<int32_t> inputs, targets;
  std::vector<float> losses;
  for (size_t w0 = 0; w0 < starts.size(); w0 += batch) {
    const int64_t b = std::min<int64_t>(batch, static_cast<int64_t>(starts.size() - w0));
    inputs.resize(b * context);
    targets.resize(b * context);
    losses.resize(b * context);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t s = starts[w0 + i];
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
  if (options.batch < 1) throw Error("eval: batch must be >= 1");
  if (options.bucket_size < 1) throw Error("eval: bucket size must be >= 1");
  if (options.max_windows < 0 || options.num_tail_windows < 0 || options.tail < 0) {
    throw Error("eval: window counts and tail must be >= 0");
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t cmax = *std::max_element(options.contexts.begin(), options.contexts.end());
  for (int64_t c : options.contexts) {
    if (c < 1) throw Error("eval: context length " + std::to_string(c) + " must be >= 1");
    if (c + 1 > n) {
      throw Error("eval: context length " + std::to_string(c) + " needs at least " +
                  std::to_string(c + 1) + " tokens of text, got " + std::to_string(n));
    }
    if (options.num_tail_windows > 0 && options.tail > c) {
      throw Error("eval: tail " + std::to_string(options.tail) + " exceeds context length " +
                  std::to_string(c));
    }
  }
  // Tail protocol end offsets e_k (exclusive end of the targets), fixed by the largest context.
  std::vector<int64_t> ends;
  for (int64_t k = 0; k < options.num_tail_windows; ++k) {
    const int64_t lo = cmax + 1;
    const int64_t denom = std::max<int64_t>(options.num_tail_windows - 1, 1);
    ends.push_back(lo + (n - lo) * k / denom);
  }
  std::vector<EvalResult> results;
  for (int64_t c : options.contexts) {
    EvalResult r;
    r.context = c;
    r.bucket_size = options.bucket_size;
    std::vector<int64_t> starts;
    for (int64_t s = 0; s + c + 1 <= n; s += c) {
      if (options.max_windows > 0 && static_cast<int64_t>(starts.size()) >= options.max_windows) {
        break;
      }
      starts.push_back(s);
    }
    std::vector<double> by_pos(c, 0.0);
    ScoreWindows(model, tokens, starts, c, options.batch, pool, by_pos);
    double total = 0.0;
    for (double v : by_pos) total += v;
    r.windows = static_cast<int64_t>(starts.size());
    r.mean_loss = total / static_cast<double>(r.windows * c);
    r.perplexity = std::exp(r.mean_loss);
    for (int64_t b0 = 0; b0 < c; b0 += options.bucket_size) {
      const int64_t b1 = std::min(c, b0 + options.bucket_size);
      double s = 0.0;
      for (int64_t t = b0; t < b1; ++t) s += by_pos[t];
      r.position_loss.push_back(s / static_cast<double>((b1 - b0) * r.windows));
    }
    if (!ends.empty()) {
      std::vector<int64_t> tail_starts;
      for (int64_t e : ends) tail_starts.push_back(e - c - 1);
      std::vector<double> tail_pos(c, 0.0);
      ScoreWindows(model, tokens, tail_starts, c, options.batch, pool, tail_pos);
      double s = 0.0;
      for (int64_t t = c - options.tail; t < c; ++t) s += tail_pos[t];
      r.tail_loss = s / static_cast<double>(options.tail * static_cast<int64_t>(ends.size()));
    }
    results.push_back(std::move(r));
  }
  return results;
}

}  // namespace ropekit
