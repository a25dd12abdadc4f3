// ropekit: the length-extrapolation study. Train short, test long, extend the context.
//
// Protocol (docs/study.md; after Press et al. 2022, arXiv:2108.12409): a byte-level LLaMA-style
// model is trained at context L with each position encoding (learned absolute, sinusoidal, NoPE,
// RoPE, ALiBi, T5 bias) and evaluated on held-out text at 1x, 2x, 4x and 8x L with
//  * the tail protocol (Kazemnejad et al. 2023, App. F): fixed end offsets e_k, windows
//    [e_k - C, e_k) for every evaluation length C, only the last `tail` targets scored, so the
//    same target tokens are scored at every length (primary metric), and
//  * non-overlapping windows (Press et al. 2022): mean loss over every target of each window,
//    plus the per-position loss curve in buckets.
// The RoPE model is then extended to 4x L without fine-tuning (plain extrapolation, position
// interpolation, NTK-aware, dynamic NTK, YaRN, Llama 3.1) and with a short fine-tune at 4x L
// (plain = direct fine-tuning, PI, YaRN, Llama 3.1), evaluated after several step counts.
//
// Every run is a unit with its own directory under <out>/runs/: checkpoint, result records and a
// completion marker written last by an atomic rename. A rerun with the same configuration reuses
// finished units and resumes an interrupted training from its latest checkpoint.
#ifndef ROPEKIT_STUDY_H_
#define ROPEKIT_STUDY_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ropekit/error.h"
#include "ropekit/model.h"
#include "ropekit/thread_pool.h"

