// Prefix tuning (Li & Liang 2021, arXiv:2101.00190; P-Tuning v2, Liu et al. 2021,
// arXiv:2110.07602) with the semantics of Hugging Face PEFT (tuners/prefix_tuning/model.py
// PrefixEncoder, peft_model.py get_prompt) and transformers' LLaMA: every layer attends over K
// trainable key and value rows in front of the sequence's own. PEFT hands them to the model as
// past_key_values, i.e. as KV-cache entries 0..K-1; LlamaAttention rotates only the new tokens'
// queries and keys, so the prefix keys are used as given (never rotated), the real tokens take
// positions K, K+1, ... (cache_position), and every real query sees all K prefix entries.
//
// Table P [K, L * 2 * td] (td = Hkv * D: PEFT's GQA rule sets token_dim = head_dim *
// num_key_value_heads): row k is [L * 2, Hkv, D], layer l's key = slice 2l, value = slice 2l + 1,
// head-major, which is the layout of one KV-cache row. With prefix_projection the trainable
// parameters are PEFT's reparameterisation Embedding(K, td) -> Linear(td, Hh) -> tanh ->
// Linear(Hh, L * 2 * td) and P is its output (what PEFT saves); without, P itself trains.
//
// Forward of layer l (rows of one sequence): K_cat = [P_k(l); rope(k)], V_cat = [P_v(l); v],
// attention of q (positions K..K+T-1) over K_cat (positions 0..K+T-1, causal: every prefix
// entry visible). Backward: the attention gradient of K_cat / V_cat; its first K rows, summed
// over the batch, are dP; the other rows continue into RoPE's backward and the projections.
//
// Dimension legend: K = virtual tokens, L = layers, td = Hkv * D, Hh = encoder hidden size,
// B = batch, T = real tokens per sequence, N = K + T.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "ropekit/kv_cache.h"
#include "src/model/model_impl.h"
#include "src/ops/ops.h"
#include "src/util/rng.h"

namespace ropekit {

int64_t Model::Impl::PrefixTokens() const {
  return lora && lora->prefix_width > 0 ? lora->config.num_virtual_tokens : 0;
}

void Model::Impl::AddPrefixTuning(const LoraConfig& cfg, uint64_t seed) {
  const ModelConfig& c = config;
  auto s = PromptLearningState(cfg, c.num_layers);
  const int64_t K = cfg.num_virtual_tokens, td = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t width = 2 * int64_t{c.num_layers} * td;
  s->prefix_width = width;
  int64_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    return s->AddTensor(std::move(name), std::move(shape), decay, &offset);
  };
  if (!cfg.prefix_projection) {
    s->prefix = add("prompt_embeddings", {K, width}, true);
  } else {
    // PEFT's PrefixEncoder (embedding, transform = [Linear, Tanh, Linear]); these tensors are
    // ropekit's trainer state, PEFT saves only their output as prompt_embeddings.
    const int64_t hh = cfg.prefix_hidden > 0 ? cfg.prefix_hidden : td;
    s->enc_embed = add("prompt_encoder.embedding.weight", {K, td}, true);
    s->enc_w1 = add("prompt_encoder.transform.0.weight", {hh, td}, true);
    s->enc_b1 = add("prompt_encoder.transform.0.bias", {hh}, false);
    s->enc_w2 = add("prompt_encoder.transform.2.weight", {width, hh}, true);
    s->enc_b2 = add("prompt_encoder.transform.2.bias", {width}, false);
    s->prefix_kv.assign(static_cast<size_t>(K * width), 0.0f);
    s->enc_h.assign(static_cast<size_t>(K * hh), 0.0f);
  }
  s->prefix_grad.assign(static_cast<size_t>(K * width), 0.0f);
  s->params.assign(static_cast<size_t>(offset), 0.0f);
  // Embeddings: torch's nn.Embedding default N(0, 1). Linear layers: nn.Linear's default,
  // weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  for (size_t i = 0; i < s->tensors.size(); ++i) {
    const TensorInfo& t = s->tensors[i];
    std::span<float> view(s->params.data() + t.offset, static_cast<size_t>(t.size));
    if (t.offset == s->prefix || t.offset == s->enc_embed) {
      FillNormal(SplitMixAt(seed, i), 1.0, view);
      continue;
    }
    const int64_t fan_in = t.shape.size() == 2 ? t.shape[1] : s->tensors[i - 1].shape[1];
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    uint64_t state = SplitMixAt(seed, i);
    for (float& x : view)
      x = static_cast<float>((2.0 * UnitInterval53(SplitMix64(state)) - 1.0) * bound);
  }
  lora = std::move(s);
  ws = Workspace();
}

