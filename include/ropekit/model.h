// ropekit: a small LLaMA-architecture language model built on ropekit's own ops, with every
// position encoding of ropekit/position_encoding.h, hand-written backward passes, AdamW training,
// KV-cache generation and Hugging Face-compatible checkpoints.
//
// Architecture (Touvron et al. 2023, "LLaMA"): token embedding -> L x [pre-norm RMSNorm ->
// attention (q/k/v/o projections, causal, grouped KV heads, position encoding hooks) + residual
// -> RMSNorm -> SwiGLU MLP + residual] -> RMSNorm -> output head (tied or untied). No biases.
//
// Dimension legend: V = vocab, d = hidden_size, H = num_heads, Hkv = num_kv_heads,
// D = head_dim, F = intermediate_size, L = num_layers, B = batch, T = tokens per sequence.
//
// Threading: every entry point takes a ThreadPool* (nullptr = calling thread). Work is split in
// fixed tiles, so losses, gradients and generated text are bitwise identical for any thread
// count and any run with the same seed. A Model is not safe for concurrent calls (it owns its
// activation workspace).
#ifndef ROPEKIT_MODEL_H_
#define ROPEKIT_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ropekit/distributed.h"
#include "ropekit/error.h"
#include "ropekit/position_encoding.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit {

// ---------------------------------------------------------------------------------------------
// Tokenizer.

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual int vocab_size() const = 0;
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // Throws Error for ids outside [0, vocab_size).
  virtual std::string Decode(std::span<const int32_t> ids) const = 0;
};

// Byte-level: one token per byte (vocab 256), lossless for any input, UTF-8 or not.
class ByteTokenizer : public Tokenizer {
 public:
  int vocab_size() const override { return 256; }
  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string Decode(std::span<const int32_t> ids) const override;
};

// ---------------------------------------------------------------------------------------------
// Configuration.

struct ModelConfig {
  int vocab_size = 256;         // V
  int hidden_size = 128;        // d
  int num_layers = 4;           // L
  int num_heads = 4;            // H
  int num_kv_heads = 2;         // Hkv, divides H (1 = MQA, H = MHA)
  int head_dim = 0;             // D; 0 = hidden_size / num_heads
  int intermediate_size = 352;  // F
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = true;
  int64_t max_position_embeddings = 128;  // the training context length
  double init_std = 0.02;  // matrices ~ N(0, std); o_proj / down_proj scaled by 1/sqrt(2L)
  // The position encoding. Model-derived fields (dim, num_heads, rope.head_dim and, when 0,
  // rope.rotary_dim, max_positions of a learned table = 8 * max_position_embeddings) are filled
  // in by Resolved(). Default: RoPE, base 10000, half-split layout, exact numerics.
  PositionEncodingSpec position_encoding = DefaultPositionEncoding();

  static PositionEncodingSpec DefaultPositionEncoding();
  // A copy with the derived fields filled in; validates (throws Error naming the field).
  ModelConfig Resolved() const;
  int resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden_size / num_heads; }
};

// config.json text with Hugging Face LlamaForCausalLM keys (architectures, model_type "llama",
// hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
// num_hidden_layers, rms_norm_eps, rope_theta, rope_scaling, partial_rotary_factor,
// max_position_embeddings, vocab_size, tie_word_embeddings) plus a "ropekit" object with the
// position encoding kind and its non-RoPE fields.
std::string ModelConfigToJson(const ModelConfig& config);
// Parses it back; `name` (a file name) is used in error messages.
ModelConfig ModelConfigFromJson(std::string_view json_text, const std::string& name);

// ---------------------------------------------------------------------------------------------
// Model.

struct TensorInfo {
  std::string name;            // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // [out, in] for matrices
  int64_t offset = 0;          // in floats, into the flat parameter buffer (16-float aligned)
  int64_t size = 0;            // elements
  bool weight_decay = false;   // true for matrices (AdamW decays only these)
};

