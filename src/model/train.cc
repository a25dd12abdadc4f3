// Training: AdamW (Loshchilov & Hutter 2019, Algorithm 2, decoupled weight decay on matrices
// only), global-norm gradient clipping, linear warmup + cosine decay, gradient accumulation,
// random crops whose offsets are a pure function of (seed, step, micro-batch, row) so that a
// resumed run reproduces the uninterrupted one bit for bit.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numbers>

#include "ropekit/model.h"
#include "src/util/json_limits.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {

using Json = nlohmann::ordered_json;

uint64_t Hash(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t z = a;
  for (uint64_t v : {b, c, d}) {
    z = SplitMixFinalize(z + kSplitMixGamma + v * 0xD1B54A32D192ED03ull);
  }
  return z;
}

std::string FormatDuration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  return buf;
}

}  // namespace

void TrainConfig::Validate() const {
  auto require = [](bool ok, const std::string& m) {
    if (!ok) throw Error(m);
  };
  require(steps >= 0, "steps: must be >= 0");
  require(batch_size >= 1, "batch_size: must be >= 1");
  require(seq_len >= 1 && seq_len <= (1 << 20), "seq_len: must be in [1, 2^20]");
  require(grad_accum >= 1, "grad_accum: must be >= 1");
  require(std::isfinite(lr) && lr >= 0, "lr: must be finite and >= 0");
  require(std::isfinite(min_lr) && min_lr >= 0, "min_lr: must be finite and >= 0");
  require(warmup_steps >= 0, "warmup_steps: must be >= 0");
  require(beta1 >= 0 && beta1 < 1, "beta1: must be in [0, 1)");
  require(beta2 >= 0 && beta2 < 1, "beta2: must be in [0, 1)");
  require(eps > 0 && std::isfinite(eps), "eps: must be finite and > 0");
  require(weight_decay >= 0 && std::isfinite(weight_decay), "weight_decay: must be >= 0");
  require(grad_clip >= 0 && std::isfinite(grad_clip), "grad_clip: must be >= 0 (0 = off)");
  require(eval_interval >= 0, "eval_interval: must be >= 0");
  require(eval_batches >= 1, "eval_batches: must be >= 1");
  require(checkpoint_interval >= 0, "checkpoint_interval: must be >= 0");
  require(log_interval >= 1, "log_interval: must be >= 1");
}

std::string TrainConfigToJson(const TrainConfig& c) {
  Json j;
  j["steps"] = c.steps;
  j["batch_size"] = c.batch_size;
  j["seq_len"] = c.seq_len;
  j["grad_accum"] = c.grad_accum;
  j["lr"] = c.lr;
  j["min_lr"] = c.min_lr;
  j["warmup_steps"] = c.warmup_steps;
  j["schedule"] = c.schedule == LrSchedule::kCosine ? "cosine" : "constant";
  j["beta1"] = c.beta1;
  j["beta2"] = c.beta2;
  j["eps"] = c.eps;
  j["weight_decay"] = c.weight_decay;
  j["grad_clip"] = c.grad_clip;
  j["data_seed"] = c.data_seed;
  j["eval_interval"] = c.eval_interval;
  j["eval_batches"] = c.eval_batches;
  j["checkpoint_interval"] = c.checkpoint_interval;
  j["bf16"] = c.bf16;
  return j.dump(2) + "\n";
}

