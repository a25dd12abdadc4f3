// Model internals shared by src/model/*.cc: the flat parameter layout and the activation
// workspace.
//
// Dimension legend: V = vocab, d = hidden, H / Hkv = heads / kv heads, D = head_dim,
// F = intermediate, L = layers, B = batch, T = tokens per sequence, M = B * T.
#ifndef ROPEKIT_SRC_MODEL_MODEL_IMPL_H_
#define ROPEKIT_SRC_MODEL_MODEL_IMPL_H_

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "ropekit/model.h"
#include "src/ops/bf16_matmul.h"
#include "src/ops/nf4.h"
#include "src/ops/ops.h"

namespace ropekit {
namespace ops {
struct AttentionArgs;
}  // namespace ops

// Every tensor starts at a multiple of this many floats (64 bytes: one AVX-512 vector).
inline constexpr int64_t kTensorAlign = 16;

// n rounded up to a multiple of kTensorAlign floats.
inline int64_t AlignUp(int64_t n) { return (n + kTensorAlign - 1) / kTensorAlign * kTensorAlign; }

struct LayerOffsets {
  int64_t input_norm, q, k, v, o, post_norm, gate, up, down;
};

// Activations of one forward pass kept for the backward (one allocation; offsets in floats).
struct Workspace {
  int64_t batch = -1, seq_len = -1, tk = -1;
  bool train = false, unfused = false;
  std::vector<float> buffer;
  struct Layer {
    // lse: [B, H, T] attention log-sum-exp per query row (train only; the fused attention's
    // backward recomputes the probabilities from it).
    // probs: [B, H, T, T] (train with AttentionKernel::kUnfused only).
    float *resid_in, *xn1, *inv1, *q, *k, *v, *lse, *probs, *ao, *mid, *xn2, *inv2, *g, *u, *h;
  };
  std::vector<Layer> layers;  // train: L entries; inference: 1 entry reused by every layer
  std::vector<float*> resid;  // train: L + 1 residual streams; inference: 2 (ping-pong)
  float *xf, *invf, *logits;
  // Backward scratch.
  float *dx, *dmid, *dxn, *dq, *dk, *dv, *dao, *dh, *dg, *du;
  // Cached decoding: rotated keys of the whole cache (length-dependent RoPE only).
  float* k_rot;
};

// A LoRA / QLoRA adapter (src/model/lora.cc). Offsets are in floats into `params`, -1 = absent.
struct LoraState {
  LoraConfig config;
  float scaling = 1.0f;             // alpha / r
  std::vector<TensorInfo> tensors;  // PEFT names
  std::vector<float> params;        // the trainable buffer
  // Appends tensor `name` of `shape` at float offset *offset and advances *offset past it
  // (aligned); returns the tensor's offset.
  int64_t AddTensor(std::string name, std::vector<int64_t> shape, bool decay, int64_t* offset) {
    int64_t size = 1;
    for (int64_t v : shape) size *= v;
    const int64_t at = *offset;
    tensors.push_back({std::move(name), std::move(shape), at, size, decay});
    *offset = AlignUp(at + size);
    return at;
  }
  struct Layer {
    std::array<int64_t, 7> a, b;  // lora_A [r, in], lora_B [out, r] per kLoraModules entry
    int64_t input_norm = -1, post_norm = -1;
  };
  std::vector<Layer> layers;
  int64_t embed = -1, final_norm = -1;
  // Prompt tuning: the virtual token embeddings [K, d] (token ids V..V+K-1 inside the model).
  int64_t prompt = -1;
  // Prefix tuning (src/model/prefix_tuning.cc): the table P [K, width = L * 2 * td] at `prefix`,
  // or with the projection the encoder tensors (enc_*) and P computed into prefix_kv.
  int64_t prefix = -1, prefix_width = 0;
  int64_t enc_embed = -1, enc_w1 = -1, enc_b1 = -1, enc_w2 = -1, enc_b2 = -1;
  std::vector<float> prefix_kv, enc_h, prefix_grad;  // P, tanh activations [K, Hh], dP
  // Keys / values with the prefix in front: [layers (train) or 1][B, K + T, td]; gradients.
  std::vector<float> kcat, vcat, dkcat, dvcat;
  uint64_t dropout_seed = 0;
  // Activations: u holds s * dropout(x) A^T, [L][7][M, r] when training, [M, r] otherwise.
  std::vector<float> u, xd, dx, du;
  // QLoRA: the frozen projections as NF4 ([L][7]) and one dequantized matrix.
  std::vector<std::array<ops::Nf4Tensor, 7>> nf4;
  std::vector<float> wbuf;
};

// The state of a prompt-learning adapter (prompt or prefix tuning): no LoRA matrices (rank 0,
// every layer's lora_A / lora_B absent), so PrepareLora allocates nothing.
inline std::unique_ptr<LoraState> PromptLearningState(const LoraConfig& config, int num_layers) {
  auto s = std::make_unique<LoraState>();
  s->config = config;
  s->config.rank = 0;
  s->layers.resize(num_layers);
  for (LoraState::Layer& L : s->layers) {
    L.a.fill(-1);
    L.b.fill(-1);
  }
  return s;
}

// The shape and state of one forward pass, shared by the steps of RunForward.
struct ForwardPass {
  int64_t batch = 0, seq_len = 0, m = 0;  // m = batch * seq_len
  int64_t past = 0, tk = 0;               // tokens cached before the pass; past + seq_len
  bool train = false;
  KVCache* cache = nullptr;
  ThreadPool* pool = nullptr;
  const RopeTable* table = nullptr;  // RoPE kinds only
  RotateOptions rot;
  bool rotate_cache = false;  // length-dependent RoPE with a cache: rotate all cached keys
};

// The shape and state of one backward pass, shared by the steps of RunBackward.
struct BackwardPass {
  int64_t batch = 0, seq_len = 0, m = 0;  // m = batch * seq_len
  float* G = nullptr;                     // gradients: of params, or of the adapter's buffer
  ThreadPool* pool = nullptr;
  const LoraState* ad = nullptr;     // the adapter, if any
  const RopeTable* table = nullptr;  // RoPE kinds only
  RotateOptions rot;                 // Direction::kBackward
  std::span<float> grad_pe;          // gradient of the position tables (empty under an adapter)
};

struct Model::Impl {
  ModelConfig config;
  std::vector<TensorInfo> tensors;
  std::vector<float> params;
  std::unique_ptr<PositionEncoding> pe;
  int64_t embed = 0, final_norm = 0, head = 0, pe_params = 0, pe_size = 0;
  std::vector<LayerOffsets> layers;
  Workspace ws;
  std::vector<int64_t> positions;    // [M]
  std::vector<int64_t> k_positions;  // [Tk]
  std::vector<int64_t> q_positions;  // [T]
  std::vector<float> losses;         // [M]
  std::vector<int32_t> inputs, targets;
  MatmulPrecision precision = MatmulPrecision::kF32;
  AttentionKernel attention = AttentionKernel::kFused;
  std::vector<float> lowp_params;  // bf16-rounded copy of params (kBf16 without the kernel)
  // kBf16 with the AVX512-BF16 kernel (ops::Bf16MatmulAvailable()): every matmul weight packed
  // as bf16 pairs, keyed by its offset in params (refreshed by RunForward).
  bool bf16_kernel = false;
  std::unordered_map<int64_t, ops::Bf16Weight> bf16_weights;
  std::unique_ptr<RopeTable> rope_table;
  int64_t rope_table_key = -1;  // FrequencySeqLen of the table's length
  int64_t rope_table_builds = 0;
  // [tk, Hkv*D] rows of a paged cache gathered for attention (and ContextShift's moved keys).
  std::vector<float> paged_k, paged_v;
  std::unique_ptr<LoraState> lora;