// ---------------------------------------------------------------------------------------------
// Parameter-efficient fine-tuning: LoRA (Hu et al. 2021, arXiv:2106.09685) and QLoRA (Dettmers
// et al. 2023, arXiv:2305.14314), with the arithmetic and file layout of Hugging Face PEFT.
//
// A LoRA adapter adds to a projection y = x W^T (W: [out, in], frozen) the low-rank update
// y += (alpha / r) * (dropout(x) A^T) B^T with A: [r, in], B: [out, r] (peft: tuners/lora/layer.py,
// LoraLayer.update_layer and Linear.forward). A starts Kaiming-uniform as torch's nn.Linear
// (kaiming_uniform_(a = sqrt(5)): gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain * sqrt(3 /
// fan_in) = 1 / sqrt(in)), so A ~ U(-1/sqrt(in), 1/sqrt(in)); B starts at 0, so an untrained
// adapter leaves the model's outputs bit for bit unchanged. LongLoRA's "LoRA+" (Chen et al. 2023,
// arXiv:2309.12307) also trains the token embeddings and the RMSNorm gains; PEFT saves those as
// modules_to_save. QLoRA keeps the frozen projection matrices as 4-bit NormalFloat (see nf4.h).
//
// The same struct describes PEFT's prompt-learning adapters (type != kLora), whose base model is
// frozen as well and which are saved in the same directories (adapter_config.json with peft_type
// PROMPT_TUNING / PREFIX_TUNING, adapter_model.safetensors with the tensor `prompt_embeddings`):
// - Prompt tuning (Lester et al. 2021, arXiv:2104.08691; peft tuners/prompt_tuning): K trainable
//   virtual token embeddings [K, d] are prepended to the token embeddings (PEFT concatenates them
//   to inputs_embeds), so they take positions 0..K-1 and the real tokens K, K+1, ...; they are
//   rotated by RoPE like any token. Initialised RANDOM (N(0, 1), torch's nn.Embedding) or TEXT:
//   rows of the word embedding for the text's byte ids, repeated or cut to K (PEFT's
//   PromptEmbedding). Logits and losses are those of the real tokens only.
// - Prefix tuning (Li & Liang 2021, arXiv:2101.00190; P-Tuning v2; peft tuners/prefix_tuning):
//   every layer attends over K trainable key and value rows in front of the sequence's own, as
//   PEFT passes them: past_key_values, i.e. KV-cache entries 0..K-1 whose keys are never
//   rotated, real tokens at positions K, K+1, ... The saved table prompt_embeddings is
//   [K, L * 2 * Hkv * D] (PEFT's GQA rule: token_dim = Hkv * D), row k = [L * 2, Hkv, D] with
//   layer l's key at slice 2l and its value at 2l + 1. With prefix_projection the trainable
//   parameters are PEFT's PrefixEncoder (Embedding(K, td) -> Linear(td, Hh) -> tanh ->
//   Linear(Hh, L * 2 * td)) and the saved table is its output. Length-dependent RoPE (dynamic,
//   longrope) is refused: it re-rotates cached keys, prefix keys are fixed entries.
enum class PeftType { kLora, kPromptTuning, kPrefixTuning };
inline constexpr int64_t kMaxVirtualTokens = 65536;

struct LoraConfig {
  PeftType type = PeftType::kLora;  // peft_type: LORA, PROMPT_TUNING, PREFIX_TUNING
  int rank = 8;                     // r, in [1, min(in, out)]
  double alpha = 8.0;               // scaling = alpha / r
  double dropout = 0.0;             // on the input of A, in [0, 1)
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};  // PEFT's llama default
  bool train_embeddings = false;  // embed_tokens (and the tied head) trainable
  bool train_norms = false;       // every RMSNorm gain trainable
  bool qlora = false;             // frozen projections stored as NF4 + double quantization
  std::string base_model;         // base_model_name_or_path: the base checkpoint's directory
  // Prompt learning: num_virtual_tokens K, in [1, max_position_embeddings - 1].
  int num_virtual_tokens = 0;
  std::string prompt_init_text;    // prompt tuning: "" = RANDOM, else TEXT initialisation
  bool prefix_projection = false;  // prefix tuning: train through the reparameterisation MLP
  int prefix_hidden = 0;           // its hidden size (encoder_hidden_size); 0 = token_dim

  // Throws Error naming the option (--lora-rank, --lora-targets, --prompt-tuning, ...) and the
  // accepted range.
  void Validate(const ModelConfig& model) const;
};

// The seven projections of a layer, in PEFT's module names.
inline constexpr const char* kLoraModules[7] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                "gate_proj", "up_proj", "down_proj"};

