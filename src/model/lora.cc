// LoRA and QLoRA adapters of the model (see ropekit/model.h, LoraConfig): the adapter's
// parameter layout and initialisation, its forward and backward on one projection, the weight
// accessors the model's passes read through, NF4 quantization of the frozen projections and
// merging.
//
// Per targeted projection y = x W^T (x [M, in], W [out, in] frozen), with s = alpha / r:
//   forward:   xd = dropout(x); u = s * xd A^T [M, r]; y += u B^T
//   backward:  dB += dy^T u; du = s * dy B; dA += du^T xd; dx += dropout'(du A)
// (the chain rule of peft's Linear.forward: lora_B(lora_A(dropout(x))) * scaling). Inverted
// dropout as torch's nn.Dropout: kept elements are scaled by 1 / (1 - p). The mask is a pure
// function of (dropout seed, layer, module, element), so the backward recomputes it.
//
// Dimension legend: M = rows (tokens), r = rank, in / out = the projection's input / output
// features, d = hidden, F = intermediate, hq = H * D, hk = Hkv * D, L = layers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <tuple>

#include "src/model/model_impl.h"
#include "src/ops/ops.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {

int64_t ModuleOffset(const LayerOffsets& o, int m) {
  const int64_t offsets[7] = {o.q, o.k, o.v, o.o, o.gate, o.up, o.down};
  return offsets[m];
}

// [in, out] of projection m.
std::pair<int64_t, int64_t> ModuleShape(const ModelConfig& c, int m) {
  const int64_t d = c.hidden_size, hq = int64_t{c.num_heads} * c.resolved_head_dim();
  const int64_t hk = int64_t{c.num_kv_heads} * c.resolved_head_dim(), F = c.intermediate_size;
  const std::pair<int64_t, int64_t> shapes[7] = {{d, hq}, {d, hk}, {d, hk}, {hq, d},
                                                 {d, F},  {d, F},  {F, d}};
  return shapes[m];
}

int ModuleIndex(const std::string& name) {
  for (int m = 0; m < 7; ++m) {
    if (name == kLoraModules[m]) return m;
  }
  return -1;
}

std::string ModulePath(int layer, int m) {
  return "base_model.model.model.layers." + std::to_string(layer) +
         (m < 4 ? ".self_attn." : ".mlp.") + kLoraModules[m];
}

// xd = dropout(x) with the mask of (seed, layer, module): keep with probability 1 - p, scaled.
void Dropout(const float* x, float* xd, int64_t n, double p, uint64_t seed) {
  const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = UnitInterval53(SplitMixAt(seed, static_cast<uint64_t>(i))) >= p;
    xd[i] = keep ? x[i] * keep_scale : 0.0f;
  }
}

// Projection `module` of `layer` under the adapter: the offsets of lora_A and lora_B in its
// buffer (a < 0: the projection is not adapted), its [in, out] and its dropout mask's seed.
struct AdaptedProjection {
  int64_t a = -1, b = -1, in = 0, out = 0;
  uint64_t dropout_seed = 0;
};

AdaptedProjection FindAdapted(const LoraState& s, const ModelConfig& c, int layer, int module) {
  AdaptedProjection p;
  p.a = s.layers[layer].a[module];
  if (p.a < 0) return p;
  p.b = s.layers[layer].b[module];
  std::tie(p.in, p.out) = ModuleShape(c, module);
  p.dropout_seed = SplitMixAt(s.dropout_seed, static_cast<uint64_t>(layer) * 7 + module);
  return p;
}

// dropout(x) [M, in] written to s.xd when `dropout`, else x itself.
const float* DropoutInput(LoraState& s, const AdaptedProjection& p, const float* x, int64_t m,
                          bool dropout) {
  if (!dropout) return x;
  Dropout(x, s.xd.data(), m * p.in, s.config.dropout, p.dropout_seed);
  return s.xd.data();
}

}  // namespace