int64_t Model::Impl::PrefixHidden() const {
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  return lora->config.prefix_hidden > 0 ? lora->config.prefix_hidden : td;
}

const float* Model::Impl::PrefixTable() const {
  return lora->prefix >= 0 ? lora->params.data() + lora->prefix : lora->prefix_kv.data();
}

void Model::Impl::PrefixEncoderForward(float* P, float* h) const {
  const LoraState& s = *lora;
  // P = tanh(E W1^T + b1) W2^T + b2, each entry accumulated in double and rounded once.
  const int64_t K = s.config.num_virtual_tokens, W = s.prefix_width, hh = PrefixHidden();
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  const float* p = s.params.data();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < hh; ++j) {
      double acc = p[s.enc_b1 + j];
      for (int64_t i = 0; i < td; ++i) {
        acc += double{p[s.enc_embed + k * td + i]} * p[s.enc_w1 + j * td + i];
      }
      h[k * hh + j] = static_cast<float>(std::tanh(acc));
    }
    for (int64_t o = 0; o < W; ++o) {
      double acc = p[s.enc_b2 + o];
      for (int64_t j = 0; j < hh; ++j) acc += double{h[k * hh + j]} * p[s.enc_w2 + o * hh + j];
      P[k * W + o] = static_cast<float>(acc);
    }
  }
}

void Model::Impl::ComputePrefix() {
  LoraState& s = *lora;
  if (s.prefix < 0) PrefixEncoderForward(s.prefix_kv.data(), s.enc_h.data());
}

void Model::Impl::PrefixForwardPrepare(int64_t batch, int64_t seq_len, bool train) {
  LoraState& s = *lora;
  ComputePrefix();
  const int64_t n = PrefixTokens() + seq_len;
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  const size_t rows = static_cast<size_t>((train ? config.num_layers : 1) * batch * n * td);
  if (s.kcat.size() != rows) {
    s.kcat.assign(rows, 0.0f);
    s.vcat.assign(rows, 0.0f);
  }
  const size_t d = train ? static_cast<size_t>(batch * n * td) : 0;
  if (s.dkcat.size() != d) {
    s.dkcat.assign(d, 0.0f);
    s.dvcat.assign(d, 0.0f);
  }
  if (train) std::fill(s.prefix_grad.begin(), s.prefix_grad.end(), 0.0f);
}

void Model::Impl::PrefixAttention(int layer, const float* k, const float* v, int64_t batch,
                                  int64_t seq_len, bool train, ops::AttentionArgs& args) {
  LoraState& s = *lora;
  const int64_t K = PrefixTokens(), T = seq_len, n = K + T, W = s.prefix_width;
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  float* kc = s.kcat.data() + (train ? layer : 0) * batch * n * td;
  float* vc = s.vcat.data() + (train ? layer : 0) * batch * n * td;
  if (k != nullptr) {  // the forward fills [P_k(l); k] and [P_v(l); v] per sequence
    const float* P = PrefixTable();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < K; ++j) {
        std::memcpy(kc + (b * n + j) * td, P + j * W + 2 * layer * td, sizeof(float) * td);
        std::memcpy(vc + (b * n + j) * td, P + j * W + (2 * layer + 1) * td, sizeof(float) * td);
      }
      std::memcpy(kc + (b * n + K) * td, k + b * T * td, sizeof(float) * T * td);
      std::memcpy(vc + (b * n + K) * td, v + b * T * td, sizeof(float) * T * td);
    }
  }
  args.k = kc;
  args.v = vc;
  args.tk = n;
  args.kv_batch_stride = n * td;
  args.k_positions = std::span<const int64_t>(k_positions.data(), static_cast<size_t>(n));
}