class KVCache;

// Precision of the matrix-product operands. kBf16 is mixed precision as in bf16 autocast: the
// inputs of every projection / head matmul (weights, activations and, in the backward, output
// gradients) are rounded to bfloat16 (round to nearest even); products are exact in float32 and
// accumulate in float32; master weights, optimizer state, norms, softmax and attention scores
// stay float32. On CPUs with AVX512-BF16 the products run on a bf16 kernel (VDPBF16PS, weights
// packed once per forward pass); elsewhere, or with the environment variable
// ROPEKIT_BF16_MATMUL=off, they run through float32 sgemm on the rounded operands (the same
// numerics up to float32 summation order, no speed-up). Bf16MatmulSupport() says which.
enum class MatmulPrecision { kF32, kBf16 };

// One line naming the path MatmulPrecision::kBf16 takes on this machine and why.
std::string Bf16MatmulSupport();

// Causal attention of the model: kFused (default) tiles queries and keys in the FlashAttention-2
// manner and keeps only a per-row log-sum-exp for the backward (O(T) memory); kUnfused computes
// and keeps the full [B, H, T, T] probability matrix (the earlier path, kept for comparisons).
// The two agree to float32 rounding.
enum class AttentionKernel { kFused, kUnfused };

class Model {
 public:
  // Builds the model and initialises the weights deterministically from `seed`.
  Model(const ModelConfig& config, uint64_t seed);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const;  // resolved
  const std::vector<TensorInfo>& tensors() const;
  const TensorInfo& tensor_info(std::string_view name) const;  // throws Error if unknown
  std::span<float> parameters();                               // flat buffer (padded)
  std::span<const float> parameters() const;
  std::span<float> tensor(std::string_view name);
  int64_t num_parameters() const;  // sum of tensor sizes (no padding)

  // Replaces the RoPE parameters (e.g. PI / YaRN scaling at load time or for fine-tuning).
  // Requires a RoPE model; head_dim must match. Throws Error otherwise.
  void SetRopeParams(const RopeParams& params);

  void set_matmul_precision(MatmulPrecision precision);
  MatmulPrecision matmul_precision() const;
  void set_attention_kernel(AttentionKernel kernel);
  AttentionKernel attention_kernel() const;
  // How many times the RoPE cos/sin table was built (diagnostics). Length-dependent scaling
  // (dynamic NTK, LongRoPE) rebuilds it only when the length changes its frequencies, i.e. past
  // max_position_embeddings (dynamic) or original_max_position_embeddings (LongRoPE).
  int64_t rope_table_builds() const;

  // Training step core. tokens: [B, T + 1] row-major; inputs are the first T of each row,
  // targets the last T. Returns the mean loss over the B*T targets; when `grads` is non-empty
  // (size of trainable_parameters()), accumulates grad_scale * d(sum of losses)/d(params) into
  // it.
  // `on_grad_ready` (optional) is called during the backward, on the calling thread, with each
  // flat range [begin, end) of parameters() whose gradient is final: the head and final norm
  // first, then the layers from last to first, then the embedding tables. The ranges cover
  // parameters() exactly once, in the same order for every call (data-parallel bucketing).
  // With an adapter there is one range, the whole trainable buffer, at the end.
  using GradReadyFn = std::function<void(int64_t begin, int64_t end)>;
  double ForwardBackward(std::span<const int32_t> tokens, int64_t batch, int64_t seq_len,
                         std::span<float> grads, float grad_scale, ThreadPool* pool,
                         const GradReadyFn& on_grad_ready = {});

  // Forward only on [B, T] inputs at positions 0..T-1. logits: optional [B*T, V] output.
  // targets / losses: optional [B*T] (a target < 0 scores 0).
  void Forward(std::span<const int32_t> inputs, int64_t batch, int64_t seq_len, float* logits,
               const int32_t* targets, float* losses, ThreadPool* pool);

  // Appends `tokens` to the cache (positions cache.size() ...) and writes the logits of every
  // new token ([tokens.size(), V]) or, when last_only, of the last one ([V]).
  void ForwardCached(std::span<const int32_t> tokens, KVCache& cache, float* logits, bool last_only,
                     ThreadPool* pool);