void LoraConfig::Validate(const ModelConfig& model) const {
  const ModelConfig c = model.Resolved();
  if (type != PeftType::kLora) {
    const char* option = type == PeftType::kPromptTuning ? "--prompt-tuning" : "--prefix-tuning";
    const int64_t max_k = std::min<int64_t>(c.max_position_embeddings - 1, kMaxVirtualTokens);
    if (num_virtual_tokens < 1 || num_virtual_tokens > max_k) {
      throw Error(std::string(option) + " " + std::to_string(num_virtual_tokens) +
                  " (num_virtual_tokens) is outside [1, " + std::to_string(max_k) +
                  "]: the virtual tokens and at least one real token must fit in the base "
                  "model's context (max_position_embeddings - 1), at most 65536");
    }
    for (size_t i = 0; i < prompt_init_text.size(); ++i) {
      const int id = static_cast<unsigned char>(prompt_init_text[i]);
      if (id >= c.vocab_size) {
        throw Error("--prompt-tuning-init-text: byte " + std::to_string(id) + " at offset " +
                    std::to_string(i) + " is outside the vocabulary [0, " +
                    std::to_string(c.vocab_size) + ")");
      }
    }
    if (!prompt_init_text.empty() && type != PeftType::kPromptTuning) {
      throw Error("--prompt-tuning-init-text: needs --prompt-tuning");
    }
    if (type == PeftType::kPrefixTuning) {
      const RopeType rt = c.position_encoding.rope.type;
      if (c.position_encoding.kind == PositionEncodingKind::kRope &&
          (rt == RopeType::kDynamic || rt == RopeType::kLongRope)) {
        throw Error(
            "--prefix-tuning: the base's rope_type (dynamic / longrope) re-rotates cached keys "
            "with the length; prefix keys are fixed cache entries (use another rope_type)");
      }
      if (prefix_projection && (prefix_hidden < 0 || prefix_hidden > kMaxVirtualTokens)) {
        throw Error("--prefix-hidden " + std::to_string(prefix_hidden) +
                    " (encoder_hidden_size) is outside [1, 65536] (0 = token_dim)");
      }
    }
    if ((prefix_projection || prefix_hidden != 0) && type != PeftType::kPrefixTuning) {
      throw Error("--prefix-projection: needs --prefix-tuning");
    }
    if (qlora) throw Error("--qlora: needs --lora-rank (QLoRA trains LoRA matrices)");
    return;
  }
  if (target_modules.empty()) {
    throw Error(
        "--lora-targets: at least one module is required (any of q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj)");
  }
  std::set<std::string> seen;
  int64_t max_rank = int64_t{1} << 30;
  for (const std::string& t : target_modules) {
    const int m = ModuleIndex(t);
    if (m < 0) {
      throw Error("--lora-targets: unknown module '" + t +
                  "' (accepted: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
    }
    if (!seen.insert(t).second) throw Error("--lora-targets: '" + t + "' is given twice");
    const auto [in, out] = ModuleShape(c, m);
    max_rank = std::min({max_rank, in, out});
  }
  if (rank < 1 || rank > max_rank) {
    throw Error("--lora-rank " + std::to_string(rank) + " is outside [1, " +
                std::to_string(max_rank) +
                "] (the smallest input or output width of the targeted projections)");
  }
  if (!(std::isfinite(alpha) && alpha > 0)) {
    throw Error("--lora-alpha " + std::to_string(alpha) + " must be finite and > 0");
  }
  if (!(dropout >= 0.0 && dropout < 1.0)) {
    throw Error("--lora-dropout " + std::to_string(dropout) + " must be in [0, 1)");
  }
}

// ---------------------------------------------------------------------------------------------
// Weight accessors.

const float* Model::Impl::Proj(int layer, int module, ThreadPool* pool) {
  if (lora && !lora->nf4.empty()) {
    const ops::Nf4Tensor& t = lora->nf4[layer][module];
    ops::DequantizeNf4(t, lora->wbuf.data(), pool);
    return lora->wbuf.data();
  }
  return MatmulWeights() + ModuleOffset(layers[layer], module);
}

const float* Model::Impl::Embed() const {
  if (lora && lora->embed >= 0) return lora->params.data() + lora->embed;
  return params.data() + embed;
}

const float* Model::Impl::Head() const {
  if (config.tie_word_embeddings && lora && lora->embed >= 0) return Embed();
  return MatmulWeights() + head;
}

const float* Model::Impl::Norm(int layer, bool post) const {
  if (lora && lora->layers[layer].input_norm >= 0) {
    const LoraState::Layer& a = lora->layers[layer];
    return lora->params.data() + (post ? a.post_norm : a.input_norm);
  }
  return params.data() + (post ? layers[layer].post_norm : layers[layer].input_norm);
}

const float* Model::Impl::FinalNorm() const {
  if (lora && lora->final_norm >= 0) return lora->params.data() + lora->final_norm;
  return params.data() + final_norm;
}

// ---------------------------------------------------------------------------------------------
// Forward and backward of one adapted projection.

void Model::Impl::PrepareLora(int64_t m, bool train) {
  LoraState& s = *lora;
  const int64_t r = s.config.rank;
  int64_t max_in = 0;
  for (int k = 0; k < 7; ++k) max_in = std::max(max_in, ModuleShape(config, k).first);
  const size_t u = static_cast<size_t>((train ? int64_t{config.num_layers} * 7 : 1) * m * r);
  if (s.u.size() != u) s.u.assign(u, 0.0f);
  const bool dropout = train && s.config.dropout > 0;
  const size_t xd = dropout ? static_cast<size_t>(m * max_in) : 0;
  if (s.xd.size() != xd) s.xd.assign(xd, 0.0f);
  if (s.dx.size() != xd) s.dx.assign(xd, 0.0f);
  const size_t du = train ? static_cast<size_t>(m * r) : 0;
  if (s.du.size() != du) s.du.assign(du, 0.0f);
}

void Model::Impl::LoraForward(int layer, int module, const float* x, float* y, int64_t m,
                              bool train, ThreadPool* pool) {
  LoraState& s = *lora;
  const AdaptedProjection p = FindAdapted(s, config, layer, module);
  if (p.a < 0) return;
  const int64_t r = s.config.rank;
  float* u = s.u.data() + (train ? (int64_t{layer} * 7 + module) * m * r : 0);
  const float* xd = DropoutInput(s, p, x, m, train && s.config.dropout > 0);
  ops::MatMul(xd, s.params.data() + p.a, u, m, p.in, r, pool);
  for (int64_t i = 0; i < m * r; ++i) u[i] *= s.scaling;
  ops::MatMul(u, s.params.data() + p.b, y, m, r, p.out, pool, /*accumulate=*/true);
}

void Model::Impl::LoraBackward(int layer, int module, const float* x, const float* dy, float* dx,
                               int64_t m, float* G, ThreadPool* pool) {
  LoraState& s = *lora;
  const AdaptedProjection p = FindAdapted(s, config, layer, module);
  if (p.a < 0) return;
  const int64_t r = s.config.rank, in = p.in;
  const float* u = s.u.data() + (int64_t{layer} * 7 + module) * m * r;
  ops::MatMulBackwardWeight(dy, u, G + p.b, m, r, p.out, pool);
  float* du = s.du.data();
  ops::MatMulBackwardInput(dy, s.params.data() + p.b, du, m, r, p.out, pool);
  for (int64_t i = 0; i < m * r; ++i) du[i] *= s.scaling;
  const bool dropout = s.config.dropout > 0;
  ops::MatMulBackwardWeight(du, DropoutInput(s, p, x, m, dropout), G + p.a, m, in, r, pool);
  // dx is null when the input's gradient is not needed (layer 0, frozen embeddings).
  if (dx == nullptr) return;
  if (!dropout) {
    ops::MatMulBackwardInput(du, s.params.data() + p.a, dx, m, in, r, pool, /*accumulate=*/true);
    return;
  }
  ops::MatMulBackwardInput(du, s.params.data() + p.a, s.dx.data(), m, in, r, pool);
  // d dropout(x) / dx: the same mask and scale (Dropout of ones gives them).
  const float keep_scale = static_cast<float>(1.0 / (1.0 - s.config.dropout));
  for (int64_t i = 0; i < m * in; ++i) {
    if (UnitInterval53(SplitMixAt(p.dropout_seed, static_cast<uint64_t>(i))) >= s.config.dropout) {
      dx[i] += s.dx[i] * keep_scale;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Model API.

namespace {

// The adapter's tensors in PEFT order (lora_A and lora_B of each targeted projection, layer by
// layer, then the LoRA+ tensors) and a zeroed buffer for them.
std::unique_ptr<LoraState> LayOutLora(const LoraConfig& config, const ModelConfig& c) {
  auto s = std::make_unique<LoraState>();
  s->config = config;
  s->scaling = static_cast<float>(config.alpha / config.rank);
  s->layers.resize(c.num_layers);
  std::vector<bool> target(7, false);
  for (const std::string& t : config.target_modules) target[ModuleIndex(t)] = true;
  int64_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    return s->AddTensor(std::move(name), std::move(shape), decay, &offset);
  };
  const int64_t r = config.rank;
  for (int l = 0; l < c.num_layers; ++l) {
    LoraState::Layer& L = s->layers[l];
    L.a.fill(-1);
    L.b.fill(-1);
    for (int m = 0; m < 7; ++m) {
      if (!target[m]) continue;
      const auto [in, out] = ModuleShape(c, m);
      L.a[m] = add(ModulePath(l, m) + ".lora_A.weight", {r, in}, true);
      L.b[m] = add(ModulePath(l, m) + ".lora_B.weight", {out, r}, true);
    }
  }
  // LoRA+ (modules_to_save): PEFT saves them under the base module's name
  // (ModulesToSaveWrapper.adapter_state_dict_load_map strips "modules_to_save.<adapter>.").
  const int64_t d = c.hidden_size;
  if (config.train_embeddings) {
    s->embed = add("base_model.model.model.embed_tokens.weight", {c.vocab_size, d}, true);
  }
  if (config.train_norms) {
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = "base_model.model.model.layers." + std::to_string(l);
      s->layers[l].input_norm = add(p + ".input_layernorm.weight", {d}, false);
      s->layers[l].post_norm = add(p + ".post_attention_layernorm.weight", {d}, false);
    }
    s->final_norm = add("base_model.model.model.norm.weight", {d}, false);
  }
  s->params.assign(static_cast<size_t>(offset), 0.0f);
  return s;
}

// A ~ U(-1/sqrt(in), 1/sqrt(in)): kaiming_uniform_(a = sqrt(5)) on [r, in] (fan_in = in), as
// torch's nn.Linear.reset_parameters and peft's LoraLayer.reset_lora_parameters. B stays 0.
void InitLoraA(LoraState& s, uint64_t seed) {
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    const TensorInfo& t = s.tensors[i];
    if (!t.name.ends_with(".lora_A.weight")) continue;
    const double bound = 1.0 / std::sqrt(static_cast<double>(t.shape[1]));
    uint64_t state = SplitMixAt(seed, i);
    for (int64_t k = 0; k < t.size; ++k) {
      const double u01 = UnitInterval53(SplitMix64(state));
      s.params[t.offset + k] = static_cast<float>((2.0 * u01 - 1.0) * bound);
    }
  }
}

// The LoRA+ tensors start as copies of the base's embeddings and norm gains.
void CopyLoraPlusFromBase(LoraState& s, const Model::Impl& I) {
  const ModelConfig& c = I.config;
  const int64_t d = c.hidden_size;
  auto copy = [&](int64_t to, int64_t from, int64_t n) {
    std::copy(I.params.begin() + from, I.params.begin() + from + n, s.params.begin() + to);
  };
  if (s.embed >= 0) copy(s.embed, I.embed, int64_t{c.vocab_size} * d);
  if (s.config.train_norms) {
    for (int l = 0; l < c.num_layers; ++l) {
      copy(s.layers[l].input_norm, I.layers[l].input_norm, d);
      copy(s.layers[l].post_norm, I.layers[l].post_norm, d);
    }
    copy(s.final_norm, I.final_norm, d);
  }
}

// QLoRA: every projection of the base as NF4, and one float matrix to dequantize into.
void QuantizeProjections(LoraState& s, const Model::Impl& I) {
  const ModelConfig& c = I.config;
  s.nf4.resize(c.num_layers);
  int64_t max_w = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int m = 0; m < 7; ++m) {
      const auto [in, out] = ModuleShape(c, m);
      s.nf4[l][m] = ops::QuantizeNf4(I.params.data() + ModuleOffset(I.layers[l], m), out, in);
      max_w = std::max(max_w, in * out);
    }
  }
  s.wbuf.assign(static_cast<size_t>(max_w), 0.0f);
}

