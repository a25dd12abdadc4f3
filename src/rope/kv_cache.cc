// Fused rotate-and-append into a KV cache and context shift (see include/ropekit/kv_cache.h).
//
// Dimension legend: T = new tokens, Hkv = cache heads, D = head_dim, N = rotated pairs,
// S = cache slots, P = page_size.
#include "ropekit/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "ropekit/thread_pool.h"
#include "src/kernels/rope_kernels.h"
#include "src/reference/rope.h"
#include "src/rope/apply_internal.h"

namespace ropekit {
namespace {

// Layout of the cache: dtype, sizes and strides such that distinct (slot, head) rows of D
// elements never share memory.
void ValidateCache(const KvCacheView& c, int rotary_dim, bool need_v) {
  if (c.dtype != DType::kF32 && c.dtype != DType::kBF16 && c.dtype != DType::kF16) {
    throw Error("cache.dtype must be float32, bfloat16 or float16");
  }
  if (c.num_heads < 1) throw Error("cache.num_heads must be >= 1");
  if (c.head_dim < rotary_dim) {
    throw Error("cache.head_dim (" + std::to_string(c.head_dim) + ") must be >= rotary_dim (" +
                std::to_string(rotary_dim) + ")");
  }
  if (c.num_slots < 0) throw Error("cache.num_slots must be >= 0");
  if (c.page_size < 1) throw Error("cache.page_size must be >= 1");
  if (c.head_stride < 1 || c.token_stride < 1 || c.page_stride < 1) {
    throw Error("cache strides (page, token, head) must be positive");
  }
  const int64_t D = c.head_dim, H = c.num_heads, P = c.page_size;
  // Either rows of a page hold all heads (NHD) or heads hold all rows of a page (HND).
  const bool nhd = c.head_stride >= D && c.token_stride >= (H - 1) * c.head_stride + D;
  const bool hnd = c.token_stride >= D && c.head_stride >= (P - 1) * c.token_stride + D;
  if (!nhd && !hnd) {
    throw Error("cache strides make rows overlap: token_stride " + std::to_string(c.token_stride) +
                ", head_stride " + std::to_string(c.head_stride) + " for " + std::to_string(H) +
                " heads of " + std::to_string(D) + " and " + std::to_string(P) + " rows per page");
  }
  const int64_t page_span = (P - 1) * c.token_stride + (H - 1) * c.head_stride + D;
  if (c.num_slots > P && c.page_stride < page_span) {
    throw Error("cache.page_stride (" + std::to_string(c.page_stride) +
                ") makes pages overlap (a page spans " + std::to_string(page_span) + " elements)");
  }
  if (c.num_slots > 0 && c.k == nullptr) throw Error("cache.k is null");
  if (need_v && c.num_slots > 0 && c.v == nullptr) throw Error("cache.v is null");
}

// The whole cache buffer as a [pages, ...] view, for conservative overlap checks.
TensorView CacheExtent(const KvCacheView& c, void* base) {
  const int64_t span = c.SlotOffset(std::max<int64_t>(c.num_slots, 1) - 1) +
                       (c.num_heads - 1) * c.head_stride + c.head_dim;
  return TensorView{base, c.dtype, 1, 1, span, span, span};
}

void CheckSlots(std::span<const int64_t> slots, int64_t num_slots) {
  for (size_t t = 0; t < slots.size(); ++t) {
    const int64_t s = slots[t];
    if (s >= num_slots) {
      throw Error("slots[" + std::to_string(t) + "] = " + std::to_string(s) +
                  " is out of range [0, cache.num_slots = " + std::to_string(num_slots) +
                  ") (negative slots mark padding)");
    }
  }
  // Distinct slots: pairwise for the few tokens of a decode step, sorted otherwise.
  auto fail = [&](int64_t s) {
    // Name the second token that uses slot s.
    size_t t = 0;
    while (slots[t] != s) ++t;
    ++t;
    while (slots[t] != s) ++t;
    throw Error("slots[" + std::to_string(t) + "] = " + std::to_string(s) +
                " repeats an earlier slot; each new token needs its own cache row");
  };
  if (slots.size() <= 32) {
    for (size_t t = 1; t < slots.size(); ++t) {
      for (size_t u = 0; u < t; ++u) {
        if (slots[t] >= 0 && slots[t] == slots[u]) fail(slots[t]);
      }
    }
    return;
  }
  std::vector<int64_t> sorted(slots.begin(), slots.end());
  std::sort(sorted.begin(), sorted.end());
  for (size_t t = 1; t < sorted.size(); ++t) {
    if (sorted[t] >= 0 && sorted[t] == sorted[t - 1]) fail(sorted[t]);
  }
}

}  // namespace

KvCacheView ContiguousKvCache(void* k, void* v, DType dtype, int64_t max_tokens, int64_t num_heads,
                              int64_t head_dim) {
  KvCacheView c;
  c.k = k;
  c.v = v;
  c.dtype = dtype;
  c.num_slots = max_tokens;
  c.num_heads = num_heads;
  c.head_dim = head_dim;
  c.page_size = std::max<int64_t>(max_tokens, 1);
  c.token_stride = num_heads * head_dim;
  c.head_stride = head_dim;
  c.page_stride = c.page_size * c.token_stride;
  return c;
}

KvCacheView PagedKvCache(void* k, void* v, DType dtype, int64_t num_pages, int64_t page_size,
                         int64_t num_heads, int64_t head_dim, bool head_major) {
  KvCacheView c;
  c.k = k;
  c.v = v;
  c.dtype = dtype;
  c.num_slots = num_pages * page_size;
  c.num_heads = num_heads;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.page_stride = page_size * num_heads * head_dim;
  if (head_major) {
    c.token_stride = head_dim;
    c.head_stride = page_size * head_dim;
  } else {
    c.token_stride = num_heads * head_dim;
    c.head_stride = head_dim;
  }
  return c;
}

std::vector<int64_t> SlotsFromBlockTable(std::span<const int32_t> block_table, int64_t page_size,
                                         int64_t first_position, int64_t count) {
  if (page_size < 1) throw Error("page_size must be >= 1");
  if (first_position < 0 || count < 0) {
    throw Error("first_position and count must be >= 0");
  }
  std::vector<int64_t> slots(static_cast<size_t>(count));
  for (int64_t j = 0; j < count; ++j) {
    const int64_t pos = first_position + j;
    const int64_t entry = pos / page_size;
    if (entry >= static_cast<int64_t>(block_table.size())) {
      throw Error("position " + std::to_string(pos) + " needs block_table[" +
                  std::to_string(entry) + "] but the block table has " +
                  std::to_string(block_table.size()) + " entries");
    }
    const int64_t block = block_table[entry];
    if (block < 0) {
      throw Error("block_table[" + std::to_string(entry) + "] = " + std::to_string(block) +
                  " must be >= 0");
    }
    slots[j] = block * page_size + pos % page_size;
  }
  return slots;
}

namespace {

// Checks of a fused append of `num_tokens` tokens (positions are checked by the caller).
void ValidateAppend(const RopeTable& table, int64_t num_tokens, const RopeOperand& q,
                    const TensorView& k, const TensorView& v, const KvCacheView& cache,
                    std::span<const int64_t> slots, const RotateOptions& options) {
  internal::ValidateCall(table, options);
  internal::ValidateOperands(std::span<const RopeOperand>(&q, 1), num_tokens, table.rotary_dim());
  ValidateCache(cache, table.rotary_dim(), /*need_v=*/true);
  internal::ValidateTensor(k, "k", num_tokens, table.rotary_dim());
  internal::ValidateTensor(v, "v", num_tokens, 0);
  for (const auto& [view, name] : {std::pair<const TensorView&, const char*>{k, "k"}, {v, "v"}}) {
    if (view.dtype != cache.dtype || view.num_heads != cache.num_heads ||
        view.head_dim != cache.head_dim) {
      throw Error(std::string(name) + " must have the cache's dtype (" +
                  std::string(DTypeName(cache.dtype)) + "), num_heads (" +
                  std::to_string(cache.num_heads) + ") and head_dim (" +
                  std::to_string(cache.head_dim) + ")");
    }
  }
  if (q.in.dtype != cache.dtype) {
    throw Error("q must have the cache's dtype (" + std::string(DTypeName(cache.dtype)) + ")");
  }
  if (static_cast<int64_t>(slots.size()) != num_tokens) {
    throw Error("slots has " + std::to_string(slots.size()) + " entries but there are " +
                std::to_string(num_tokens) + " positions");
  }
  CheckSlots(slots, cache.num_slots);
  if (num_tokens == 0 || cache.num_slots == 0) return;
  // The cache must not share memory with the inputs or with q's output (conservative: whole
  // buffers).
  const TensorView cache_k = CacheExtent(cache, cache.k), cache_v = CacheExtent(cache, cache.v);
  const std::pair<const TensorView*, const char*> inputs[] = {
      {&q.out, "q output"}, {&q.in, "q input"}, {&k, "k"}, {&v, "v"}};
  for (const auto& [view, name] : inputs) {
    if (view->num_heads == 0) continue;
    if (internal::Overlap(*view, cache_k) || internal::Overlap(*view, cache_v)) {
      throw Error(std::string(name) + " overlaps the KV cache");
    }
  }
  if (internal::Overlap(cache_k, cache_v)) throw Error("cache.k and cache.v overlap");
}

// One validated fused append: per token, rotate q, rotate k into its cache slot and copy v
// beside it, so that k and v are read once and the cache rows written once.
struct AppendCall {
  const RopeOperand& q;
  const TensorView& k;
  const TensorView& v;
  const KvCacheView& cache;
  std::span<const int64_t> slots;
  RotateHeadsFn fn;  // q and k share dtype, layout and direction
  int num_pairs;

