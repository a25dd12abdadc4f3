// The LLaMA-architecture model: parameter layout, initialisation, forward, hand-written backward
// and cached (KV) forward.
//
// Forward of layer l on the residual stream x [M, d] (Touvron et al. 2023):
//   xn1 = RMSNorm(x) * w_in;  q = xn1 Wq^T, k = xn1 Wk^T, v = xn1 Wv^T
//   q, k <- RoPE(q, k) (RoPE kinds); ao = causal softmax(q k^T / sqrt(D) + bias) v (fused,
//   FlashAttention-2 tiles: only the per-row log-sum-exp is kept for the backward)
//   mid = x + ao Wo^T;  xn2 = RMSNorm(mid) * w_post;  h = silu(xn2 Wg^T) * (xn2 Wu^T)
//   x' = mid + h Wd^T
// then xf = RMSNorm(x_L) * w_norm and logits = xf W_head^T (W_head = W_embed when tied).
// The backward applies the chain rule to the same steps in reverse; RoPE's backward is the
// transposed rotation (Direction::kBackward), the embedding hooks' backward is
// AddToEmbeddingsBackward, the logit hooks' backward AddLogitBiasBackward.
//
// Dimension legend: V = vocab, d = hidden, H / Hkv = heads / kv heads, D = head_dim,
// F = intermediate, L = layers, B = batch, T = tokens per sequence, M = B * T, Tk = keys.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ropekit/half.h"
#include "ropekit/kv_cache.h"
#include "src/model/model_impl.h"
#include "src/ops/ops.h"
#include "src/util/profile.h"
#include "src/util/rng.h"

namespace ropekit {
namespace {

uint64_t MixSeed(uint64_t seed, uint64_t index) {
  return SplitMixFinalize(seed + kSplitMixGamma * (index + 1));
}

int64_t AlignUp(int64_t n) { return (n + kTensorAlign - 1) / kTensorAlign * kTensorAlign; }

}  // namespace

void Model::Impl::BuildLayout() {
  const ModelConfig& c = config;
  const int64_t d = c.hidden_size, D = c.head_dim, F = c.intermediate_size, V = c.vocab_size;
  const int64_t hq = int64_t{c.num_heads} * D, hk = int64_t{c.num_kv_heads} * D;
  int64_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    int64_t size = 1;
    for (int64_t s : shape) size *= s;
    tensors.push_back({std::move(name), std::move(shape), offset, size, decay});
    const int64_t at = offset;
    offset = AlignUp(offset + size);
    return at;
  };
  embed = add("model.embed_tokens.weight", {V, d}, true);
  layers.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerOffsets& o = layers[l];
    o.input_norm = add(p + "input_layernorm.weight", {d}, false);
    o.q = add(p + "self_attn.q_proj.weight", {hq, d}, true);
    o.k = add(p + "self_attn.k_proj.weight", {hk, d}, true);
    o.v = add(p + "self_attn.v_proj.weight", {hk, d}, true);
    o.o = add(p + "self_attn.o_proj.weight", {d, hq}, true);
    o.post_norm = add(p + "post_attention_layernorm.weight", {d}, false);
    o.gate = add(p + "mlp.gate_proj.weight", {F, d}, true);
    o.up = add(p + "mlp.up_proj.weight", {F, d}, true);
    o.down = add(p + "mlp.down_proj.weight", {d, F}, true);
  }
  final_norm = add("model.norm.weight", {d}, false);
  head = c.tie_word_embeddings ? embed : add("lm_head.weight", {V, d}, true);
  pe_size = pe->num_parameters();
  pe_params = offset;
  const PositionEncodingSpec& spec = c.position_encoding;
  if (spec.kind == PositionEncodingKind::kLearned) {
    pe_params = add("model.embed_positions.weight", {spec.max_positions, d}, true);
  } else if (spec.kind == PositionEncodingKind::kT5) {
    pe_params = add("model.relative_attention_bias.weight", {spec.num_buckets, c.num_heads}, true);
  }
  params.assign(static_cast<size_t>(offset), 0.0f);
}

void Model::Impl::Init(uint64_t seed) {
  const double std = config.init_std;
  const double out_std = std / std::sqrt(2.0 * config.num_layers);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& t = tensors[i];
    std::span<float> view(params.data() + t.offset, static_cast<size_t>(t.size));
    if (t.shape.size() == 1) {
      std::fill(view.begin(), view.end(), 1.0f);  // RMSNorm gains
    } else if (t.offset == pe_params && pe_size > 0) {
      pe->InitParameters(MixSeed(seed, i), view);
    } else {
      const bool is_out = t.name.ends_with("o_proj.weight") || t.name.ends_with("down_proj.weight");
      FillNormal(MixSeed(seed, i), is_out ? out_std : std, view);
    }
  }
}

bool Model::Impl::RopeIsLengthDependent() const {
  const RopeType t = config.position_encoding.rope.type;
  return config.position_encoding.kind == PositionEncodingKind::kRope &&
         (t == RopeType::kDynamic || t == RopeType::kLongRope);
}