// QLoRA: keeps only the base's other tensors (embeddings, norms, head, position table) in its
// float buffer, moved together, and points the model's offsets at their new places (the
// projections' at -1).
void DropFloatProjections(Model::Impl& I) {
  std::vector<TensorInfo> kept;
  std::vector<float> compact;
  auto is_proj = [](const std::string& n) {
    for (const char* m : kLoraModules) {
      if (n.ends_with(std::string(m) + ".weight")) return true;
    }
    return false;
  };
  std::vector<std::pair<int64_t, int64_t>> moves;  // old offset -> new offset
  int64_t at = 0;
  for (const TensorInfo& t : I.tensors) {
    if (is_proj(t.name)) continue;
    TensorInfo n = t;
    n.offset = at;
    moves.push_back({t.offset, at});
    kept.push_back(n);
    at = AlignUp(at + t.size);
  }
  compact.assign(static_cast<size_t>(at), 0.0f);
  for (size_t i = 0; i < kept.size(); ++i) {
    std::copy(I.params.begin() + moves[i].first, I.params.begin() + moves[i].first + kept[i].size,
              compact.begin() + kept[i].offset);
  }
  auto move = [&](int64_t old) {
    for (const auto& [from, to] : moves) {
      if (from == old) return to;
    }
    return at;  // the end of the buffer (an absent position table)
  };
  I.embed = move(I.embed);
  I.head = move(I.head);
  I.final_norm = move(I.final_norm);
  I.pe_params = I.pe_size > 0 ? move(I.pe_params) : at;
  for (LayerOffsets& o : I.layers) {
    o.input_norm = move(o.input_norm);
    o.post_norm = move(o.post_norm);
    o.q = o.k = o.v = o.o = o.gate = o.up = o.down = -1;
  }
  I.tensors = std::move(kept);
  I.params = std::move(compact);
  I.params.shrink_to_fit();
}

}  // namespace

