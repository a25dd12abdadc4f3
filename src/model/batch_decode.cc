// Batched decoding for continuous batching (BatchDecoder in ropekit/model.h): one token for each
// of B sequences at their own positions, through the layers of model.cc's forward
//   xn1 = RMSNorm(x) w_in; q, k, v = xn1 Wq^T, Wk^T, Wv^T; q, k <- RoPE; append k, v;
//   ao = softmax(q K^T / sqrt(D) + bias) V (per sequence, over its own cache, with
//        ops::DecodeAttention);
//   mid = x + ao Wo^T; h = silu(RMSNorm(mid) Wg^T) * (RMSNorm(mid) Wu^T); x' = mid + h Wd^T
// with every projection a [B, K] x [K, N] product (ops::MatMulRowwise; q | k | v and gate | up
// each as one MatMulRowwiseMulti call) whose rows do not influence each other, so a sequence's
// logits are the same in any batch.
//
// Dimension legend: B = sequences in the step, V = vocab, d = hidden, H / Hkv = heads / kv heads,
// D = head_dim, F = intermediate, L = layers, Tk_b = keys of sequence b (its cache size + 1).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "ropekit/kv_cache.h"
#include "src/model/model_impl.h"
#include "src/ops/ops.h"
#include "src/ops/rowwise_matmul.h"
#include "src/util/profile.h"

namespace ropekit {
namespace {

// [B, heads, D] rows of `row_stride` floats (q or k inside a q | k | v row).
TensorView RowView(float* data, int64_t tokens, int64_t heads, int64_t head_dim,
                   int64_t row_stride) {
  TensorView v = ContiguousView(data, DType::kF32, tokens, heads, head_dim);
  v.token_stride = row_stride;
  return v;
}

}  // namespace

// Row buffers of one group of sequences (the whole batch, or one worker's share of it).
struct BatchDecoder::Rows {
  int64_t batch = -1;
  // [B, ...] rows; qkv: q | k | v per row (hq + 2 hk), gu: gate | up per row (2 F).
  std::vector<float> x, xn, qkv, ao, mid, gu, h, inv;
  std::vector<int64_t> positions;          // [B]
  std::vector<int64_t> slots;              // [B] rows in a shared page pool
  std::vector<std::vector<float>> scores;  // [workers][max Tk]