const RopeTable& Model::Impl::Table(int64_t seq_len) {
  const PositionEncodingSpec& spec = config.position_encoding;
  // Rebuilt only when the frequencies change (dynamic NTK past max_position_embeddings, LongRoPE
  // past its original length), not at every decode step below.
  const int64_t key = RopeIsLengthDependent() ? FrequencySeqLen(spec.rope, seq_len) : 0;
  if (!rope_table || rope_table_key != key) {
    rope_table = std::make_unique<RopeTable>(ComputeFrequencies(spec.rope, spec.rope_numerics, key),
                                             seq_len);
    rope_table_key = key;
    ++rope_table_builds;
  } else {
    rope_table->Reserve(seq_len);
  }
  return *rope_table;
}

void Model::Impl::Prepare(int64_t batch, int64_t seq_len, int64_t tk, bool train) {
  Workspace& w = ws;
  const bool unfused = attention == AttentionKernel::kUnfused;
  if (w.batch == batch && w.seq_len == seq_len && w.tk == tk && w.train == train &&
      w.unfused == unfused) {
    return;
  }
  const ModelConfig& c = config;
  const int64_t M = batch * seq_len, d = c.hidden_size, D = c.head_dim;
  const int64_t hq = c.num_heads * D, hk = c.num_kv_heads * D, F = c.intermediate_size;
  const int64_t V = c.vocab_size;
  const int64_t lse = train ? batch * c.num_heads * seq_len : 0;
  const int64_t probs = train && unfused ? batch * c.num_heads * seq_len * tk : 0;
  const int num_layer_sets = train ? c.num_layers : 1;
  const int num_resid = train ? c.num_layers + 1 : 2;
  std::vector<std::pair<float**, int64_t>> plan;
  w.layers.assign(num_layer_sets, {});
  w.resid.assign(num_resid, nullptr);
  for (auto& L : w.layers) {
    plan.insert(plan.end(), {{&L.xn1, M * d},
                             {&L.inv1, M},
                             {&L.q, M * hq},
                             {&L.k, M * hk},
                             {&L.v, M * hk},
                             {&L.lse, lse},
                             {&L.probs, probs},
                             {&L.ao, M * hq},
                             {&L.mid, M * d},
                             {&L.xn2, M * d},
                             {&L.inv2, M},
                             {&L.g, M * F},
                             {&L.u, M * F},
                             {&L.h, M * F}});
  }
  for (auto& r : w.resid) plan.push_back({&r, M * d});
  plan.insert(plan.end(), {{&w.xf, M * d}, {&w.invf, M}, {&w.logits, M * V}});
  const int64_t bw = train ? 1 : 0;
  plan.insert(plan.end(), {{&w.dx, bw * M * d},
                           {&w.dmid, bw * M * d},
                           {&w.dxn, bw * M * d},
                           {&w.dq, bw * M * hq},
                           {&w.dk, bw * M * hk},
                           {&w.dv, bw * M * hk},
                           {&w.dao, bw * M * hq},
                           {&w.dh, bw * M * F},
                           {&w.dg, bw * M * F},
                           {&w.du, bw * M * F}});
  plan.push_back({&w.k_rot, RopeIsLengthDependent() && !train ? tk * hk : 0});
  int64_t total = 0;
  for (auto& [ptr, size] : plan) total = AlignUp(total + size);
  w.buffer.assign(static_cast<size_t>(total), 0.0f);
  int64_t at = 0;
  for (auto& [ptr, size] : plan) {
    *ptr = size > 0 ? w.buffer.data() + at : nullptr;
    at = AlignUp(at + size);
  }
  for (int l = 0; l < num_layer_sets; ++l) w.layers[l].resid_in = w.resid[l];
  w.batch = batch;
  w.seq_len = seq_len;
  w.tk = tk;
  w.train = train;
  w.unfused = unfused;
}

void Model::Impl::PrepareLowPrecisionWeights(bool train, ThreadPool* pool) {
  bf16_kernel = precision == MatmulPrecision::kBf16 && ops::Bf16MatmulAvailable();
  if (precision != MatmulPrecision::kBf16) return;
  if (!bf16_kernel) {
    lowp_params.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      lowp_params[i] = Bf16ToFloat(FloatToBf16(params[i]));
    }
    return;
  }
  OpTimer timer("bf16 weight packing");
  const ModelConfig& c = config;
  const int64_t d = c.hidden_size, hq = int64_t{c.num_heads} * c.head_dim;
  const int64_t hk = int64_t{c.num_kv_heads} * c.head_dim, F = c.intermediate_size;
  auto pack = [&](int64_t offset, int64_t n, int64_t k) {
    ops::PackBf16Weight(params.data() + offset, n, k, train, &bf16_weights[offset], pool);
  };
  for (const LayerOffsets& o : layers) {
    pack(o.q, hq, d);
    pack(o.k, hk, d);
    pack(o.v, hk, d);
    pack(o.o, d, hq);
    pack(o.gate, F, d);
    pack(o.up, F, d);
    pack(o.down, d, F);
  }
  pack(head, c.vocab_size, d);
}

void Model::Impl::Project(const float* x, int64_t w, const float* weights, float* y, int64_t m,
                          int64_t k, int64_t n, ThreadPool* pool, bool accumulate) const {
  if (bf16_kernel) return ops::MatMulBf16(x, bf16_weights.at(w), y, m, pool, accumulate);
  ops::MatMul(x, weights, y, m, k, n, pool, accumulate);
}