  // row_of(t) gives token t's row (cos then sin).
  template <class RowOf>
  void Tokens(int64_t begin, int64_t end, RowOf&& row_of) const {
    const size_t n = static_cast<size_t>(num_pairs);
    const int64_t es = static_cast<int64_t>(DTypeSize(cache.dtype));
    const int64_t D = cache.head_dim, H = cache.num_heads;
    // v rows of a token and of a slot are one block each when their heads are adjacent.
    const bool v_block = (H == 1 || (v.head_stride == D && cache.head_stride == D));
    for (int64_t t = begin; t < end; ++t) {
      const float* row = row_of(t);
      fn(internal::TokenHeads(q, t), row, row + n, n);
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding token: nothing is written to the cache
      const int64_t slot_offset = cache.SlotOffset(slot) * es;
      HeadRows kh;
      kh.in = static_cast<const uint8_t*>(k.data) + t * k.token_stride * es;
      kh.out = static_cast<uint8_t*>(cache.k) + slot_offset;
      kh.in_head_stride = k.head_stride;
      kh.out_head_stride = cache.head_stride;
      kh.num_heads = H;
      kh.head_dim = D;
      fn(kh, row, row + n, n);
      const uint8_t* v_in = static_cast<const uint8_t*>(v.data) + t * v.token_stride * es;
      uint8_t* v_out = static_cast<uint8_t*>(cache.v) + slot_offset;
      if (v_block) {
        std::memcpy(v_out, v_in, static_cast<size_t>(H * D * es));
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(v_out + h * cache.head_stride * es, v_in + h * v.head_stride * es,
                    static_cast<size_t>(D * es));
      }
    }
  }
};

// The kernel of an append of T tokens: pairs outer for one token (its heads are in the L1 cache),
// heads outer for more (streamed from memory); the same bits either way.
RotateHeadsFn AppendFn(const RotateOptions& options, DType dtype, int64_t num_tokens) {
  return ResolveRotateHeads(dtype, options.layout, options.direction,
                            num_tokens > 1 ? HeadOrder::kHeadsOuter : HeadOrder::kPairsOuter);
}

// The reference composition: rotate(ops) rotates q in place (or into q.out) and k into a
// [T, Hkv, D] scratch with the reference backend; then k and v are copied into the slots.
template <class Rotate>
void AppendReference(const AppendCall& c, int64_t num_tokens, Rotate&& rotate) {
  const KvCacheView& cache = c.cache;
  const int64_t es = static_cast<int64_t>(DTypeSize(cache.dtype));
  const int64_t row = cache.num_heads * cache.head_dim;
  std::vector<uint8_t> k_rot(static_cast<size_t>(num_tokens * row * es));
  const RopeOperand ops[] = {c.q,
                             {c.k, ContiguousView(k_rot.data(), cache.dtype, num_tokens,
                                                  cache.num_heads, cache.head_dim)}};
  rotate(std::span<const RopeOperand>(ops));
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (c.slots[t] < 0) continue;
    const int64_t dst = cache.SlotOffset(c.slots[t]) * es;
    for (int64_t h = 0; h < cache.num_heads; ++h) {
      const int64_t d_off = dst + h * cache.head_stride * es;
      std::memcpy(static_cast<uint8_t*>(cache.k) + d_off,
                  k_rot.data() + (t * row + h * cache.head_dim) * es, cache.head_dim * es);
      std::memcpy(
          static_cast<uint8_t*>(cache.v) + d_off,
          static_cast<const uint8_t*>(c.v.data) + (t * c.v.token_stride + h * c.v.head_stride) * es,
          cache.head_dim * es);
    }
  }
}

}  // namespace

