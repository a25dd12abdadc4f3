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
  Runner(const StudyOptions& options, const StudyPreset& preset, const StudyCorpus& corpus)
      : o_(options), p_(preset), corpus_(corpus), pool_(static_cast<size_t>(options.threads)) {
    L_ = p_.train.seq_len;
    int64_t max_mult = 1;
    for (int64_t m : p_.eval_multipliers) max_mult = std::max(max_mult, m);
    ends_ = TailWindowEnds(static_cast<int64_t>(corpus_.held_out.size()), L_ * max_mult,
                           p_.tail_windows);
    Json base;
    base["study_format"] = 1;  // bump when the meaning of a unit's results changes
    base["preset"] = p_.name;
    base["seed"] = o_.seed;
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
  }

  // This rank's share of the study (rank r of N runs jobs r, r + N, ...; a job is a pretraining,
  // an extension, or one scaling's chain of fine-tunes). Jobs that start from the RoPE model
  // wait until its unit is finished with this configuration (its DONE marker), which another
  // rank may be writing; the directory is shared.
  void RunShare(int rank, int ranks) {
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
    for (size_t j = static_cast<size_t>(rank); j < jobs.size(); j += static_cast<size_t>(ranks)) {
      jobs[j]();
    }
  }

  StudyResult Run() {
    const auto t0 = Clock::now();
    for (const std::string& enc : p_.encodings) Pretrain(enc);
    if (std::find(p_.encodings.begin(), p_.encodings.end(), "rope") != p_.encodings.end()) {
      for (const std::string& s : p_.scalings) Extend(s);
      for (const std::string& s : p_.finetune_scalings) Finetune(s);
    }
    result_.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return std::move(result_);
  }

  ModelConfig ModelFor(const std::string& encoding) const {
    ModelConfig c = p_.model;
    c.max_position_embeddings = L_;
    PositionEncodingSpec& pe = c.position_encoding;
    pe.kind = ParsePositionEncodingKind(encoding);
    const bool absolute =
        pe.kind == PositionEncodingKind::kSinusoidal || pe.kind == PositionEncodingKind::kLearned;
    // Sec. 3.1 pitfall: embeddings (std 0.02) are scaled by sqrt(d) before an absolute encoding
    // of amplitude ~1 is added (Vaswani et al. sec. 3.4; fairseq).
    pe.embedding_scale = absolute ? EmbeddingScale::kSqrtDim : EmbeddingScale::kNone;
    pe.max_positions = 0;  // learned: 8 L rows (Resolved); rows >= L are never trained
    // T5 (sec. 3.1): 32 buckets, max_distance L (fewer buckets when L is tiny: max_distance must
    // exceed the num_buckets / 2 exact buckets).
    pe.num_buckets = static_cast<int>(std::min<int64_t>(32, L_));
    pe.max_distance = static_cast<int>(L_);
    return c.Resolved();
  }

 private:
  enum class UnitState { kDone, kResume, kFresh };

  void Log(const std::string& line) const {
    if (o_.verbose) std::fprintf(stderr, "%s\n", line.c_str());
  }

  std::string Prefix(const std::string& unit) const {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "[%2d/%d] ", unit_index_, total_units_);
    return buf + unit;
  }

  fs::path UnitDir(const std::string& unit) const { return fs::path(o_.out) / "runs" / unit; }

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
      r.seed = o_.seed;
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
    Json j = base_fingerprint_;
    j["unit"] = unit;
    j["model"] = ModelFingerprint(mc);
    if (tc) j["train"] = TrainFingerprint(*tc);
    if (!extra.empty()) j["extra"] = extra;
    return j.dump(1) + "\n";
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
    tc.data_seed = o_.seed;
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
    const std::string unit = "pretrain-" + enc;
    const ModelConfig mc = ModelFor(enc);
    const TrainConfig tc = PretrainConfig();
    const std::string fp = PretrainFingerprint(enc);
    const UnitState st = Prepare(unit, fp);
    if (st == UnitState::kDone) return Reuse(unit, unit);
    const fs::path dir = UnitDir(unit);
    Model model(mc, o_.seed);
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
    StudyRecord proto;
    proto.encoding = std::string(PositionEncodingKindName(mc.position_encoding.kind));
    proto.scaling = "none";
    Finish(unit, fp, EvaluateUnit(unit, model, proto, {}));
  }

  RopeParams RopeBase() const { return ModelFor("rope").position_encoding.rope; }

  void Extend(const std::string& scaling) {
    const std::string unit = "extend-" + scaling;
    const ModelConfig mc = ModelFor("rope");
    const std::string fp = Fingerprint(unit, mc, nullptr, "no fine-tuning; parent pretrain-rope");
    if (Prepare(unit, fp) == UnitState::kDone) return Reuse(unit, unit);
    Model model = LoadModel((UnitDir("pretrain-rope") / "ckpt").string());
    StudyRecord proto;
    proto.encoding = "rope";
    proto.scaling = scaling;
    const RopeParams base = RopeBase();
    Finish(unit, fp, EvaluateUnit(unit, model, proto, [&](int64_t c) {
             const double s = std::max(1.0, static_cast<double>(c) / static_cast<double>(L_));
             return std::make_pair(ScaledRope(base, scaling, s, L_), s);
           }));
  }

  void Finetune(const std::string& scaling) {
    const double s = scaling == "none" ? 1.0 : static_cast<double>(p_.extension_factor);
    const RopeParams rope = ScaledRope(RopeBase(), scaling, s, L_);
    std::string parent = "pretrain-rope";
    int64_t prev_steps = 0;
    for (int64_t steps : p_.finetune_steps) {
      const std::string unit = "finetune-" + scaling + "-" + std::to_string(steps);
      ModelConfig mc = ModelFor("rope");
      mc.position_encoding.rope = rope;
      mc = mc.Resolved();
      TrainConfig tc = p_.finetune;
      tc.steps = steps;
      tc.data_seed = o_.seed + 7919;
      const std::string fp = Fingerprint(unit, mc, &tc, "fine-tune from " + parent);
      const UnitState st = Prepare(unit, fp);
      const std::string curve = "finetune-" + scaling;
      if (st == UnitState::kDone) {
        Reuse(unit, curve);
      } else {
        const fs::path dir = UnitDir(unit);
        const std::string parent_ckpt = (UnitDir(parent) / "ckpt").string();
        std::unique_ptr<Model> model;
        OptimizerState state;
        std::vector<TrainLogEntry> log;
        if (st == UnitState::kResume) {
          model = std::make_unique<Model>(LoadModel((dir / "ckpt").string()));
          state = LoadOptimizerState((dir / "ckpt").string(), *model);
          log = LogFromJson(ReadFile(dir / "train_log.json"), (dir / "train_log.json").string());
          std::erase_if(log, [&](const TrainLogEntry& e) { return e.step > state.step; });
          Log(Prefix(unit) + ": resuming from step " + std::to_string(state.step));
        } else if (prev_steps == 0) {
          LoadOptions lo;
          lo.rope_override = rope;
          model = std::make_unique<Model>(LoadModel(parent_ckpt, lo));
          Log(Prefix(unit) + ": fine-tuning the RoPE model at " + std::to_string(tc.seq_len) +
              " with scaling " + scaling);
        } else {
          model = std::make_unique<Model>(LoadModel(parent_ckpt));
          state = LoadOptimizerState(parent_ckpt, *model);
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
        Finish(unit, fp, EvaluateUnit(unit, *model, proto, {}));
      }
      parent = unit;
      prev_steps = steps;
    }
  }

  const StudyOptions& o_;
  const StudyPreset& p_;
  const StudyCorpus& corpus_;
  ThreadPool pool_;
  int64_t L_ = 0;
  std::vector<int64_t> ends_;
  Json base_fingerprint_;
  int unit_index_ = 0, total_units_ = 0;
  Clock::time_point unit_start_;  // wall time of this invocation's part of the current unit
  StudyResult result_;
};

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
  std::vector<std::string> finished_before;  // units finished by an earlier invocation
  if (ranks > 1) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fs::path(options.out) / "runs", ec)) {
      if (fs::exists(e.path() / "DONE")) finished_before.push_back(e.path().filename().string());
    }
    barrier();  // --out is locked and clean
    Runner(options, preset, corpus).RunShare(rank, ranks);
    barrier();  // every unit is finished
    if (rank != 0) return {};
    log("study: every rank finished its units; collecting the results");
  }
  // One process: runs the study. Rank 0 of many: finds every unit finished and reads them back
  // (the same records, curves and results as one process).
  Runner runner(options, preset, corpus);
  StudyResult result = runner.Run();
  if (ranks > 1) {  // units the ranks trained just now count as computed, not reused
    std::vector<std::string> reused;
    for (std::string& u : result.reused_units) {
      const bool before =
          std::find(finished_before.begin(), finished_before.end(), u) != finished_before.end();
      (before ? reused : result.trained_units).push_back(std::move(u));
    }
    result.reused_units = std::move(reused);
  }
  const fs::path out(options.out);
  WriteAtomic(out / "results.json", RecordsToJson(result.records));
  WriteAtomic(out / "results.csv", RecordsToCsv(result.records));
  Json curves = Json::array();
  for (const TrainCurve& c : result.curves) {
    curves.push_back({{"name", c.name}, {"loss", c.loss}, {"val_loss", c.val_loss}});
  }
  WriteAtomic(out / "curves.json", curves.dump() + "\n");
  WriteAtomic(out / "report.html",
              ReportHtml(preset, result, runner.ModelFor("rope"), corpus.description));
  return result;
}

}  // namespace ropekit::study