void Model::Impl::ProjectBackwardInput(const float* dy, int64_t w, const float* weights, float* dx,
                                       int64_t m, int64_t k, int64_t n, ThreadPool* pool,
                                       bool accumulate) const {
  if (bf16_kernel) {
    return ops::MatMulBackwardInputBf16(dy, bf16_weights.at(w), dx, m, pool, accumulate);
  }
  ops::MatMulBackwardInput(dy, weights, dx, m, k, n, pool, accumulate);
}

void Model::Impl::ProjectBackwardWeight(const float* dy, const float* x, float* dw, int64_t m,
                                        int64_t k, int64_t n, ThreadPool* pool) const {
  if (bf16_kernel) return ops::MatMulBackwardWeightBf16(dy, x, dw, m, k, n, pool);
  ops::MatMulBackwardWeight(dy, x, dw, m, k, n, pool);
}

void Model::Impl::RoundOperand(float* x, int64_t n) const {
  if (precision != MatmulPrecision::kBf16) return;
  for (int64_t i = 0; i < n; ++i) x[i] = Bf16ToFloat(FloatToBf16(x[i]));
}

void Model::Impl::RunForward(const int32_t* tokens, int64_t batch, int64_t seq_len, bool train,
                             KVCache* cache, ThreadPool* pool) {
  const ModelConfig& c = config;
  const int64_t M = batch * seq_len, d = c.hidden_size, D = c.head_dim;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, F = c.intermediate_size, V = c.vocab_size;
  // Prefix tuning: K prefix entries in front of the keys, real tokens from position K.
  const int64_t prefix = cache ? 0 : PrefixTokens();
  const int64_t past = cache ? cache->size_ : prefix;
  const int64_t tk = past + seq_len;
  if (cache && tk > cache->capacity_) {
    throw Error("KV cache: " + std::to_string(tk) + " tokens exceed its capacity " +
                std::to_string(cache->capacity_));
  }
  if (tk - 1 > kMaxPosition) throw Error("position exceeds 2^31 - 1");
  const int64_t ids = V + VirtualTokens();  // prompt tuning's virtual ids V..V+K-1
  for (int64_t m = 0; m < M; ++m) {
    if (tokens[m] < 0 || tokens[m] >= ids) {
      throw Error("token id " + std::to_string(tokens[m]) + " at index " + std::to_string(m) +
                  " is outside [0, vocab_size " + std::to_string(V) + ")");
    }
  }
  Prepare(batch, seq_len, cache || prefix > 0 ? tk : seq_len, train);
  if (lora) PrepareLora(M, train);
  if (prefix > 0) PrefixForwardPrepare(batch, seq_len, train);
  Workspace& w = ws;
  PrepareLowPrecisionWeights(train, pool);
  positions.resize(M);
  q_positions.resize(seq_len);
  k_positions.resize(tk);
  for (int64_t t = 0; t < seq_len; ++t) q_positions[t] = past + t;
  for (int64_t j = 0; j < tk; ++j) k_positions[j] = j;
  for (int64_t m = 0; m < M; ++m) positions[m] = past + m % seq_len;

  // Embedding lookup and the absolute position hook.
  OpTimer embed_timer("fwd embedding");
  float* x = w.resid[0];
  for (int64_t m = 0; m < M; ++m) std::memcpy(x + m * d, EmbedRow(tokens[m]), sizeof(float) * d);
  const PositionSpan pos_span(positions);
  if (pe->acts_on_embeddings()) pe->AddToEmbeddings(pos_span, PeParams(), x, d);

  embed_timer.Stop();
  const bool rope = pe->acts_on_query_key();
  const RopeTable* table = rope ? &Table(tk) : nullptr;
  RotateOptions rot;
  rot.layout = c.position_encoding.rope_layout;
  rot.pool = pool;
  const bool rotate_cache = cache && RopeIsLengthDependent();

  for (int l = 0; l < c.num_layers; ++l) {
    Workspace::Layer& A = w.layers[train ? l : 0];
    const LayerOffsets& o = layers[l];
    float* xin = train ? w.resid[l] : w.resid[l % 2];
    float* xout = train ? w.resid[l + 1] : w.resid[(l + 1) % 2];
    A.resid_in = xin;
    {
      OpTimer timer("fwd rmsnorm");
      ops::RmsNorm(xin, Norm(l, false), A.xn1, A.inv1, M, d, c.rms_norm_eps, pool);
      RoundOperand(A.xn1, M * d);
    }
    {
      OpTimer timer("fwd matmul qkv");
      Project(A.xn1, o.q, Proj(l, 0, pool), A.q, M, d, hq, pool);
      Project(A.xn1, o.k, Proj(l, 1, pool), A.k, M, d, hk, pool);
      Project(A.xn1, o.v, Proj(l, 2, pool), A.v, M, d, hk, pool);
      if (lora) {
        for (int m = 0; m < 3; ++m) {
          LoraForward(l, m, A.xn1, m == 0 ? A.q : m == 1 ? A.k : A.v, M, train, pool);
        }
      }
    }
    OpTimer rope_timer("fwd rope");
    const float* keys = A.k;
    const float* values = A.v;
    if (cache) {
      float* ck = cache->k_.data() + (l * cache->capacity_) * hk;
      float* cv = cache->v_.data() + (l * cache->capacity_) * hk;
      if (rotate_cache) {
        // Store pre-rotation keys; rotate the whole cache with the table of length tk.
        std::memcpy(ck + past * hk, A.k, sizeof(float) * M * hk);
        std::vector<RopeOperand> opsv = {
            {ContiguousView(A.q, DType::kF32, M, H, D), ContiguousView(A.q, DType::kF32, M, H, D)},
        };
        ApplyRope(*table, pos_span, opsv, rot);
        RopeOperand kop{ContiguousView(ck, DType::kF32, tk, Hkv, D),
                        ContiguousView(w.k_rot, DType::kF32, tk, Hkv, D)};
        ApplyRope(*table, PositionSpan(k_positions), std::span<const RopeOperand>(&kop, 1), rot);
        keys = w.k_rot;
        std::memcpy(cv + past * hk, A.v, sizeof(float) * M * hk);
      } else if (rope) {
        // One pass: rotate q in place, rotate k into the cache rows past.., copy v beside it.
        const TensorView q_view = ContiguousView(A.q, DType::kF32, M, H, D);
        const KvCacheView layer_cache =
            ContiguousKvCache(ck, cv, DType::kF32, cache->capacity_, Hkv, D);
        ApplyRopeAndAppend(*table, pos_span, RopeOperand{q_view, q_view},
                           ContiguousView(A.k, DType::kF32, M, Hkv, D),
                           ContiguousView(A.v, DType::kF32, M, Hkv, D), layer_cache,
                           std::span<const int64_t>(positions), rot);
      } else {
        std::memcpy(ck + past * hk, A.k, sizeof(float) * M * hk);
        std::memcpy(cv + past * hk, A.v, sizeof(float) * M * hk);
      }
      if (!rotate_cache) keys = ck;
      values = cv;
    } else if (rope) {
      std::vector<RopeOperand> opsv = {
          {ContiguousView(A.q, DType::kF32, M, H, D), ContiguousView(A.q, DType::kF32, M, H, D)},
          {ContiguousView(A.k, DType::kF32, M, Hkv, D),
           ContiguousView(A.k, DType::kF32, M, Hkv, D)}};
      ApplyRope(*table, pos_span, opsv, rot);
    }
    rope_timer.Stop();
    ops::AttentionArgs args;
    args.batch = batch;
    args.tq = seq_len;
    args.tk = cache ? tk : seq_len;
    args.heads = H;
    args.kv_heads = Hkv;
    args.head_dim = D;
    args.q = A.q;
    args.q_row_stride = hq;
    args.q_batch_stride = seq_len * hq;
    args.k = keys;
    args.v = values;
    args.kv_row_stride = hk;
    args.kv_batch_stride = seq_len * hk;
    args.out = A.ao;
    args.out_row_stride = hq;
    args.out_batch_stride = seq_len * hq;
    args.q_positions = q_positions;
    args.k_positions = cache ? std::span<const int64_t>(k_positions)
                             : std::span<const int64_t>(k_positions.data(), seq_len);
    args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    args.logit_bias = pe.get();
    args.bias_params = PeParams();
    if (prefix > 0) PrefixAttention(l, keys, values, batch, seq_len, train, args);
    {
      OpTimer timer("fwd attention");
      if (attention == AttentionKernel::kUnfused) {
        args.probs = train ? A.probs : nullptr;
        ops::AttentionForward(args, pool);
      } else {
        ops::FlashAttentionForward(args, train ? A.lse : nullptr, pool);
      }
      RoundOperand(A.ao, M * hq);
    }
    {
      OpTimer timer("fwd matmul o");
      std::memcpy(A.mid, xin, sizeof(float) * M * d);
      Project(A.ao, o.o, Proj(l, 3, pool), A.mid, M, hq, d, pool, /*accumulate=*/true);
      if (lora) LoraForward(l, 3, A.ao, A.mid, M, train, pool);
    }
    {
      OpTimer timer("fwd rmsnorm");
      ops::RmsNorm(A.mid, Norm(l, true), A.xn2, A.inv2, M, d, c.rms_norm_eps, pool);
      RoundOperand(A.xn2, M * d);
    }
    {
      OpTimer timer("fwd matmul mlp");
      Project(A.xn2, o.gate, Proj(l, 4, pool), A.g, M, d, F, pool);
      Project(A.xn2, o.up, Proj(l, 5, pool), A.u, M, d, F, pool);
      if (lora) {
        LoraForward(l, 4, A.xn2, A.g, M, train, pool);
        LoraForward(l, 5, A.xn2, A.u, M, train, pool);
      }
    }
    {
      OpTimer timer("fwd swiglu");
      ops::SwiGlu(A.g, A.u, A.h, M * F, pool);
      RoundOperand(A.h, M * F);
    }
    {
      OpTimer timer("fwd matmul mlp");
      std::memcpy(xout, A.mid, sizeof(float) * M * d);
      Project(A.h, o.down, Proj(l, 6, pool), xout, M, F, d, pool, /*accumulate=*/true);
      if (lora) LoraForward(l, 6, A.h, xout, M, train, pool);
    }
  }
  OpTimer timer("fwd rmsnorm");
  float* xl = train ? w.resid[c.num_layers] : w.resid[c.num_layers % 2];
  ops::RmsNorm(xl, FinalNorm(), w.xf, w.invf, M, d, c.rms_norm_eps, pool);
  RoundOperand(w.xf, M * d);
  if (cache) cache->size_ = tk;
}