  void Resize(const ModelConfig& c, int64_t b, size_t workers, int64_t max_tk) {
    if (batch != b) {
      const int64_t d = c.hidden_size, hq = int64_t{c.num_heads} * c.head_dim;
      const int64_t hk = int64_t{c.num_kv_heads} * c.head_dim, F = c.intermediate_size;
      x.assign(b * d, 0.0f);
      xn.assign(b * d, 0.0f);
      mid.assign(b * d, 0.0f);
      qkv.assign(b * (hq + 2 * hk), 0.0f);
      ao.assign(b * hq, 0.0f);
      gu.assign(b * 2 * F, 0.0f);
      h.assign(b * F, 0.0f);
      inv.assign(b, 0.0f);
      positions.assign(b, 0);
      slots.assign(b, 0);
      batch = b;
    }
    if (scores.size() < workers) scores.resize(workers);
    for (std::vector<float>& w : scores) {
      if (static_cast<int64_t>(w.size()) < max_tk) w.resize(max_tk);
    }
  }
};

struct BatchDecoder::Scratch {
  std::vector<Rows> groups;            // [groups]: one per worker when the batch is split
  std::vector<int64_t> key_positions;  // 0, 1, ..., max Tk - 1
};

BatchDecoder::BatchDecoder(Model& model) : model_(model), scratch_(std::make_unique<Scratch>()) {
  const Model::Impl& I = *model.impl_;
  if (I.RopeIsLengthDependent()) {
    throw Error("batched decoding: RoPE type " +
                std::string(RopeTypeName(I.config.position_encoding.rope.type)) +
                " depends on the sequence length; use a length-independent type (default, "
                "linear, yarn, llama3, ntk)");
  }
  if (I.lora) {
    throw Error("batched decoding: the model has a LoRA adapter; merge it first (ropekit merge)");
  }
}
BatchDecoder::~BatchDecoder() = default;

void BatchDecoder::Step(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                        float* logits, ThreadPool* pool) {
  Model::Impl& I = *model_.impl_;
  const ModelConfig& c = I.config;
  if (I.precision != MatmulPrecision::kF32) {
    throw Error("batched decoding: only float32 matmul precision is supported");
  }
  if (caches.size() != tokens.size()) {
    throw Error("BatchDecoder::Step: " + std::to_string(caches.size()) + " caches but " +
                std::to_string(tokens.size()) + " tokens");
  }
  const int64_t B = static_cast<int64_t>(tokens.size());
  if (B == 0) return;
  const int64_t V = c.vocab_size;
  int64_t max_tk = 0;
  for (int64_t b = 0; b < B; ++b) {
    const KVCache* cache = caches[b];
    if (cache == nullptr || !cache->Fits(c)) {
      throw Error("BatchDecoder::Step: cache " + std::to_string(b) +
                  " is missing or was made for a different model config");
    }
    if (cache->size_ < 1 || cache->size_ >= cache->capacity_) {
      throw Error("BatchDecoder::Step: cache " + std::to_string(b) + " holds " +
                  std::to_string(cache->size_) + " of " + std::to_string(cache->capacity_) +
                  " tokens; it needs a prefilled prompt and one free slot");
    }
    if (tokens[b] < 0 || tokens[b] >= V) {
      throw Error("BatchDecoder::Step: token " + std::to_string(tokens[b]) + " is outside [0, " +
                  std::to_string(V) + ")");
    }
    max_tk = std::max(max_tk, cache->size_ + 1);
  }
  // Pages for the new tokens are drawn here, on one thread, before any worker appends. When every
  // cache lives in the same pool, each layer appends the whole batch with one fused call.
  KvPagePool* shared = caches[0]->pool_;
  for (int64_t b = 0; b < B; ++b) {
    caches[b]->Cover(caches[b]->size_ + 1);
    if (caches[b]->pool_ != shared) shared = nullptr;
  }
  Scratch& s = *scratch_;
  if (static_cast<int64_t>(s.key_positions.size()) < max_tk) {
    s.key_positions.resize(max_tk);
    std::iota(s.key_positions.begin(), s.key_positions.end(), int64_t{0});
  }
  // Built (or grown) once, before any worker reads it.
  const RopeTable* table = I.pe->acts_on_query_key() ? &I.Table(max_tk) : nullptr;
  // With W > 1 workers and at least W sequences, each worker decodes a contiguous share of the
  // sequences through all layers on its own (one hand-off per step instead of one per op, and no
  // product split into column blocks too small to pay for it). Otherwise the ops of the whole
  // batch use the pool. A row's arithmetic is the same either way (MatMulRowwise rows and
  // attention per sequence are independent of the others), so the logits are too.
  const size_t workers = pool != nullptr ? pool->num_threads() : 1;
  const bool split = workers > 1 && B >= static_cast<int64_t>(workers);
  const size_t groups = split ? workers : 1;
  if (s.groups.size() < groups) s.groups.resize(groups);
  for (size_t g = 0; g < groups; ++g) {
    const int64_t b0 = B * static_cast<int64_t>(g) / static_cast<int64_t>(groups);
    const int64_t b1 = B * static_cast<int64_t>(g + 1) / static_cast<int64_t>(groups);
    s.groups[g].Resize(c, b1 - b0, split ? 1 : workers, max_tk);
  }
  auto run = [&](size_t g, ThreadPool* p) {
    const int64_t b0 = B * static_cast<int64_t>(g) / static_cast<int64_t>(groups);
    const int64_t b1 = B * static_cast<int64_t>(g + 1) / static_cast<int64_t>(groups);
    DecodeGroup(caches.subspan(b0, b1 - b0), tokens.subspan(b0, b1 - b0), table, shared,
                s.groups[g], logits + b0 * V, p);
  };
  if (split) {
    pool->ParallelFor(groups, [&](size_t begin, size_t end, size_t) {
      for (size_t g = begin; g < end; ++g) run(g, nullptr);
    });
  } else {
    run(0, pool);
  }
  for (int64_t b = 0; b < B; ++b) caches[b]->size_ += 1;
}

void BatchDecoder::AppendShared(KvPagePool& pool, int l, const RopeTable* table, Rows& s,
                                const RotateOptions& rot) {
  const ModelConfig& c = model_.impl_->config;
  const int64_t B = s.batch, D = c.head_dim, H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, wqkv = hq + 2 * hk;
  float* const q = s.qkv.data();
  const TensorView k = RowView(q + hq, B, Hkv, D, wqkv), v = RowView(q + hq + hk, B, Hkv, D, wqkv);
  float* const pk = pool.k_.data() + l * pool.layer_stride_;
  float* const pv = pool.v_.data() + l * pool.layer_stride_;
  const std::span<const int64_t> slots(s.slots.data(), static_cast<size_t>(B));
  if (table == nullptr) {  // no rotary encoding: copy the rows
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(pk + slots[b] * hk, q + b * wqkv + hq, sizeof(float) * hk);
      std::memcpy(pv + slots[b] * hk, q + b * wqkv + hq + hk, sizeof(float) * hk);
    }
    return;
  }
  const TensorView qv = RowView(q, B, H, D, wqkv);
  ApplyRopeAndAppend(
      *table, PositionSpan(std::span<const int64_t>(s.positions.data(), B)), RopeOperand{qv, qv}, k,
      v, PagedKvCache(pk, pv, DType::kF32, pool.num_pages_, pool.page_size_, Hkv, D), slots, rot);
}