  // Context shift (llama.cpp; StreamingLLM attention sinks, Xiao et al. 2023,
  // arXiv:2309.17453): drops the cached tokens [n_keep, n_keep + n_discard) of every layer,
  // moves the later ones back by n_discard rows and re-rotates their keys by -n_discard
  // (ShiftKeys), so that the cache again holds positions 0 .. size() - 1 and decoding continues
  // at position size(). Values are moved, never changed. Length-dependent RoPE types (dynamic,
  // longrope) keep unrotated keys in the cache and need no re-rotation.
  void ContextShift(KVCache& cache, int64_t n_keep, int64_t n_discard, ThreadPool* pool);

  // Parameter-efficient fine-tuning. AddLora freezes the model's weights and adds a LoRA adapter
  // (A from `seed`, B = 0); with config.qlora the projection matrices are quantized to NF4 and
  // their float copies released. From then on trainable_parameters() is the adapter's own flat
  // buffer (the LoRA matrices, then the embeddings and norm gains it trains), ForwardBackward's
  // gradients have its size, and no gradient of a frozen matrix is computed. Throws Error for
  // a bad config or when an adapter is already present.
  void AddLora(const LoraConfig& config, uint64_t seed);
  // With a prompt-tuning config (config.type) it adds K virtual token embeddings instead (from
  // `seed` or from config.prompt_init_text; no LoRA matrices). Forward, ForwardBackward and
  // Evaluate then take and return the real tokens only; ForwardCached puts the virtual tokens
  // into an empty cache first (cache entries 0..K-1).
  const LoraConfig* lora_config() const;  // nullptr without an adapter
  // With a prefix-tuning config it adds the per-layer key / value prefixes (the table, or the
  // reparameterisation MLP, from `seed`); ForwardCached puts them into an empty cache.
  // K of a prompt-learning adapter (the cache entries it occupies), else 0.
  int64_t num_virtual_tokens() const;
  // Prefix tuning: the table [K, L * 2 * Hkv * D] as saved (the MLP's output with
  // prefix_projection). Throws Error without a prefix-tuning adapter.
  std::vector<float> prefix_table() const;
  // Trainable parameters: parameters() without an adapter, else the adapter's buffer. The
  // tensors carry PEFT's saved names ("base_model.model.model.layers.0.self_attn.q_proj.lora_A
  // .weight", "base_model.model.model.embed_tokens.weight", ...).
  std::span<float> trainable_parameters();
  std::span<const float> trainable_parameters() const;
  const std::vector<TensorInfo>& trainable_tensors() const;
  // Seeds the LoRA dropout masks of the next ForwardBackward (the trainer passes a pure function
  // of (data_seed, step, micro-batch), so a resumed run draws the same masks).
  void set_dropout_seed(uint64_t seed);
  // Folds the adapter into the weights (W += (alpha / r) B A, in double, rounded once to float)
  // and removes it: an ordinary model again. Refused for QLoRA (its base has no float weights)
  // and for prompt learning (virtual tokens are no weight update; PEFT cannot merge them either).
  void MergeLora();
  // Bytes that hold the frozen projection matrices (float32, or NF4 codes + double-quantized
  // block scales under QLoRA) and their element count.
  int64_t projection_bytes() const;
  int64_t projection_parameters() const;

  struct Impl;

 private:
  friend class BatchDecoder;
  std::unique_ptr<Impl> impl_;
};

// A pool of KV-cache pages shared by many sequences, as vLLM's PagedAttention (Kwon et al. 2023,
// arXiv:2309.06180): num_pages pages of P = page_size tokens, each holding the keys and values
// of every layer. k and v are [L, pages, P, Hkv*D] each: per layer the NHD layout of
// PagedKvCache (ropekit/kv_cache.h), and one block table addresses a sequence in every layer.
// A KVCache made on the pool reserves ceil(capacity / P) pages when it is made (so a sequence
// admitted by its reservation never runs out of pages), draws them from the free list one page at
// a time as its tokens grow, returns the drawn pages when it is cleared and the reservation when
// it is destroyed. The pool must outlive its caches. Not safe for concurrent use.
class KvPagePool {
 public:
  // Throws Error naming num_pages (>= 1) or page_size (in [1, 65536]) when out of range, or when
  // the pool would exceed 2^34 floats per tensor.
  KvPagePool(const ModelConfig& config, int64_t num_pages, int64_t page_size = 16);
  ~KvPagePool();
  KvPagePool(const KvPagePool&) = delete;
  KvPagePool& operator=(const KvPagePool&) = delete;

  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  // Pages a sequence of `tokens` tokens needs: ceil(tokens / page_size).
  int64_t PagesFor(int64_t tokens) const;
  int64_t reserved_pages() const { return reserved_; }  // held by live caches
  int64_t used_pages() const { return num_pages_ - static_cast<int64_t>(free_.size()); }  // drawn
  int64_t available_pages() const { return num_pages_ - reserved_; }  // free to reserve
  int64_t bytes() const;                                              // memory of k and v