void ApplyRopeAndAppend(const RopeTable& table, PositionSpan positions, const RopeOperand& q,
                        const TensorView& k, const TensorView& v, const KvCacheView& cache,
                        std::span<const int64_t> slots, const RotateOptions& options) {
  const int64_t num_tokens = positions.size();
  const int64_t needed_rows = internal::CheckPositions(table, positions, "positions");
  ValidateAppend(table, num_tokens, q, k, v, cache, slots, options);
  if (num_tokens == 0 || cache.num_slots == 0) {
    if (num_tokens > 0) ApplyRope(table, positions, std::span<const RopeOperand>(&q, 1), options);
    return;
  }
  const int n = table.num_pairs();
  const AppendCall call{q, k, v, cache, slots, AppendFn(options, cache.dtype, num_tokens), n};
  if (internal::UseReferenceBackend(options.backend)) {
    AppendReference(call, num_tokens, [&](std::span<const RopeOperand> ops) {
      ApplyRope(table, positions, ops, options);
    });
    return;
  }
  internal::GrowTable(table, needed_rows, num_tokens);
  const internal::RowLookup lookup(table, table.Snapshot());
  const int64_t bytes = num_tokens * (q.in.num_heads + 2 * cache.num_heads) * cache.head_dim *
                        static_cast<int64_t>(DTypeSize(cache.dtype));
  if (num_tokens == 1 || internal::PoolFor(options, bytes) == nullptr) {
    std::vector<float> scratch(2 * static_cast<size_t>(n));
    call.Tokens(0, num_tokens, [&](int64_t t) { return lookup.Row(positions[t], scratch.data()); });
    return;
  }
  ParallelFor(options.pool, static_cast<size_t>(num_tokens),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                std::vector<float> scratch(2 * static_cast<size_t>(n));
                call.Tokens(static_cast<int64_t>(begin), static_cast<int64_t>(end),
                            [&](int64_t t) { return lookup.Row(positions[t], scratch.data()); });
              });
}