void Model::Impl::Logits(int64_t rows, ThreadPool* pool) {
  OpTimer timer("fwd matmul head");
  Project(ws.xf, head, Head(), ws.logits, rows, config.hidden_size, config.vocab_size, pool);
}

void Model::Impl::RunBackward(const int32_t* tokens, int64_t batch, int64_t seq_len, float* G,
                              ThreadPool* pool, const Model::GradReadyFn& on_ready) {
  const ModelConfig& c = config;
  Workspace& w = ws;
  const int64_t M = batch * seq_len, d = c.hidden_size, D = c.head_dim;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, F = c.intermediate_size, V = c.vocab_size;
  // With an adapter G is its trainable buffer: frozen weights get no gradient (nullptr: the
  // weight-gradient product is skipped).
  const LoraState* ad = lora.get();
  auto grad = [&](int64_t full_offset, int64_t adapter_offset) -> float* {
    if (!ad) return G + full_offset;
    return adapter_offset >= 0 ? G + adapter_offset : nullptr;
  };
  auto weight_grad = [&](const float* dy, const float* x, float* dw, int64_t k, int64_t n) {
    if (dw) ProjectBackwardWeight(dy, x, dw, M, k, n, pool);
  };
  // w.logits holds dL/dlogits. Head: logits = xf W_head^T.
  {
    OpTimer timer("bwd matmul head");
    RoundOperand(w.logits, M * V);
    weight_grad(w.logits, w.xf, grad(head, c.tie_word_embeddings && ad ? ad->embed : -1), d, V);
    ProjectBackwardInput(w.logits, head, Head(), w.dxn, M, d, V, pool);
  }
  {
    OpTimer timer("bwd rmsnorm");
    ops::RmsNormBackward(w.resid[c.num_layers], FinalNorm(), w.invf, w.dxn, w.dx,
                         grad(final_norm, ad ? ad->final_norm : -1), M, d, pool);
  }
  // Ready ranges follow the layout of BuildLayout: embed | layers | final norm, head | pe table.
  const int64_t num_params = static_cast<int64_t>(params.size());
  auto ready = [&](int64_t begin, int64_t end) {
    if (on_ready && begin < end && !ad) on_ready(begin, end);
  };
  ready(final_norm, pe_params);  // the final norm and an untied head
  const bool rope = pe->acts_on_query_key();
  const int64_t prefix = PrefixTokens();  // prefix tuning: positions prefix..prefix+T-1
  const RopeTable* table = rope ? &Table(prefix + seq_len) : nullptr;
  RotateOptions rot;
  rot.layout = c.position_encoding.rope_layout;
  rot.direction = Direction::kBackward;
  rot.pool = pool;
  const PositionSpan pos_span(positions);
  // Position tables (learned, T5) are frozen under an adapter.
  std::span<float> grad_pe =
      ad ? std::span<float>() : std::span<float>(G + pe_params, static_cast<size_t>(pe_size));
  for (int l = c.num_layers - 1; l >= 0; --l) {
    const Workspace::Layer& A = w.layers[l];
    const LayerOffsets& o = layers[l];
    // x' = mid + h Wd^T: dmid = dx (+ the norm path below).
    {
      OpTimer timer("bwd matmul mlp");
      std::memcpy(w.dmid, w.dx, sizeof(float) * M * d);
      RoundOperand(w.dx, M * d);
      weight_grad(w.dx, A.h, grad(o.down, -1), F, d);
      ProjectBackwardInput(w.dx, o.down, Proj(l, 6, pool), w.dh, M, F, d, pool);
      if (ad) LoraBackward(l, 6, A.h, w.dx, w.dh, M, G, pool);
    }
    {
      OpTimer timer("bwd swiglu");
      ops::SwiGluBackward(A.g, A.u, w.dh, w.dg, w.du, M * F, pool);
      RoundOperand(w.dg, M * F);
      RoundOperand(w.du, M * F);
    }
    {
      OpTimer timer("bwd matmul mlp");
      weight_grad(w.dg, A.xn2, grad(o.gate, -1), d, F);
      weight_grad(w.du, A.xn2, grad(o.up, -1), d, F);
      ProjectBackwardInput(w.dg, o.gate, Proj(l, 4, pool), w.dxn, M, d, F, pool);
      ProjectBackwardInput(w.du, o.up, Proj(l, 5, pool), w.dxn, M, d, F, pool,
                           /*accumulate=*/true);
      if (ad) {
        LoraBackward(l, 4, A.xn2, w.dg, w.dxn, M, G, pool);
        LoraBackward(l, 5, A.xn2, w.du, w.dxn, M, G, pool);
      }
    }
    {
      OpTimer timer("bwd rmsnorm");
      ops::RmsNormBackward(A.mid, Norm(l, true), A.inv2, w.dxn, w.dmid,
                           grad(o.post_norm, ad ? ad->layers[l].post_norm : -1), M, d, pool,
                           /*accumulate=*/true);
    }
    // mid = x + ao Wo^T: dx = dmid (+ the attention path below).
    {
      OpTimer timer("bwd matmul o");
      std::memcpy(w.dx, w.dmid, sizeof(float) * M * d);
      RoundOperand(w.dmid, M * d);
      weight_grad(w.dmid, A.ao, grad(o.o, -1), hq, d);
      ProjectBackwardInput(w.dmid, o.o, Proj(l, 3, pool), w.dao, M, hq, d, pool);
      if (ad) LoraBackward(l, 3, A.ao, w.dmid, w.dao, M, G, pool);
    }
    ops::AttentionArgs args;
    args.batch = batch;
    args.tq = args.tk = seq_len;
    args.heads = H;
    args.kv_heads = Hkv;
    args.head_dim = D;
    args.q = A.q;
    args.q_row_stride = hq;
    args.q_batch_stride = seq_len * hq;
    args.k = A.k;
    args.v = A.v;
    args.kv_row_stride = hk;
    args.kv_batch_stride = seq_len * hk;
    args.out = A.ao;
    args.out_row_stride = hq;
    args.out_batch_stride = seq_len * hq;
    args.q_positions = q_positions;
    args.k_positions = std::span<const int64_t>(k_positions.data(), seq_len);
    args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    args.logit_bias = pe.get();
    args.bias_params = PeParams();
    if (prefix > 0) PrefixAttention(l, nullptr, nullptr, batch, seq_len, true, args);
    // With kBf16 A.ao holds the rounded output; the backward's delta = rowsum(dO o O) then
    // carries that rounding (relative 2^-9), the precision of every other bf16 operand.
    {
      OpTimer timer("bwd attention");
      const std::span<float> grad_bias = pe->acts_on_logits() ? grad_pe : std::span<float>();
      // With a prefix the key / value gradients cover [prefix; sequence] rows first.
      float* dk = prefix > 0 ? lora->dkcat.data() : w.dk;
      float* dv = prefix > 0 ? lora->dvcat.data() : w.dv;
      if (attention == AttentionKernel::kUnfused) {
        args.probs = A.probs;
        ops::AttentionBackward(args, w.dao, w.dq, dk, dv, grad_bias, pool);
      } else {
        ops::FlashAttentionBackward(args, A.lse, w.dao, w.dq, dk, dv, grad_bias, pool);
      }
      if (prefix > 0) PrefixGradients(l, batch, seq_len, w.dk, w.dv, G);
    }
    if (rope) {
      OpTimer timer("bwd rope");
      std::vector<RopeOperand> opsv = {
          {ContiguousView(w.dq, DType::kF32, M, H, D), ContiguousView(w.dq, DType::kF32, M, H, D)},
          {ContiguousView(w.dk, DType::kF32, M, Hkv, D),
           ContiguousView(w.dk, DType::kF32, M, Hkv, D)}};
      ApplyRope(*table, pos_span, opsv, rot);
    }
    // Under an adapter that trains neither the embeddings nor the first norm, nothing needs the
    // gradient of layer 0's input: its q/k/v input products and norm backward are skipped.
    const bool input_grad =
        !(ad && l == 0 && ad->embed < 0 && ad->layers[0].input_norm < 0 && ad->prompt < 0);
    {
      OpTimer timer("bwd matmul qkv");
      RoundOperand(w.dq, M * hq);
      RoundOperand(w.dk, M * hk);
      RoundOperand(w.dv, M * hk);
      weight_grad(w.dq, A.xn1, grad(o.q, -1), d, hq);
      weight_grad(w.dk, A.xn1, grad(o.k, -1), d, hk);
      weight_grad(w.dv, A.xn1, grad(o.v, -1), d, hk);
      if (input_grad) {
        ProjectBackwardInput(w.dq, o.q, Proj(l, 0, pool), w.dxn, M, d, hq, pool);
        ProjectBackwardInput(w.dk, o.k, Proj(l, 1, pool), w.dxn, M, d, hk, pool, true);
        ProjectBackwardInput(w.dv, o.v, Proj(l, 2, pool), w.dxn, M, d, hk, pool, true);
      }
      if (ad) {
        float* dx = input_grad ? w.dxn : nullptr;
        LoraBackward(l, 0, A.xn1, w.dq, dx, M, G, pool);
        LoraBackward(l, 1, A.xn1, w.dk, dx, M, G, pool);
        LoraBackward(l, 2, A.xn1, w.dv, dx, M, G, pool);
      }
    }
    if (input_grad) {
      OpTimer timer("bwd rmsnorm");
      ops::RmsNormBackward(w.resid[l], Norm(l, false), A.inv1, w.dxn, w.dx,
                           grad(o.input_norm, ad ? ad->layers[l].input_norm : -1), M, d, pool,
                           /*accumulate=*/true);
    }
    ready(o.input_norm, l + 1 < c.num_layers ? layers[l + 1].input_norm : final_norm);
  }
  OpTimer timer("bwd embedding");
  // Embedding hooks, then the scatter into the token embedding rows (ascending order).
  if (pe->acts_on_embeddings() && !ad) pe->AddToEmbeddingsBackward(pos_span, w.dx, d, grad_pe);
  // (With an adapter the scatter below runs only when it trains the embeddings, and then w.dx
  // holds layer 0's input gradient.)
  if (float* dE = grad(embed, ad ? ad->embed : -1)) {
    for (int64_t m = 0; m < M; ++m) {
      float* row = dE + int64_t{tokens[m]} * d;
      const float* src = w.dx + m * d;
      for (int64_t j = 0; j < d; ++j) row[j] += src[j];
    }
  }
  if (ad && ad->prompt >= 0) PromptBackward(tokens, M, w.dx, G);
  if (prefix > 0) PrefixBackwardFinish(G);
  ready(0, c.num_layers > 0 ? layers[0].input_norm : final_norm);  // embed (and a tied head)
  ready(pe_params, num_params);                                    // learned / T5 position tables
  if (ad && on_ready && !ad->params.empty()) on_ready(0, static_cast<int64_t>(ad->params.size()));
}