void Model::Impl::PrefixGradients(int layer, int64_t batch, int64_t seq_len, float* dk, float* dv,
                                  float* G) {
  LoraState& s = *lora;
  const int64_t K = PrefixTokens(), T = seq_len, n = K + T, W = s.prefix_width;
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  float* dP = s.prefix >= 0 ? G + s.prefix : s.prefix_grad.data();
  for (int64_t b = 0; b < batch; ++b) {  // ascending batch rows: a fixed summation order
    std::memcpy(dk + b * T * td, s.dkcat.data() + (b * n + K) * td, sizeof(float) * T * td);
    std::memcpy(dv + b * T * td, s.dvcat.data() + (b * n + K) * td, sizeof(float) * T * td);
    for (int64_t j = 0; j < K; ++j) {
      float* gk = dP + j * W + 2 * layer * td;
      float* gv = gk + td;
      const float* sk = s.dkcat.data() + (b * n + j) * td;
      const float* sv = s.dvcat.data() + (b * n + j) * td;
      for (int64_t c = 0; c < td; ++c) {
        gk[c] += sk[c];
        gv[c] += sv[c];
      }
    }
  }
}

void Model::Impl::PrefixBackwardFinish(float* G) {
  LoraState& s = *lora;
  if (s.prefix >= 0) return;  // the table's gradient is already in G
  // The reparameterisation's chain rule, in double: z = E W1^T + b1, h = tanh(z),
  // P = h W2^T + b2; dW2 = dP^T h, db2 = sum_k dP, dh = dP W2, dz = dh (1 - h^2),
  // dW1 = dz^T E, db1 = sum_k dz, dE = dz W1.
  const int64_t K = s.config.num_virtual_tokens, W = s.prefix_width, hh = PrefixHidden();
  const int64_t td = int64_t{config.num_kv_heads} * config.head_dim;
  const float* p = s.params.data();
  const float* dP = s.prefix_grad.data();
  const float* h = s.enc_h.data();
  for (int64_t o = 0; o < W; ++o) {
    double db = 0.0;
    for (int64_t k = 0; k < K; ++k) db += dP[k * W + o];
    G[s.enc_b2 + o] += static_cast<float>(db);
    for (int64_t j = 0; j < hh; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += double{dP[k * W + o]} * h[k * hh + j];
      G[s.enc_w2 + o * hh + j] += static_cast<float>(acc);
    }
  }
  std::vector<double> dz(static_cast<size_t>(K * hh));
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < hh; ++j) {
      double acc = 0.0;
      for (int64_t o = 0; o < W; ++o) acc += double{dP[k * W + o]} * p[s.enc_w2 + o * hh + j];
      const double hv = h[k * hh + j];
      dz[k * hh + j] = acc * (1.0 - hv * hv);
    }
  }
  for (int64_t j = 0; j < hh; ++j) {
    double db = 0.0;
    for (int64_t k = 0; k < K; ++k) db += dz[k * hh + j];
    G[s.enc_b1 + j] += static_cast<float>(db);
    for (int64_t i = 0; i < td; ++i) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += dz[k * hh + j] * p[s.enc_embed + k * td + i];
      G[s.enc_w1 + j * td + i] += static_cast<float>(acc);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < td; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < hh; ++j) acc += dz[k * hh + j] * p[s.enc_w1 + j * td + i];
      G[s.enc_embed + k * td + i] += static_cast<float>(acc);
    }
  }
}

void Model::Impl::PrefillPrefix(KVCache& cache) {
  if (cache.size_ > 0) return;
  LoraState& s = *lora;
  const int64_t K = PrefixTokens(), W = s.prefix_width, row = cache.row_;
  if (K >= cache.capacity_) {
    throw Error("KV cache: the adapter's " + std::to_string(K) +
                " prefix entries leave no room in its capacity " + std::to_string(cache.capacity_));
  }
  ComputePrefix();
  const float* P = PrefixTable();
  cache.Cover(K);
  for (int l = 0; l < config.num_layers; ++l) {
    for (int64_t j = 0; j < K; ++j) {
      std::memcpy(cache.KeyRow(l, j), P + j * W + 2 * l * row, sizeof(float) * row);
      std::memcpy(cache.ValueRow(l, j), P + j * W + (2 * l + 1) * row, sizeof(float) * row);
    }
  }
  cache.size_ = K;
}

std::vector<float> Model::Impl::PrefixTableCopy() const {
  const LoraState& s = *lora;
  const int64_t K = PrefixTokens();
  std::vector<float> table(static_cast<size_t>(K * s.prefix_width));
  if (s.prefix >= 0) {
    std::copy(s.params.begin() + s.prefix, s.params.begin() + s.prefix + K * s.prefix_width,
              table.begin());
  } else {
    std::vector<float> h(static_cast<size_t>(K * PrefixHidden()));
    PrefixEncoderForward(table.data(), h.data());
  }
  return table;
}

}  // namespace ropekit