void ApplyRopeAndAppend(const RopeTable& table, const AxisPositions& positions,
                        const RopeAxes& axes, const RopeOperand& q, const TensorView& k,
                        const TensorView& v, const KvCacheView& cache,
                        std::span<const int64_t> slots, const RotateOptions& options) {
  const int n = table.num_pairs();
  const std::vector<uint8_t> pair_axis = axes.PairAxes(n);
  const int64_t needed_rows = internal::CheckAxisPositions(table, positions, axes);
  const int64_t num_tokens = positions.num_tokens();
  ValidateAppend(table, num_tokens, q, k, v, cache, slots, options);
  if (num_tokens == 0 || cache.num_slots == 0) {
    if (num_tokens > 0) {
      ApplyRope(table, positions, axes, std::span<const RopeOperand>(&q, 1), options);
    }
    return;
  }
  const AppendCall call{q, k, v, cache, slots, AppendFn(options, cache.dtype, num_tokens), n};
  if (internal::UseReferenceBackend(options.backend)) {
    AppendReference(call, num_tokens, [&](std::span<const RopeOperand> ops) {
      ApplyRope(table, positions, axes, ops, options);
    });
    return;
  }
  internal::GrowTable(table, needed_rows, num_tokens);
  const internal::RowLookup lookup(table, table.Snapshot());
  const int64_t bytes = num_tokens * (q.in.num_heads + 2 * cache.num_heads) * cache.head_dim *
                        static_cast<int64_t>(DTypeSize(cache.dtype));
  ParallelFor(internal::PoolFor(options, bytes), static_cast<size_t>(num_tokens),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                internal::AxisRows rows(lookup, positions, pair_axis.data());
                call.Tokens(static_cast<int64_t>(begin), static_cast<int64_t>(end),
                            [&](int64_t t) { return rows.Row(t); });
              });
}

namespace {

// The unit-magnitude row of |delta| (A = 1: the cached keys already carry A).
std::vector<float> ShiftRow(const RopeTable& table, int64_t delta) {
  if (delta < -kMaxPosition || delta > kMaxPosition) {
    throw Error("delta = " + std::to_string(delta) + " is out of range [" +
                std::to_string(-kMaxPosition) + ", " + std::to_string(kMaxPosition) + "]");
  }
  RopeFrequencies unit = table.frequencies();
  unit.attention_factor = 1.0;
  const RopeTable unit_table(std::move(unit));
  const int n = table.num_pairs();
  std::vector<float> row(2 * static_cast<size_t>(n));
  unit_table.ComputeRow(std::abs(delta), row.data(), row.data() + n);
  return row;
}

void CheckShiftOptions(const RopeTable& table, const RotateOptions& options) {
  internal::ValidateCall(table, options);
  if (options.direction != Direction::kForward) {
    throw Error(
        "ShiftKeys: options.direction must be forward; the sign of delta sets the "
        "direction of the shift");
  }
}

}  // namespace

