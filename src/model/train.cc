// Training: AdamW (Loshchilov & Hutter 2019, Algorithm 2, decoupled weight decay on matrices
// only), global-norm gradient clipping, linear warmup + cosine decay, gradient accumulation,
// random crops whose offsets are a pure function of (seed, step, micro-batch, row) so that a
// resumed run reproduces the uninterrupted one bit for bit.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>

#include "ropekit/json_limits.h"
#include "ropekit/model.h"
#include "src/dist/zero.h"
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

uint64_t Fnv1a(const void* data, size_t size, uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// Every rank must train the same model on the same data with the same config (the same command
// line): compares fingerprints with rank 0's. Every rank sees all fingerprints, so every rank
// throws the same error.
void CheckSameRun(Communicator& comm, const Model& model, const OptimizerState& state,
                  const TrainConfig& config, std::span<const int32_t> train,
                  std::span<const int32_t> val) {
  const char* names[] = {"the initial weights", "the optimizer state", "the training config",
                         "the training text", "the validation text"};
  TrainConfig c = config;
  c.progress = false;
  const std::string cfg = TrainConfigToJson(c) + c.checkpoint_dir;
  const std::span<const float> p = model.parameters();
  const uint64_t mine[5] = {Fnv1a(p.data(), p.size_bytes()),
                            Fnv1a(state.v.data(), state.v.size() * sizeof(float),
                                  Fnv1a(state.m.data(), state.m.size() * sizeof(float),
                                        Fnv1a(&state.step, sizeof(state.step)))),
                            Fnv1a(cfg.data(), cfg.size()), Fnv1a(train.data(), train.size_bytes()),
                            Fnv1a(val.data(), val.size_bytes())};
  std::vector<uint64_t> all(5 * comm.size());
  comm.AllGatherBytes({reinterpret_cast<const uint8_t*>(mine), sizeof(mine)},
                      {reinterpret_cast<uint8_t*>(all.data()), all.size() * sizeof(uint64_t)});
  for (int r = 1; r < comm.size(); ++r) {
    for (int i = 0; i < 5; ++i) {
      if (all[5 * r + i] != all[i]) {
        throw Error(std::string("data-parallel training: ") + names[i] + " of rank " +
                    std::to_string(r) + " differ from rank 0's; every rank must run the same " +
                    "command on the same files");
      }
    }
  }
}

}  // namespace