 private:
  friend class KVCache;
  friend struct Model::Impl;
  friend class BatchDecoder;
  int64_t num_pages_ = 0;
  int64_t page_size_ = 0;
  int64_t reserved_ = 0;
  int64_t row_ = 0;            // Hkv * D
  int64_t layer_stride_ = 0;   // pages * P * row
  std::vector<int32_t> free_;  // page ids, drawn from the back
  std::vector<float> k_, v_;   // [L, pages, P, Hkv*D]
};

// Keys and values of every layer for one sequence. Contiguous (the first constructor): the cache
// owns [L][capacity, Hkv*D] for k and v. Paged (the second): rows live in pages of a
// KvPagePool, position t at row t % P of page block_table()[t / P]; Model::ForwardCached, the
// prompt / prefix tuning prefill, Model::ContextShift and BatchDecoder::Step accept both kinds
// and give bitwise the same logits for either (any page size, any page order). Cached decoding
// equals a full recompute of the same prefix. For length-dependent RoPE (dynamic, longrope) keys
// are stored before rotation and re-rotated with the table of the current length at every step
// (transformers instead caches rotated keys and never re-rotates them); hidden states of earlier
// tokens are not recomputed, so for those types the equality is exact in the first layer only.
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t capacity);
  // Reserves pool.PagesFor(capacity) pages; throws Error naming the pool's free pages when it
  // cannot. `config` must be the pool's model config.
  KVCache(KvPagePool& pool, int64_t capacity);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int64_t size() const { return size_; }
  int64_t capacity() const { return capacity_; }
  // Empties the cache; a paged cache returns its drawn pages to the pool (keeping its reservation).
  void Clear();
  bool paged() const { return pool_ != nullptr; }
  // Pages drawn so far (paged caches; empty otherwise).
  std::span<const int32_t> block_table() const { return block_table_; }

 private:
  friend class Model;
  friend struct Model::Impl;
  friend class BatchDecoder;
  // Draws pages until the block table covers `tokens` positions (<= capacity).
  void Cover(int64_t tokens);
  // Row `pos` of layer l's keys / values.
  float* KeyRow(int l, int64_t pos);
  float* ValueRow(int l, int64_t pos);
  // Whether the cache was made for a model with this config (layers and Hkv * D).
  bool Fits(const ModelConfig& config) const;
  int64_t capacity_ = 0;
  int64_t size_ = 0;
  int64_t row_ = 0;  // Hkv * D
  int layers_ = 0;
  std::vector<float> k_, v_;  // contiguous: [L, capacity, Hkv*D]
  KvPagePool* pool_ = nullptr;
  int64_t reserved_ = 0;              // pages reserved in pool_
  std::vector<int32_t> block_table_;  // paged: pages drawn, in position order
};

// Batched decoding for serving (continuous batching): one step appends one token to each of B
// independent sequences, each with its own KVCache at its own position, and computes their
// logits with matrix-matrix products ([B, d] x [d, N]) instead of B matrix-vector products.
// Row b's logits depend on (caches[b], tokens[b]) only: they are bitwise identical for any B, any
// order of the sequences and any thread count (the products use ops::MatMulRowwise, attention
// runs per sequence; with a pool of W threads and B >= W, each thread decodes a contiguous share
// of the sequences through all layers). They equal ForwardCached's logits up to float32 summation
// order. Length-dependent RoPE (dynamic, longrope) and kBf16 precision are refused (Error). Uses
// its own workspace; like Model, not safe for concurrent calls on the same model.
class BatchDecoder {
 public:
  explicit BatchDecoder(Model& model);
  ~BatchDecoder();
  // caches[b] holds sequence b's past (at least one token); tokens[b] is its next input, at
  // position caches[b]->size(). logits: [B, V].
  void Step(std::span<KVCache* const> caches, std::span<const int32_t> tokens, float* logits,
            ThreadPool* pool);