void ShiftKeys(const RopeTable& table, const KvCacheView& cache, std::span<const int64_t> slots,
               int64_t delta, const RotateOptions& options) {
  CheckShiftOptions(table, options);
  ValidateCache(cache, table.rotary_dim(), /*need_v=*/false);
  CheckSlots(slots, cache.num_slots);
  const std::vector<float> row = ShiftRow(table, delta);
  if (delta == 0 || slots.empty()) return;
  const int n = table.num_pairs();
  const Direction direction = delta > 0 ? Direction::kForward : Direction::kBackward;
  const RotateHeadsFn fn = ResolveRotateHeads(cache.dtype, options.layout, direction);
  const bool reference = internal::UseReferenceBackend(options.backend);
  const int64_t es = static_cast<int64_t>(DTypeSize(cache.dtype));
  const int64_t bytes = static_cast<int64_t>(slots.size()) * cache.num_heads * cache.head_dim * es;
  ParallelFor(internal::PoolFor(options, bytes), slots.size(),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                if (!reference) {
                  // Every key takes the same row: R(p + delta) = R(delta) R(p).
                  for (size_t s = begin; s < end; ++s) {
                    if (slots[s] < 0) continue;
                    HeadRows heads;
                    heads.out = static_cast<uint8_t*>(cache.k) + cache.SlotOffset(slots[s]) * es;
                    heads.in = heads.out;
                    heads.in_head_stride = heads.out_head_stride = cache.head_stride;
                    heads.num_heads = cache.num_heads;
                    heads.head_dim = cache.head_dim;
                    fn(heads, row.data(), row.data() + n, static_cast<size_t>(n));
                  }
                  return;
                }
                std::vector<double> x(cache.head_dim), y(cache.head_dim);
                for (size_t s = begin; s < end; ++s) {
                  if (slots[s] < 0) continue;
                  for (int64_t h = 0; h < cache.num_heads; ++h) {
                    const int64_t off = cache.SlotOffset(slots[s]) + h * cache.head_stride;
                    for (int64_t c = 0; c < cache.head_dim; ++c) {
                      x[c] = reference::LoadAsDouble(cache.k, cache.dtype, off + c);
                    }
                    reference::RotateHead(x.data(), y.data(), row.data(), row.data() + n, n,
                                          static_cast<int>(cache.head_dim), options.layout,
                                          direction);
                    for (int64_t c = 0; c < cache.head_dim; ++c) {
                      reference::StoreFromDouble(cache.k, cache.dtype, off + c, y[c]);
                    }
                  }
                }
              });
}

void ShiftKeys(const RopeTable& table, const TensorView& keys, int64_t delta,
               const RotateOptions& options) {
  CheckShiftOptions(table, options);
  internal::ValidateTensor(keys, "keys", keys.num_tokens, table.rotary_dim());
  const std::vector<float> row = ShiftRow(table, delta);
  if (delta == 0 || keys.num_tokens == 0 || keys.num_heads == 0) return;
  // Every key takes the same row: a one-row table read at position 0.
  const int n = table.num_pairs();
  const std::vector<int64_t> zeros(static_cast<size_t>(keys.num_tokens), 0);
  const PositionSpan positions(zeros);
  const RopeOperand op{keys, keys};
  const Direction direction = delta > 0 ? Direction::kForward : Direction::kBackward;
  const bool reference = internal::UseReferenceBackend(options.backend);
  const int64_t bytes = keys.num_tokens * keys.num_heads * keys.head_dim *
                        static_cast<int64_t>(DTypeSize(keys.dtype));
  ParallelFor(internal::PoolFor(options, bytes), static_cast<size_t>(keys.num_tokens),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                if (reference) {
                  reference::ApplyRopeTokens(std::span<const RopeOperand>(&op, 1), n,
                                             options.layout, direction, static_cast<int64_t>(begin),
                                             static_cast<int64_t>(end),
                                             [&](int64_t, float* cos, float* sin) {
                                               std::memcpy(cos, row.data(), n * sizeof(float));
                                               std::memcpy(sin, row.data() + n, n * sizeof(float));
                                             });
                  return;
                }
                RotateJob job;
                job.ops = std::span<const RopeOperand>(&op, 1);
                job.positions = &positions;
                job.rows = row.data();
                job.num_rows = 1;
                job.row_stride = 2 * n;
                job.num_pairs = n;
                job.layout = options.layout;
                job.direction = direction;
                RotateTokensSimd(job, static_cast<int64_t>(begin), static_cast<int64_t>(end));
              });
}

}  // namespace ropekit