void TrainConfig::Validate() const {
  auto require = [](bool ok, const std::string& m) {
    if (!ok) throw Error(m);
  };
  // Bounds keep every product below (B * T <= 2^20, grad_accum <= 2^20, steps <= 2^40), so the
  // loop's 64-bit arithmetic cannot overflow, and keep one micro-batch's activations allocatable.
  constexpr int64_t k20 = int64_t{1} << 20, k40 = int64_t{1} << 40;
  require(steps >= 0 && steps <= k40, "steps (--steps): must be in [0, 2^40]");
  require(batch_size >= 1 && batch_size <= k20,
          "batch_size (--batch-size): must be in [1, 2^20 = 1048576], got " +
              std::to_string(batch_size));
  require(seq_len >= 1 && seq_len <= k20, "seq_len (--seq-len): must be in [1, 2^20]");
  require(batch_size * seq_len <= k20,
          "batch_size x seq_len (--batch-size x --seq-len): " + std::to_string(batch_size) + " x " +
              std::to_string(seq_len) +
              " tokens per micro-batch, more than 2^20 = 1048576; use --grad-accum for a larger "
              "effective batch");
  require(grad_accum >= 1 && grad_accum <= k20,
          "grad_accum (--grad-accum): must be in [1, 2^20 = 1048576], got " +
              std::to_string(grad_accum));
  require(std::isfinite(lr) && lr >= 0, "lr: must be finite and >= 0");
  require(std::isfinite(min_lr) && min_lr >= 0, "min_lr: must be finite and >= 0");
  require(warmup_steps >= 0 && warmup_steps <= k40,
          "warmup_steps (--warmup): must be in [0, 2^40]");
  require(beta1 >= 0 && beta1 < 1, "beta1: must be in [0, 1)");
  require(beta2 >= 0 && beta2 < 1, "beta2: must be in [0, 1)");
  require(eps > 0 && std::isfinite(eps), "eps: must be finite and > 0");
  require(weight_decay >= 0 && std::isfinite(weight_decay), "weight_decay: must be >= 0");
  require(grad_clip >= 0 && std::isfinite(grad_clip), "grad_clip: must be >= 0 (0 = off)");
  require(eval_interval >= 0 && eval_interval <= k40,
          "eval_interval (--eval-interval): must be in [0, 2^40]");
  require(eval_batches >= 1 && eval_batches <= k20,
          "eval_batches (--eval-batches): must be in [1, 2^20]");
  require(checkpoint_interval >= 0 && checkpoint_interval <= k40,
          "checkpoint_interval (--checkpoint-interval): must be in [0, 2^40]");
  require(log_interval >= 1 && log_interval <= k40,
          "log_interval (--log-interval): must be in [1, 2^40]");
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
    // Integer fields take JSON integers in int64 range only (a float such as 10.7 or 1e31 is
    // refused instead of truncated or converted out of range).
    auto i64 = [&](const char* k, int64_t& out) {
      if (!j.contains(k)) return;
      const Json& v = j.at(k);
      if (!v.is_number_integer() ||
          (v.is_number_unsigned() &&
           v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))) {
        throw Error(std::string(k) + " must be an integer in [" +
                    std::to_string(std::numeric_limits<int64_t>::min()) + ", " +
                    std::to_string(std::numeric_limits<int64_t>::max()) + "]");
      }
      out = v.get<int64_t>();
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
    if (j.contains("data_seed")) {
      if (!j.at("data_seed").is_number_unsigned()) {
        throw Error("data_seed must be an integer in [0, 2^64 - 1]");
      }
      c.data_seed = j.at("data_seed").get<uint64_t>();
    }
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

namespace {

// Train's preconditions on the text (n tokens) and on the split of A micro-batches over N ranks.
void CheckTrainSplit(int64_t n, int64_t T, int64_t A, int N) {
  if (n < T + 1) {
    throw Error("training text has " + std::to_string(n) +
                " tokens, fewer than seq_len + 1 = " + std::to_string(T + 1));
  }
  if (A < N) {
    throw Error("grad_accum: " + std::to_string(A) +
                " micro-batches per step cannot be split over " + std::to_string(N) +
                " ranks (each rank computes at least one); use grad_accum >= " + std::to_string(N) +
                ", a multiple of the rank count to balance them");
  }
}

// Zero AdamW moments for a new run; a resumed run's moments must match the P parameters.
void PrepareMoments(OptimizerState& state, int64_t P) {
  if (state.m.empty() && state.v.empty() && state.step == 0) {
    state.m.assign(P, 0.0f);
    state.v.assign(P, 0.0f);
  }
  if (static_cast<int64_t>(state.m.size()) != P || static_cast<int64_t>(state.v.size()) != P) {
    throw Error("optimizer state has " + std::to_string(state.m.size()) +
                " moments, the model has " + std::to_string(P) + " parameters");
  }
}

// 1 for the elements of the shard [s0, s0 + S) that belong to a weight-decayed tensor (padding is
// never decayed; its gradient stays 0).
std::vector<uint8_t> DecayMask(const Model& model, int64_t s0, int64_t S) {
  std::vector<uint8_t> decay(S, 0);
  for (const TensorInfo& t : model.trainable_tensors()) {
    const int64_t b = std::max(t.offset, s0), e = std::min(t.offset + t.size, s0 + S);
    if (t.weight_decay && b < e) std::fill(decay.begin() + (b - s0), decay.begin() + (e - s0), 1);
  }
  return decay;
}

// Micro-batch `micro` of step s: batch_size crops of seq_len + 1 tokens whose starts are hashed
// from (data seed, step, micro-batch, row), so any rank can draw any micro-batch.
void FillMicroBatch(const TrainConfig& config, std::span<const int32_t> train, int64_t s,
                    int64_t micro, std::vector<int32_t>& batch) {
  const int64_t T = config.seq_len;
  const int64_t span = static_cast<int64_t>(train.size()) - (T + 1);
  for (int64_t b = 0; b < config.batch_size; ++b) {
    const uint64_t h = Hash(config.data_seed, static_cast<uint64_t>(s),
                            static_cast<uint64_t>(micro), static_cast<uint64_t>(b));
    const int64_t start = static_cast<int64_t>(h % static_cast<uint64_t>(span + 1));
    std::copy(train.begin() + start, train.begin() + start + T + 1, batch.begin() + b * (T + 1));
  }
}

// The step's mean loss over its A micro-batches and the latest end of any rank's backward, from
// the gathered blocks (rank r's block: its micro-batch losses, then that time).
std::pair<double, double> StepLoss(const std::vector<double>& shared,
                                   const std::vector<int64_t>& offsets, int N, int64_t A) {
  double loss = 0.0;
  double last_backward = 0.0;
  for (int r = 0; r < N; ++r) {
    for (int64_t i = offsets[r]; i + 1 < offsets[r + 1]; ++i) loss += shared[i];
    last_backward = std::max(last_backward, shared[offsets[r + 1] - 1]);
  }
  return {loss / static_cast<double>(A), last_backward};
}

// AdamW (Loshchilov & Hutter 2019, decoupled weight decay) at step t on the shard: gradient g
// (scaled by clip), moments m and v, parameters p, decay mask; updates in double, rounded once.
void AdamWStep(const TrainConfig& config, int64_t t, double lr, double clip,
               std::span<const float> grad, std::span<const uint8_t> decay, std::vector<float>& m,
               std::vector<float>& v, float* params) {
  const double bc1 = 1.0 - std::pow(config.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(config.beta2, static_cast<double>(t));
  const float b1 = static_cast<float>(config.beta1), b2 = static_cast<float>(config.beta2);
  const int64_t S = static_cast<int64_t>(grad.size());
  for (int64_t i = 0; i < S; ++i) {
    const float g = static_cast<float>(grad[i] * clip);
    m[i] = b1 * m[i] + (1.0f - b1) * g;
    v[i] = b2 * v[i] + (1.0f - b2) * g * g;
    const double mhat = m[i] / bc1;
    const double vhat = v[i] / bc2;
    double p = params[i];
    if (decay[i]) p -= lr * config.weight_decay * p;
    p -= lr * mhat / (std::sqrt(vhat) + config.eps);
    params[i] = static_cast<float>(p);
  }
}

// The progress line of step entry.step: loss, validation loss, lr, gradient norm, throughput.
void PrintProgress(const TrainConfig& config, const TrainLogEntry& entry, int64_t first_step,
                   double elapsed) {
  const int64_t t = entry.step;
  const double done = static_cast<double>(t - first_step);
  const double tok_s =
      done * config.batch_size * config.seq_len * config.grad_accum / std::max(elapsed, 1e-9);
  const double eta = elapsed / done * static_cast<double>(config.steps - t);
  std::fprintf(stderr, "step %lld/%lld  loss %.4f", static_cast<long long>(t),
               static_cast<long long>(config.steps), entry.loss);
  if (entry.val_loss >= 0) std::fprintf(stderr, "  val %.4f", entry.val_loss);
  std::fprintf(stderr, "  lr %.3g  |g| %.3f  %.0f tok/s  elapsed %s  eta %s\n", entry.lr,
               entry.grad_norm, tok_s, FormatDuration(elapsed).c_str(),
               FormatDuration(eta).c_str());
}

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// When a step's phases ended: compute (t1), gradient reduction (t2), optimizer (t4), parameter
// all-gather (t5) from its start t0; the reduction work done inside the backward (post_s) and the
// latest end of any rank's backward (seconds since the steady clock's epoch).
struct StepTimes {
  Clock::time_point t0, t1, t2, t4, t5;
  double post_s = 0.0, last_backward = 0.0;
};

void AddStepTimes(const StepTimes& w, DataParallelStats& stats) {
  stats.steps += 1;
  stats.step_s += Seconds(w.t0, w.t5);
  stats.compute_s += Seconds(w.t0, w.t1) - w.post_s;
  stats.reduce_post_s += w.post_s;
  stats.reduce_wait_s += Seconds(w.t1, w.t2);
  stats.reduce_after_last_backward_s += std::max(
      0.0, std::chrono::duration<double>(w.t2.time_since_epoch()).count() - w.last_backward);
  stats.optimizer_s += Seconds(w.t2, w.t4);
  stats.allgather_s += Seconds(w.t4, w.t5);
}

// Global gradient norm: per-chunk sums of squares of the summed gradient (this rank's chunks from
// its shard, the others' gathered), added in chunk order, the same terms in the same order for
// any rank count.
double GlobalGradNorm(Communicator& comm, const dist::ShardLayout& layout, int rank,
                      std::span<const float> shard_grad, std::vector<double>& chunk_sq) {
  dist::ChunkSquares(shard_grad, std::span<double>(chunk_sq).subspan(
                                     layout.chunk_begin(rank),
                                     layout.chunk_begin(rank + 1) - layout.chunk_begin(rank)));
  comm.AllGather(std::span<double>(chunk_sq), layout.chunk_offsets());
  double sq = 0.0;
  for (double c : chunk_sq) sq += c;
  return std::sqrt(sq);
}

// One checkpoint after step t, written by rank 0 (after the moments' shards m, v are gathered to
// it when the optimizer state is sharded). Every rank takes part: the gather is collective.
void SaveTrainCheckpoint(Communicator& comm, const dist::ShardLayout& layout, const Model& model,
                         const OptimizerState& state, const TrainConfig& config,
                         const std::vector<float>& m, const std::vector<float>& v, int64_t t) {
  if (comm.size() == 1) {
    SaveCheckpoint(config.checkpoint_dir, model, &state, &config);
    return;
  }
  const int64_t P = static_cast<int64_t>(model.trainable_parameters().size());
  const bool lead = comm.rank() == 0;
  OptimizerState full{t, std::vector<float>(lead ? P : 0), std::vector<float>(lead ? P : 0)};
  comm.Gather(m, full.m, layout.offsets());
  comm.Gather(v, full.v, layout.offsets());
  if (lead) SaveCheckpoint(config.checkpoint_dir, model, &full, &config);
}

// The full moments on every rank from the shards m, v at s0, as one process would hold them.
void GatherMoments(Communicator& comm, const dist::ShardLayout& layout, int64_t s0,
                   const std::vector<float>& m, const std::vector<float>& v, int64_t P,
                   OptimizerState& state) {
  state.m.assign(P, 0.0f);
  state.v.assign(P, 0.0f);
  std::copy(m.begin(), m.end(), state.m.begin() + s0);
  std::copy(v.begin(), v.end(), state.v.begin() + s0);
  comm.AllGather(std::span<float>(state.m), layout.offsets());
  comm.AllGather(std::span<float>(state.v), layout.offsets());
}

}  // namespace

std::vector<TrainLogEntry> Train(Model& model, OptimizerState& state, const TrainConfig& config,
                                 std::span<const int32_t> train, std::span<const int32_t> val,
                                 ThreadPool* pool,
                                 const std::function<void(const TrainLogEntry&)>& on_step,
                                 const DataParallelOptions& dp) {
  config.Validate();
  Communicator& comm = dp.comm ? *dp.comm : SingleProcess();
  const int N = comm.size(), rank = comm.rank();
  const int64_t T = config.seq_len, B = config.batch_size, A = config.grad_accum;
  CheckTrainSplit(static_cast<int64_t>(train.size()), T, A, N);
  model.set_matmul_precision(config.bf16 ? MatmulPrecision::kBf16 : MatmulPrecision::kF32);
  // With an adapter only its own buffer trains (the base stays frozen and is never copied).
  std::span<float> params = model.trainable_parameters();
  const int64_t P = static_cast<int64_t>(params.size());
  PrepareMoments(state, P);
  if (N > 1) CheckSameRun(comm, model, state, config, train, val);

  // ZeRO stage 1: this rank's shard [s0, s0 + S) of the moments and of the summed gradient.
  const dist::ShardLayout layout(P, N);
  const int64_t s0 = layout.begin(rank), S = layout.size(rank);
  // One process updates state.m / state.v in place; a rank keeps only its shard.
  std::vector<float> m_shard, v_shard;
  if (N > 1) {
    m_shard.assign(state.m.begin() + s0, state.m.begin() + s0 + S);
    v_shard.assign(state.v.begin() + s0, state.v.begin() + s0 + S);
    state.m = {};
    state.v = {};
  }
  std::vector<float>& m = N > 1 ? m_shard : state.m;
  std::vector<float>& v = N > 1 ? v_shard : state.v;
  const std::vector<uint8_t> decay = DecayMask(model, s0, S);
  // Local gradient buffers: rank 0 folds its micro-batches into one (a scratch buffer takes each
  // later micro-batch), every other rank keeps one per micro-batch for the owners' fold.
  const int64_t micro0 = dist::MicroBegin(A, N, rank), micro1 = dist::MicroBegin(A, N, rank + 1);
  const int64_t local_micro = micro1 - micro0;
  std::vector<std::vector<float>> grads(rank == 0 ? 1 : local_micro, std::vector<float>(P));
  std::vector<float> scratch(rank == 0 && local_micro > 1 ? P : 0);
  std::vector<const float*> owner_view;
  for (const auto& g : grads) owner_view.push_back(g.data());
  dist::GradientReducer reducer(comm, layout, A, dp.overlap);
  std::vector<float> shard_grad(S);
  // Gathered per step: rank r's block holds its micro-batch losses, then the time its backward
  // ended (steady clock, which one machine's ranks share) for the stats.
  std::vector<double> shared(A + N), chunk_sq(layout.num_chunks());
  std::vector<int64_t> shared_offsets(N + 1);
  for (int r = 0; r <= N; ++r) shared_offsets[r] = dist::MicroBegin(A, N, r) + r;
  const int64_t my_block = shared_offsets[rank];

  DataParallelStats stats;
  stats.ranks = N;
  stats.optimizer_floats = 2 * S;
  stats.optimizer_floats_unsharded = 2 * P;

  std::vector<int32_t> batch(B * (T + 1));
  std::vector<TrainLogEntry> log;
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(B * T * A));
  const auto t_start = Clock::now();
  const int64_t first_step = state.step;
  while (state.step < config.steps) {
    const int64_t s = state.step;
    StepTimes w;
    w.t0 = Clock::now();
    reducer.BeginStep(owner_view);
    double& post_s = w.post_s;
    for (int64_t micro = micro0; micro < micro1; ++micro) {
      FillMicroBatch(config, train, s, micro, batch);
      const bool into_scratch = rank == 0 && micro > micro0;
      std::vector<float>& g = into_scratch ? scratch : grads[rank == 0 ? 0 : micro - micro0];
      std::fill(g.begin(), g.end(), 0.0f);
      Model::GradReadyFn ready;
      if (micro + 1 == micro1) {
        ready = [&](int64_t begin, int64_t end) {
          const auto r0 = Clock::now();
          if (into_scratch) {  // the last term of rank 0's local fold, range by range
            for (int64_t i = begin; i < end; ++i) grads[0][i] += scratch[i];
          }
          reducer.Ready(begin, end);
          post_s += Seconds(r0, Clock::now());
        };
      }
      // LoRA dropout masks: a pure function of (data seed, step, micro-batch), like the crops.
      model.set_dropout_seed(Hash(config.data_seed ^ 0x4c6f5241ull, static_cast<uint64_t>(s),
                                  static_cast<uint64_t>(micro), 0));
      shared[my_block + (micro - micro0)] =
          model.ForwardBackward(batch, B, T, g, grad_scale, pool, ready);
      if (into_scratch && micro + 1 < micro1) {
        for (int64_t i = 0; i < P; ++i) grads[0][i] += scratch[i];
      }
    }
    w.t1 = Clock::now();
    reducer.Finish(shard_grad);
    w.t2 = Clock::now();
    const double norm = GlobalGradNorm(comm, layout, rank, shard_grad, chunk_sq);
    shared[my_block + local_micro] = std::chrono::duration<double>(w.t1.time_since_epoch()).count();
    comm.AllGather(std::span<double>(shared), shared_offsets);
    const auto [loss, last_backward] = StepLoss(shared, shared_offsets, N, A);
    w.last_backward = last_backward;
    const double clip =
        config.grad_clip > 0 && norm > config.grad_clip ? config.grad_clip / norm : 1.0;
    const double lr = LearningRate(config, s);
    const int64_t t = s + 1;
    AdamWStep(config, t, lr, clip, shard_grad, decay, m, v, params.data() + s0);
    w.t4 = Clock::now();
    comm.AllGather(params, layout.offsets());
    w.t5 = Clock::now();
    AddStepTimes(w, stats);
    state.step = t;
    TrainLogEntry entry{t, loss, lr, norm, -1.0};
    const bool last = t == config.steps;
    if (rank == 0 && !val.empty() && config.eval_interval > 0 &&
        (t % config.eval_interval == 0 || last)) {
      entry.val_loss = ValidationLoss(model, val, T, config.eval_batches * B, B, pool);
    }
    log.push_back(entry);
    if (rank == 0 && config.progress &&
        (t % config.log_interval == 0 || last || entry.val_loss >= 0)) {
      PrintProgress(config, entry, first_step, Seconds(t_start, Clock::now()));
    }
    const bool save =
        !config.checkpoint_dir.empty() &&
        ((config.checkpoint_interval > 0 && t % config.checkpoint_interval == 0) || last);
    auto save_checkpoint = [&] {
      SaveTrainCheckpoint(comm, layout, model, state, config, m, v, t);
    };
    // on_step (which may log the step) runs before the save, so that a log never lacks a step
    // that a checkpoint holds; a resumed run drops the logged steps after its checkpoint. A
    // callback that throws (an interruption) still gets the checkpoint due at this step.
    if (on_step) {
      try {
        on_step(entry);
      } catch (...) {
        if (save) save_checkpoint();
        throw;
      }
    }
    if (save) save_checkpoint();
  }
  if (N > 1) GatherMoments(comm, layout, s0, m, v, P, state);
  stats.grad_floats_sent = reducer.floats_sent();
  if (dp.stats) *dp.stats = stats;
  return log;
}

}  // namespace ropekit