 private:
  struct Rows;
  struct Scratch;
  // The layers for one group of sequences (all of them, or one worker's share), ops on `pool`.
  // `shared`: the pool every cache lives in, or null.
  void DecodeGroup(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                   const RopeTable* table, KvPagePool* shared, Rows& rows, float* logits,
                   ThreadPool* pool);
  // Layer l's new keys and values of the group into the shared pool (one fused call).
  void AppendShared(KvPagePool& pool, int l, const RopeTable* table, Rows& rows,
                    const RotateOptions& rot);
  // Sequence b's new key and value into its own cache (one fused call).
  void AppendOwn(KVCache& cache, int l, const RopeTable* table, Rows& rows, int64_t b);
  // Sequence b's attention output over its cache (page by page when paged).
  void Attend(KVCache& cache, int l, Rows& rows, int64_t b, std::vector<float>& scores);
  Model& model_;
  std::unique_ptr<Scratch> scratch_;
};

// ---------------------------------------------------------------------------------------------
// Training.

enum class LrSchedule { kCosine, kConstant };

struct TrainConfig {
  int64_t steps = 1000;
  int64_t batch_size = 16;
  int64_t seq_len = 128;
  int64_t grad_accum = 1;  // micro-batches of batch_size per optimizer step
  double lr = 2e-3;        // peak
  double min_lr = 2e-4;    // end of the cosine
  int64_t warmup_steps = 100;
  LrSchedule schedule = LrSchedule::kCosine;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;        // decoupled (Loshchilov & Hutter 2019), matrices only
  double grad_clip = 1.0;           // global L2 norm; 0 = off
  uint64_t data_seed = 1;           // crop offsets are a pure function of (seed, step, micro, row)
  int64_t eval_interval = 100;      // validation every N steps (and at the end); 0 = never
  int64_t eval_batches = 8;         // validation windows = eval_batches * batch_size, fixed
  int64_t checkpoint_interval = 0;  // 0 = only at the end (when checkpoint_dir is set)
  std::string checkpoint_dir;       // "" = no checkpoints
  bool bf16 = false;                // MatmulPrecision::kBf16 during training and validation
  bool progress = false;            // one progress line per log_interval steps on stderr
  int64_t log_interval = 10;

  void Validate() const;
};
std::string TrainConfigToJson(const TrainConfig& config);
TrainConfig TrainConfigFromJson(std::string_view json_text, const std::string& name);

// AdamW moments, one float per parameter (same layout as Model::parameters()).
struct OptimizerState {
  int64_t step = 0;  // optimizer steps taken
  std::vector<float> m, v;
};

struct TrainLogEntry {
  int64_t step = 0;  // 1-based step just taken
  double loss = 0.0;
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping
  double val_loss = -1.0;  // < 0 when not evaluated at this step
};

// Learning rate of step s (0-based): linear warmup (s + 1) / warmup * lr, then cosine from lr to
// min_lr over the remaining steps (or constant lr).
double LearningRate(const TrainConfig& config, int64_t step);

// Trains from state.step to config.steps on random crops of `train` (each crop T + 1 tokens),
// validating on fixed windows of `val`. Saves checkpoints when config.checkpoint_dir is set.
// `on_step` (optional) sees every step, before the checkpoint due at that step is saved (also
// when it throws). Returns the log. Resuming from a checkpoint saved at
// step s with the same config reproduces the uninterrupted run bit for bit.
//
// A step's gradient is the float32 left fold ((g_0 + g_1) + ...) of its grad_accum micro-batch
// gradients, each computed on its own. Data parallel (dp.comm with N > 1 ranks, every rank
// calling Train with the same model, state, config and data): rank r computes micro-batches
// [A r / N, A (r + 1) / N) of the A = grad_accum, so A >= N is required; gradients are
// reduce-scattered in the fold's order, each rank keeps and updates only its ZeRO-1 shard of the
// AdamW moments, and the parameters are all-gathered. The weights, log and checkpoints are
// bitwise those of one process with the same config, for any N (see src/dist/zero.h). Rank 0
// validates, prints progress and writes checkpoints; the returned state holds the full moments
// on every rank.
std::vector<TrainLogEntry> Train(Model& model, OptimizerState& state, const TrainConfig& config,
                                 std::span<const int32_t> train, std::span<const int32_t> val,
                                 ThreadPool* pool,
                                 const std::function<void(const TrainLogEntry&)>& on_step = {},
                                 const DataParallelOptions& dp = {});