namespace ropekit::study {

// ---------------------------------------------------------------------------------------------
// Corpus.

// Inflates a zlib or gzip stream (auto-detected). `what` names the data in error messages.
std::string Inflate(std::string_view compressed, const std::string& what);

// Reads an R serialization in XDR format ("X\n", versions 2 and 3) holding a character vector
// (STRSXP); returns its elements (NA becomes ""). Throws Error for anything else.
std::vector<std::string> ParseRCharacterVector(std::string_view serialized,
                                               const std::string& what);

// An R lazy-load database (Rdata.rdb + Rdata.rdx, as written by R's makeLazyLoadDB): the index is
// a gzip-compressed serialized list whose "variables" element maps each object name to an
// (offset, length) pair into the .rdb; each .rdb entry is a 4-byte big-endian uncompressed length
// followed by a zlib stream of the serialized object. Returns (name, elements) for every
// character-vector object, in index order.
std::vector<std::pair<std::string, std::vector<std::string>>> ReadRLazyLoadDb(
    const std::string& rdb_path, const std::string& rdx_path);

// The six novels of the janeaustenr package as (R object name, file stem), training novels
// first and the held-out one (Persuasion) last. The file stems are those scripts/get_corpus.sh
// writes (e.g. "sense_and_sensibility"), so either tool fills the same cache.
const std::vector<std::pair<std::string, std::string>>& AustenNovels();

// Returns the paths of <data_dir>/austen/<stem>.txt for AustenNovels(), creating them when
// missing: `apt-get download r-cran-janeaustenr` into data_dir, `dpkg-deb -x`, then
// ReadRLazyLoadDb on data/Rdata.rdb (one line per element, joined with '\n'). Files are written
// atomically. `log` (may be empty) receives progress lines.
std::vector<std::string> FetchAustenCorpus(const std::string& data_dir,
                                           const std::function<void(const std::string&)>& log);

struct StudyCorpus {
  std::vector<int32_t> train;     // byte tokens
  std::vector<int32_t> held_out;  // byte tokens
  std::string description;
  uint64_t content_hash = 0;  // FNV-1a of both token streams: identifies the text, not the names
};

// Several files: the last one is held out, the others are concatenated for training. One file:
// its last 10% (by bytes) is held out.
StudyCorpus LoadStudyCorpus(const std::vector<std::string>& paths);

// ---------------------------------------------------------------------------------------------
// Tail protocol windowing.

// End offsets e_k (exclusive end of the scored targets, absolute token indices) of the tail
// protocol: num_windows offsets evenly spaced in [max_context + 1, num_tokens], so that a window
// of max_context inputs fits before each. The window of length C for end e has inputs
// tokens[e - C - 1, e - 1) and targets tokens[e - C, e); its last `tail` targets, tokens
// [e - tail, e), are scored, the same tokens for every C <= max_context.
std::vector<int64_t> TailWindowEnds(int64_t num_tokens, int64_t max_context, int64_t num_windows);

// One tail-protocol window of context C: inputs tokens[input_begin, input_begin + C), targets
// tokens[input_begin + 1, end) (end = input_begin + C + 1), scored targets tokens[scored_begin,
// end) with scored_begin = end - tail.
struct TailWindow {
  int64_t input_begin = 0;
  int64_t scored_begin = 0;
  int64_t end = 0;
};
// The windows of context `context` for the given ends; throws Error when one does not fit in
// [0, num_tokens) or tail is outside [1, context].
std::vector<TailWindow> PlanTailWindows(std::span<const int64_t> ends, int64_t context,
                                        int64_t tail, int64_t num_tokens);

// Mean loss of the tail-protocol targets for context `context` (<= max_context), batched.
double TailLoss(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> ends,
                int64_t context, int64_t tail, int64_t batch, ThreadPool* pool);

// RoFormer's long-term decay bound (Su et al. 2021, sec. 3.4.3): for relative distance r,
// (1 / N) sum_{j=1..N} |S_j| with S_j = sum_{i<j} exp(i r w_i), over the N inverse frequencies w.
std::vector<double> RopeDecayCurve(std::span<const double> inv_freq, int64_t max_distance);

// ---------------------------------------------------------------------------------------------
// Plan and presets.

struct StudyPreset {
  std::string name;
  ModelConfig model;                   // non-position-encoding fields; max_position_embeddings = L
  TrainConfig train;                   // pre-training at seq_len = L
  std::vector<std::string> encodings;  // learned, sinusoidal, none, rope, alibi, t5
  std::vector<int64_t> eval_multipliers;  // e.g. 1, 2, 4, 8
  int64_t tail_windows = 64;              // tail protocol end offsets
  int64_t tail = 64;                      // scored targets per window
  int64_t max_windows = 64;               // non-overlapping windows per length
  int64_t bucket_size = 16;               // per-position curve bucket
  int64_t eval_batch = 4;
  // Context extension (RoPE model).
  int64_t extension_factor = 4;
  std::vector<std::string> scalings;           // evaluated without fine-tuning
  std::vector<std::string> finetune_scalings;  // fine-tuned at extension_factor * L
  TrainConfig finetune;                        // seq_len = extension_factor * L
  std::vector<int64_t> finetune_steps;         // evaluation points, ascending; last = total
  // Experiments that test the study's deviations from the papers (each adds units):
  //  "t5-published": T5 bias with max_distance = L / 4, the ratio of Raffel et al. (128 at
  //                  512) that Press et al. 2022 trained with, beside max_distance = L;
  //  "alibi-heads":  ALiBi with `alibi_heads` heads (slopes 2^-8h/H; Press et al. used 8+);
  //  "pi-cutoff":    position interpolation applied only to the pairs below a frequency
  //                  cut-off: the k highest-frequency pairs keep their frequency, for k = 0
  //                  (PI), 1, 2, 4, ..., N (plain extrapolation); evaluation only.
  std::vector<std::string> experiments;
  int alibi_heads = 8;
  // Fine-tuning methods compared at extension_factor * L for each of `method_scalings` (after
  // LongLoRA, Chen et al. 2023, arXiv:2309.12307, Table 2): "full" (the fine-tune units above,
  // reused), "lora-qv", "lora-all", "lora-plus" (LoRA on every projection plus trainable
  // embeddings and norms) and "qlora" (lora-all on an NF4 base); see MethodLoraConfig. Every
  // method fine-tunes the pretrained RoPE model with the finetune config, the same data order
  // and the same evaluation points; the LoRA methods at lora_lr_multiplier times its lr.
  std::vector<std::string> methods;          // empty: no method comparison
  std::vector<std::string> method_scalings;  // each must be one of finetune_scalings
  int lora_rank = 8;
  double lora_alpha = 16.0;
  double lora_lr_multiplier = 10.0;
  std::string description;
};

// "micro" (test suite, seconds), "quick" (about 10 minutes on 2 cores), "full" (the protocol),
// "paper" (more heads, L = 256, twice the tokens: about an hour on 2 cores, estimated).
StudyPreset GetStudyPreset(std::string_view name);

// The model the study trains with `encoding` (learned, sinusoidal, none, rope, alibi, t5) at the
// preset's training length L.
ModelConfig StudyModel(const StudyPreset& preset, const std::string& encoding);
// The model of a training experiment ("t5-published", "alibi-heads"; see StudyPreset).
ModelConfig StudyExperimentModel(const StudyPreset& preset, const std::string& experiment);

// Position interpolation by s on every pair except the `keep` highest-frequency ones (j < keep),
// which keep their frequency; keep = 0 is PI, keep = N plain RoPE. Attention factor 1.
RopeParams PartialPi(const RopeParams& base, int keep, double s, int64_t train_length);

// The adapter of fine-tuning method `method` ("lora-qv", "lora-all", "lora-plus", "qlora") with
// the preset's rank and alpha, no dropout; throws Error for "full" and unknown names.
LoraConfig MethodLoraConfig(const StudyPreset& preset, const std::string& method);

// RoPE parameters of scaling `scaling` ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
// with factor s for a model trained at `train_length`; `base` is the model's RoPE params.
// s == 1 (and "none") return plain RoPE; dynamic ignores s (its factor is the current length
// over train_length).
RopeParams ScaledRope(const RopeParams& base, std::string_view scaling, double s,
                      int64_t train_length);

// ---------------------------------------------------------------------------------------------
// Results.

struct StudyRecord {
  std::string encoding;       // position encoding of the model
  std::string scaling;        // RoPE scaling ("none" for plain RoPE and other encodings)
  double scaling_factor = 1;  // s used at this evaluation length (dynamic: 0 = by length)
  int64_t finetune_steps = 0;
  int64_t train_length = 0;
  int64_t eval_length = 0;
  double tail_loss = 0;    // primary: same last `tail` targets at every length
  double window_loss = 0;  // non-overlapping full windows
  uint64_t seed = 0;
  int64_t bucket_size = 16;
  std::vector<double> position_loss;  // non-overlapping windows, per bucket of positions
  // An experiment's setting ("" for the main study): "max_distance=<d>" (T5), "heads=<h>"
  // (ALiBi), "pi_keep=<k>" (PI on all but the k highest-frequency pairs).
  std::string variant;
  // An aggregate over seeds (AggregateSeeds) has seeds > 1: the losses above are means over the
  // seeds (seed = the first one), with the sample standard deviations and the half-width of the
  // 95% confidence interval of the mean tail loss (Student's t with seeds - 1 degrees of freedom).
  int64_t seeds = 1;
  double tail_loss_sd = 0;
  double window_loss_sd = 0;
  double tail_loss_ci95 = 0;
  // Fine-tuning records (finetune_steps > 0): the method ("full", "lora-qv", "lora-all",
  // "lora-plus", "qlora"; records written before methods existed read as "full"), its trainable
  // parameters, the bytes of its AdamW state (m and v, float32, as allocated) and the wall time
  // of its fine-tuning units up to this step count (training and evaluation; mean over seeds in
  // an aggregate). The last three are set by the run, not read from the units' records. "" for
  // records without fine-tuning.
  std::string method;
  int64_t trainable_parameters = 0;
  int64_t optimizer_bytes = 0;
  double seconds = 0;
};

// One record per configuration (encoding, scaling, factor, fine-tuning steps, lengths): a
// configuration with one record keeps it; several (one per seed) become their aggregate. Input
// records must be per-seed records (seeds == 1).
std::vector<StudyRecord> AggregateSeeds(const std::vector<StudyRecord>& per_seed);

// Two-sided 95% quantile of Student's t distribution with `dof` >= 1 degrees of freedom.
double StudentT95(int64_t dof);

struct TrainCurve {
  std::string name;                                  // unit name
  std::vector<std::pair<int64_t, double>> loss;      // (step, training loss)
  std::vector<std::pair<int64_t, double>> val_loss;  // (step, validation loss)
};

struct StudyOptions {
  std::string preset = "quick";
  std::vector<std::string> corpus;  // empty: the Austen novels, fetched into data_dir
  std::string data_dir = "data";
  std::string out = "study";
  int threads = 1;
  uint64_t seed = 1;
  // Seeds per configuration: seed, seed + 1, ..., seed + seeds - 1 (the weight initialisation
  // and the data order vary together). The first seed's runs live in <out>/runs/, seed s's in
  // <out>/runs/seed-<s>/, so a single-seed study is the first seed of a larger one.
  int seeds = 1;
  bool verbose = true;  // progress lines on stderr
  // Ranks that share the study (mpirun -np N ropekit study): the units are spread over them,
  // fine-tunes wait for their base model, rank 0 writes the results. nullptr: this process.
  // --out must be a directory every rank sees (one machine, or a shared file system).
  Communicator* comm = nullptr;
};

struct StudyResult {
  std::vector<StudyRecord> records;
  std::vector<TrainCurve> curves;
  std::vector<std::string> reused_units;   // finished units found on disk
  std::vector<std::string> trained_units;  // units run now
  double seconds = 0;                      // this invocation
  double compute_seconds = 0;  // sum of the wall times of every unit, reused ones included
};

// Runs (or resumes) the whole study and writes results.json (every per-seed record, then the
// aggregate records when seeds > 1), results.csv (per-seed records), curves.json (the first
// seed's training curves), study.json (preset, seeds, corpus) and report.html into options.out.
StudyResult RunStudy(const StudyOptions& options);

// Rewrites report.html in `out` from its results.json, curves.json and study.json, without
// training or evaluating anything; returns the study (records and curves) it read.
StudyResult RewriteReport(const std::string& out, StudyPreset* preset);

std::string RecordsToJson(const std::vector<StudyRecord>& records);
std::vector<StudyRecord> RecordsFromJson(std::string_view json, const std::string& name);
std::string RecordsToCsv(const std::vector<StudyRecord>& records);

// Summary tables (plain text) for the terminal, and the same tables in Markdown for the docs
// (`ropekit study --report-only --markdown`), from per-seed records. With several seeds the
// tables show mean ± sd, and a last table the paired differences (same seed) that the study's
// conclusions compare, with 95% confidence intervals (Student's t).
std::string SummaryTables(const StudyPreset& preset, const std::vector<StudyRecord>& records);
std::string MarkdownTables(const StudyPreset& preset, const std::vector<StudyRecord>& records);

// The self-contained report page (inline SVG, no scripts).
std::string ReportHtml(const StudyPreset& preset, const StudyResult& result,
                       const ModelConfig& rope_model, const std::string& corpus_description);

}  // namespace ropekit::study

#endif  // ROPEKIT_STUDY_H_