// ---------------------------------------------------------------------------------------------

Model::Model(const ModelConfig& config, uint64_t seed) : impl_(std::make_unique<Impl>()) {
  impl_->config = config.Resolved();
  impl_->pe = std::make_unique<PositionEncoding>(impl_->config.position_encoding);
  impl_->BuildLayout();
  impl_->Init(seed);
}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const ModelConfig& Model::config() const { return impl_->config; }
const std::vector<TensorInfo>& Model::tensors() const { return impl_->tensors; }
const TensorInfo& Model::tensor_info(std::string_view name) const {
  for (const TensorInfo& t : impl_->tensors) {
    if (t.name == name) return t;
  }
  throw Error("model has no tensor named \"" + std::string(name) + "\"");
}
std::span<float> Model::parameters() { return impl_->params; }
std::span<const float> Model::parameters() const { return impl_->params; }
std::span<float> Model::tensor(std::string_view name) {
  const TensorInfo& t = tensor_info(name);
  return {impl_->params.data() + t.offset, static_cast<size_t>(t.size)};
}
int64_t Model::num_parameters() const {
  int64_t n = 0;
  for (const TensorInfo& t : impl_->tensors) n += t.size;
  return n;
}

void Model::SetRopeParams(const RopeParams& params) {
  ModelConfig c = impl_->config;
  if (c.position_encoding.kind != PositionEncodingKind::kRope) {
    throw Error("rope scaling override: the model's position encoding is " +
                std::string(PositionEncodingKindName(c.position_encoding.kind)) + ", not rope");
  }
  RopeParams p = params;
  p.head_dim = c.head_dim;
  if (p.rotary_dim == 0) p.rotary_dim = c.position_encoding.rope.rotary_dim;
  c.position_encoding.rope = p;
  c = c.Resolved();
  impl_->config = c;
  impl_->pe = std::make_unique<PositionEncoding>(c.position_encoding);
  impl_->rope_table.reset();
  impl_->rope_table_key = -1;
}

