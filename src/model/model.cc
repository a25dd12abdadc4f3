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
  // The rope layer's one rule (FrequencySeqLen: dynamic NTK, LongRoPE): frequencies that change
  // with the sequence length change at some length up to 2^31 - 1.
  return config.position_encoding.kind == PositionEncodingKind::kRope &&
         FrequencySeqLen(config.position_encoding.rope, kMaxPosition) != 0;
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

void Model::Impl::CheckForwardInputs(const int32_t* tokens, int64_t m, int64_t tk,
                                     const KVCache* cache) const {
  if (cache && tk > cache->capacity_) {
    throw Error("KV cache: " + std::to_string(tk) + " tokens exceed its capacity " +
                std::to_string(cache->capacity_));
  }
  if (tk - 1 > kMaxPosition) throw Error("position exceeds 2^31 - 1");
  const int64_t V = config.vocab_size;
  const int64_t ids = V + VirtualTokens();  // prompt tuning's virtual ids V..V+K-1
  for (int64_t i = 0; i < m; ++i) {
    if (tokens[i] < 0 || tokens[i] >= ids) {
      throw Error("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                  " is outside [0, vocab_size " + std::to_string(V) + ")");
    }
  }
}

void Model::Impl::SetPositions(const ForwardPass& f) {
  positions.resize(f.m);
  q_positions.resize(f.seq_len);
  k_positions.resize(f.tk);
  for (int64_t t = 0; t < f.seq_len; ++t) q_positions[t] = f.past + t;
  for (int64_t j = 0; j < f.tk; ++j) k_positions[j] = j;
  for (int64_t i = 0; i < f.m; ++i) positions[i] = f.past + i % f.seq_len;
}

void Model::Impl::EmbedTokens(const int32_t* tokens, const ForwardPass& f) {
  OpTimer timer("fwd embedding");
  const int64_t d = config.hidden_size;
  float* x = ws.resid[0];
  for (int64_t i = 0; i < f.m; ++i) std::memcpy(x + i * d, EmbedRow(tokens[i]), sizeof(float) * d);
  if (pe->acts_on_embeddings()) pe->AddToEmbeddings(PositionSpan(positions), PeParams(), x, d);
}

ops::AttentionArgs Model::Impl::LayerAttentionArgs(const Workspace::Layer& A, int64_t batch,
                                                   int64_t seq_len, int64_t tk, const float* keys,
                                                   const float* values) const {
  const int64_t D = config.head_dim, hq = config.num_heads * D, hk = config.num_kv_heads * D;
  ops::AttentionArgs args;
  args.batch = batch;
  args.tq = seq_len;
  args.tk = tk;
  args.heads = config.num_heads;
  args.kv_heads = config.num_kv_heads;
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
  args.k_positions = std::span<const int64_t>(k_positions.data(), static_cast<size_t>(tk));
  args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  args.logit_bias = pe.get();
  args.bias_params = PeParams();
  return args;
}

void Model::Impl::ProjectQkv(int l, Workspace::Layer& A, const ForwardPass& f) {
  OpTimer timer("fwd matmul qkv");
  const int64_t d = config.hidden_size, D = config.head_dim;
  const int64_t hq = config.num_heads * D, hk = config.num_kv_heads * D;
  const LayerOffsets& o = layers[l];
  Project(A.xn1, o.q, Proj(l, 0, f.pool), A.q, f.m, d, hq, f.pool);
  Project(A.xn1, o.k, Proj(l, 1, f.pool), A.k, f.m, d, hk, f.pool);
  Project(A.xn1, o.v, Proj(l, 2, f.pool), A.v, f.m, d, hk, f.pool);
  if (lora) {
    for (int m = 0; m < 3; ++m) {
      LoraForward(l, m, A.xn1, m == 0 ? A.q : m == 1 ? A.k : A.v, f.m, f.train, f.pool);
    }
  }
}

Model::Impl::KeyValues Model::Impl::RotateAndCache(int l, const Workspace::Layer& A,
                                                   const ForwardPass& f) {
  OpTimer timer("fwd rope");
  const int64_t H = config.num_heads, Hkv = config.num_kv_heads, D = config.head_dim;
  const int64_t M = f.m;
  const TensorView q_view = ContiguousView(A.q, DType::kF32, M, H, D);
  if (!f.cache) {
    if (f.table) {
      const TensorView k_view = ContiguousView(A.k, DType::kF32, M, Hkv, D);
      const std::vector<RopeOperand> opsv = {{q_view, q_view}, {k_view, k_view}};
      ApplyRope(*f.table, PositionSpan(positions), opsv, f.rot);
    }
    return {A.k, A.v};
  }
  if (f.cache->paged()) return RotateAndCachePaged(l, A, f);
  const int64_t hk = Hkv * D, cap = f.cache->capacity_;
  float* ck = f.cache->k_.data() + (l * cap) * hk;
  float* cv = f.cache->v_.data() + (l * cap) * hk;
  if (f.rotate_cache) {
    // Store pre-rotation keys; rotate the whole cache with the table of length tk.
    std::memcpy(ck + f.past * hk, A.k, sizeof(float) * M * hk);
    const std::vector<RopeOperand> opsv = {{q_view, q_view}};
    ApplyRope(*f.table, PositionSpan(positions), opsv, f.rot);
    RopeOperand kop{ContiguousView(ck, DType::kF32, f.tk, Hkv, D),
                    ContiguousView(ws.k_rot, DType::kF32, f.tk, Hkv, D)};
    ApplyRope(*f.table, PositionSpan(k_positions), std::span<const RopeOperand>(&kop, 1), f.rot);
    std::memcpy(cv + f.past * hk, A.v, sizeof(float) * M * hk);
    return {ws.k_rot, cv};
  }
  if (f.table) {
    // One pass: rotate q in place, rotate k into the cache rows past.., copy v beside it.
    const KvCacheView layer_cache = ContiguousKvCache(ck, cv, DType::kF32, cap, Hkv, D);
    ApplyRopeAndAppend(*f.table, PositionSpan(positions), RopeOperand{q_view, q_view},
                       ContiguousView(A.k, DType::kF32, M, Hkv, D),
                       ContiguousView(A.v, DType::kF32, M, Hkv, D), layer_cache,
                       std::span<const int64_t>(positions), f.rot);
  } else {
    std::memcpy(ck + f.past * hk, A.k, sizeof(float) * M * hk);
    std::memcpy(cv + f.past * hk, A.v, sizeof(float) * M * hk);
  }
  return {ck, cv};
}

void Model::Impl::GatherCache(int l, const ForwardPass& f) {
  const int64_t hk = f.cache->row_;
  paged_k.resize(static_cast<size_t>(f.tk * hk));
  paged_v.resize(paged_k.size());
  for (int64_t t = 0; t < f.tk; ++t) {
    std::memcpy(paged_k.data() + t * hk, f.cache->KeyRow(l, t), sizeof(float) * hk);
    std::memcpy(paged_v.data() + t * hk, f.cache->ValueRow(l, t), sizeof(float) * hk);
  }
}

// A paged cache: the new keys go in through ApplyRopeAndAppend at the slots of the block table
// (raw keys for length-dependent RoPE); attention then reads the sequence's rows gathered in
// position order, so its arithmetic and bits are those of a contiguous cache.
Model::Impl::KeyValues Model::Impl::RotateAndCachePaged(int l, const Workspace::Layer& A,
                                                        const ForwardPass& f) {
  KVCache& cache = *f.cache;
  const int64_t H = config.num_heads, Hkv = config.num_kv_heads, D = config.head_dim;
  const int64_t M = f.m, hk = Hkv * D;
  const TensorView q_view = ContiguousView(A.q, DType::kF32, M, H, D);
  if (f.table && !f.rotate_cache) {
    KvPagePool& pool = *cache.pool_;
    const KvCacheView layer_cache = PagedKvCache(
        pool.k_.data() + l * pool.layer_stride_, pool.v_.data() + l * pool.layer_stride_,
        DType::kF32, pool.num_pages_, pool.page_size_, Hkv, D);
    const std::vector<int64_t> slots =
        SlotsFromBlockTable(cache.block_table_, pool.page_size_, f.past, M);
    ApplyRopeAndAppend(*f.table, PositionSpan(positions), RopeOperand{q_view, q_view},
                       ContiguousView(A.k, DType::kF32, M, Hkv, D),
                       ContiguousView(A.v, DType::kF32, M, Hkv, D), layer_cache,
                       std::span<const int64_t>(slots), f.rot);
    GatherCache(l, f);
    return {paged_k.data(), paged_v.data()};
  }
  for (int64_t t = 0; t < M; ++t) {
    std::memcpy(cache.KeyRow(l, f.past + t), A.k + t * hk, sizeof(float) * hk);
    std::memcpy(cache.ValueRow(l, f.past + t), A.v + t * hk, sizeof(float) * hk);
  }
  GatherCache(l, f);
  if (!f.rotate_cache) return {paged_k.data(), paged_v.data()};
  // Pre-rotation keys are stored; rotate the whole cache with the table of length tk.
  const std::vector<RopeOperand> opsv = {{q_view, q_view}};
  ApplyRope(*f.table, PositionSpan(positions), opsv, f.rot);
  RopeOperand kop{ContiguousView(paged_k.data(), DType::kF32, f.tk, Hkv, D),
                  ContiguousView(ws.k_rot, DType::kF32, f.tk, Hkv, D)};
  ApplyRope(*f.table, PositionSpan(k_positions), std::span<const RopeOperand>(&kop, 1), f.rot);
  return {ws.k_rot, paged_v.data()};
}

void Model::Impl::AttentionBlockForward(int l, Workspace::Layer& A, float* xin,
                                        const ForwardPass& f) {
  const int64_t M = f.m, d = config.hidden_size, hq = config.num_heads * config.head_dim;
  A.resid_in = xin;
  {
    OpTimer timer("fwd rmsnorm");
    ops::RmsNorm(xin, Norm(l, false), A.xn1, A.inv1, M, d, config.rms_norm_eps, f.pool);
    RoundOperand(A.xn1, M * d);
  }
  ProjectQkv(l, A, f);
  const KeyValues kv = RotateAndCache(l, A, f);
  ops::AttentionArgs args =
      LayerAttentionArgs(A, f.batch, f.seq_len, f.cache ? f.tk : f.seq_len, kv.keys, kv.values);
  // Prefix tuning: [prefix; sequence] keys and values, Tk = K + T.
  if (!f.cache && f.past > 0) {
    PrefixAttention(l, kv.keys, kv.values, f.batch, f.seq_len, f.train, args);
  }
  {
    OpTimer timer("fwd attention");
    if (attention == AttentionKernel::kUnfused) {
      args.probs = f.train ? A.probs : nullptr;
      ops::AttentionForward(args, f.pool);
    } else {
      ops::FlashAttentionForward(args, f.train ? A.lse : nullptr, f.pool);
    }
    RoundOperand(A.ao, M * hq);
  }
  {
    OpTimer timer("fwd matmul o");
    std::memcpy(A.mid, xin, sizeof(float) * M * d);
    Project(A.ao, layers[l].o, Proj(l, 3, f.pool), A.mid, M, hq, d, f.pool, /*accumulate=*/true);
    if (lora) LoraForward(l, 3, A.ao, A.mid, M, f.train, f.pool);
  }
}

void Model::Impl::MlpBlockForward(int l, Workspace::Layer& A, float* xout, const ForwardPass& f) {
  const int64_t M = f.m, d = config.hidden_size, F = config.intermediate_size;
  const LayerOffsets& o = layers[l];
  {
    OpTimer timer("fwd rmsnorm");
    ops::RmsNorm(A.mid, Norm(l, true), A.xn2, A.inv2, M, d, config.rms_norm_eps, f.pool);
    RoundOperand(A.xn2, M * d);
  }
  {
    OpTimer timer("fwd matmul mlp");
    Project(A.xn2, o.gate, Proj(l, 4, f.pool), A.g, M, d, F, f.pool);
    Project(A.xn2, o.up, Proj(l, 5, f.pool), A.u, M, d, F, f.pool);
    if (lora) {
      LoraForward(l, 4, A.xn2, A.g, M, f.train, f.pool);
      LoraForward(l, 5, A.xn2, A.u, M, f.train, f.pool);
    }
  }
  {
    OpTimer timer("fwd swiglu");
    ops::SwiGlu(A.g, A.u, A.h, M * F, f.pool);
    RoundOperand(A.h, M * F);
  }
  {
    OpTimer timer("fwd matmul mlp");
    std::memcpy(xout, A.mid, sizeof(float) * M * d);
    Project(A.h, o.down, Proj(l, 6, f.pool), xout, M, F, d, f.pool, /*accumulate=*/true);
    if (lora) LoraForward(l, 6, A.h, xout, M, f.train, f.pool);
  }
}

void Model::Impl::RunForward(const int32_t* tokens, int64_t batch, int64_t seq_len, bool train,
                             KVCache* cache, ThreadPool* pool) {
  const ModelConfig& c = config;
  ForwardPass f;
  f.batch = batch;
  f.seq_len = seq_len;
  f.m = batch * seq_len;
  // Prefix tuning: K prefix entries in front of the keys, real tokens from position K.
  f.past = cache ? cache->size_ : PrefixTokens();
  f.tk = f.past + seq_len;
  f.train = train;
  f.cache = cache;
  f.pool = pool;
  CheckForwardInputs(tokens, f.m, f.tk, cache);
  if (cache) cache->Cover(f.tk);
  Prepare(batch, seq_len, cache || f.past > 0 ? f.tk : seq_len, train);
  if (lora) PrepareLora(f.m, train);
  if (!cache && f.past > 0) PrefixForwardPrepare(batch, seq_len, train);
  PrepareLowPrecisionWeights(train, pool);
  SetPositions(f);
  EmbedTokens(tokens, f);
  f.table = pe->acts_on_query_key() ? &Table(f.tk) : nullptr;
  f.rot.layout = c.position_encoding.rope_layout;
  f.rot.pool = pool;
  f.rotate_cache = cache && RopeIsLengthDependent();
  for (int l = 0; l < c.num_layers; ++l) {
    Workspace::Layer& A = ws.layers[train ? l : 0];
    AttentionBlockForward(l, A, train ? ws.resid[l] : ws.resid[l % 2], f);
    MlpBlockForward(l, A, train ? ws.resid[l + 1] : ws.resid[(l + 1) % 2], f);
  }
  OpTimer timer("fwd rmsnorm");
  float* xl = train ? ws.resid[c.num_layers] : ws.resid[c.num_layers % 2];
  ops::RmsNorm(xl, FinalNorm(), ws.xf, ws.invf, f.m, c.hidden_size, c.rms_norm_eps, pool);
  RoundOperand(ws.xf, f.m * c.hidden_size);
  if (cache) cache->size_ = f.tk;
}

void Model::Impl::Logits(int64_t rows, ThreadPool* pool) {
  OpTimer timer("fwd matmul head");
  Project(ws.xf, head, Head(), ws.logits, rows, config.hidden_size, config.vocab_size, pool);
}

float* Model::Impl::Grad(const BackwardPass& b, int64_t full_offset, int64_t adapter_offset) const {
  if (!b.ad) return b.G + full_offset;
  return adapter_offset >= 0 ? b.G + adapter_offset : nullptr;
}

void Model::Impl::WeightGrad(const BackwardPass& b, const float* dy, const float* x, float* dw,
                             int64_t k, int64_t n) const {
  if (dw) ProjectBackwardWeight(dy, x, dw, b.m, k, n, b.pool);
}

void Model::Impl::HeadBackward(const BackwardPass& b) {
  const ModelConfig& c = config;
  const int64_t M = b.m, d = c.hidden_size, V = c.vocab_size;
  Workspace& w = ws;
  // w.logits holds dL/dlogits. Head: logits = xf W_head^T.
  {
    OpTimer timer("bwd matmul head");
    RoundOperand(w.logits, M * V);
    WeightGrad(b, w.logits, w.xf, Grad(b, head, c.tie_word_embeddings && b.ad ? b.ad->embed : -1),
               d, V);
    ProjectBackwardInput(w.logits, head, Head(), w.dxn, M, d, V, b.pool);
  }
  OpTimer timer("bwd rmsnorm");
  ops::RmsNormBackward(w.resid[c.num_layers], FinalNorm(), w.invf, w.dxn, w.dx,
                       Grad(b, final_norm, b.ad ? b.ad->final_norm : -1), M, d, b.pool);
}

void Model::Impl::MlpBlockBackward(int l, const BackwardPass& b) {
  const int64_t M = b.m, d = config.hidden_size, F = config.intermediate_size;
  Workspace& w = ws;
  const Workspace::Layer& A = w.layers[l];
  const LayerOffsets& o = layers[l];
  ThreadPool* pool = b.pool;
  // x' = mid + h Wd^T: dmid = dx (+ the norm path below).
  {
    OpTimer timer("bwd matmul mlp");
    std::memcpy(w.dmid, w.dx, sizeof(float) * M * d);
    RoundOperand(w.dx, M * d);
    WeightGrad(b, w.dx, A.h, Grad(b, o.down, -1), F, d);
    ProjectBackwardInput(w.dx, o.down, Proj(l, 6, pool), w.dh, M, F, d, pool);
    if (b.ad) LoraBackward(l, 6, A.h, w.dx, w.dh, M, b.G, pool);
  }
  {
    OpTimer timer("bwd swiglu");
    ops::SwiGluBackward(A.g, A.u, w.dh, w.dg, w.du, M * F, pool);
    RoundOperand(w.dg, M * F);
    RoundOperand(w.du, M * F);
  }
  {
    OpTimer timer("bwd matmul mlp");
    WeightGrad(b, w.dg, A.xn2, Grad(b, o.gate, -1), d, F);
    WeightGrad(b, w.du, A.xn2, Grad(b, o.up, -1), d, F);
    ProjectBackwardInput(w.dg, o.gate, Proj(l, 4, pool), w.dxn, M, d, F, pool);
    ProjectBackwardInput(w.du, o.up, Proj(l, 5, pool), w.dxn, M, d, F, pool,
                         /*accumulate=*/true);
    if (b.ad) {
      LoraBackward(l, 4, A.xn2, w.dg, w.dxn, M, b.G, pool);
      LoraBackward(l, 5, A.xn2, w.du, w.dxn, M, b.G, pool);
    }
  }
  OpTimer timer("bwd rmsnorm");
  ops::RmsNormBackward(A.mid, Norm(l, true), A.inv2, w.dxn, w.dmid,
                       Grad(b, o.post_norm, b.ad ? b.ad->layers[l].post_norm : -1), M, d, pool,
                       /*accumulate=*/true);
}

void Model::Impl::SelfAttentionBackward(int l, const BackwardPass& b) {
  const int64_t M = b.m, D = config.head_dim;
  const int64_t H = config.num_heads, Hkv = config.num_kv_heads;
  Workspace& w = ws;
  const Workspace::Layer& A = w.layers[l];
  ops::AttentionArgs args = LayerAttentionArgs(A, b.batch, b.seq_len, b.seq_len, A.k, A.v);
  const bool prefix = PrefixTokens() > 0;
  if (prefix) PrefixAttention(l, nullptr, nullptr, b.batch, b.seq_len, true, args);
  // With kBf16 A.ao holds the rounded output; the backward's delta = rowsum(dO o O) then
  // carries that rounding (relative 2^-9), the precision of every other bf16 operand.
  {
    OpTimer timer("bwd attention");
    const std::span<float> grad_bias = pe->acts_on_logits() ? b.grad_pe : std::span<float>();
    // With a prefix the key / value gradients cover [prefix; sequence] rows first.
    float* dk = prefix ? lora->dkcat.data() : w.dk;
    float* dv = prefix ? lora->dvcat.data() : w.dv;
    if (attention == AttentionKernel::kUnfused) {
      args.probs = A.probs;
      ops::AttentionBackward(args, w.dao, w.dq, dk, dv, grad_bias, b.pool);
    } else {
      ops::FlashAttentionBackward(args, A.lse, w.dao, w.dq, dk, dv, grad_bias, b.pool);
    }
    if (prefix) PrefixGradients(l, b.batch, b.seq_len, w.dk, w.dv, b.G);
  }
  if (b.table) {
    OpTimer timer("bwd rope");
    const TensorView dq = ContiguousView(w.dq, DType::kF32, M, H, D);
    const TensorView dk = ContiguousView(w.dk, DType::kF32, M, Hkv, D);
    const std::vector<RopeOperand> opsv = {{dq, dq}, {dk, dk}};
    ApplyRope(*b.table, PositionSpan(positions), opsv, b.rot);
  }
}

void Model::Impl::AttentionBlockBackward(int l, const BackwardPass& b) {
  const int64_t M = b.m, d = config.hidden_size, D = config.head_dim;
  const int64_t hq = config.num_heads * D, hk = config.num_kv_heads * D;
  Workspace& w = ws;
  const Workspace::Layer& A = w.layers[l];
  const LayerOffsets& o = layers[l];
  const LoraState* ad = b.ad;
  ThreadPool* pool = b.pool;
  // mid = x + ao Wo^T: dx = dmid (+ the attention path below).
  {
    OpTimer timer("bwd matmul o");
    std::memcpy(w.dx, w.dmid, sizeof(float) * M * d);
    RoundOperand(w.dmid, M * d);
    WeightGrad(b, w.dmid, A.ao, Grad(b, o.o, -1), hq, d);
    ProjectBackwardInput(w.dmid, o.o, Proj(l, 3, pool), w.dao, M, hq, d, pool);
    if (ad) LoraBackward(l, 3, A.ao, w.dmid, w.dao, M, b.G, pool);
  }
  SelfAttentionBackward(l, b);
  // Under an adapter that trains neither the embeddings nor the first norm, nothing needs the
  // gradient of layer 0's input: its q/k/v input products and norm backward are skipped.
  const bool input_grad =
      !(ad && l == 0 && ad->embed < 0 && ad->layers[0].input_norm < 0 && ad->prompt < 0);
  {
    OpTimer timer("bwd matmul qkv");
    RoundOperand(w.dq, M * hq);
    RoundOperand(w.dk, M * hk);
    RoundOperand(w.dv, M * hk);
    WeightGrad(b, w.dq, A.xn1, Grad(b, o.q, -1), d, hq);
    WeightGrad(b, w.dk, A.xn1, Grad(b, o.k, -1), d, hk);
    WeightGrad(b, w.dv, A.xn1, Grad(b, o.v, -1), d, hk);
    if (input_grad) {
      ProjectBackwardInput(w.dq, o.q, Proj(l, 0, pool), w.dxn, M, d, hq, pool);
      ProjectBackwardInput(w.dk, o.k, Proj(l, 1, pool), w.dxn, M, d, hk, pool, true);
      ProjectBackwardInput(w.dv, o.v, Proj(l, 2, pool), w.dxn, M, d, hk, pool, true);
    }
    if (ad) {
      float* dx = input_grad ? w.dxn : nullptr;
      LoraBackward(l, 0, A.xn1, w.dq, dx, M, b.G, pool);
      LoraBackward(l, 1, A.xn1, w.dk, dx, M, b.G, pool);
      LoraBackward(l, 2, A.xn1, w.dv, dx, M, b.G, pool);
    }
  }
  if (input_grad) {
    OpTimer timer("bwd rmsnorm");
    ops::RmsNormBackward(w.resid[l], Norm(l, false), A.inv1, w.dxn, w.dx,
                         Grad(b, o.input_norm, ad ? ad->layers[l].input_norm : -1), M, d, pool,
                         /*accumulate=*/true);
  }
}

void Model::Impl::EmbeddingBackward(const int32_t* tokens, const BackwardPass& b) {
  OpTimer timer("bwd embedding");
  const int64_t d = config.hidden_size;
  // Embedding hooks, then the scatter into the token embedding rows (ascending order).
  if (pe->acts_on_embeddings() && !b.ad) {
    pe->AddToEmbeddingsBackward(PositionSpan(positions), ws.dx, d, b.grad_pe);
  }
  // With an adapter the scatter runs only when it trains the embeddings (LoRA+), and then ws.dx
  // holds layer 0's input gradient. The hooks did not run (an adapter never trains the position
  // table), so their factor is applied here: x = scale * e + P gives de = scale * dx, rounded
  // as AddToEmbeddingsBackward rounds it, so LoRA+ and full fine-tuning agree bit for bit.
  float* dE = Grad(b, embed, b.ad ? b.ad->embed : -1);
  if (dE == nullptr) return;
  const double scale = b.ad && pe->acts_on_embeddings() ? pe->embedding_scale() : 1.0;
  for (int64_t m = 0; m < b.m; ++m) {
    float* row = dE + int64_t{tokens[m]} * d;
    const float* src = ws.dx + m * d;
    for (int64_t j = 0; j < d; ++j) {
      row[j] += scale == 1.0 ? src[j] : static_cast<float>(scale * double{src[j]});
    }
  }
}

void Model::Impl::RunBackward(const int32_t* tokens, int64_t batch, int64_t seq_len, float* G,
                              ThreadPool* pool, const Model::GradReadyFn& on_ready) {
  const ModelConfig& c = config;
  BackwardPass b;
  b.batch = batch;
  b.seq_len = seq_len;
  b.m = batch * seq_len;
  b.G = G;
  b.pool = pool;
  // With an adapter G is its trainable buffer: frozen weights get no gradient (Grad gives
  // nullptr: the weight-gradient product is skipped).
  b.ad = lora.get();
  HeadBackward(b);
  // Ready ranges follow the layout of BuildLayout: embed | layers | final norm, head | pe table.
  const int64_t num_params = static_cast<int64_t>(params.size());
  auto ready = [&](int64_t begin, int64_t end) {
    if (on_ready && begin < end && !b.ad) on_ready(begin, end);
  };
  ready(final_norm, pe_params);  // the final norm and an untied head
  // Prefix tuning: positions K..K+T-1.
  b.table = pe->acts_on_query_key() ? &Table(PrefixTokens() + seq_len) : nullptr;
  b.rot.layout = c.position_encoding.rope_layout;
  b.rot.direction = Direction::kBackward;
  b.rot.pool = pool;
  // Position tables (learned, T5) are frozen under an adapter.
  if (!b.ad) b.grad_pe = std::span<float>(G + pe_params, static_cast<size_t>(pe_size));
  for (int l = c.num_layers - 1; l >= 0; --l) {
    MlpBlockBackward(l, b);
    AttentionBlockBackward(l, b);
    ready(layers[l].input_norm, l + 1 < c.num_layers ? layers[l + 1].input_norm : final_norm);
  }
  EmbeddingBackward(tokens, b);
  if (b.ad && b.ad->prompt >= 0) PromptBackward(tokens, b.m, ws.dx, G);
  if (PrefixTokens() > 0) PrefixBackwardFinish(G);
  ready(0, c.num_layers > 0 ? layers[0].input_norm : final_norm);  // embed (and a tied head)
  ready(pe_params, num_params);                                    // learned / T5 position tables
  if (b.ad && on_ready && !b.ad->params.empty()) {
    on_ready(0, static_cast<int64_t>(b.ad->params.size()));
  }
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
  if (!cache.Fits(I.config)) {
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
  if (!cache.Fits(c)) {
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
  if (n_keep < I.VirtualTokens() + I.PrefixTokens()) {
    throw Error("ContextShift: n_keep (" + std::to_string(n_keep) + ") must keep the adapter's " +
                std::to_string(I.VirtualTokens() + I.PrefixTokens()) +
                " virtual / prefix entries at the start of the cache");
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
    if (cache.paged()) {
      // Row by row through the block table (destinations precede sources), the keys gathered
      // for the same ShiftKeys call as a contiguous cache, then written back.
      std::vector<float>& keys = I.paged_k;
      keys.resize(static_cast<size_t>(moved * row));
      for (int64_t i = 0; i < moved; ++i) {
        const int64_t from = n_keep + n_discard + i;
        std::memcpy(keys.data() + i * row, cache.KeyRow(l, from), sizeof(float) * row);
        std::memcpy(cache.ValueRow(l, n_keep + i), cache.ValueRow(l, from), sizeof(float) * row);
      }
      if (table != nullptr && moved > 0) {
        ShiftKeys(*table,
                  ContiguousView(keys.data(), DType::kF32, moved, c.num_kv_heads, c.head_dim),
                  -n_discard, rot);
      }
      for (int64_t i = 0; i < moved; ++i) {
        std::memcpy(cache.KeyRow(l, n_keep + i), keys.data() + i * row, sizeof(float) * row);
      }
      continue;
    }
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

}  // namespace ropekit
