// Runs the study as a list of units, each in its own directory under <out>/runs/<unit>/:
//   fingerprint.json  the unit's full configuration (written when the unit starts)
//   ckpt/             checkpoint (config.json, model.safetensors, optimizer state), saved every
//                     checkpoint_interval steps by Train
//   train_log.json    training log up to the last checkpoint
//   records.json      the unit's evaluation records
//   DONE              completion marker holding the fingerprint; written last, atomically
//                     (temporary file + rename), so a unit is finished exactly when DONE exists.
// A rerun reuses a finished unit whose fingerprint matches, resumes an unfinished one from its
// last checkpoint (Train reproduces the uninterrupted run bit for bit) and refuses a directory
// finished under another configuration.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <tuple>

#include "ropekit/file.h"
#include "ropekit/json_limits.h"
#include "ropekit/study.h"

namespace ropekit::study {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

std::string ReadFile(const fs::path& path) { return ReadFileToString(path.string()); }

void WriteAtomic(const fs::path& path, std::string_view data) {
  WriteFileAtomic(path.string(), data);
}

std::string LogToJson(const std::vector<TrainLogEntry>& log) {
  Json a = Json::array();
  for (const TrainLogEntry& e : log) {
    a.push_back({{"step", e.step},
                 {"loss", e.loss},
                 {"lr", e.lr},
                 {"grad_norm", e.grad_norm},
                 {"val_loss", e.val_loss}});
  }
  return a.dump() + "\n";
}

std::vector<TrainLogEntry> LogFromJson(const std::string& text, const std::string& name) {
  std::vector<TrainLogEntry> log;
  CheckJsonLimits(text, name);
  try {
    for (const Json& j : Json::parse(text)) {
      log.push_back({j.at("step").get<int64_t>(), j.at("loss").get<double>(),
                     j.at("lr").get<double>(), j.at("grad_norm").get<double>(),
                     j.at("val_loss").get<double>()});
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(name + ": " + e.what());
  }
  return log;
}

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

class Runner {
 public:
  // The runs of one seed; the first seed's live in <out>/runs/, seed s's in <out>/runs/seed-<s>/.
  Runner(const StudyOptions& options, const StudyPreset& preset, const StudyCorpus& corpus,
         uint64_t seed)
      : o_(options),
        p_(preset),
        corpus_(corpus),
        pool_(static_cast<size_t>(options.threads)),
        seed_(seed),
        runs_(seed == options.seed
                  ? fs::path(options.out) / "runs"
                  : fs::path(options.out) / "runs" / ("seed-" + std::to_string(seed))) {
    L_ = p_.train.seq_len;
    int64_t max_mult = 1;
    for (int64_t m : p_.eval_multipliers) max_mult = std::max(max_mult, m);
    ends_ = TailWindowEnds(static_cast<int64_t>(corpus_.held_out.size()), L_ * max_mult,
                           p_.tail_windows);
    Json base;
    base["study_format"] = 1;  // bump when the meaning of a unit's results changes
    base["preset"] = p_.name;
    base["seed"] = seed_;
    base["corpus"] = {{"train_bytes", corpus_.train.size()},
                      {"held_out_bytes", corpus_.held_out.size()},
                      {"fnv1a", corpus_.content_hash}};
    base["eval"] = {{"multipliers", p_.eval_multipliers},
                    {"tail_windows", p_.tail_windows},
                    {"tail", p_.tail},
                    {"max_windows", p_.max_windows},
                    {"bucket_size", p_.bucket_size}};
    base_fingerprint_ = base;
    total_units_ = static_cast<int>(p_.encodings.size());
    const bool has_rope =
        std::find(p_.encodings.begin(), p_.encodings.end(), "rope") != p_.encodings.end();
    if (has_rope) {
      total_units_ += static_cast<int>(p_.scalings.size() +
                                       p_.finetune_scalings.size() * p_.finetune_steps.size());
    }
    for (const std::string& e : p_.experiments) {
      total_units_ += e == "pi-cutoff" ? static_cast<int>(PiKeeps().size()) : 1;
    }
    CheckMethods();
    if (has_rope) {
      for (const std::string& m : p_.methods) {
        if (m == "full") continue;  // the fine-tune units above
        total_units_ += static_cast<int>(p_.method_scalings.size() * p_.finetune_steps.size());
      }
    }
  }

  // The method comparison reuses the full fine-tunes: its scalings must be fine-tuned ones.
  void CheckMethods() const {
    for (const std::string& sc : p_.method_scalings) {
      if (std::find(p_.finetune_scalings.begin(), p_.finetune_scalings.end(), sc) ==
          p_.finetune_scalings.end()) {
        throw Error("study preset " + p_.name + ": method scaling '" + sc +
                    "' is not one of the fine-tuned scalings");
      }
    }
    for (const std::string& m : p_.methods) {
      if (m != "full") MethodLoraConfig(p_, m).Validate(ModelFor("rope"));
    }
  }

  // The k of the "pi-cutoff" experiment: 0, 1, 2, 4, ..., N (N = the RoPE model's pairs).
  std::vector<int> PiKeeps() const {
    const int n = RopeBase().rotary_dim / 2;
    std::vector<int> keeps = {0};
    for (int k = 1; k < n; k *= 2) keeps.push_back(k);
    keeps.push_back(n);
    return keeps;
  }

  // The study's independent jobs (a pretraining, an extension, or one scaling's chain of
  // fine-tunes), for ranks to share. Jobs that start from the RoPE model wait until its unit is
  // finished with this configuration (its DONE marker), which another rank may be writing; the
  // directory is shared.
  std::vector<std::function<void()>> Jobs() {
    std::vector<std::function<void()>> jobs;
    for (const std::string& enc : p_.encodings) jobs.push_back([this, enc] { Pretrain(enc); });
    if (std::find(p_.encodings.begin(), p_.encodings.end(), "rope") != p_.encodings.end()) {
      for (const std::string& sc : p_.scalings) {
        jobs.push_back([this, sc] {
          WaitForPretrainedRope();
          Extend(sc);
        });
      }
      for (const std::string& sc : p_.finetune_scalings) {
        jobs.push_back([this, sc] {
          WaitForPretrainedRope();
          Finetune(sc);
        });
      }
    }
    for (const std::string& e : p_.experiments) {
      if (e != "pi-cutoff") {
        jobs.push_back([this, e] { PretrainExperiment(e); });
        continue;
      }
      for (int keep : PiKeeps()) {
        jobs.push_back([this, keep] {
          WaitForPretrainedRope();
          ExtendPartialPi(keep);
        });
      }
    }
    // The method comparison last, so that the jobs above keep their places among the ranks.
    if (std::find(p_.encodings.begin(), p_.encodings.end(), "rope") != p_.encodings.end()) {
      for (const std::string& sc : p_.method_scalings) {
        for (const std::string& m : p_.methods) {
          if (m == "full") continue;
          jobs.push_back([this, sc, m] {
            WaitForPretrainedRope();
            FinetuneChain(sc, m);
          });
        }
      }
    }
    return jobs;
  }

  // Every job in order, in this process.
  StudyResult Run() {
    const auto t0 = Clock::now();
    for (const auto& job : Jobs()) job();
    result_.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return std::move(result_);
  }

  ModelConfig ModelFor(const std::string& encoding) const { return StudyModel(p_, encoding); }
  uint64_t seed() const { return seed_; }

  fs::path UnitDir(const std::string& unit) const { return runs_ / unit; }

 private:
  enum class UnitState { kDone, kResume, kFresh };

  void Log(const std::string& line) const {
    if (o_.verbose) std::fprintf(stderr, "%s\n", line.c_str());
  }

  std::string Prefix(const std::string& unit) const {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "[%2d/%d] ", unit_index_, total_units_);
    const std::string seed = o_.seeds > 1 ? " (seed " + std::to_string(seed_) + ")" : "";
    return buf + unit + seed;
  }

  UnitState Prepare(const std::string& unit, const std::string& fingerprint) {
    ++unit_index_;
    unit_start_ = Clock::now();
    const fs::path dir = UnitDir(unit);
    // What a killed run left (the study holds the output directory's lock).
    RemoveStaleTempFiles(dir.string());
    if (fs::is_directory(dir / "ckpt")) CleanCheckpointDirectory((dir / "ckpt").string());
    if (fs::exists(dir / "DONE")) {
      if (ReadFile(dir / "DONE") != fingerprint) {
        throw Error(dir.string() +
                    ": holds a finished run with a different configuration (preset, seed, "
                    "corpus or study format); use another --out or remove that directory");
      }
      return UnitState::kDone;
    }
    if (fs::exists(dir / "fingerprint.json") && ReadFile(dir / "fingerprint.json") == fingerprint &&
        fs::exists(dir / "ckpt" / "trainer_state.json") && fs::exists(dir / "train_log.json")) {
      return UnitState::kResume;
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
    fs::create_directories(dir, ec);
    if (ec) throw Error(dir.string() + ": cannot create (" + ec.message() + ")");
    WriteAtomic(dir / "fingerprint.json", fingerprint);
    return UnitState::kFresh;
  }

  void Reuse(const std::string& unit, const std::string& curve_name) {
    const fs::path dir = UnitDir(unit);
    const auto recs =
        RecordsFromJson(ReadFile(dir / "records.json"), (dir / "records.json").string());
    result_.records.insert(result_.records.end(), recs.begin(), recs.end());
    if (fs::exists(dir / "train_log.json")) {
      AddCurve(curve_name,
               LogFromJson(ReadFile(dir / "train_log.json"), (dir / "train_log.json").string()));
    }
    if (fs::exists(dir / "timing.json")) {
      try {
        const std::string timing = ReadFile(dir / "timing.json");
        CheckJsonLimits(timing, (dir / "timing.json").string());
        result_.compute_seconds += Json::parse(timing).at("seconds").get<double>();
      } catch (const nlohmann::json::exception& e) {
        throw Error((dir / "timing.json").string() + ": " + e.what());
      }
    }
    result_.reused_units.push_back(unit);
    Log(Prefix(unit) + ": finished earlier, reusing " + dir.string());
  }

  void Finish(const std::string& unit, const std::string& fingerprint,
              const std::vector<StudyRecord>& records) {
    const fs::path dir = UnitDir(unit);
    const double seconds = std::chrono::duration<double>(Clock::now() - unit_start_).count();
    result_.compute_seconds += seconds;
    WriteAtomic(dir / "timing.json", Json({{"seconds", seconds}}).dump() + "\n");
    WriteAtomic(dir / "records.json", RecordsToJson(records));
    WriteAtomic(dir / "DONE", fingerprint);  // the completion marker, last
    result_.records.insert(result_.records.end(), records.begin(), records.end());
    result_.trained_units.push_back(unit);
  }

  void AddCurve(const std::string& name, const std::vector<TrainLogEntry>& log) {
    TrainCurve* c = nullptr;
    for (TrainCurve& x : result_.curves) {
      if (x.name == name) c = &x;
    }
    if (!c) {
      result_.curves.push_back({name, {}, {}});
      c = &result_.curves.back();
    }
    for (const TrainLogEntry& e : log) {
      c->loss.emplace_back(e.step, e.loss);
      if (e.val_loss >= 0) c->val_loss.emplace_back(e.step, e.val_loss);
    }
  }

  // Trains `model` to tc.steps, checkpointing into dir/ckpt and logging into dir/train_log.json.
  std::vector<TrainLogEntry> TrainUnit(const std::string& unit, Model& model, OptimizerState& state,
                                       TrainConfig tc, std::vector<TrainLogEntry> log) {
    const fs::path dir = UnitDir(unit);
    tc.checkpoint_dir = (dir / "ckpt").string();
    tc.progress = false;
    const auto t0 = Clock::now();
    const int64_t first = state.step;
    const int64_t log_every = std::max<int64_t>(1, tc.steps / 10);
    auto on_step = [&](const TrainLogEntry& e) {
      log.push_back(e);
      if (!std::isfinite(e.loss)) {
        throw Error(unit + ": training loss is not finite at step " + std::to_string(e.step));
      }
      const bool last = e.step == tc.steps;
      if ((tc.checkpoint_interval > 0 && e.step % tc.checkpoint_interval == 0) || last) {
        WriteAtomic(dir / "train_log.json", LogToJson(log));
      }
      if (e.step % log_every == 0 || last) {
        const double el = std::chrono::duration<double>(Clock::now() - t0).count();
        const double eta =
            el / static_cast<double>(e.step - first) * static_cast<double>(tc.steps - e.step);
        std::string line = Prefix(unit) + ": step " + std::to_string(e.step) + "/" +
                           std::to_string(tc.steps) + "  loss " + Fmt("%.4f", e.loss);
        if (e.val_loss >= 0) line += "  val " + Fmt("%.4f", e.val_loss);
        line += "  " +
                Fmt("%.0f", static_cast<double>((e.step - first) * tc.batch_size * tc.seq_len *
                                                tc.grad_accum) /
                                std::max(el, 1e-9)) +
                " tok/s  " + Fmt("%.0f", el) + " s, eta " + Fmt("%.0f", eta) + " s";
        Log(line);
      }
    };
    if (state.step < tc.steps) {
      Train(model, state, tc, corpus_.train, corpus_.held_out, &pool_, on_step);
    }
    return log;
  }

  // Evaluates at every length; rope_for_length (optional) sets the RoPE parameters per length.
  std::vector<StudyRecord> EvaluateUnit(
      const std::string& unit, Model& model, StudyRecord proto,
      const std::function<std::pair<RopeParams, double>(int64_t)>& rope_for_length) {
    std::vector<StudyRecord> out;
    std::string line = Prefix(unit) + ": tail/window loss";
    for (int64_t m : p_.eval_multipliers) {
      const int64_t c = L_ * m;
      StudyRecord r = proto;
      if (rope_for_length) {
        const auto [params, s] = rope_for_length(c);
        model.SetRopeParams(params);
        r.scaling_factor = s;
      }
      r.train_length = L_;
      r.eval_length = c;
      r.seed = seed_;
      r.tail_loss = TailLoss(model, corpus_.held_out, ends_, c, p_.tail, p_.eval_batch, &pool_);
      EvalOptions eo;
      eo.contexts = {c};
      eo.max_windows = p_.max_windows;
      eo.num_tail_windows = 0;
      eo.bucket_size = p_.bucket_size;
      eo.batch = p_.eval_batch;
      const EvalResult er = Evaluate(model, corpus_.held_out, eo, &pool_)[0];
      r.window_loss = er.mean_loss;
      r.bucket_size = er.bucket_size;
      r.position_loss = er.position_loss;
      if (!std::isfinite(r.tail_loss) || !std::isfinite(r.window_loss)) {
        throw Error(unit + ": evaluation loss at length " + std::to_string(c) + " is not finite");
      }
      line += "  " + std::to_string(c) + ": " + Fmt("%.3f", r.tail_loss) + "/" +
              Fmt("%.3f", r.window_loss);
      out.push_back(std::move(r));
    }
    Log(line);
    return out;
  }

  std::string Fingerprint(const std::string& unit, const ModelConfig& mc, const TrainConfig* tc,
                          const std::string& extra) const {
    return FingerprintJson(unit, mc, tc, extra).dump(1) + "\n";
  }
  Json FingerprintJson(const std::string& unit, const ModelConfig& mc, const TrainConfig* tc,
                       const std::string& extra) const {
    Json j = base_fingerprint_;
    j["unit"] = unit;
    j["model"] = ModelFingerprint(mc);
    if (tc) j["train"] = TrainFingerprint(*tc);
    if (!extra.empty()) j["extra"] = extra;
    return j;
  }

  // The fields the study sets, written here (not through the checkpoint serialisers) so that a
  // new library option with its default value does not invalidate finished runs.
  static Json ModelFingerprint(const ModelConfig& c) {
    const PositionEncodingSpec& pe = c.position_encoding;
    Json j = {{"vocab_size", c.vocab_size},
              {"hidden_size", c.hidden_size},
              {"num_layers", c.num_layers},
              {"num_heads", c.num_heads},
              {"num_kv_heads", c.num_kv_heads},
              {"head_dim", c.head_dim},
              {"intermediate_size", c.intermediate_size},
              {"rms_norm_eps", c.rms_norm_eps},
              {"tie_word_embeddings", c.tie_word_embeddings},
              {"max_position_embeddings", c.max_position_embeddings},
              {"init_std", c.init_std},
              {"pe", PositionEncodingKindName(pe.kind)},
              {"embedding_scale", EmbeddingScaleName(pe.embedding_scale)},
              {"max_positions", pe.max_positions},
              {"num_buckets", pe.num_buckets},
              {"max_distance", pe.max_distance}};
    if (pe.kind == PositionEncodingKind::kRope) {
      const RopeParams& r = pe.rope;
      j["rope"] = {{"type", RopeTypeName(r.type)},
                   {"base", r.base},
                   {"rotary_dim", r.rotary_dim},
                   {"factor", r.factor},
                   {"ntk_alpha", r.ntk_alpha},
                   {"original_max_position_embeddings", r.original_max_position_embeddings},
                   {"low_freq_factor", r.low_freq_factor},
                   {"high_freq_factor", r.high_freq_factor},
                   {"layout", LayoutName(pe.rope_layout)},
                   {"numerics", NumericsName(pe.rope_numerics)}};
    }
    return j;
  }
  static Json TrainFingerprint(const TrainConfig& c) {
    return {{"steps", c.steps},
            {"batch_size", c.batch_size},
            {"seq_len", c.seq_len},
            {"grad_accum", c.grad_accum},
            {"lr", c.lr},
            {"min_lr", c.min_lr},
            {"warmup_steps", c.warmup_steps},
            {"schedule", c.schedule == LrSchedule::kCosine ? "cosine" : "constant"},
            {"beta1", c.beta1},
            {"beta2", c.beta2},
            {"eps", c.eps},
            {"weight_decay", c.weight_decay},
            {"grad_clip", c.grad_clip},
            {"data_seed", c.data_seed},
            {"eval_interval", c.eval_interval},
            {"eval_batches", c.eval_batches},
            {"checkpoint_interval", c.checkpoint_interval}};
  }

  TrainConfig PretrainConfig() const {
    TrainConfig tc = p_.train;
    tc.data_seed = seed_;
    return tc;
  }

  std::string PretrainFingerprint(const std::string& enc) const {
    const TrainConfig tc = PretrainConfig();
    return Fingerprint("pretrain-" + enc, ModelFor(enc), &tc, "");
  }

  void WaitForPretrainedRope() const {
    const fs::path done = UnitDir("pretrain-rope") / "DONE";
    const std::string fp = PretrainFingerprint("rope");
    bool said = false;
    while (!fs::exists(done) || ReadFile(done) != fp) {
      if (!said) Log("waiting for pretrain-rope (another rank trains it)");
      said = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  void Pretrain(const std::string& enc) {
    const ModelConfig mc = ModelFor(enc);
    StudyRecord proto;
    proto.encoding = std::string(PositionEncodingKindName(mc.position_encoding.kind));
    proto.scaling = "none";
    PretrainUnit("pretrain-" + enc, mc, proto);
  }

  // A training experiment: T5 with the published max_distance ratio, ALiBi with more heads.
  void PretrainExperiment(const std::string& experiment) {
    const ModelConfig mc = StudyExperimentModel(p_, experiment);
    const PositionEncodingSpec& pe = mc.position_encoding;
    StudyRecord proto;
    proto.encoding = std::string(PositionEncodingKindName(pe.kind));
    proto.scaling = "none";
    proto.variant = pe.kind == PositionEncodingKind::kT5
                        ? "max_distance=" + std::to_string(pe.max_distance)
                        : "heads=" + std::to_string(mc.num_heads);
    PretrainUnit("pretrain-" + experiment, mc, proto);
  }

  void PretrainUnit(const std::string& unit, const ModelConfig& mc, const StudyRecord& proto) {
    const TrainConfig tc = PretrainConfig();
    const std::string fp = Fingerprint(unit, mc, &tc, "");
    const UnitState st = Prepare(unit, fp);
    if (st == UnitState::kDone) return Reuse(unit, unit);
    const fs::path dir = UnitDir(unit);
    Model model(mc, seed_);
    OptimizerState state;
    std::vector<TrainLogEntry> log;
    if (st == UnitState::kResume) {
      model = LoadModel((dir / "ckpt").string());
      state = LoadOptimizerState((dir / "ckpt").string(), model);
      log = LogFromJson(ReadFile(dir / "train_log.json"), (dir / "train_log.json").string());
      std::erase_if(log, [&](const TrainLogEntry& e) { return e.step > state.step; });
      Log(Prefix(unit) + ": resuming from step " + std::to_string(state.step));
    } else {
      Log(Prefix(unit) + ": training " + std::to_string(model.num_parameters()) +
          " parameters at L = " + std::to_string(L_));
    }
    log = TrainUnit(unit, model, state, tc, std::move(log));
    AddCurve(unit, log);
    Finish(unit, fp, EvaluateUnit(unit, model, proto, {}));
  }

  // PI on every pair but the `keep` highest-frequency ones, without fine-tuning.
  void ExtendPartialPi(int keep) {
    StudyRecord proto;
    proto.encoding = "rope";
    proto.scaling = "linear";
    proto.variant = "pi_keep=" + std::to_string(keep);
    const RopeParams base = RopeBase();
    ExtendUnit("extend-pi-keep" + std::to_string(keep), proto,
               [&](double s) { return PartialPi(base, keep, s, L_); });
  }

  // The RoPE model evaluated at every length with the parameters rope(s), s = length / L (at
  // least 1), without fine-tuning.
  void ExtendUnit(const std::string& unit, const StudyRecord& proto,
                  const std::function<RopeParams(double)>& rope) {
    const ModelConfig mc = ModelFor("rope");
    const std::string fp = Fingerprint(unit, mc, nullptr, "no fine-tuning; parent pretrain-rope");
    if (Prepare(unit, fp) == UnitState::kDone) return Reuse(unit, unit);
    Model model = LoadModel((UnitDir("pretrain-rope") / "ckpt").string());
    Finish(unit, fp, EvaluateUnit(unit, model, proto, [&](int64_t c) {
             const double s = std::max(1.0, static_cast<double>(c) / static_cast<double>(L_));
             return std::make_pair(rope(s), s);
           }));
  }

  RopeParams RopeBase() const { return ModelFor("rope").position_encoding.rope; }

  void Extend(const std::string& scaling) {
    StudyRecord proto;
    proto.encoding = "rope";
    proto.scaling = scaling;
    const RopeParams base = RopeBase();
    ExtendUnit("extend-" + scaling, proto,
               [&](double s) { return ScaledRope(base, scaling, s, L_); });
  }

  void Finetune(const std::string& scaling) { FinetuneChain(scaling, "full"); }

  // The wall time of a finished unit (timing.json; 0 when absent).
  double UnitSeconds(const std::string& unit) const {
    const fs::path path = UnitDir(unit) / "timing.json";
    if (!fs::exists(path)) return 0.0;
    const std::string text = ReadFile(path);
    CheckJsonLimits(text, path.string());
    try {
      return Json::parse(text).at("seconds").get<double>();
    } catch (const nlohmann::json::exception& e) {
      throw Error(path.string() + ": " + e.what());
    }
  }

  // Trainable parameters and AdamW state bytes (m and v, float32, one per element of the
  // trainable buffer, as Train allocates them) of `method` on the model `mc`.
  std::pair<int64_t, int64_t> MethodCost(const ModelConfig& mc, const std::string& method) const {
    Model model(mc, seed_);
    if (method != "full") model.AddLora(MethodLoraConfig(p_, method), seed_);
    int64_t params = 0;
    for (const TensorInfo& t : model.trainable_tensors()) params += t.size;
    const auto state = static_cast<int64_t>(model.trainable_parameters().size());
    return {params, 2 * state * static_cast<int64_t>(sizeof(float))};
  }

  // The fine-tunes of `scaling` with `method` at extension_factor x L, one unit per evaluation
  // point, each continuing the previous one. "full" trains every weight (units
  // finetune-<scaling>-<steps>); the LoRA methods train an adapter on the frozen pretrained
  // RoPE model at lora_lr_multiplier times the learning rate (units
  // finetune-<scaling>-<method>-<steps>; their fingerprints add the adapter's settings).
  void FinetuneChain(const std::string& scaling, const std::string& method) {
    const bool full = method == "full";
    const double s = scaling == "none" ? 1.0 : static_cast<double>(p_.extension_factor);
    const RopeParams rope = ScaledRope(RopeBase(), scaling, s, L_);
    std::optional<LoraConfig> lora;
    if (!full) {
      lora = MethodLoraConfig(p_, method);
      lora->base_model =
          fs::absolute(UnitDir("pretrain-rope") / "ckpt").lexically_normal().string();
    }
    const std::string tag = full ? scaling : scaling + "-" + method;
    std::string parent = "pretrain-rope";
    int64_t prev_steps = 0;
    double chain_seconds = 0;
    std::pair<int64_t, int64_t> cost = {0, 0};
    for (int64_t steps : p_.finetune_steps) {
      const std::string unit = "finetune-" + tag + "-" + std::to_string(steps);
      ModelConfig mc = ModelFor("rope");
      mc.position_encoding.rope = rope;
      mc = mc.Resolved();
      if (prev_steps == 0) cost = MethodCost(mc, method);
      TrainConfig tc = p_.finetune;
      tc.steps = steps;
      tc.data_seed = seed_ + 7919;  // every method sees the same data order
      if (!full) {
        tc.lr *= p_.lora_lr_multiplier;
        tc.min_lr *= p_.lora_lr_multiplier;
      }
      const std::string fp = full ? Fingerprint(unit, mc, &tc, "fine-tune from " + parent)
                                  : MethodFingerprint(unit, mc, tc, parent, method, *lora);
      const UnitState st = Prepare(unit, fp);
      // Full fine-tunes keep the curve names of the studies before the method comparison.
      const std::string curve = full ? "finetune-" + scaling : "methods-" + tag;
      const size_t first_record = result_.records.size();
      if (st == UnitState::kDone) {
        Reuse(unit, curve);
      } else {
        const fs::path dir = UnitDir(unit);
        const std::string parent_ckpt = (UnitDir(parent) / "ckpt").string();
        std::unique_ptr<Model> model;
        OptimizerState state;
        std::vector<TrainLogEntry> log;
        if (st == UnitState::kResume) {
          if (full) {
            model = std::make_unique<Model>(LoadModel((dir / "ckpt").string()));
            state = LoadOptimizerState((dir / "ckpt").string(), *model);
          } else {  // the adapter, on the base it names
            TrainingCheckpoint ck = LoadCheckpoint((dir / "ckpt").string());
            model = std::make_unique<Model>(std::move(ck.model));
            state = std::move(ck.optimizer);
          }
          log = LogFromJson(ReadFile(dir / "train_log.json"), (dir / "train_log.json").string());
          std::erase_if(log, [&](const TrainLogEntry& e) { return e.step > state.step; });
          Log(Prefix(unit) + ": resuming from step " + std::to_string(state.step));
        } else if (prev_steps == 0) {
          LoadOptions lo;
          lo.rope_override = rope;
          model = std::make_unique<Model>(LoadModel(parent_ckpt, lo));
          if (lora) model->AddLora(*lora, seed_);
          Log(Prefix(unit) + ": fine-tuning the RoPE model at " + std::to_string(tc.seq_len) +
              " with scaling " + scaling + (full ? "" : ", method " + method));
        } else {
          if (full) {
            model = std::make_unique<Model>(LoadModel(parent_ckpt));
            state = LoadOptimizerState(parent_ckpt, *model);
          } else {
            TrainingCheckpoint ck = LoadCheckpoint(parent_ckpt);
            model = std::make_unique<Model>(std::move(ck.model));
            state = std::move(ck.optimizer);
          }
          Log(Prefix(unit) + ": continuing from " + parent + " (step " +
              std::to_string(state.step) + ")");
        }
        log = TrainUnit(unit, *model, state, tc, std::move(log));
        AddCurve(curve, log);
        StudyRecord proto;
        proto.encoding = "rope";
        proto.scaling = scaling;
        proto.scaling_factor = s;
        proto.finetune_steps = steps;
        if (!full) proto.method = method;  // full fine-tunes keep the records of before
        Finish(unit, fp, EvaluateUnit(unit, *model, proto, {}));
      }
      // What the comparison reports; set here for reused units too.
      chain_seconds += UnitSeconds(unit);
      for (size_t i = first_record; i < result_.records.size(); ++i) {
        StudyRecord& r = result_.records[i];
        r.method = method;
        std::tie(r.trainable_parameters, r.optimizer_bytes) = cost;
        r.seconds = chain_seconds;
      }
      parent = unit;
      prev_steps = steps;
    }
  }

  // A LoRA fine-tune unit: the full fine-tune's fingerprint plus the adapter's settings.
  std::string MethodFingerprint(const std::string& unit, const ModelConfig& mc,
                                const TrainConfig& tc, const std::string& parent,
                                const std::string& method, const LoraConfig& c) const {
    Json j = FingerprintJson(unit, mc, &tc, "fine-tune from " + parent);
    j["method"] = method;
    j["lora"] = {{"rank", c.rank},
                 {"alpha", c.alpha},
                 {"dropout", c.dropout},
                 {"target_modules", c.target_modules},
                 {"train_embeddings", c.train_embeddings},
                 {"train_norms", c.train_norms},
                 {"qlora", c.qlora}};
    return j.dump(1) + "\n";
  }

  const StudyOptions& o_;
  const StudyPreset& p_;
  const StudyCorpus& corpus_;
  ThreadPool pool_;
  uint64_t seed_;
  fs::path runs_;
  int64_t L_ = 0;
  std::vector<int64_t> ends_;
  Json base_fingerprint_;
  int unit_index_ = 0, total_units_ = 0;
  Clock::time_point unit_start_;  // wall time of this invocation's part of the current unit
  StudyResult result_;
};

}  // namespace

namespace {

std::vector<TrainCurve> CurvesFromJson(const std::string& name) {
  const std::string text = ReadFileToString(name);
  CheckJsonLimits(text, name);
  std::vector<TrainCurve> curves;
  try {
    for (const Json& c : Json::parse(text)) {
      curves.push_back({c.at("name").get<std::string>(),
                        c.at("loss").get<std::vector<std::pair<int64_t, double>>>(),
                        c.at("val_loss").get<std::vector<std::pair<int64_t, double>>>()});
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(name + ": " + e.what());
  }
  return curves;
}

// results.json (per-seed records, then aggregates over seeds), results.csv, curves.json,
// study.json (what --report-only needs) and report.html.
void WriteResults(const StudyOptions& options, const StudyPreset& preset,
                  const std::string& corpus_description, const StudyResult& result) {
  const fs::path out(options.out);
  std::vector<StudyRecord> all = result.records;
  if (options.seeds > 1) {
    for (StudyRecord& r : AggregateSeeds(result.records)) all.push_back(std::move(r));
  }
  WriteAtomic(out / "results.json", RecordsToJson(all));
  WriteAtomic(out / "results.csv", RecordsToCsv(result.records));
  Json curves = Json::array();
  for (const TrainCurve& c : result.curves) {
    curves.push_back({{"name", c.name}, {"loss", c.loss}, {"val_loss", c.val_loss}});
  }
  WriteAtomic(out / "curves.json", curves.dump() + "\n");
  const Json info = {{"preset", preset.name},
                     {"seed", options.seed},
                     {"seeds", options.seeds},
                     {"corpus", corpus_description},
                     {"seconds", result.seconds},
                     {"compute_seconds", result.compute_seconds},
                     {"trained_units", result.trained_units},
                     {"reused_units", result.reused_units}};
  WriteAtomic(out / "study.json", info.dump(1) + "\n");
  WriteAtomic(out / "report.html",
              ReportHtml(preset, result, StudyModel(preset, "rope"), corpus_description));
}

}  // namespace

StudyResult RunStudy(const StudyOptions& options) {
  if (options.threads < 0 || options.threads > static_cast<int>(kMaxThreads)) {
    throw Error("--threads " + std::to_string(options.threads) + " is outside [0, " +
                std::to_string(kMaxThreads) + "] (0 = all hardware threads)");
  }
  if (options.out.empty()) throw Error("--out: an output directory is required");
  const StudyPreset preset = GetStudyPreset(options.preset);
  auto log = [&](const std::string& s) {
    if (options.verbose) std::fprintf(stderr, "%s\n", s.c_str());
  };
  // Ranks of `mpirun -np N ropekit study`: rank 0 fetches the corpus, locks --out and writes the
  // results; the others wait for it where marked, then run their share of the units.
  Communicator& comm = options.comm ? *options.comm : SingleProcess();
  const int rank = comm.rank(), ranks = comm.size();
  auto barrier = [&] {
    std::vector<uint8_t> all(static_cast<size_t>(ranks));
    const uint8_t mine = 1;
    comm.AllGatherBytes({&mine, 1}, all);
  };
  if (rank != 0) barrier();  // the corpus is fetched
  const std::vector<std::string> paths =
      options.corpus.empty() ? FetchAustenCorpus(options.data_dir, log) : options.corpus;
  if (rank == 0 && ranks > 1) barrier();
  const StudyCorpus corpus = LoadStudyCorpus(paths);
  if (static_cast<int64_t>(corpus.train.size()) < preset.finetune.seq_len * 4 + 1) {
    throw Error("--corpus: " + std::to_string(corpus.train.size()) +
                " training bytes are too few for preset " + preset.name + " (need " +
                std::to_string(preset.finetune.seq_len * 4 + 1) + ")");
  }
  // The output directory: writable, this study's alone while it runs (runs/* hold checkpoints
  // that only one writer may commit), cleared of temporary files a killed run left.
  std::optional<DirectoryLock> lock;
  if (rank == 0) {
    CheckDirectoryWritable(options.out, "--out");
    lock.emplace(options.out, "--out");
    RemoveStaleTempFiles(options.out);
    log("study: preset " + preset.name + ": " + preset.description);
    log("study: corpus: " + corpus.description);
  }
  if (options.seeds < 1 || options.seeds > 100) {
    throw Error("--seeds " + std::to_string(options.seeds) + " is outside [1, 100]");
  }
  std::vector<std::unique_ptr<Runner>> runners;  // one per seed
  for (int k = 0; k < options.seeds; ++k) {
    runners.push_back(std::make_unique<Runner>(options, preset, corpus, options.seed + k));
  }
  std::vector<std::string> finished_before;  // units finished by an earlier invocation
  if (ranks > 1) {
    std::error_code ec;
    for (const auto& e : fs::recursive_directory_iterator(fs::path(options.out) / "runs", ec)) {
      if (fs::exists(e.path() / "DONE")) finished_before.push_back(e.path().string());
    }
    barrier();  // --out is locked and clean
    // Rank r of N runs jobs r, r + N, ... of every seed's jobs in turn.
    std::vector<std::function<void()>> jobs;
    for (auto& runner : runners) {
      for (auto& job : runner->Jobs()) jobs.push_back(std::move(job));
    }
    for (size_t j = static_cast<size_t>(rank); j < jobs.size(); j += static_cast<size_t>(ranks)) {
      jobs[j]();
    }
    barrier();  // every unit is finished
    if (rank != 0) return {};
    log("study: every rank finished its units; collecting the results");
    for (auto& runner : runners) {  // fresh runners: these hold this rank's share of the results
      runner = std::make_unique<Runner>(options, preset, corpus, runner->seed());
    }
  }
  // One process: runs the study. Rank 0 of many: finds every unit finished and reads them back
  // (the same records, curves and results as one process).
  StudyResult result;
  for (auto& runner : runners) {
    StudyResult r = runner->Run();
    result.records.insert(result.records.end(), r.records.begin(), r.records.end());
    if (result.curves.empty()) result.curves = std::move(r.curves);  // the first seed's
    for (auto* names : {&r.reused_units, &r.trained_units}) {
      for (std::string& u : *names)
        u = fs::relative(runner->UnitDir(u), fs::path(options.out) / "runs").string();
    }
    result.reused_units.insert(result.reused_units.end(), r.reused_units.begin(),
                               r.reused_units.end());
    result.trained_units.insert(result.trained_units.end(), r.trained_units.begin(),
                                r.trained_units.end());
    result.seconds += r.seconds;
    result.compute_seconds += r.compute_seconds;
  }
  if (ranks > 1) {  // units the ranks trained just now count as computed, not reused
    std::vector<std::string> reused;
    for (std::string& u : result.reused_units) {
      const std::string path = (fs::path(options.out) / "runs" / u).string();
      const bool before =
          std::find(finished_before.begin(), finished_before.end(), path) != finished_before.end();
      (before ? reused : result.trained_units).push_back(std::move(u));
    }
    result.reused_units = std::move(reused);
  }
  WriteResults(options, preset, corpus.description, result);
  return result;
}

StudyResult RewriteReport(const std::string& out, StudyPreset* preset_out) {
  const fs::path dir(out);
  const std::string info_name = (dir / "study.json").string();
  const std::string info_text = ReadFileToString(info_name);
  CheckJsonLimits(info_text, info_name);
  std::string preset_name, corpus_description;
  StudyResult result;
  try {
    const Json info = Json::parse(info_text);
    preset_name = info.at("preset").get<std::string>();
    corpus_description = info.at("corpus").get<std::string>();
    result.seconds = info.at("seconds").get<double>();
    result.compute_seconds = info.at("compute_seconds").get<double>();
    result.trained_units = info.at("trained_units").get<std::vector<std::string>>();
    result.reused_units = info.at("reused_units").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(info_name + ": " + e.what());
  }
  const StudyPreset preset = GetStudyPreset(preset_name);
  const std::string results_name = (dir / "results.json").string();
  for (StudyRecord& r : RecordsFromJson(ReadFileToString(results_name), results_name)) {
    if (r.seeds == 1) result.records.push_back(std::move(r));  // aggregates are recomputed
  }
  result.curves = CurvesFromJson((dir / "curves.json").string());
  WriteAtomic(dir / "report.html",
              ReportHtml(preset, result, StudyModel(preset, "rope"), corpus_description));
  if (preset_out) *preset_out = preset;
  return result;
}

}  // namespace ropekit::study