// ---------------------------------------------------------------------------------------------
// Evaluation.

// Mean loss over `num_windows` fixed windows of `seq_len` inputs (+1 target), evenly spaced
// over `tokens` (deterministic).
double ValidationLoss(Model& model, std::span<const int32_t> tokens, int64_t seq_len,
                      int64_t num_windows, int64_t batch, ThreadPool* pool);

struct EvalResult {
  int64_t context = 0;  // evaluation context length
  int64_t windows = 0;
  double mean_loss = 0.0;             // nats per token, over all scored tokens
  double perplexity = 0.0;            // exp(mean_loss)
  double tail_loss = 0.0;             // tail protocol: mean over the scored tail tokens
  std::vector<double> position_loss;  // mean loss per position bucket (bucket_size positions)
  int64_t bucket_size = 16;
};

struct EvalOptions {
  std::vector<int64_t> contexts = {128};  // evaluation lengths
  // Non-overlapping windows (at most max_windows, 0 = all) for mean_loss and position_loss.
  int64_t max_windows = 64;
  // Tail protocol (Kazemnejad et al. 2023, App. F): num_tail_windows end offsets, fixed from the
  // largest context, each window [e - C, e) scored on its last `tail` targets only, the same
  // target tokens for every context C. 0 = skip.
  int64_t num_tail_windows = 64;
  int64_t tail = 64;
  int64_t bucket_size = 16;
  int64_t batch = 4;
};

std::vector<EvalResult> Evaluate(Model& model, std::span<const int32_t> tokens,
                                 const EvalOptions& options, ThreadPool* pool);

// ---------------------------------------------------------------------------------------------
// Generation.

struct SamplerConfig {
  double temperature = 0.0;  // 0 = greedy (argmax, lowest id on ties)
  int top_k = 0;             // 0 = all
  double top_p = 1.0;        // nucleus mass in (0, 1]
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& config);
  int32_t Sample(std::span<const float> logits);

 private:
  SamplerConfig config_;
  uint64_t state_;
};

// Longest sequence (prompt + new tokens) Generate accepts: 2^24 tokens.
inline constexpr int64_t kMaxGenerateTokens = int64_t{1} << 24;

// Prefills `prompt` into a KV cache, then decodes max_new_tokens one at a time. Calls on_token
// for each new token (may be empty). Returns the new tokens.
// With `shift`, the KV cache holds at most shift->context tokens: when it is full, the oldest
// tokens after the first n_keep (attention sinks) are dropped (n_discard of them; 0 = half of
// the non-sink tokens, as llama.cpp) and the rest re-rotated (Model::ContextShift), so
// generation continues past the model's context.
struct ContextShiftConfig {
  int64_t context = 0;    // cache size in tokens; 0 = the model's max_position_embeddings
  int64_t n_keep = 4;     // sink tokens kept at the start
  int64_t n_discard = 0;  // tokens dropped per shift; 0 = (size - n_keep) / 2
};
std::vector<int32_t> Generate(Model& model, std::span<const int32_t> prompt, int64_t max_new_tokens,
                              const SamplerConfig& sampler, ThreadPool* pool,
                              const std::function<void(int32_t)>& on_token = {},
                              const ContextShiftConfig* shift = nullptr);

// ---------------------------------------------------------------------------------------------
// Checkpoints. A checkpoint directory commits as one unit: every save writes a new step
// directory (config.json, model.safetensors and, for resuming, optimizer.safetensors +
// trainer_state.json, then manifest.json with the step and every file's size and checksum),
// syncs it, and switches the `current` link to it by one atomic rename; the previous step is
// removed only after that. Fixed links <dir>/config.json etc. -> current/... make the directory
// a Hugging Face model directory (LlamaForCausalLM). A crash at any point leaves the previous or
// the new checkpoint, complete. Loading checks every part against the manifest and the step
// recorded inside it and throws an Error naming the mismatch. Plain directories (Hugging Face
// models, no `current`) load as they are; their parts must still agree on the step.
// A writer must be the only one in `dir` (the command line holds a DirectoryLock).

