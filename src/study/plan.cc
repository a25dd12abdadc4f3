// The study's presets, RoPE scalings, tail-protocol windows, the RoFormer decay bound and the
// result records.
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "ropekit/json_limits.h"
#include "ropekit/study.h"

namespace ropekit::study {
namespace {

using Json = nlohmann::ordered_json;

TrainConfig PretrainConfig(int64_t steps, int64_t batch, int64_t seq_len, int64_t warmup) {
  TrainConfig t;
  t.steps = steps;
  t.batch_size = batch;
  t.seq_len = seq_len;
  t.lr = 2e-3;
  t.min_lr = 2e-4;
  t.warmup_steps = warmup;
  t.schedule = LrSchedule::kCosine;
  t.weight_decay = 0.1;
  t.grad_clip = 1.0;
  t.eval_batches = 4;
  return t;
}

// Fine-tuning (docs/study.md, "Training settings"): the same tokens per step as pre-training,
// constant lr 0.1 x peak, a short warmup, no weight decay.
TrainConfig FinetuneConfig(const TrainConfig& pre, int64_t factor, int64_t steps, int64_t warmup) {
  TrainConfig t = pre;
  t.seq_len = pre.seq_len * factor;
  t.batch_size = std::max<int64_t>(1, pre.batch_size / factor);
  t.steps = steps;
  t.lr = 0.1 * pre.lr;
  t.min_lr = t.lr;
  t.warmup_steps = warmup;
  t.schedule = LrSchedule::kConstant;
  t.weight_decay = 0.0;
  return t;
}

// What differs between the presets; everything else is the protocol's shared set-up above.
struct PresetRow {
  const char* name;
  const char* description;
  // Model: d, layers, heads, KV heads, head_dim, SwiGLU width; L = the training length.
  int hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size;
  int64_t train_length;
  // Pre-training: steps of batch x L tokens, warmup, peak / final lr, intervals, eval batches.
  int64_t steps, batch, warmup;
  double lr, min_lr;
  int64_t eval_interval, checkpoint_interval, eval_batches;
  // Tail protocol and per-position curves.
  int64_t tail_windows, tail, max_windows, bucket_size;
  // Fine-tuning at extension_factor x L: steps, warmup, eval = checkpoint interval, the
  // evaluation points.
  int64_t finetune_total, finetune_warmup, finetune_interval;
  std::vector<int64_t> finetune_steps;
  // Experiments beside the main grid, and the head count of the alibi-heads one.
  std::vector<std::string> experiments;
  int alibi_heads;
  // Fine-tuning methods compared for YaRN and PI (none: no comparison), LoRA rank and alpha.
  std::vector<std::string> methods;
  int lora_rank;
  double lora_alpha;
};

// The methods of the comparison (StudyPreset::methods): full fine-tuning first.
const std::vector<std::string> kMethods = {"full", "lora-qv", "lora-all", "lora-plus", "qlora"};

const std::vector<PresetRow>& PresetTable() {
  // clang-format off
  static const std::vector<PresetRow> rows = {
      // The protocol (docs/study.md, the preset table): d 128, 4 layers, 4 query / 2 KV heads,
      // head_dim 32, SwiGLU 352, tied embeddings, init std 0.02.
      {"full",
       "protocol model (d 128, 4 layers, 4/2 heads, head_dim 32), L = 128, "
       "1000 steps x 2048 tokens; fine-tune 200 steps at 512",
       128, 4, 4, 2, 32, 352, 128,
       1000, 16, 100, 2e-3, 2e-4, 100, 100, 4,
       64, 64, 64, 16,
       200, 10, 50, {50, 100, 200},
       {"t5-published", "alibi-heads", "pi-cutoff"}, 8,
       kMethods, 8, 16.0},
      // The largest configuration for about an hour on 2 cores: twice the heads (8 query / 4 KV,
      // head_dim 16), L = 256, twice the full preset's tokens; ALiBi's experiment with 16 heads.
      {"paper",
       "protocol width with 8/4 heads (d 128, 4 layers, head_dim 16), L = 256, "
       "1000 steps x 4096 tokens; fine-tune 200 steps at 1024",
       128, 4, 8, 4, 16, 352, 256,
       1000, 16, 100, 2e-3, 2e-4, 100, 100, 4,
       64, 64, 64, 32,
       200, 10, 50, {50, 100, 200},
       {"t5-published", "alibi-heads", "pi-cutoff"}, 16,
       kMethods, 8, 16.0},
      // Same architecture family at a quarter of the compute: half the width, two layers.
      {"quick",
       "small model (d 64, 2 layers, 2/1 heads, head_dim 32), L = 64, "
       "3000 steps x 1024 tokens; fine-tune 200 steps at 256",
       64, 2, 2, 1, 32, 176, 64,
       3000, 16, 100, 2e-3, 2e-4, 250, 500, 4,
       48, 32, 32, 8,
       200, 10, 50, {50, 100, 200},
       {}, 8,
       {}, 8, 16.0},
      {"micro",
       "test-suite model (d 32, 1 layer, 2/1 heads, head_dim 16), L = 16, 100 steps",
       32, 1, 2, 1, 16, 64, 16,
       100, 8, 10, 1e-2, 1e-3, 20, 20, 2,
       8, 8, 8, 4,
       10, 2, 5, {5, 10},
       {"t5-published", "alibi-heads", "pi-cutoff"}, 4,
       kMethods, 8, 16.0},
  };
  // clang-format on
  return rows;
}

StudyPreset PresetFromRow(const PresetRow& r) {
  StudyPreset p;
  p.name = r.name;
  p.description = r.description;
  p.encodings = {"learned", "sinusoidal", "none", "rope", "alibi", "t5"};
  p.eval_multipliers = {1, 2, 4, 8};
  p.scalings = {"linear", "ntk", "dynamic", "yarn", "llama3"};
  p.finetune_scalings = {"none", "linear", "yarn", "llama3"};
  p.extension_factor = 4;
  p.model.hidden_size = r.hidden_size;
  p.model.num_layers = r.num_layers;
  p.model.num_heads = r.num_heads;
  p.model.num_kv_heads = r.num_kv_heads;
  p.model.head_dim = r.head_dim;
  p.model.intermediate_size = r.intermediate_size;
  p.model.max_position_embeddings = r.train_length;
  p.train = PretrainConfig(r.steps, r.batch, r.train_length, r.warmup);
  p.train.lr = r.lr;
  p.train.min_lr = r.min_lr;
  p.train.eval_interval = r.eval_interval;
  p.train.checkpoint_interval = r.checkpoint_interval;
  p.train.eval_batches = r.eval_batches;
  p.tail_windows = r.tail_windows;
  p.tail = r.tail;
  p.max_windows = r.max_windows;
  p.bucket_size = r.bucket_size;
  p.finetune = FinetuneConfig(p.train, p.extension_factor, r.finetune_total, r.finetune_warmup);
  p.finetune.eval_interval = r.finetune_interval;
  p.finetune.checkpoint_interval = r.finetune_interval;
  p.finetune_steps = r.finetune_steps;
  p.experiments = r.experiments;
  p.alibi_heads = r.alibi_heads;
  p.methods = r.methods;
  if (!p.methods.empty()) p.method_scalings = {"yarn", "linear"};
  p.lora_rank = r.lora_rank;
  p.lora_alpha = r.lora_alpha;
  // LoRA's B starts at 0 and its update is scaled by alpha / r: adapters are commonly trained
  // at about ten times the learning rate of full fine-tuning (docs/study.md).
  p.lora_lr_multiplier = 10.0;
  return p;
}

}  // namespace

StudyPreset GetStudyPreset(std::string_view name) {
  for (const PresetRow& row : PresetTable()) {
    if (name == row.name) return PresetFromRow(row);
  }
  throw Error("--preset '" + std::string(name) + "' is not one of micro, quick, full, paper");
}

ModelConfig StudyModel(const StudyPreset& preset, const std::string& encoding) {
  ModelConfig c = preset.model;
  const int64_t L = preset.train.seq_len;
  c.max_position_embeddings = L;
  PositionEncodingSpec& pe = c.position_encoding;
  pe.kind = ParsePositionEncodingKind(encoding);
  const bool absolute =
      pe.kind == PositionEncodingKind::kSinusoidal || pe.kind == PositionEncodingKind::kLearned;
  // Embeddings (std 0.02) are scaled by sqrt(d) before an absolute encoding of amplitude ~1 is
  // added, or the encoding drowns them (Vaswani et al. 2017, arXiv:1706.03762, sec. 3.4; fairseq).
  pe.embedding_scale = absolute ? EmbeddingScale::kSqrtDim : EmbeddingScale::kNone;
  pe.max_positions = 0;  // learned: 8 L rows (Resolved); rows >= L are never trained
  // T5 (docs/study.md, "Encoding details"): 32 buckets, max_distance L (fewer buckets when L is
  // tiny: max_distance must exceed the num_buckets / 2 exact buckets).
  pe.num_buckets = static_cast<int>(std::min<int64_t>(32, L));
  pe.max_distance = static_cast<int>(L);
  return c.Resolved();
}

ModelConfig StudyExperimentModel(const StudyPreset& preset, const std::string& experiment) {
  ModelConfig c = StudyModel(preset, experiment == "t5-published" ? "t5" : "alibi");
  PositionEncodingSpec& pe = c.position_encoding;
  if (experiment == "t5-published") {
    pe.max_distance = static_cast<int>(std::max<int64_t>(2, preset.train.seq_len / 4));
    pe.num_buckets = std::min(32, pe.max_distance);
  } else if (experiment == "alibi-heads") {
    const int heads = preset.alibi_heads;
    if (heads < 1 || c.hidden_size % heads != 0) {
      throw Error("alibi_heads " + std::to_string(heads) + " must divide hidden_size " +
                  std::to_string(c.hidden_size));
    }
    c.num_heads = heads;
    c.num_kv_heads =
        std::max(1, heads * c.num_kv_heads / preset.model.num_heads);  // same GQA ratio
    c.head_dim = c.hidden_size / heads;
  } else {
    throw Error("study experiment '" + experiment + "' trains no model of its own");
  }
  return c.Resolved();
}

LoraConfig MethodLoraConfig(const StudyPreset& preset, const std::string& method) {
  LoraConfig c;
  c.rank = preset.lora_rank;
  c.alpha = preset.lora_alpha;
  c.dropout = 0.0;
  const std::vector<std::string> all(std::begin(kLoraModules), std::end(kLoraModules));
  if (method == "lora-qv") {
    c.target_modules = {"q_proj", "v_proj"};
  } else if (method == "lora-all" || method == "lora-plus" || method == "qlora") {
    c.target_modules = all;
    // LongLoRA's LoRA+ (Chen et al. 2023, sec. 3.3): embeddings and norms trainable too.
    c.train_embeddings = c.train_norms = method == "lora-plus";
    // QLoRA (Dettmers et al. 2023, sec. 4): LoRA on every linear layer of an NF4 base.
    c.qlora = method == "qlora";
  } else {
    throw Error("study method '" + method +
                "' has no adapter (accepted: lora-qv, lora-all, lora-plus, qlora)");
  }
  return c;
}

RopeParams PartialPi(const RopeParams& base, int keep, double s, int64_t train_length) {
  RopeParams p = ScaledRope(base, "none", 1.0, train_length);
  const int n = base.rotary_dim / 2;
  if (keep < 0 || keep > n) {
    throw Error("pi_keep " + std::to_string(keep) + " is outside [0, " + std::to_string(n) + "]");
  }
  if (s == 1.0 || keep == n) return p;
  // LongRoPE's per-pair factors express it exactly: theta_j / f_j with f_j = 1 for the k
  // highest-frequency pairs (j < k) and s for the others; attention factor 1, as PI.
  p.type = RopeType::kLongRope;
  p.original_max_position_embeddings = train_length;
  p.short_factor.assign(n, s);
  for (int j = 0; j < keep; ++j) p.short_factor[j] = 1.0;
  p.long_factor = p.short_factor;
  p.attention_factor = 1.0;
  p.Validate();
  return p;
}

RopeParams ScaledRope(const RopeParams& base, std::string_view scaling, double s,
                      int64_t train_length) {
  if (!(s >= 1.0) || !std::isfinite(s)) {
    throw Error("rope scaling factor " + std::to_string(s) + " must be finite and >= 1");
  }
  RopeParams p;
  p.base = base.base;
  p.head_dim = base.head_dim;
  p.rotary_dim = base.rotary_dim;
  p.max_position_embeddings = train_length;
  if (scaling == "none") return p;
  if (scaling == "dynamic") {
    // Dynamic NTK (HF form): base' = base ((a l / L) - (a - 1))^(R / (R - 2)) with a = 1, i.e.
    // s = l / L for the current length l, recomputed per forward pass; plain RoPE for l <= L.
    p.type = RopeType::kDynamic;
    p.factor = 1.0;
    return p;
  }
  if (s == 1.0) return p;
  if (scaling == "linear") {  // PI: positions m / s
    p.type = RopeType::kLinear;
    p.factor = s;
  } else if (scaling == "ntk") {  // NTK-aware: base' = base s^(R / (R - 2))
    p.type = RopeType::kNtk;
    p.ntk_alpha = s;
  } else if (scaling == "yarn") {  // NTK-by-parts (alpha 1, beta 32) + mscale 0.1 ln s + 1
    p.type = RopeType::kYarn;
    p.factor = s;
    p.original_max_position_embeddings = train_length;
  } else if (scaling == "llama3") {  // low 1, high 4, original length L
    p.type = RopeType::kLlama3;
    p.factor = s;
    p.low_freq_factor = 1.0;
    p.high_freq_factor = 4.0;
    p.original_max_position_embeddings = train_length;
  } else {
    throw Error("rope scaling '" + std::string(scaling) +
                "' is not one of none, linear, ntk, dynamic, yarn, llama3");
  }
  p.Validate();
  return p;
}

std::vector<int64_t> TailWindowEnds(int64_t num_tokens, int64_t max_context, int64_t num_windows) {
  if (max_context < 1 || num_windows < 1) {
    throw Error("tail protocol: max_context and num_windows must be >= 1");
  }
  const int64_t lo = max_context + 1;
  if (num_tokens < lo) {
    throw Error("tail protocol: the held-out text has " + std::to_string(num_tokens) +
                " tokens, a window of " + std::to_string(max_context) + " needs " +
                std::to_string(lo));
  }
  std::vector<int64_t> ends;
  const int64_t denom = std::max<int64_t>(num_windows - 1, 1);
  for (int64_t k = 0; k < num_windows; ++k) ends.push_back(lo + (num_tokens - lo) * k / denom);
  return ends;
}

std::vector<TailWindow> PlanTailWindows(std::span<const int64_t> ends, int64_t context,
                                        int64_t tail, int64_t num_tokens) {
  if (tail < 1 || tail > context) {
    throw Error("tail protocol: tail " + std::to_string(tail) + " must be in [1, context " +
                std::to_string(context) + "]");
  }
  std::vector<TailWindow> windows;
  for (int64_t e : ends) {
    if (e - context - 1 < 0 || e > num_tokens) {
      throw Error("tail protocol: window end " + std::to_string(e) + " does not fit context " +
                  std::to_string(context) + " in " + std::to_string(num_tokens) + " tokens");
    }
    windows.push_back({e - context - 1, e - tail, e});
  }
  return windows;
}

double TailLoss(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> ends,
                int64_t context, int64_t tail, int64_t batch, ThreadPool* pool) {
  if (batch < 1) throw Error("tail protocol: batch must be >= 1");
  const std::vector<TailWindow> windows =
      PlanTailWindows(ends, context, tail, static_cast<int64_t>(tokens.size()));
  std::vector<int32_t> inputs, targets;
  std::vector<float> losses;
  double sum = 0.0;
  int64_t count = 0;
  for (size_t w0 = 0; w0 < windows.size(); w0 += static_cast<size_t>(batch)) {
    const int64_t b = std::min<int64_t>(batch, static_cast<int64_t>(windows.size() - w0));
    inputs.resize(b * context);
    targets.resize(b * context);
    losses.resize(b * context);
    for (int64_t i = 0; i < b; ++i) {
      const TailWindow& w = windows[w0 + i];
      std::copy(tokens.begin() + w.input_begin, tokens.begin() + w.input_begin + context,
                inputs.begin() + i * context);
      // Only the scored targets are set; a target < 0 scores 0.
      std::fill(targets.begin() + i * context, targets.begin() + (i + 1) * context, -1);
      const int64_t first = w.scored_begin - (w.input_begin + 1);  // index of the first scored
      std::copy(tokens.begin() + w.scored_begin, tokens.begin() + w.end,
                targets.begin() + i * context + first);
    }
    model.Forward(inputs, b, context, nullptr, targets.data(), losses.data(), pool);
    for (int64_t i = 0; i < b * context; ++i) {
      if (targets[i] >= 0) {
        sum += losses[i];
        ++count;
      }
    }
  }
  return sum / static_cast<double>(count);
}

std::vector<double> RopeDecayCurve(std::span<const double> inv_freq, int64_t max_distance) {
  const size_t n = inv_freq.size();
  std::vector<double> curve;
  for (int64_t r = 0; r <= max_distance; ++r) {
    std::complex<double> s = 0.0;
    double total = 0.0;
    for (size_t j = 0; j < n; ++j) {
      s += std::polar(1.0, static_cast<double>(r) * inv_freq[j]);  // S_{j+1}
      total += std::abs(s);
    }
    curve.push_back(n ? total / static_cast<double>(n) : 0.0);
  }
  return curve;
}

std::string RecordsToJson(const std::vector<StudyRecord>& records) {
  Json a = Json::array();
  for (const StudyRecord& r : records) {
    Json j;
    j["encoding"] = r.encoding;
    j["scaling"] = r.scaling;
    j["scaling_factor"] = r.scaling_factor;
    j["finetune_steps"] = r.finetune_steps;
    j["train_length"] = r.train_length;
    j["eval_length"] = r.eval_length;
    j["tail_loss"] = r.tail_loss;
    j["window_loss"] = r.window_loss;
    j["seed"] = r.seed;
    j["bucket_size"] = r.bucket_size;
    j["position_loss"] = r.position_loss;
    if (!r.variant.empty()) j["variant"] = r.variant;
    if (!r.method.empty()) j["method"] = r.method;
    if (r.trainable_parameters > 0) {  // set by the run (a unit's own records have none)
      j["trainable_parameters"] = r.trainable_parameters;
      j["optimizer_bytes"] = r.optimizer_bytes;
      j["seconds"] = r.seconds;
    }
    if (r.seeds > 1) {
      j["seeds"] = r.seeds;
      j["tail_loss_sd"] = r.tail_loss_sd;
      j["window_loss_sd"] = r.window_loss_sd;
      j["tail_loss_ci95"] = r.tail_loss_ci95;
    }
    a.push_back(std::move(j));
  }
  return a.dump(1) + "\n";
}

std::vector<StudyRecord> RecordsFromJson(std::string_view text, const std::string& name) {
  std::vector<StudyRecord> out;
  CheckJsonLimits(text, name);
  try {
    const Json a = Json::parse(text);
    if (!a.is_array()) throw Error("expected a JSON list of records");
    for (const Json& j : a) {
      StudyRecord r;
      r.encoding = j.at("encoding").get<std::string>();
      r.scaling = j.at("scaling").get<std::string>();
      r.scaling_factor = j.at("scaling_factor").get<double>();
      r.finetune_steps = j.at("finetune_steps").get<int64_t>();
      r.train_length = j.at("train_length").get<int64_t>();
      r.eval_length = j.at("eval_length").get<int64_t>();
      r.tail_loss = j.at("tail_loss").get<double>();
      r.window_loss = j.at("window_loss").get<double>();
      r.seed = j.at("seed").get<uint64_t>();
      r.bucket_size = j.at("bucket_size").get<int64_t>();
      r.position_loss = j.at("position_loss").get<std::vector<double>>();
      if (j.contains("variant")) r.variant = j.at("variant").get<std::string>();
      // Fine-tuning records written before the method comparison are full fine-tunes.
      if (j.contains("method")) {
        r.method = j.at("method").get<std::string>();
      } else if (r.finetune_steps > 0) {
        r.method = "full";
      }
      if (j.contains("trainable_parameters")) {
        r.trainable_parameters = j.at("trainable_parameters").get<int64_t>();
        r.optimizer_bytes = j.at("optimizer_bytes").get<int64_t>();
        r.seconds = j.at("seconds").get<double>();
        if (r.trainable_parameters < 1 || r.optimizer_bytes < 1 || !(r.seconds >= 0)) {
          throw Error("trainable_parameters and optimizer_bytes must be >= 1, seconds >= 0");
        }
      }
      if (j.contains("seeds")) {
        r.seeds = j.at("seeds").get<int64_t>();
        if (r.seeds < 2) throw Error("an aggregate record needs seeds >= 2");
        r.tail_loss_sd = j.at("tail_loss_sd").get<double>();
        r.window_loss_sd = j.at("window_loss_sd").get<double>();
        r.tail_loss_ci95 = j.at("tail_loss_ci95").get<double>();
      }
      out.push_back(std::move(r));
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(name + ": " + e.what());
  } catch (const Error& e) {
    throw Error(name + ": " + e.what());
  }
  return out;
}

double StudentT95(int64_t dof) {
  // Two-sided 95% points t_{0.975, dof} of Student's t distribution (standard tables, e.g.
  // Abramowitz & Stegun, Table 26.10); 1.960 is the normal limit.
  static constexpr double kT[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306,
                                  2.262,  2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
                                  2.110,  2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                                  2.060,  2.056, 2.052, 2.048, 2.045, 2.042};
  if (dof < 1) throw Error("Student's t: degrees of freedom must be >= 1");
  if (dof <= 30) return kT[dof - 1];
  return dof <= 60 ? 2.000 : dof <= 120 ? 1.980 : 1.960;
}

namespace {

bool SameConfiguration(const StudyRecord& a, const StudyRecord& b) {
  return a.encoding == b.encoding && a.scaling == b.scaling && a.variant == b.variant &&
         a.method == b.method && a.scaling_factor == b.scaling_factor &&
         a.finetune_steps == b.finetune_steps && a.train_length == b.train_length &&
         a.eval_length == b.eval_length;
}

// Mean and sample standard deviation (n - 1 in the denominator) of `values` (n >= 2).
std::pair<double, double> MeanSd(const std::vector<double>& values) {
  double mean = 0;
  for (double v : values) mean += v;
  mean /= static_cast<double>(values.size());
  double ss = 0;
  for (double v : values) ss += (v - mean) * (v - mean);
  return {mean, std::sqrt(ss / static_cast<double>(values.size() - 1))};
}

StudyRecord Aggregate(const std::vector<const StudyRecord*>& group) {
  StudyRecord out = *group[0];
  const size_t n = group.size();
  std::vector<double> tail, window;
  for (const StudyRecord* r : group) {
    tail.push_back(r->tail_loss);
    window.push_back(r->window_loss);
  }
  std::tie(out.tail_loss, out.tail_loss_sd) = MeanSd(tail);
  std::tie(out.window_loss, out.window_loss_sd) = MeanSd(window);
  double seconds = 0;
  for (const StudyRecord* r : group) seconds += r->seconds;
  out.seconds = seconds / static_cast<double>(n);
  out.seeds = static_cast<int64_t>(n);
  out.tail_loss_ci95 =
      StudentT95(out.seeds - 1) * out.tail_loss_sd / std::sqrt(static_cast<double>(n));
  for (size_t b = 0; b < out.position_loss.size(); ++b) {
    double sum = 0;
    for (const StudyRecord* r : group) sum += b < r->position_loss.size() ? r->position_loss[b] : 0;
    out.position_loss[b] = sum / static_cast<double>(n);
  }
  return out;
}

}  // namespace

std::vector<StudyRecord> AggregateSeeds(const std::vector<StudyRecord>& per_seed) {
  std::vector<StudyRecord> out;
  std::vector<bool> used(per_seed.size(), false);
  for (size_t i = 0; i < per_seed.size(); ++i) {
    if (used[i]) continue;
    if (per_seed[i].seeds != 1) throw Error("AggregateSeeds: an input record is an aggregate");
    std::vector<const StudyRecord*> group;
    for (size_t k = i; k < per_seed.size(); ++k) {
      if (!used[k] && SameConfiguration(per_seed[i], per_seed[k])) {
        used[k] = true;
        group.push_back(&per_seed[k]);
      }
    }
    out.push_back(group.size() == 1 ? *group[0] : Aggregate(group));
  }
  return out;
}

std::string RecordsToCsv(const std::vector<StudyRecord>& records) {
  std::string s =
      "encoding,scaling,scaling_factor,finetune_steps,train_length,eval_length,tail_loss,"
      "window_loss,seed,variant,method\n";
  char buf[512];
  for (const StudyRecord& r : records) {
    std::snprintf(buf, sizeof(buf), "%s,%s,%.17g,%lld,%lld,%lld,%.17g,%.17g,%llu,%s,%s\n",
                  r.encoding.c_str(), r.scaling.c_str(), r.scaling_factor,
                  static_cast<long long>(r.finetune_steps), static_cast<long long>(r.train_length),
                  static_cast<long long>(r.eval_length), r.tail_loss, r.window_loss,
                  static_cast<unsigned long long>(r.seed), r.variant.c_str(), r.method.c_str());
    s += buf;
  }
  return s;
}

}  // namespace ropekit::study
