// Model internals shared by src/model/*.cc: the flat parameter layout and the activation
// workspace.
//
// Dimension legend: V = vocab, d = hidden, H / Hkv = heads / kv heads, D = head_dim,
// F = intermediate, L = layers, B = batch, T = tokens per sequence, M = B * T.
#ifndef ROPEKIT_SRC_MODEL_MODEL_IMPL_H_
#define ROPEKIT_SRC_MODEL_MODEL_IMPL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ropekit/model.h"
#include "src/ops/bf16_matmul.h"

namespace ropekit {

// Every tensor starts at a multiple of this many floats (64 bytes: one AVX-512 vector).
inline constexpr int64_t kTensorAlign = 16;

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

  void BuildLayout();
  void Init(uint64_t seed);
  const RopeTable& Table(int64_t seq_len);
  bool RopeIsLengthDependent() const;
  void Prepare(int64_t batch, int64_t seq_len, int64_t tk, bool train);
  // Runs the layers on inputs [B, T]; with a cache (B = 1) appends keys / values to it.
  void RunForward(const int32_t* inputs, int64_t batch, int64_t seq_len, bool train, KVCache* cache,
                  ThreadPool* pool);
  // Logits of the rows [row0, row0 + rows) of the final hidden state into ws.logits.
  void Logits(int64_t rows, ThreadPool* pool);
  void RunBackward(const int32_t* inputs, int64_t batch, int64_t seq_len, float* grads,
                   ThreadPool* pool, const Model::GradReadyFn& on_ready);
  // Weights for matmuls: params, or their bf16-rounded copy (refreshed by RunForward).
  const float* MatmulWeights() const {
    return precision == MatmulPrecision::kBf16 ? lowp_params.data() : params.data();
  }
  // Refreshes the matmul weights of kBf16 (the packed bf16 weights, or lowp_params where the
  // kernel is not available); `train` also packs the layouts of the backward.
  void PrepareLowPrecisionWeights(bool train, ThreadPool* pool);
  // The model's matrix products with the weight matrix at params offset `w` ([n, k]): float32
  // sgemm (kF32, or kBf16 on bf16-rounded operands), or the bf16 kernel.
  void Project(const float* x, int64_t w, float* y, int64_t m, int64_t k, int64_t n,
               ThreadPool* pool, bool accumulate = false) const;
  void ProjectBackwardInput(const float* dy, int64_t w, float* dx, int64_t m, int64_t k, int64_t n,
                            ThreadPool* pool, bool accumulate = false) const;
  void ProjectBackwardWeight(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                             int64_t n, ThreadPool* pool) const;
  // Rounds a matmul operand in place when precision is kBf16.
  void RoundOperand(float* x, int64_t n) const;
  std::span<const float> PeParams() const {
    return {params.data() + pe_params, static_cast<size_t>(pe_size)};
  }
};

}  // namespace ropekit

#endif  // ROPEKIT_SRC_MODEL_MODEL_IMPL_H_