TrainConfig TrainConfigFromJson(std::string_view text, const std::string& name) {
  CheckJsonLimits(text, name);
  Json j;
  try {
    j = Json::parse(text);
  } catch (const std::exception& e) {
    throw Error(name + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw Error(name + ": the top level must be a JSON object");
  TrainConfig c;
  try {
    auto i64 = [&](const char* k, int64_t& out) {
      if (j.contains(k)) out = j.at(k).get<int64_t>();
    };
    auto f64 = [&](const char* k, double& out) {
      if (j.contains(k)) out = j.at(k).get<double>();
    };
    i64("steps", c.steps);
    i64("batch_size", c.batch_size);
    i64("seq_len", c.seq_len);
    i64("grad_accum", c.grad_accum);
    f64("lr", c.lr);
    f64("min_lr", c.min_lr);
    i64("warmup_steps", c.warmup_steps);
    if (j.contains("schedule")) {
      const std::string s = j.at("schedule").get<std::string>();
      if (s != "cosine" && s != "constant") throw Error("schedule must be cosine or constant");
      c.schedule = s == "cosine" ? LrSchedule::kCosine : LrSchedule::kConstant;
    }
    f64("beta1", c.beta1);
    f64("beta2", c.beta2);
    f64("eps", c.eps);
    f64("weight_decay", c.weight_decay);
    f64("grad_clip", c.grad_clip);
    if (j.contains("data_seed")) c.data_seed = j.at("data_seed").get<uint64_t>();
    i64("eval_interval", c.eval_interval);
    i64("eval_batches", c.eval_batches);
    i64("checkpoint_interval", c.checkpoint_interval);
    if (j.contains("bf16")) c.bf16 = j.at("bf16").get<bool>();
    c.Validate();
  } catch (const nlohmann::json::exception& e) {
    throw Error(name + ": " + e.what());
  } catch (const Error& e) {
    throw Error(name + ": " + e.what());
  }
  return c;
}

double LearningRate(const TrainConfig& c, int64_t step) {
  if (step < c.warmup_steps) {
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  }
  if (c.schedule == LrSchedule::kConstant) return c.lr;
  const int64_t decay_steps = c.steps - c.warmup_steps;
  if (decay_steps <= 1) return c.lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - c.warmup_steps) / (decay_steps - 1));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

double ValidationLoss(Model& model, std::span<const int32_t> tokens, int64_t seq_len,
                      int64_t num_windows, int64_t batch, ThreadPool* pool) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < seq_len + 1) {
    throw Error("validation text has " + std::to_string(n) +
                " tokens, fewer than seq_len + 1 = " + std::to_string(seq_len + 1));
  }
  if (num_windows < 1 || batch < 1) throw Error("ValidationLoss: windows and batch must be >= 1");
  const int64_t span = n - (seq_len + 1);
  double sum = 0.0;
  int64_t count = 0;
  std::vector<int32_t> buf;
  for (int64_t w0 = 0; w0 < num_windows; w0 += batch) {
    const int64_t b = std::min(batch, num_windows - w0);
    buf.resize(b * (seq_len + 1));
    for (int64_t i = 0; i < b; ++i) {
      const int64_t w = w0 + i;
      const int64_t start = num_windows == 1 ? 0 : span * w / (num_windows - 1);
      std::copy(tokens.begin() + start, tokens.begin() + start + seq_len + 1,
                buf.begin() + i * (seq_len + 1));
    }
    sum += model.ForwardBackward(buf, b, seq_len, {}, 1.0f, pool) * static_cast<double>(b);
    count += b;
  }
  return sum / static_cast<double>(count);
}