void BatchDecoder::AppendOwn(KVCache& cache, int l, const RopeTable* table, Rows& s, int64_t b) {
  const ModelConfig& c = model_.impl_->config;
  const int64_t D = c.head_dim, H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, wqkv = hq + 2 * hk;
  float* const q = s.qkv.data() + b * wqkv;
  const int64_t pos = s.positions[b];
  if (table == nullptr) {
    std::memcpy(cache.KeyRow(l, pos), q + hq, sizeof(float) * hk);
    std::memcpy(cache.ValueRow(l, pos), q + hq + hk, sizeof(float) * hk);
    return;
  }
  // A one-slot view of the cache's row for this position (contiguous or paged).
  RotateOptions rot;
  rot.layout = c.position_encoding.rope_layout;
  const TensorView qv = RowView(q, 1, H, D, wqkv);
  const int64_t slot = 0;
  const KvCacheView row =
      ContiguousKvCache(cache.KeyRow(l, pos), cache.ValueRow(l, pos), DType::kF32, 1, Hkv, D);
  ApplyRopeAndAppend(*table, PositionSpan(std::span<const int64_t>(&s.positions[b], 1)),
                     RopeOperand{qv, qv}, RowView(q + hq, 1, Hkv, D, wqkv),
                     RowView(q + hq + hk, 1, Hkv, D, wqkv), row, std::span<const int64_t>(&slot, 1),
                     rot);
}

void BatchDecoder::Attend(KVCache& cache, int l, Rows& s, int64_t b, std::vector<float>& scores) {
  const Model::Impl& I = *model_.impl_;
  const ModelConfig& c = I.config;
  const int64_t D = c.head_dim, H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, wqkv = hq + 2 * hk;
  const int64_t pos = s.positions[b];
  ops::AttentionArgs args;
  args.batch = 1;
  args.tq = 1;
  args.tk = pos + 1;
  args.heads = H;
  args.kv_heads = Hkv;
  args.head_dim = D;
  args.q = s.qkv.data() + b * wqkv;
  args.q_row_stride = wqkv;
  args.q_batch_stride = wqkv;
  if (cache.paged()) {  // page by page through the block table
    const KvPagePool& pool = *cache.pool_;
    args.k = pool.k_.data() + l * pool.layer_stride_;
    args.v = pool.v_.data() + l * pool.layer_stride_;
    args.block_table = cache.block_table_;
    args.page_size = pool.page_size_;
  } else {
    args.k = cache.KeyRow(l, 0);
    args.v = cache.ValueRow(l, 0);
  }
  args.kv_row_stride = hk;
  args.kv_batch_stride = (pos + 1) * hk;
  args.out = s.ao.data() + b * hq;
  args.out_row_stride = hq;
  args.out_batch_stride = hq;
  args.q_positions = std::span<const int64_t>(&s.positions[b], 1);
  args.k_positions =
      std::span<const int64_t>(scratch_->key_positions.data(), static_cast<size_t>(pos + 1));
  args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  args.logit_bias = I.pe.get();
  args.bias_params = I.PeParams();
  ops::DecodeAttention(args, scores);
}