std::string Bf16MatmulSupport() { return ops::Bf16MatmulDescription(); }

void Model::set_matmul_precision(MatmulPrecision precision) {
  if (impl_->lora && precision == MatmulPrecision::kBf16) {
    throw Error("--bf16: bf16 matmul precision is not supported with a LoRA / QLoRA adapter");
  }
  impl_->precision = precision;
}
MatmulPrecision Model::matmul_precision() const { return impl_->precision; }
void Model::set_attention_kernel(AttentionKernel kernel) { impl_->attention = kernel; }
AttentionKernel Model::attention_kernel() const { return impl_->attention; }
int64_t Model::rope_table_builds() const { return impl_->rope_table_builds; }

double Model::ForwardBackward(std::span<const int32_t> tokens, int64_t batch, int64_t seq_len,
                              std::span<float> grads, float grad_scale, ThreadPool* pool,
                              const GradReadyFn& on_grad_ready) {
  Impl& I = *impl_;
  if (batch < 1 || seq_len < 1) throw Error("ForwardBackward: batch and seq_len must be >= 1");
  if (static_cast<int64_t>(tokens.size()) != batch * (seq_len + 1)) {
    throw Error("ForwardBackward: tokens must hold batch * (seq_len + 1) = " +
                std::to_string(batch * (seq_len + 1)) + " ids, got " +
                std::to_string(tokens.size()));
  }
  const bool backward = !grads.empty();
  const size_t trainable = I.lora ? I.lora->params.size() : I.params.size();
  if (backward && grads.size() != trainable) {
    throw Error("ForwardBackward: grads must have " + std::to_string(trainable) +
                " floats (the trainable parameters)");
  }
  const int64_t scored = batch * seq_len;  // the real tokens' targets
  I.inputs.resize(scored);
  I.targets.resize(scored);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < seq_len; ++t) {
      I.inputs[b * seq_len + t] = tokens[b * (seq_len + 1) + t];
      I.targets[b * seq_len + t] = tokens[b * (seq_len + 1) + t + 1];
    }
  }
  seq_len = I.PrependVirtualTokens(batch, seq_len);  // prompt tuning: K + T, virtual rows unscored
  const int64_t M = batch * seq_len;
  I.RunForward(I.inputs.data(), batch, seq_len, backward, nullptr, pool);
  I.Logits(M, pool);
  I.losses.resize(M);
  OpTimer loss_timer("cross-entropy");
  ops::CrossEntropy(I.ws.logits, I.targets.data(), I.losses.data(),
                    backward ? I.ws.logits : nullptr, grad_scale, M, I.config.vocab_size, pool);
  double sum = 0.0;
  for (int64_t m = 0; m < M; ++m) sum += I.losses[m];
  loss_timer.Stop();
  if (backward) I.RunBackward(I.inputs.data(), batch, seq_len, grads.data(), pool, on_grad_ready);
  return sum / static_cast<double>(scored);
}