void SaveCheckpoint(const std::string& dir, const Model& model,
                    const OptimizerState* optimizer = nullptr,
                    const TrainConfig* train_config = nullptr);

struct LoadOptions {
  // Replaces the RoPE scaling read from config.json (the head_dim is taken from the model).
  std::optional<RopeParams> rope_override;
};
Model LoadModel(const std::string& dir, const LoadOptions& options = {});

// Everything a resumed run needs, read from one committed step and verified together.
struct TrainingCheckpoint {
  Model model;
  OptimizerState optimizer;
  TrainConfig train_config;
};
TrainingCheckpoint LoadCheckpoint(const std::string& dir);

// PEFT adapters (peft: PeftModel.save_pretrained): with a LoRA adapter, SaveCheckpoint writes
// adapter_config.json (peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
// modules_to_save, bias "none", task_type "CAUSAL_LM", base_model_name_or_path, ...; sorted keys)
// and adapter_model.safetensors (the trainable tensors under PEFT's names) in place of
// config.json and model.safetensors, in the same committed step directories; trainer_state.json
// also records the QLoRA flag and the base config the adapter was trained on (RoPE scaling
// included), which LoadCheckpoint reapplies to the base named by base_model_name_or_path.
std::string LoraConfigToPeftJson(const LoraConfig& config);
LoraConfig LoraConfigFromPeftJson(std::string_view json_text, const std::string& name);
// adapter_config.json of any adapter type: LoraConfigToPeftJson for LoRA; for prompt tuning
// peft_type "PROMPT_TUNING", num_virtual_tokens, token_dim (d), num_layers,
// num_attention_heads, num_transformer_submodules 1, prompt_tuning_init RANDOM / TEXT,
// prompt_tuning_init_text, task_type "CAUSAL_LM", base_model_name_or_path (sorted keys).
// LoraConfigFromPeftJson reads both; LoadLoraAdapter checks token_dim, num_layers and
// num_attention_heads against the base and throws Error naming the field.
std::string AdapterConfigToPeftJson(const LoraConfig& config, const ModelConfig& model);
// Adds the LoRA adapter saved in `dir` (a committed training directory or a plain PEFT adapter
// directory) to `model`; qlora quantizes the base first. Throws Error naming the tensor when the
// adapter was saved for another base shape, and for adapter types other than LORA.
void LoadLoraAdapter(Model& model, const std::string& dir, bool qlora = false);

// Reads optimizer.safetensors + trainer_state.json; throws Error naming the file if absent.
OptimizerState LoadOptimizerState(const std::string& dir, const Model& model);
TrainConfig LoadTrainConfig(const std::string& dir);

// The committed step of the checkpoint in `dir` (0 for a model-only or plain Hugging Face
// directory), nullopt when `dir` holds none.
std::optional<int64_t> FindCheckpoint(const std::string& dir);
// Removes what interrupted saves left in `dir` (temporary files, uncommitted step directories);
// returns how many entries. Call only as the directory's single writer.
int CleanCheckpointDirectory(const std::string& dir);
// Removes the checkpoint in `dir` (the commit link first, then its files); other files stay.
void RemoveCheckpoint(const std::string& dir);

// Safetensors (https://huggingface.co/docs/safetensors): 8-byte little-endian header length,
// JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, raw data.
struct SafeTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;  // F32 on disk (BF16 / F16 files are widened on read)
};
void WriteSafetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                      const std::vector<std::pair<std::string, std::string>>& metadata = {});
std::vector<SafeTensor> ReadSafetensors(const std::string& path);
// The same from bytes in memory; `name` is used in error messages.
std::vector<SafeTensor> ParseSafetensors(std::string_view bytes, const std::string& name);

// Reads text files (bytes as they are) and concatenates them; errors name the file.
std::string ReadTextFiles(const std::vector<std::string>& paths);

}  // namespace ropekit

#endif  // ROPEKIT_MODEL_H_