  void BuildLayout();
  void Init(uint64_t seed);
  const RopeTable& Table(int64_t seq_len);
  bool RopeIsLengthDependent() const;
  void Prepare(int64_t batch, int64_t seq_len, int64_t tk, bool train);
  // Runs the layers on inputs [B, T]; with a cache (B = 1) appends keys / values to it.
  void RunForward(const int32_t* inputs, int64_t batch, int64_t seq_len, bool train, KVCache* cache,
                  ThreadPool* pool);
  // The steps of RunForward.
  // Throws Error for a pass past the cache's capacity or position 2^31 - 1, or a token id
  // outside [0, vocab_size).
  void CheckForwardInputs(const int32_t* tokens, int64_t m, int64_t tk, const KVCache* cache) const;
  void SetPositions(const ForwardPass& f);  // positions, q_positions, k_positions
  // Token embeddings into ws.resid[0], with the absolute position hook.
  void EmbedTokens(const int32_t* tokens, const ForwardPass& f);
  // x -> mid = x + attention(RMSNorm(x)) Wo^T for layer l (A.resid_in = xin).
  void AttentionBlockForward(int l, Workspace::Layer& A, float* xin, const ForwardPass& f);
  void ProjectQkv(int l, Workspace::Layer& A, const ForwardPass& f);  // A.q, A.k, A.v
  // The keys and values attention reads: RoPE applied to q and k, and with a cache the new keys
  // and values appended to layer l's rows (keys rotated into it, or the whole cache rotated into
  // ws.k_rot for length-dependent RoPE).
  struct KeyValues {
    const float* keys;
    const float* values;
  };
  KeyValues RotateAndCache(int l, const Workspace::Layer& A, const ForwardPass& f);
  // The same for a paged cache (KvPagePool): appends through the block table, then gathers.
  KeyValues RotateAndCachePaged(int l, const Workspace::Layer& A, const ForwardPass& f);
  // Copies layer l's rows [0, tk) of a paged f.cache, in position order, to paged_k / paged_v.
  void GatherCache(int l, const ForwardPass& f);
  // mid -> xout = mid + SwiGLU MLP(RMSNorm(mid)) for layer l.
  void MlpBlockForward(int l, Workspace::Layer& A, float* xout, const ForwardPass& f);
  // The attention arguments of layer activations A: [B, T] queries over tk keys (k_positions
  // [0, tk)), with the position encoding's logit bias.
  ops::AttentionArgs LayerAttentionArgs(const Workspace::Layer& A, int64_t batch, int64_t seq_len,
                                        int64_t tk, const float* keys, const float* values) const;
  // Logits of the rows [row0, row0 + rows) of the final hidden state into ws.logits.
  void Logits(int64_t rows, ThreadPool* pool);
  void RunBackward(const int32_t* inputs, int64_t batch, int64_t seq_len, float* grads,
                   ThreadPool* pool, const Model::GradReadyFn& on_ready);
  // The steps of RunBackward, in the order it calls them (layers last to first).
  // The gradient slot of a weight: G + full_offset without an adapter; under one, G +
  // adapter_offset where it trains the weight, else nullptr (frozen).
  float* Grad(const BackwardPass& b, int64_t full_offset, int64_t adapter_offset) const;
  // dw += dy^T x (skipped when dw is null).
  void WeightGrad(const BackwardPass& b, const float* dy, const float* x, float* dw, int64_t k,
                  int64_t n) const;
  void HeadBackward(const BackwardPass& b);  // head and final norm: ws.dx = dL/dx_L
  // dL/dx' in ws.dx -> dL/dmid in ws.dmid.
  void MlpBlockBackward(int l, const BackwardPass& b);
  // dL/dmid in ws.dmid -> dL/dx in ws.dx.
  void AttentionBlockBackward(int l, const BackwardPass& b);
  // dL/dao in ws.dao -> dL/dq, dL/dk (rotated back), dL/dv in ws.dq, ws.dk, ws.dv.
  void SelfAttentionBackward(int l, const BackwardPass& b);
  // The embedding hook's backward and the scatter into the embedding rows.
  void EmbeddingBackward(const int32_t* tokens, const BackwardPass& b);
  // Weights for matmuls: params, or their bf16-rounded copy (refreshed by RunForward).
  const float* MatmulWeights() const {
    return precision == MatmulPrecision::kBf16 ? lowp_params.data() : params.data();
  }
  // Refreshes the matmul weights of kBf16 (the packed bf16 weights, or lowp_params where the
  // kernel is not available); `train` also packs the layouts of the backward.
  void PrepareLowPrecisionWeights(bool train, ThreadPool* pool);
  // The model's matrix products with the weight matrix at params offset `w` ([n, k]): the bf16
  // kernel when it is on, else float32 sgemm on `weights` (the matrix as the forward reads it:
  // MatmulWeights() + w, or Proj/Head under an adapter).
  void Project(const float* x, int64_t w, const float* weights, float* y, int64_t m, int64_t k,
               int64_t n, ThreadPool* pool, bool accumulate = false) const;
  void ProjectBackwardInput(const float* dy, int64_t w, const float* weights, float* dx, int64_t m,
                            int64_t k, int64_t n, ThreadPool* pool, bool accumulate = false) const;
  void ProjectBackwardWeight(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                             int64_t n, ThreadPool* pool) const;
  // Rounds a matmul operand in place when precision is kBf16.
  void RoundOperand(float* x, int64_t n) const;
  // Weights as the forward reads them: the adapter's trainable copies of the embeddings and norm
  // gains when it trains them, the NF4 projections dequantized into lora->wbuf under QLoRA (valid
  // until the next Proj call).
  const float* Proj(int layer, int module, ThreadPool* pool);
  const float* Embed() const;
  const float* Head() const;
  const float* Norm(int layer, bool post) const;
  const float* FinalNorm() const;
  // LoRA on projection `module` of `layer`: y[M, out] += s (dropout(x) A^T) B^T; x [M, in].
  void LoraForward(int layer, int module, const float* x, float* y, int64_t m, bool train,
                   ThreadPool* pool);
  // Its backward: gradients of A and B into G, dx[M, in] += d/dx (skipped when dx is null).
  void LoraBackward(int layer, int module, const float* x, const float* dy, float* dx, int64_t m,
                    float* G, ThreadPool* pool);
  void PrepareLora(int64_t m, bool train);
  // Prompt tuning (src/model/prompt_tuning.cc). Inside the model virtual token k has the id
  // V + k; EmbedRow maps any id to its embedding row.
  int64_t VirtualTokens() const;
  const float* EmbedRow(int32_t id) const;
  void AddPromptTuning(const LoraConfig& config, uint64_t seed);
  // Prepends the K virtual ids to each of the `batch` rows of inputs ([B, T] -> [B, K + T]) and
  // K ignored targets (-1) to targets; returns K + T (T without an adapter).
  int64_t PrependVirtualTokens(int64_t batch, int64_t seq_len);
  // Adds dx (layer 0's input gradient [M, d]) of the virtual rows to their embeddings' gradient.
  void PromptBackward(const int32_t* tokens, int64_t m, const float* dx, float* G) const;
  // Model::Forward under prompt tuning: runs [B, K + T] and returns the real rows' logits and
  // losses. Throws Error for ids outside [0, V).
  void ForwardVirtual(std::span<const int32_t> inputs, int64_t batch, int64_t seq_len,
                      float* logits, const int32_t* targets, float* losses, ThreadPool* pool);
  // ForwardCached under prompt tuning: checks the real ids and, on an empty cache, appends the
  // K virtual tokens first (cache entries 0..K-1).
  void PrefillVirtualTokens(std::span<const int32_t> tokens, KVCache& cache, ThreadPool* pool);
  // Prefix tuning (src/model/prefix_tuning.cc).
  int64_t PrefixTokens() const;  // K, or 0 without a prefix adapter
  int64_t PrefixHidden() const;
  void AddPrefixTuning(const LoraConfig& config, uint64_t seed);
  const float* PrefixTable() const;
  void ComputePrefix();  // P from the encoder into prefix_kv (projection only)
  void PrefixEncoderForward(float* P, float* h) const;
  void PrefixForwardPrepare(int64_t batch, int64_t seq_len, bool train);
  // Points args' keys / values at [P_k(layer); k] / [P_v(layer); v] per sequence (filled from
  // k, v [B * T, td] when they are given: the forward) with Tk = K + T.
  void PrefixAttention(int layer, const float* k, const float* v, int64_t batch, int64_t seq_len,
                       bool train, ops::AttentionArgs& args);
  // Splits the attention's key / value gradients: the sequence rows into dk, dv [B * T, td], the
  // prefix rows (summed over the batch) into the table's gradient.
  void PrefixGradients(int layer, int64_t batch, int64_t seq_len, float* dk, float* dv, float* G);
  void PrefixBackwardFinish(float* G);  // the projection's backward into G
  void PrefillPrefix(KVCache& cache);
  std::vector<float> PrefixTableCopy() const;
  std::span<const float> PeParams() const {
    return {params.data() + pe_params, static_cast<size_t>(pe_size)};
  }
};

}  // namespace ropekit

#endif  // ROPEKIT_SRC_MODEL_MODEL_IMPL_H_
