// `ropekit train`: trains the LLaMA-style model on byte-tokenised text files, from scratch, from
// a checkpoint (fine-tuning, optionally with a new RoPE scaling) or resuming an interrupted run.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "command.h"
#include "model_cli.h"
#include "ropekit/distributed.h"
#include "ropekit/file.h"
#include "ropekit/json_limits.h"
#include "ropekit/model.h"

namespace ropekit::cli {
namespace {

struct TrainArgs {
  std::vector<std::string> corpus, val_corpus;
  double val_fraction = 0.1;
  std::string out, init;
  bool resume = false, overwrite = false;
  uint64_t seed = 1;
  int threads = 1;
  bool quiet = false;
  int64_t stop_after = 0;
  std::string log_file;
  // Data parallel (under mpirun).
  double comm_timeout = 600.0;
  bool no_overlap = false;
  std::string dist_stats;
  // Model.
  int hidden_size = 128, layers = 4, heads = 4, kv_heads = 2, head_dim = 0;
  int intermediate_size = 352;
  bool untied = false;
  int64_t max_position_embeddings = 0;  // 0 = seq_len
  std::string pe = "rope";
  std::string rope_layout = "neox";
  int rotary_dim = 0;
  std::string embedding_scale;  // default: sqrt_dim for sinusoidal / learned, else none
  int64_t learned_positions = 0;
  std::string out_of_range = "error";
  int t5_buckets = 32, t5_max_distance = 0;  // 0 = seq_len
  double init_std = 0.02;
  double rms_norm_eps = 1e-5;
  RopeOverrideArgs rope;
  // Parameter-efficient fine-tuning (with --init).
  int lora_rank = 0;  // 0 = full fine-tuning
  double lora_alpha = 8.0, lora_dropout = 0.0;
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
  bool lora_train_embeddings = false, lora_train_norms = false, qlora = false;
  int prompt_tuning = 0;  // K virtual tokens (prompt tuning)
  std::string prompt_init_text;
  int prefix_tuning = 0;  // K prefix entries per layer (prefix tuning)
  bool prefix_projection = false;
  int prefix_hidden = 0;
  // Training.
  TrainConfig tc;
  std::string schedule = "cosine";
};

ModelConfig BuildConfig(const TrainArgs& a) {
  ModelConfig c;
  c.hidden_size = a.hidden_size;
  c.num_layers = a.layers;
  c.num_heads = a.heads;
  c.num_kv_heads = a.kv_heads;
  c.head_dim = a.head_dim;
  c.intermediate_size = a.intermediate_size;
  c.tie_word_embeddings = !a.untied;
  c.rms_norm_eps = a.rms_norm_eps;
  c.init_std = a.init_std;
  c.max_position_embeddings =
      a.max_position_embeddings > 0 ? a.max_position_embeddings : a.tc.seq_len;
  PositionEncodingSpec& pe = c.position_encoding;
  pe.kind = ParsePositionEncodingKind(a.pe);
  pe.rope.rotary_dim = a.rotary_dim;
  pe.rope_layout = ParseLayout(a.rope_layout);
  const bool absolute =
      pe.kind == PositionEncodingKind::kSinusoidal || pe.kind == PositionEncodingKind::kLearned;
  pe.embedding_scale = ParseEmbeddingScale(
      a.embedding_scale.empty() ? (absolute ? "sqrt_dim" : "none") : a.embedding_scale);
  pe.max_positions = a.learned_positions;
  pe.out_of_range = ParseOutOfRange(a.out_of_range);
  pe.num_buckets = a.t5_buckets;
  pe.max_distance = a.t5_max_distance > 0 ? a.t5_max_distance : static_cast<int>(a.tc.seq_len);
  pe.init_std = a.init_std;
  c = c.Resolved();
  if (auto r = RopeOverride(c, a.rope)) c.position_encoding.rope = *r;
  return c.Resolved();
}

// Keeps the complete lines of a previous run's --log whose step is at most `step` (the resumed
// checkpoint's), so that the resumed run continues it without duplicate or missing steps.
void TrimLog(const std::string& path, int64_t step) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return;
  const std::string text = ReadFileToString(path);
  std::string kept;
  int64_t expect = 1;
  size_t begin = 0;
  for (size_t end; (end = text.find('\n', begin)) != std::string::npos; begin = end + 1) {
    const std::string line = text.substr(begin, end - begin);
    int64_t s = 0;
    try {
      CheckJsonLimits(line, "--log " + path);
      s = nlohmann::json::parse(line).at("step").get<int64_t>();
    } catch (const std::exception&) {
      break;  // a line cut by a crash, or not ours: keep what came before it
    }
    if (s != expect || s > step) break;
    kept += line + "\n";
    ++expect;
  }
  WriteFileAtomic(path, kept);
}

// Per-rank data-parallel measurements as JSON (rank 0 writes it; every rank takes part).
void WriteDistStats(Communicator& comm, const DataParallelStats& st, const std::string& path) {
  constexpr int kFields = 10;
  const int N = comm.size();
  std::vector<double> all(static_cast<size_t>(kFields) * N);
  const double mine[kFields] = {st.step_s,
                                st.compute_s,
                                st.reduce_post_s,
                                st.reduce_wait_s,
                                st.reduce_after_last_backward_s,
                                st.optimizer_s,
                                st.allgather_s,
                                static_cast<double>(st.grad_floats_sent),
                                static_cast<double>(st.optimizer_floats),
                                static_cast<double>(st.optimizer_floats_unsharded)};
  std::copy(mine, mine + kFields, all.begin() + kFields * comm.rank());
  std::vector<int64_t> offsets(N + 1);
  for (int r = 0; r <= N; ++r) offsets[r] = int64_t{kFields} * r;
  comm.AllGather(std::span<double>(all), offsets);
  if (comm.rank() != 0) return;
  const char* names[kFields] = {"step_s",
                                "compute_s",
                                "reduce_post_s",
                                "reduce_wait_s",
                                "reduce_after_last_backward_s",
                                "optimizer_s",
                                "allgather_s",
                                "grad_floats_sent",
                                "optimizer_floats",
                                "optimizer_floats_unsharded"};
  std::string json =
      "{\"ranks\": " + std::to_string(N) + ", \"steps\": " + std::to_string(st.steps);
  for (int f = 0; f < kFields; ++f) {
    json += std::string(", \"") + names[f] + "\": [";
    for (int r = 0; r < N; ++r) {
      char num[64];
      std::snprintf(num, sizeof(num), "%s%.17g", r ? ", " : "", all[kFields * r + f]);
      json += num;
    }
    json += "]";
  }
  WriteFileAtomic(path, json + "}\n");
}

int RunTrainOn(Communicator& comm, TrainArgs& a, CLI::App* sub);

int RunTrain(TrainArgs& a, CLI::App* sub) {
  CommunicatorOptions co;
  co.timeout_s = a.comm_timeout;
  std::unique_ptr<Communicator> world = ConnectRanks(nullptr, nullptr, co);
  if (!world) return RunTrainOn(SingleProcess(), a, sub);
  try {
    return RunTrainOn(*world, a, sub);
  } catch (const std::exception& e) {
    world->Abort(e.what());  // stops the other ranks too; does not return
  }
  return 1;
}

// The LoRA options given on the command line (nullopt without --lora-rank); checks that they
// come with --init and not with --resume.
std::optional<LoraConfig> LoraFromArgs(const TrainArgs& a, CLI::App* sub) {
  const char* others[] = {"--lora-alpha",       "--lora-dropout",
                          "--lora-targets",     "--lora-train-embeddings",
                          "--lora-train-norms", "--qlora"};
  const bool lora = sub->count("--lora-rank") > 0;
  const bool prompt = sub->count("--prompt-tuning") > 0;
  const bool prefix = sub->count("--prefix-tuning") > 0;
  if (sub->count("--prompt-tuning-init-text") > 0 && !prompt) {
    throw Error("--prompt-tuning-init-text: needs --prompt-tuning");
  }
  if (sub->count("--prefix-projection") > 0 && !prefix) {
    throw Error("--prefix-projection: needs --prefix-tuning");
  }
  if (sub->count("--prefix-hidden") > 0 && !a.prefix_projection) {
    throw Error("--prefix-hidden: needs --prefix-projection");
  }
  if (int(lora) + int(prompt) + int(prefix) > 1) {
    throw Error("--lora-rank, --prompt-tuning and --prefix-tuning cannot be combined");
  }
  if (!lora) {
    for (const char* o : others) {
      if (sub->count(o) > 0) throw Error(std::string(o) + ": needs --lora-rank");
    }
    if (!prompt && !prefix) return std::nullopt;
  }
  const char* option = lora ? "--lora-rank" : prompt ? "--prompt-tuning" : "--prefix-tuning";
  if (a.resume) {
    throw Error(std::string(option) +
                ": --resume continues the adapter saved in --out with its own config; omit the "
                "adapter options");
  }
  if (a.init.empty()) {
    throw Error(std::string(option) +
                ": parameter-efficient fine-tuning adapts an existing model; give its "
                "checkpoint with --init");
  }
  std::error_code ec;
  if (std::filesystem::exists(a.out, ec) && std::filesystem::equivalent(a.out, a.init, ec)) {
    throw Error("--out " + a.out +
                " is the --init checkpoint; the adapter needs its own directory "
                "(the base checkpoint is never modified)");
  }
  LoraConfig c;
  c.base_model = std::filesystem::absolute(a.init).lexically_normal().string();
  if (prompt) {
    if (sub->count("--prompt-tuning-init-text") > 0 && a.prompt_init_text.empty()) {
      throw Error("--prompt-tuning-init-text: the text is empty (omit the option for RANDOM)");
    }
    c.type = PeftType::kPromptTuning;
    c.num_virtual_tokens = a.prompt_tuning;
    c.prompt_init_text = a.prompt_init_text;
    return c;
  }
  if (prefix) {
    if (sub->count("--prefix-hidden") > 0 && a.prefix_hidden < 1) {
      throw Error("--prefix-hidden " + std::to_string(a.prefix_hidden) +
                  " (encoder_hidden_size) is outside [1, 65536]");
    }
    c.type = PeftType::kPrefixTuning;
    c.num_virtual_tokens = a.prefix_tuning;
    c.prefix_projection = a.prefix_projection;
    c.prefix_hidden = a.prefix_hidden;
    return c;
  }
  c.rank = a.lora_rank;
  c.alpha = a.lora_alpha;
  c.dropout = a.lora_dropout;
  c.target_modules = a.lora_targets;
  c.train_embeddings = a.lora_train_embeddings;
  c.train_norms = a.lora_train_norms;
  c.qlora = a.qlora;
  c.base_model = std::filesystem::absolute(a.init).lexically_normal().string();
  return c;
}

// Checks the options that need no file and sets the schedule and progress of a.tc.
void CheckTrainArgs(TrainArgs& a) {
  if (a.resume && a.overwrite) throw Error("--resume and --overwrite cannot be combined");
  if (!(a.val_fraction >= 0.0 && a.val_fraction < 1.0)) {
    throw Error("--val-fraction " + std::to_string(a.val_fraction) + " must be in [0, 1)");
  }
  a.tc.schedule = a.schedule == "cosine"     ? LrSchedule::kCosine
                  : a.schedule == "constant" ? LrSchedule::kConstant
                                             : throw Error("--schedule must be cosine or constant");
  a.tc.checkpoint_dir = a.out;
  a.tc.progress = !a.quiet;
}

// A fresh run's output: a checkpoint or a non-empty --log already there is replaced only with
// --overwrite.
void ClaimOutput(const TrainArgs& a) {
  std::optional<int64_t> existing;
  try {
    existing = FindCheckpoint(a.out);
  } catch (const Error& e) {
    existing = -1;  // something unreadable is there: still not ours to replace silently
  }
  if (existing && !a.overwrite) {
    throw Error("--out " + a.out + " already holds a checkpoint" +
                (*existing > 0 ? " (step " + std::to_string(*existing) + ")" : std::string()) +
                "; pass --resume to continue it or --overwrite to replace it");
  }
  std::error_code ec;
  if (!a.log_file.empty() && std::filesystem::exists(a.log_file, ec) &&
      std::filesystem::file_size(a.log_file, ec) > 0 && !a.overwrite) {
    throw Error("--log " + a.log_file +
                " already exists; pass --overwrite to replace it or --resume to continue the "
                "run it logs");
  }
  if (existing) RemoveCheckpoint(a.out);
}

// The run saved in --out, with the options given on this command line replacing saved values
// (the saved schedule is kept otherwise); nullptr when it has already reached --steps.
std::unique_ptr<Model> ResumeRun(TrainArgs& a, CLI::App* sub, bool lead, OptimizerState& state) {
  if (!a.init.empty()) throw Error("--resume and --init cannot be combined");
  if (!FindCheckpoint(a.out)) throw Error("--resume: " + a.out + " holds no checkpoint");
  TrainingCheckpoint ck = LoadCheckpoint(a.out);
  auto model = std::make_unique<Model>(std::move(ck.model));
  state = std::move(ck.optimizer);
  const TrainConfig& saved = ck.train_config;
  auto keep = [&](const char* flag, auto& field, const auto& saved_value) {
    if (sub->count(flag) == 0) field = saved_value;
  };
  keep("--steps", a.tc.steps, saved.steps);
  keep("--batch-size", a.tc.batch_size, saved.batch_size);
  keep("--seq-len", a.tc.seq_len, saved.seq_len);
  keep("--grad-accum", a.tc.grad_accum, saved.grad_accum);
  keep("--lr", a.tc.lr, saved.lr);
  keep("--min-lr", a.tc.min_lr, saved.min_lr);
  keep("--warmup", a.tc.warmup_steps, saved.warmup_steps);
  keep("--schedule", a.tc.schedule, saved.schedule);
  keep("--beta1", a.tc.beta1, saved.beta1);
  keep("--beta2", a.tc.beta2, saved.beta2);
  keep("--adam-eps", a.tc.eps, saved.eps);
  keep("--weight-decay", a.tc.weight_decay, saved.weight_decay);
  keep("--grad-clip", a.tc.grad_clip, saved.grad_clip);
  keep("--data-seed", a.tc.data_seed, saved.data_seed);
  keep("--eval-interval", a.tc.eval_interval, saved.eval_interval);
  keep("--eval-batches", a.tc.eval_batches, saved.eval_batches);
  keep("--checkpoint-interval", a.tc.checkpoint_interval, saved.checkpoint_interval);
  keep("--bf16", a.tc.bf16, saved.bf16);
  if (!a.log_file.empty() && lead) TrimLog(a.log_file, state.step);
  if (state.step >= a.tc.steps) {
    std::fprintf(stderr, "checkpoint %s is at step %lld of %lld: nothing to do\n", a.out.c_str(),
                 static_cast<long long>(state.step), static_cast<long long>(a.tc.steps));
    return nullptr;
  }
  return model;
}

// The model of a new run: --init's weights (with the RoPE override and an adapter), or a fresh
// one built from the architecture options.
std::unique_ptr<Model> NewRunModel(const TrainArgs& a, const std::optional<LoraConfig>& lora) {
  if (a.init.empty()) return std::make_unique<Model>(BuildConfig(a), a.seed);
  LoadOptions lo;
  const std::string cfg_path = (std::filesystem::path(a.init) / "config.json").string();
  lo.rope_override = RopeOverride(ModelConfigFromJson(ReadTextFiles({cfg_path}), cfg_path), a.rope);
  auto model = std::make_unique<Model>(LoadModel(a.init, lo));
  if (lora) {
    if (a.tc.bf16) {
      throw Error(
          "--bf16 cannot be combined with --lora-rank / --qlora / --prompt-tuning / "
          "--prefix-tuning");
    }
    lora->Validate(model->config());
    model->AddLora(*lora, a.seed);
  }
  return model;
}

// The training and validation tokens: --val-corpus, else the last --val-fraction of --corpus.
struct Corpus {
  std::vector<int32_t> train, val;
};

Corpus ReadCorpus(const TrainArgs& a) {
  if (a.corpus.empty()) throw Error("--corpus: at least one text file is required");
  ByteTokenizer tok;
  Corpus c;
  c.train = tok.Encode(ReadTextFiles(a.corpus));
  if (!a.val_corpus.empty()) {
    c.val = tok.Encode(ReadTextFiles(a.val_corpus));
  } else if (a.val_fraction > 0) {
    const size_t cut =
        c.train.size() - static_cast<size_t>(static_cast<double>(c.train.size()) * a.val_fraction);
    c.val.assign(c.train.begin() + static_cast<int64_t>(cut), c.train.end());
    c.train.resize(cut);
  }
  if (static_cast<int64_t>(c.train.size()) < a.tc.seq_len + 1) {
    throw Error("--corpus: " + std::to_string(c.train.size()) +
                " training bytes, fewer than --seq-len + 1 = " + std::to_string(a.tc.seq_len + 1));
  }
  if (!c.val.empty() && static_cast<int64_t>(c.val.size()) < a.tc.seq_len + 1) {
    throw Error("validation text: " + std::to_string(c.val.size()) +
                " bytes, fewer than --seq-len + 1 = " + std::to_string(a.tc.seq_len + 1) +
                " (use a larger --val-fraction or --val-corpus)");
  }
  return c;
}

// The model, data and adapter line printed before training.
void PrintRunSummary(const Model& model, const Corpus& corpus, const TrainConfig& tc) {
  const ModelConfig& c = model.config();
  std::fprintf(
      stderr,
      "model: d=%d layers=%d heads=%d kv_heads=%d head_dim=%d ffn=%d pe=%s, %lld "
      "parameters; %zu training / %zu validation bytes; %lld tokens per step\n",
      c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
      std::string(PositionEncodingKindName(c.position_encoding.kind)).c_str(),
      static_cast<long long>(model.num_parameters()), corpus.train.size(), corpus.val.size(),
      static_cast<long long>(tc.batch_size * tc.seq_len * tc.grad_accum));
  if (tc.bf16) std::fprintf(stderr, "%s\n", Bf16MatmulSupport().c_str());
  const LoraConfig* lc = model.lora_config();
  if (lc && lc->type == PeftType::kPromptTuning) {
    std::fprintf(stderr, "prompt tuning: %d virtual tokens (%s), %zu trainable parameters\n",
                 lc->num_virtual_tokens, lc->prompt_init_text.empty() ? "RANDOM" : "TEXT",
                 model.trainable_parameters().size());
  } else if (lc && lc->type == PeftType::kPrefixTuning) {
    std::fprintf(stderr, "prefix tuning: %d prefix entries per layer%s, %zu trainable parameters\n",
                 lc->num_virtual_tokens, lc->prefix_projection ? " (through the MLP)" : "",
                 model.trainable_parameters().size());
  } else if (lc) {
    std::fprintf(stderr,
                 "%s: r=%d alpha=%g dropout=%g, %zu trainable parameters; frozen projections "
                 "%.3f bits per parameter\n",
                 lc->qlora ? "QLoRA" : "LoRA", lc->rank, lc->alpha, lc->dropout,
                 model.trainable_parameters().size(),
                 8.0 * static_cast<double>(model.projection_bytes()) /
                     static_cast<double>(model.projection_parameters()));
  }
}

// One --log line: {"step", "loss", "lr", "grad_norm"[, "val_loss"]}.
void WriteLogLine(std::ofstream& out, const TrainLogEntry& e) {
  char line[256];
  std::snprintf(line, sizeof(line),
                "{\"step\": %lld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g",
                static_cast<long long>(e.step), e.loss, e.lr, e.grad_norm);
  out << line;
  if (e.val_loss >= 0) {
    std::snprintf(line, sizeof(line), ", \"val_loss\": %.9g", e.val_loss);
    out << line;
  }
  out << "}\n" << std::flush;
}

// The data-parallel line and the final losses printed after training.
void PrintRunEnd(Communicator& comm, const DataParallelStats& stats,
                 const std::vector<TrainLogEntry>& log, const TrainArgs& a) {
  if (comm.rank() != 0) return;
  if (comm.size() > 1 && !a.quiet) {
    std::fprintf(stderr,
                 "data parallel: %d ranks; AdamW moments per rank %.3f MiB (one process: %.3f "
                 "MiB); rank 0: compute %.3f s, waiting for gradients %.3f s, all-gather %.3f s "
                 "of %.3f s\n",
                 comm.size(), stats.optimizer_floats * 4.0 / (1 << 20),
                 stats.optimizer_floats_unsharded * 4.0 / (1 << 20), stats.compute_s,
                 stats.reduce_wait_s, stats.allgather_s, stats.step_s);
  }
  if (log.empty()) return;
  std::printf("final step %lld  train loss %.4f", static_cast<long long>(log.back().step),
              log.back().loss);
  if (log.back().val_loss >= 0) std::printf("  val loss %.4f", log.back().val_loss);
  std::printf("\ncheckpoint: %s\n", a.out.c_str());
}

int RunTrainOn(Communicator& comm, TrainArgs& a, CLI::App* sub) {
  const bool lead = comm.rank() == 0;  // prints, writes the log and the checkpoints
  if (!lead) a.quiet = true;
  if (a.out.empty()) throw Error("--out: a checkpoint directory is required");
  const std::optional<LoraConfig> lora = LoraFromArgs(a, sub);
  CheckTrainArgs(a);
  auto pool = MakePool(a.threads);

  // The output directory: writable, ours alone for the run, cleared of what killed runs left.
  // Rank 0 owns it (an error there stops every rank); the others only read a resumed checkpoint.
  std::optional<DirectoryLock> lock;
  if (lead) {
    CheckDirectoryWritable(a.out, "--out");
    lock.emplace(a.out, "--out");
    CleanCheckpointDirectory(a.out);
    if (!a.resume) ClaimOutput(a);
  }
  OptimizerState state;
  std::unique_ptr<Model> model = a.resume ? ResumeRun(a, sub, lead, state) : NewRunModel(a, lora);
  if (!model) return 0;  // resumed at its last step already
  a.tc.Validate();
  const Corpus corpus = ReadCorpus(a);
  if (!a.quiet) PrintRunSummary(*model, corpus, a.tc);
  struct Stop {};
  std::vector<TrainLogEntry> log;
  std::ofstream log_out;
  if (!a.log_file.empty() && lead) {
    log_out.open(a.log_file, a.resume ? std::ios::app : std::ios::trunc);  // checked above
    if (!log_out) throw Error("--log " + a.log_file + ": cannot open the file for writing");
  }
  DataParallelStats stats;
  DataParallelOptions dp;
  dp.comm = &comm;
  dp.overlap = !a.no_overlap;
  dp.stats = &stats;
  try {
    log = Train(
        *model, state, a.tc, corpus.train, corpus.val, pool.get(),
        [&](const TrainLogEntry& e) {
          log.push_back(e);
          if (log_out.is_open()) WriteLogLine(log_out, e);
          if (a.stop_after > 0 && e.step >= a.stop_after) throw Stop{};
        },
        dp);
  } catch (const Stop&) {
    if (lead) {
      std::fprintf(stderr, "stopped after step %lld (--stop-after)\n",
                   static_cast<long long>(state.step));
    }
    return 0;
  }
  if (!a.dist_stats.empty()) WriteDistStats(comm, stats, a.dist_stats);
  PrintRunEnd(comm, stats, log, a);
  return 0;
}

// Input, output, resume and logging.
void AddRunOptions(CLI::App* sub, TrainArgs* a) {
  sub->add_option("--corpus", a->corpus, "Training text files (UTF-8 or any bytes)")
      ->check(CLI::ExistingFile);
  sub->add_option("--val-corpus", a->val_corpus,
                  "Validation text files (default: the last --val-fraction of --corpus)")
      ->check(CLI::ExistingFile);
  sub->add_option("--val-fraction", a->val_fraction,
                  "Fraction of the corpus held out for validation when no --val-corpus")
      ->capture_default_str();
  sub->add_option("--out", a->out,
                  "Checkpoint directory (config.json, model.safetensors, optimizer state)")
      ->required();
  sub->add_option("--init", a->init,
                  "Start from this checkpoint's weights (fine-tuning; fresh optimizer); the "
                  "architecture options are then ignored, --rope-scaling still applies");
  sub->add_flag("--resume", a->resume,
                "Continue the run saved in --out (weights, AdamW moments, step, schedule) bit "
                "for bit; options given explicitly replace the saved ones");
  sub->add_flag("--overwrite", a->overwrite,
                "Replace a checkpoint already in --out and an existing --log (without it, "
                "train refuses to touch them)");
  sub->add_option("--seed", a->seed, "Weight initialisation seed")->capture_default_str();
  sub->add_option("--threads", a->threads, "Worker threads (0 = all cores)")->capture_default_str();
  sub->add_flag("--quiet", a->quiet, "No progress lines");
  sub->add_option("--log", a->log_file,
                  "Write one JSON line per step (step, loss, lr, grad_norm, val_loss when "
                  "validated); appended to with --resume");
  sub->add_option("--stop-after", a->stop_after,
                  "Stop after this step as if interrupted (the schedule still follows "
                  "--steps); the checkpoint saved at a --checkpoint-interval step can then "
                  "be continued with --resume");
}

// Data-parallel runs (mpirun).
void AddDataParallelOptions(CLI::App* sub, TrainArgs* a) {
  auto* d = "Data parallel (mpirun -np N ropekit train ...)";
  sub->add_option("--comm-timeout", a->comm_timeout,
                  "Seconds a rank waits for another before stopping all ranks with an error "
                  "naming it")
      ->group(d)
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_flag("--no-overlap", a->no_overlap,
                "Reduce gradients only after the whole backward (to measure the overlap)")
      ->group(d);
  sub->add_option("--dist-stats", a->dist_stats,
                  "Write per-rank timings and sizes (compute, communication, optimizer "
                  "state) as JSON")
      ->group(d);
}

// The architecture of a new run.
void AddModelOptions(CLI::App* sub, TrainArgs* a) {
  auto* m = "Model (new runs)";
  sub->add_option("--hidden-size", a->hidden_size, "d")->group(m)->capture_default_str();
  sub->add_option("--layers", a->layers, "Transformer layers")->group(m)->capture_default_str();
  sub->add_option("--heads", a->heads, "Query heads")->group(m)->capture_default_str();
  sub->add_option("--kv-heads", a->kv_heads, "Key/value heads (divides --heads; 1 = MQA)")
      ->group(m)
      ->capture_default_str();
  sub->add_option("--head-dim", a->head_dim, "Head dimension (0 = hidden / heads)")
      ->group(m)
      ->capture_default_str();
  sub->add_option("--intermediate-size", a->intermediate_size, "SwiGLU hidden width")
      ->group(m)
      ->capture_default_str();
  sub->add_flag("--untied", a->untied, "Separate output head (default: tied to embeddings)")
      ->group(m);
  sub->add_option("--max-position-embeddings", a->max_position_embeddings,
                  "Recorded training context (0 = --seq-len); dynamic RoPE's threshold")
      ->group(m);
  sub->add_option("--rms-norm-eps", a->rms_norm_eps, "RMSNorm epsilon")
      ->group(m)
      ->capture_default_str();
  sub->add_option("--init-std", a->init_std, "Weight init std (out projections / sqrt(2L))")
      ->group(m)
      ->capture_default_str();
}

// The position encoding of a new run.
void AddPositionEncodingOptions(CLI::App* sub, TrainArgs* a) {
  auto* p = "Position encoding (new runs)";
  sub->add_option("--pe", a->pe, "rope, none (nope), sinusoidal, learned, alibi, t5")
      ->group(p)
      ->capture_default_str();
  sub->add_option("--rope-layout", a->rope_layout, "neox (half split) or gptj (interleaved)")
      ->group(p)
      ->capture_default_str();
  sub->add_option("--rotary-dim", a->rotary_dim, "Rotated channels per head (0 = head_dim)")
      ->group(p);
  sub->add_option("--embedding-scale", a->embedding_scale,
                  "none or sqrt_dim (default sqrt_dim for sinusoidal/learned)")
      ->group(p);
  sub->add_option("--learned-positions", a->learned_positions,
                  "Rows of the learned table (0 = 8 * max_position_embeddings)")
      ->group(p);
  sub->add_option("--out-of-range", a->out_of_range, "Learned table past its end: error or clamp")
      ->group(p)
      ->capture_default_str();
  sub->add_option("--t5-buckets", a->t5_buckets, "T5 relative buckets")
      ->group(p)
      ->capture_default_str();
  sub->add_option("--t5-max-distance", a->t5_max_distance, "T5 max distance (0 = --seq-len)")
      ->group(p);
  AddRopeOverrideOptions(sub, a->rope);
}

// LoRA, QLoRA, prompt and prefix tuning.
void AddPeftOptions(CLI::App* sub, TrainArgs* a) {
  auto* f = "Parameter-efficient fine-tuning (with --init; --out receives a PEFT adapter)";
  sub->add_option("--lora-rank", a->lora_rank,
                  "LoRA rank r: freeze --init and train a LoRA adapter (Hu et al. 2021)")
      ->group(f);
  sub->add_option("--lora-alpha", a->lora_alpha, "LoRA alpha (scaling alpha / r)")
      ->group(f)
      ->capture_default_str();
  sub->add_option("--lora-dropout", a->lora_dropout, "Dropout on the LoRA input, in [0, 1)")
      ->group(f)
      ->capture_default_str();
  sub->add_option("--lora-targets", a->lora_targets,
                  "Adapted projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
      ->group(f)
      ->delimiter(',')
      ->capture_default_str();
  sub->add_flag("--lora-train-embeddings", a->lora_train_embeddings,
                "Also train the token embeddings (LongLoRA's LoRA+)")
      ->group(f);
  sub->add_flag("--lora-train-norms", a->lora_train_norms,
                "Also train the RMSNorm gains (LongLoRA's LoRA+)")
      ->group(f);
  sub->add_flag("--qlora", a->qlora,
                "QLoRA: keep the frozen projections as NF4 with double-quantized scales "
                "(Dettmers et al. 2023), dequantized inside every product")
      ->group(f);
  sub->add_option("--prompt-tuning", a->prompt_tuning,
                  "Prompt tuning: freeze --init and train K virtual token embeddings "
                  "prepended to the input (Lester et al. 2021)")
      ->group(f);
  sub->add_option("--prompt-tuning-init-text", a->prompt_init_text,
                  "With --prompt-tuning: initialise the virtual tokens from the embeddings of "
                  "this text's bytes, repeated or cut to K (PEFT's TEXT init; default RANDOM)")
      ->group(f);
  sub->add_option("--prefix-tuning", a->prefix_tuning,
                  "Prefix tuning: freeze --init and train K key / value prefix entries per "
                  "layer (Li & Liang 2021; P-Tuning v2)")
      ->group(f);
  sub->add_flag("--prefix-projection", a->prefix_projection,
                "With --prefix-tuning: train through PEFT's reparameterisation MLP "
                "(Embedding -> Linear -> tanh -> Linear); its output is saved")
      ->group(f);
  sub->add_option("--prefix-hidden", a->prefix_hidden,
                  "With --prefix-projection: the MLP's hidden size (default: the KV width)")
      ->group(f);
}

// Optimizer, schedule, batches, validation and checkpoints.
void AddTrainingOptions(CLI::App* sub, TrainArgs* a) {
  auto* t = "Training";
  sub->add_option("--steps", a->tc.steps, "Optimizer steps")->group(t)->capture_default_str();
  sub->add_option("--batch-size", a->tc.batch_size, "Sequences per micro-batch")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--seq-len", a->tc.seq_len, "Tokens per training sequence (context)")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--grad-accum", a->tc.grad_accum, "Micro-batches per step")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--lr", a->tc.lr, "Peak learning rate")->group(t)->capture_default_str();
  sub->add_option("--min-lr", a->tc.min_lr, "Final cosine learning rate")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--warmup", a->tc.warmup_steps, "Linear warmup steps")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--schedule", a->schedule, "cosine or constant")->group(t)->capture_default_str();
  sub->add_option("--beta1", a->tc.beta1, "AdamW beta1")->group(t)->capture_default_str();
  sub->add_option("--beta2", a->tc.beta2, "AdamW beta2")->group(t)->capture_default_str();
  sub->add_option("--adam-eps", a->tc.eps, "AdamW epsilon")->group(t)->capture_default_str();
  sub->add_option("--weight-decay", a->tc.weight_decay, "Decoupled decay (matrices only)")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--grad-clip", a->tc.grad_clip, "Global gradient norm clip (0 = off)")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--data-seed", a->tc.data_seed, "Seed of the random crops")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--eval-interval", a->tc.eval_interval, "Validate every N steps (0 = never)")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--eval-batches", a->tc.eval_batches,
                  "Validation windows = eval-batches * batch-size (fixed offsets)")
      ->group(t)
      ->capture_default_str();
  sub->add_option("--checkpoint-interval", a->tc.checkpoint_interval,
                  "Save every N steps (0 = at the end only)")
      ->group(t)
      ->capture_default_str();
  sub->add_flag("--bf16", a->tc.bf16,
                "Mixed precision: bfloat16 matmul operands, float32 accumulation and "
                "master weights. Faster than float32 on CPUs with AVX512-BF16; elsewhere "
                "the products fall back to float32 sgemm on the rounded operands (same "
                "numerics, no speed-up). Here: " +
                    Bf16MatmulSupport())
      ->group(t);
  sub->add_option("--log-interval", a->tc.log_interval, "Progress line every N steps")
      ->group(t)
      ->capture_default_str();
}

const CommandRegistration kTrain{
    "train", "Train the LLaMA-style byte-level model (any position encoding) on text files",
    [](CLI::App* sub) -> std::function<int()> {
      auto a = std::make_shared<TrainArgs>();
      AddRunOptions(sub, a.get());
      AddDataParallelOptions(sub, a.get());
      AddModelOptions(sub, a.get());
      AddPositionEncodingOptions(sub, a.get());
      AddPeftOptions(sub, a.get());
      AddTrainingOptions(sub, a.get());
      return [a, sub] { return RunTrain(*a, sub); };
    }};

}  // namespace
}  // namespace ropekit::cli