void Model::AddLora(const LoraConfig& config, uint64_t seed) {
  Impl& I = *impl_;
  if (I.lora) throw Error("AddLora: the model already has an adapter");
  config.Validate(I.config);
  if (I.precision == MatmulPrecision::kBf16) {
    throw Error("LoRA: bf16 matmul precision (--bf16) is not supported with adapters");
  }
  if (config.type == PeftType::kPromptTuning) return I.AddPromptTuning(config, seed);
  if (config.type == PeftType::kPrefixTuning) return I.AddPrefixTuning(config, seed);
  if (config.type != PeftType::kLora) throw Error("AddLora: this adapter type is not supported");
  std::unique_ptr<LoraState> s = LayOutLora(config, I.config);
  InitLoraA(*s, seed);
  CopyLoraPlusFromBase(*s, I);
  if (config.qlora) {
    // Quantize every projection, then keep only the other tensors in the float buffer.
    QuantizeProjections(*s, I);
    DropFloatProjections(I);
  }
  I.lora = std::move(s);
  I.ws = Workspace();  // the activation plan is rebuilt for the adapter
}

int64_t Model::num_virtual_tokens() const { return impl_->VirtualTokens() + impl_->PrefixTokens(); }

std::vector<float> Model::prefix_table() const {
  if (impl_->PrefixTokens() == 0) throw Error("prefix_table: the model has no prefix adapter");
  return impl_->PrefixTableCopy();
}

