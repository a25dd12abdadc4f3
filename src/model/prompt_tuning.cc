// Prompt tuning (Lester et al. 2021, arXiv:2104.08691) with the semantics of Hugging Face PEFT
// (tuners/prompt_tuning/model.py PromptEmbedding, peft_model.py PeftModelForCausalLM.forward):
// K trainable virtual token embeddings P [K, d] are concatenated in front of the token
// embeddings of every sequence, so the model runs on K + T rows:
//   x_0 = [P; E[ids]] (+ the absolute position hook at positions 0..K+T-1)
// The virtual rows take positions 0..K-1 (RoPE rotates their queries and keys like any token),
// the real tokens K..K+T-1; the virtual rows' targets are ignored (PEFT pads the labels with
// -100), so the loss is the mean over the real targets. Inside the model virtual token k has the
// id V + k, so the forward, the KV cache and the backward treat it as a token whose embedding row
// is P[k]; its gradient is layer 0's input gradient of those rows (times the embedding scale of
// an embedding-scaled position encoding), summed over the batch.
//
// Dimension legend: K = virtual tokens, d = hidden, V = vocab, B = batch, T = real tokens per
// sequence, M = rows of the forward (B * (K + T)).
#include <cstring>
#include <string>

#include "ropekit/kv_cache.h"
#include "src/model/model_impl.h"
#include "src/ops/ops.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {

void CheckRealIds(const int32_t* ids, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      throw Error("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                  " is outside [0, vocab_size " + std::to_string(vocab) + ")");
    }
  }
}

}  // namespace

int64_t Model::Impl::VirtualTokens() const {
  return lora && lora->prompt >= 0 ? lora->config.num_virtual_tokens : 0;
}

const float* Model::Impl::EmbedRow(int32_t id) const {
  const int64_t d = config.hidden_size, V = config.vocab_size;
  if (id >= V) return lora->params.data() + lora->prompt + (id - V) * d;
  return Embed() + int64_t{id} * d;
}

void Model::Impl::AddPromptTuning(const LoraConfig& config_in, uint64_t seed) {
  const ModelConfig& c = config;
  auto s = PromptLearningState(config_in, c.num_layers);
  const int64_t K = config_in.num_virtual_tokens, d = c.hidden_size;
  // peft saves the table as "prompt_embeddings" ([num_virtual_tokens * num_transformer_submodules,
  // token_dim], one submodule for a causal LM).
  int64_t size = 0;
  s->prompt = s->AddTensor("prompt_embeddings", {K, d}, true, &size);
  s->params.assign(static_cast<size_t>(size), 0.0f);
  std::span<float> table(s->params.data(), static_cast<size_t>(K * d));
  if (config_in.prompt_init_text.empty()) {
    // RANDOM: torch's nn.Embedding default, N(0, 1).
    FillNormal(SplitMixAt(seed, 0), 1.0, table);
  } else {
    // TEXT: the word embeddings of the text's ids, cut or repeated to K (PromptEmbedding).
    const std::string& text = config_in.prompt_init_text;
    const float* E = Embed();
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = static_cast<unsigned char>(text[k % static_cast<int64_t>(text.size())]);
      std::memcpy(table.data() + k * d, E + id * d, sizeof(float) * d);
    }
  }
  lora = std::move(s);
  ws = Workspace();
}

int64_t Model::Impl::PrependVirtualTokens(int64_t batch, int64_t seq_len) {
  const int64_t K = VirtualTokens();
  if (K == 0) return seq_len;
  const int64_t V = config.vocab_size, T = seq_len, n = K + T;
  CheckRealIds(inputs.data(), batch * T, V);
  std::vector<int32_t> in(batch * n), tg(batch * n, -1);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < K; ++k) in[b * n + k] = static_cast<int32_t>(V + k);
    std::memcpy(in.data() + b * n + K, inputs.data() + b * T, sizeof(int32_t) * T);
    std::memcpy(tg.data() + b * n + K, targets.data() + b * T, sizeof(int32_t) * T);
  }
  inputs.swap(in);
  targets.swap(tg);
  return n;
}

void Model::Impl::PromptBackward(const int32_t* tokens, int64_t m, const float* dx,
                                 float* G) const {
  const int64_t d = config.hidden_size, V = config.vocab_size;
  // x = scale * e + pe: de = scale * dx (AddToEmbeddingsBackward's factor).
  const double scale = pe->acts_on_embeddings() ? pe->embedding_scale() : 1.0;
  for (int64_t i = 0; i < m; ++i) {  // ascending rows: a fixed summation order
    if (tokens[i] < V) continue;
    float* row = G + lora->prompt + (tokens[i] - V) * d;
    const float* src = dx + i * d;
    for (int64_t j = 0; j < d; ++j) {
      row[j] += scale == 1.0 ? src[j] : static_cast<float>(scale * double{src[j]});
    }
  }
}

void Model::Impl::ForwardVirtual(std::span<const int32_t> in, int64_t batch, int64_t seq_len,
                                 float* out_logits, const int32_t* tg, float* out_losses,
                                 ThreadPool* pool) {
  const int64_t T = seq_len, V = config.vocab_size;
  inputs.assign(in.begin(), in.end());
  targets.assign(static_cast<size_t>(batch * T), -1);
  if (tg) std::memcpy(targets.data(), tg, sizeof(int32_t) * batch * T);
  const int64_t n = PrependVirtualTokens(batch, T);
  const int64_t K = n - T;
  RunForward(inputs.data(), batch, n, false, nullptr, pool);
  Logits(batch * n, pool);
  const bool score = tg != nullptr && out_losses != nullptr;
  if (score) {
    losses.resize(batch * n);
    ops::CrossEntropy(ws.logits, targets.data(), losses.data(), nullptr, 1.0f, batch * n, V, pool);
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (out_logits) {
      std::memcpy(out_logits + b * T * V, ws.logits + (b * n + K) * V, sizeof(float) * T * V);
    }
    if (score) std::memcpy(out_losses + b * T, losses.data() + b * n + K, sizeof(float) * T);
  }
}

void Model::Impl::PrefillVirtualTokens(std::span<const int32_t> tokens, KVCache& cache,
                                       ThreadPool* pool) {
  const int64_t K = VirtualTokens(), V = config.vocab_size;
  CheckRealIds(tokens.data(), static_cast<int64_t>(tokens.size()), V);
  if (cache.size() > 0) return;
  if (K + static_cast<int64_t>(tokens.size()) > cache.capacity()) {
    throw Error("KV cache: the adapter's " + std::to_string(K) + " virtual tokens plus " +
                std::to_string(tokens.size()) + " tokens exceed its capacity " +
                std::to_string(cache.capacity()));
  }
  std::vector<int32_t> ids(K);
  for (int64_t k = 0; k < K; ++k) ids[k] = static_cast<int32_t>(V + k);
  RunForward(ids.data(), 1, K, false, &cache, pool);
}

}  // namespace ropekit