std::vector<TrainLogEntry> Train(Model& model, OptimizerState& state, const TrainConfig& config,
                                 std::span<const int32_t> train, std::span<const int32_t> val,
                                 ThreadPool* pool,
                                 const std::function<void(const TrainLogEntry&)>& on_step) {
  config.Validate();
  const int64_t T = config.seq_len, B = config.batch_size;
  const int64_t n = static_cast<int64_t>(train.size());
  if (n < T + 1) {
    throw Error("training text has " + std::to_string(n) +
                " tokens, fewer than seq_len + 1 = " + std::to_string(T + 1));
  }
  model.set_matmul_precision(config.bf16 ? MatmulPrecision::kBf16 : MatmulPrecision::kF32);
  std::span<float> params = model.parameters();
  const size_t P = params.size();
  if (state.m.empty() && state.v.empty() && state.step == 0) {
    state.m.assign(P, 0.0f);
    state.v.assign(P, 0.0f);
  }
  if (state.m.size() != P || state.v.size() != P) {
    throw Error("optimizer state has " + std::to_string(state.m.size()) +
                " moments, the model has " + std::to_string(P) + " parameters");
  }
  // Decay mask over the flat buffer (padding is never decayed; its gradient stays 0).
  std::vector<uint8_t> decay(P, 0);
  for (const TensorInfo& t : model.tensors()) {
    if (t.weight_decay) std::fill(decay.begin() + t.offset, decay.begin() + t.offset + t.size, 1);
  }
  std::vector<float> grads(P);
  std::vector<int32_t> batch(B * (T + 1));
  std::vector<TrainLogEntry> log;
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(B * T * config.grad_accum));
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = state.step;
  const int64_t span = n - (T + 1);
  while (state.step < config.steps) {
    const int64_t s = state.step;
    std::fill(grads.begin(), grads.end(), 0.0f);
    double loss = 0.0;
    for (int64_t micro = 0; micro < config.grad_accum; ++micro) {
      for (int64_t b = 0; b < B; ++b) {
        const uint64_t h = Hash(config.data_seed, static_cast<uint64_t>(s),
                                static_cast<uint64_t>(micro), static_cast<uint64_t>(b));
        const int64_t start = static_cast<int64_t>(h % static_cast<uint64_t>(span + 1));
        std::copy(train.begin() + start, train.begin() + start + T + 1,
                  batch.begin() + b * (T + 1));
      }
      loss += model.ForwardBackward(batch, B, T, grads, grad_scale, pool);
    }
    loss /= static_cast<double>(config.grad_accum);
    double sq = 0.0;
    for (size_t i = 0; i < P; ++i) sq += double{grads[i]} * grads[i];
    const double norm = std::sqrt(sq);
    const double clip =
        config.grad_clip > 0 && norm > config.grad_clip ? config.grad_clip / norm : 1.0;
    const double lr = LearningRate(config, s);
    const int64_t t = s + 1;
    const double bc1 = 1.0 - std::pow(config.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(config.beta2, static_cast<double>(t));
    const float b1 = static_cast<float>(config.beta1), b2 = static_cast<float>(config.beta2);
    for (size_t i = 0; i < P; ++i) {
      const float g = static_cast<float>(grads[i] * clip);
      state.m[i] = b1 * state.m[i] + (1.0f - b1) * g;
      state.v[i] = b2 * state.v[i] + (1.0f - b2) * g * g;
      const double mhat = state.m[i] / bc1;
      const double vhat = state.v[i] / bc2;
      double p = params[i];
      if (decay[i]) p -= lr * config.weight_decay * p;
      p -= lr * mhat / (std::sqrt(vhat) + config.eps);
      params[i] = static_cast<float>(p);
    }
    state.step = t;
    TrainLogEntry entry{t, loss, lr, norm, -1.0};
    const bool last = t == config.steps;
    if (!val.empty() && config.eval_interval > 0 && (t % config.eval_interval == 0 || last)) {
      entry.val_loss = ValidationLoss(model, val, T, config.eval_batches * B, B, pool);
    }
    log.push_back(entry);
    if (config.progress && (t % config.log_interval == 0 || last || entry.val_loss >= 0)) {
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      const double done = static_cast<double>(t - first_step);
      const double tok_s = done * B * T * config.grad_accum / std::max(elapsed, 1e-9);
      const double eta = elapsed / done * static_cast<double>(config.steps - t);
      std::fprintf(stderr, "step %lld/%lld  loss %.4f", static_cast<long long>(t),
                   static_cast<long long>(config.steps), loss);
      if (entry.val_loss >= 0) std::fprintf(stderr, "  val %.4f", entry.val_loss);
      std::fprintf(stderr, "  lr %.3g  |g| %.3f  %.0f tok/s  elapsed %s  eta %s\n", lr, norm, tok_s,
                   FormatDuration(elapsed).c_str(), FormatDuration(eta).c_str());
    }
    const bool save =
        !config.checkpoint_dir.empty() &&
        ((config.checkpoint_interval > 0 && t % config.checkpoint_interval == 0) || last);
    // on_step (which may log the step) runs before the save, so that a log never lacks a step
    // that a checkpoint holds; a resumed run drops the logged steps after its checkpoint. A
    // callback that throws (an interruption) still gets the checkpoint due at this step.
    if (on_step) {
      try {
        on_step(entry);
      } catch (...) {
        if (save) SaveCheckpoint(config.checkpoint_dir, model, &state, &config);
        throw;
      }
    }
    if (save) SaveCheckpoint(config.checkpoint_dir, model, &state, &config);
  }
  return log;
}

}  // namespace ropekit