void Model::Forward(std::span<const int32_t> inputs, int64_t batch, int64_t seq_len, float* logits,
                    const int32_t* targets, float* losses, ThreadPool* pool) {
  Impl& I = *impl_;
  if (batch < 1 || seq_len < 1) throw Error("Forward: batch and seq_len must be >= 1");
  if (static_cast<int64_t>(inputs.size()) != batch * seq_len) {
    throw Error("Forward: inputs must hold batch * seq_len ids");
  }
  const int64_t K = I.VirtualTokens();
  if (K > 0) return I.ForwardVirtual(inputs, batch, seq_len, logits, targets, losses, pool);
  const int64_t M = batch * seq_len;
  I.RunForward(inputs.data(), batch, seq_len, false, nullptr, pool);
  I.Logits(M, pool);
  const int64_t V = I.config.vocab_size;
  if (logits) std::memcpy(logits, I.ws.logits, sizeof(float) * M * V);
  if (targets && losses) ops::CrossEntropy(I.ws.logits, targets, losses, nullptr, 1.0f, M, V, pool);
}

void Model::ForwardCached(std::span<const int32_t> tokens, KVCache& cache, float* logits,
                          bool last_only, ThreadPool* pool) {
  Impl& I = *impl_;
  if (tokens.empty()) throw Error("ForwardCached: no tokens given");
  if (cache.row_ != int64_t{I.config.num_kv_heads} * I.config.head_dim ||
      static_cast<int64_t>(cache.k_.size()) != I.config.num_layers * cache.capacity_ * cache.row_) {
    throw Error("ForwardCached: the KV cache was made for a different model config");
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (I.VirtualTokens() > 0) I.PrefillVirtualTokens(tokens, cache, pool);
  if (I.PrefixTokens() > 0) I.PrefillPrefix(cache);
  I.RunForward(tokens.data(), 1, n, false, &cache, pool);
  const int64_t d = I.config.hidden_size, V = I.config.vocab_size;
  if (last_only) {
    I.Project(I.ws.xf + (n - 1) * d, I.head, I.Head(), I.ws.logits, 1, d, V, pool);
    if (logits) std::memcpy(logits, I.ws.logits, sizeof(float) * V);
  } else {
    I.Logits(n, pool);
    if (logits) std::memcpy(logits, I.ws.logits, sizeof(float) * n * V);
  }
}

void Model::ContextShift(KVCache& cache, int64_t n_keep, int64_t n_discard, ThreadPool* pool) {
  Impl& I = *impl_;
  const ModelConfig& c = I.config;
  if (cache.row_ != int64_t{c.num_kv_heads} * c.head_dim ||
      static_cast<int64_t>(cache.k_.size()) != c.num_layers * cache.capacity_ * cache.row_) {
    throw Error("ContextShift: the KV cache was made for a different model config");
  }
  if (n_keep < 0 || n_discard < 1 || n_keep + n_discard > cache.size_) {
    throw Error("ContextShift: need 0 <= n_keep (" + std::to_string(n_keep) +
                ") and 1 <= n_discard (" + std::to_string(n_discard) +
                ") with n_keep + n_discard <= cached tokens (" + std::to_string(cache.size_) + ")");
  }
  if (I.pe->acts_on_embeddings()) {
    throw Error(
        "ContextShift: the model's position encoding is added to the token embeddings, "
        "so cached keys cannot be moved to new positions (use rope, alibi, t5 or nope)");
  }
  const int64_t row = cache.row_;
  const int64_t moved = cache.size_ - n_keep - n_discard;
  // Rotated keys move to a position n_discard lower: R(p - n) = R(-n) R(p).
  const bool rotated = I.pe->acts_on_query_key() && !I.RopeIsLengthDependent();
  const RopeTable* table = rotated ? &I.Table(cache.size_) : nullptr;
  RotateOptions rot;
  rot.layout = c.position_encoding.rope_layout;
  rot.pool = pool;
  for (int l = 0; l < c.num_layers; ++l) {
    float* ck = cache.k_.data() + l * cache.capacity_ * row;
    float* cv = cache.v_.data() + l * cache.capacity_ * row;
    std::memmove(ck + n_keep * row, ck + (n_keep + n_discard) * row, sizeof(float) * moved * row);
    std::memmove(cv + n_keep * row, cv + (n_keep + n_discard) * row, sizeof(float) * moved * row);
    if (table != nullptr && moved > 0) {
      ShiftKeys(*table,
                ContiguousView(ck + n_keep * row, DType::kF32, moved, c.num_kv_heads, c.head_dim),
                -n_discard, rot);
    }
  }
  cache.size_ -= n_discard;
}

KVCache::KVCache(const ModelConfig& config, int64_t capacity) {
  const ModelConfig c = config.Resolved();
  if (capacity < 1 || capacity > kMaxPosition) {
    throw Error("KV cache capacity " + std::to_string(capacity) + " must be in [1, 2^31 - 1]");
  }
  capacity_ = capacity;
  row_ = int64_t{c.num_kv_heads} * c.head_dim;
  // layers <= 1024, capacity < 2^31, row <= 2^32: checked in 128 bits against 2^34 floats.
  const unsigned __int128 floats = static_cast<unsigned __int128>(c.num_layers) *
                                   static_cast<unsigned __int128>(capacity) *
                                   static_cast<unsigned __int128>(row_);
  if (floats > (static_cast<unsigned __int128>(1) << 34)) {
    throw Error("KV cache of " + std::to_string(capacity) +
                " positions for this model needs more "
                "than 2^34 floats per tensor (64 GiB); use a shorter sequence");
  }
  k_.assign(static_cast<size_t>(floats), 0.0f);
  v_.assign(k_.size(), 0.0f);
}

}  // namespace ropekit