const LoraConfig* Model::lora_config() const {
  return impl_->lora ? &impl_->lora->config : nullptr;
}

std::span<float> Model::trainable_parameters() {
  return impl_->lora ? std::span<float>(impl_->lora->params) : std::span<float>(impl_->params);
}
std::span<const float> Model::trainable_parameters() const {
  return impl_->lora ? std::span<const float>(impl_->lora->params)
                     : std::span<const float>(impl_->params);
}
const std::vector<TensorInfo>& Model::trainable_tensors() const {
  return impl_->lora ? impl_->lora->tensors : impl_->tensors;
}

void Model::set_dropout_seed(uint64_t seed) {
  if (impl_->lora) impl_->lora->dropout_seed = seed;
}

void Model::MergeLora() {
  Impl& I = *impl_;
  if (!I.lora) throw Error("MergeLora: the model has no adapter");
  LoraState& s = *I.lora;
  if (s.config.type != PeftType::kLora) {
    throw Error(
        "merge: a prompt-learning adapter (PROMPT_TUNING / PREFIX_TUNING) adds virtual tokens, "
        "not a weight update, so it cannot be merged into the weights (PEFT cannot merge it "
        "either); use it with --adapter in eval or generate");
  }
  if (!s.nf4.empty()) {
    throw Error(
        "merge: a QLoRA adapter's base is NF4; merge it into the float checkpoint "
        "(load the base without --qlora)");
  }
  const ModelConfig& c = I.config;
  const int64_t r = s.config.rank;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int m = 0; m < 7; ++m) {
      if (s.layers[l].a[m] < 0) continue;
      const auto [in, out] = ModuleShape(c, m);
      const float* A = s.params.data() + s.layers[l].a[m];
      const float* B = s.params.data() + s.layers[l].b[m];
      float* W = I.params.data() + ModuleOffset(I.layers[l], m);
      // W += (alpha / r) B A (peft get_delta_weight), each element in double, rounded once.
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) {
          double acc = 0.0;
          for (int64_t k = 0; k < r; ++k) acc += double{B[o * r + k]} * A[k * in + i];
          W[o * in + i] = static_cast<float>(W[o * in + i] + double{s.scaling} * acc);
        }
      }
    }
  }
  const int64_t d = c.hidden_size;
  auto back = [&](int64_t to, int64_t from, int64_t n) {
    std::copy(s.params.begin() + from, s.params.begin() + from + n, I.params.begin() + to);
  };
  if (s.embed >= 0) back(I.embed, s.embed, int64_t{c.vocab_size} * d);
  if (s.final_norm >= 0) {
    for (int l = 0; l < c.num_layers; ++l) {
      back(I.layers[l].input_norm, s.layers[l].input_norm, d);
      back(I.layers[l].post_norm, s.layers[l].post_norm, d);
    }
    back(I.final_norm, s.final_norm, d);
  }
  I.lora.reset();
  I.ws = Workspace();
}

int64_t Model::projection_parameters() const {
  int64_t n = 0;
  for (int m = 0; m < 7; ++m) {
    const auto [in, out] = ModuleShape(impl_->config, m);
    n += in * out;
  }
  return n * impl_->config.num_layers;
}

int64_t Model::projection_bytes() const {
  const Impl& I = *impl_;
  if (!I.lora || I.lora->nf4.empty()) {
    return projection_parameters() * static_cast<int64_t>(sizeof(float));
  }
  int64_t bytes = 0;
  for (const auto& layer : I.lora->nf4) {
    for (const ops::Nf4Tensor& t : layer) bytes += t.bytes();
  }
  return bytes;
}

}  // namespace ropekit