void BatchDecoder::DecodeGroup(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                               const RopeTable* table, KvPagePool* shared, Rows& s, float* logits,
                               ThreadPool* pool) {
  Model::Impl& I = *model_.impl_;
  const ModelConfig& c = I.config;
  const int64_t B = static_cast<int64_t>(tokens.size());
  const int64_t d = c.hidden_size, D = c.head_dim, H = c.num_heads, Hkv = c.num_kv_heads;
  const int64_t hq = H * D, hk = Hkv * D, F = c.intermediate_size, V = c.vocab_size;
  int64_t max_tk = 0;
  for (int64_t b = 0; b < B; ++b) {
    s.positions[b] = caches[b]->size_;
    max_tk = std::max(max_tk, caches[b]->size_ + 1);
    if (shared != nullptr) {
      const int64_t P = shared->page_size_;
      s.slots[b] = int64_t{caches[b]->block_table_[s.positions[b] / P]} * P + s.positions[b] % P;
    }
  }
  const float* P = I.params.data();
  const float* W = I.MatmulWeights();
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(s.x.data() + b * d, P + I.embed + int64_t{tokens[b]} * d, sizeof(float) * d);
  }
  const PositionSpan pos_span(s.positions);
  if (I.pe->acts_on_embeddings()) I.pe->AddToEmbeddings(pos_span, I.PeParams(), s.x.data(), d);
  RotateOptions rot;
  rot.layout = c.position_encoding.rope_layout;
  rot.pool = pool;
  const int64_t wqkv = hq + 2 * hk;  // row width of s.qkv
  float* const qk_k = s.qkv.data() + hq;
  float* const qk_v = s.qkv.data() + hq + hk;

  for (int l = 0; l < c.num_layers; ++l) {
    const LayerOffsets& o = I.layers[l];
    {
      OpTimer timer("dec rmsnorm");
      ops::RmsNorm(s.x.data(), P + o.input_norm, s.xn.data(), s.inv.data(), B, d, c.rms_norm_eps,
                   pool);
    }
    {
      OpTimer timer("dec matmul qkv");
      const ops::RowwiseOutput outs[] = {
          {W + o.q, hq, s.qkv.data()}, {W + o.k, hk, qk_k}, {W + o.v, hk, qk_v}};
      ops::MatMulRowwiseMulti(s.xn.data(), outs, B, d, wqkv, pool);
    }
    if (shared != nullptr) {
      // One fused call: rotate q in place, rotate k into each sequence's slot of the shared pool
      // (its block table's row for its position), copy v beside it.
      OpTimer timer("dec rope");
      AppendShared(*shared, l, table, s, rot);
    }
    // Append each sequence's key and value (unless done above), then attend over its own cache
    // (one task each).
    OpTimer attention_timer("dec attention");
    ParallelFor(B * max_tk * hq < (int64_t{1} << 15) ? nullptr : pool, static_cast<size_t>(B),
                [&](size_t begin, size_t end, size_t worker) {
                  for (size_t bi = begin; bi < end; ++bi) {
                    const int64_t b = static_cast<int64_t>(bi);
                    if (shared == nullptr) AppendOwn(*caches[b], l, table, s, b);
                    Attend(*caches[b], l, s, b, s.scores[worker]);
                  }
                });
    attention_timer.Stop();
    {
      OpTimer timer("dec matmul o");
      std::memcpy(s.mid.data(), s.x.data(), sizeof(float) * B * d);
      ops::MatMulRowwise(s.ao.data(), W + o.o, s.mid.data(), B, hq, d, pool, /*accumulate=*/true);
    }
    {
      OpTimer timer("dec rmsnorm");
      ops::RmsNorm(s.mid.data(), P + o.post_norm, s.xn.data(), s.inv.data(), B, d, c.rms_norm_eps,
                   pool);
    }
    {
      OpTimer timer("dec matmul mlp");
      const ops::RowwiseOutput outs[] = {{W + o.gate, F, s.gu.data()},
                                         {W + o.up, F, s.gu.data() + F}};
      ops::MatMulRowwiseMulti(s.xn.data(), outs, B, d, 2 * F, pool);
    }
    {
      OpTimer timer("dec swiglu");
      for (int64_t b = 0; b < B; ++b) {
        ops::SwiGlu(s.gu.data() + b * 2 * F, s.gu.data() + b * 2 * F + F, s.h.data() + b * F, F,
                    nullptr);
      }
    }
    {
      OpTimer timer("dec matmul mlp");
      std::memcpy(s.x.data(), s.mid.data(), sizeof(float) * B * d);
      ops::MatMulRowwise(s.h.data(), W + o.down, s.x.data(), B, F, d, pool, /*accumulate=*/true);
    }
  }
  {
    OpTimer timer("dec rmsnorm");
    ops::RmsNorm(s.x.data(), P + I.final_norm, s.xn.data(), s.inv.data(), B, d, c.rms_norm_eps,
                 pool);
  }
  OpTimer timer("dec matmul head");
  ops::MatMulRowwise(s.xn.data(), W + I.head, logits, B, d, V, pool);
  timer.Stop();
}

}  // namespace ropekit
