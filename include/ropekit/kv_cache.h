// ropekit: RoPE for inference engines' KV caches.
//
//  - ApplyRopeAndAppend: one call rotates q and k of the new tokens and writes the rotated k and
//    the raw v into a KV cache slot per token, in one pass (the fused "rotate, then append" of
//    vLLM's reshape_and_cache and FlashInfer's append_paged_kv_cache). The cache holds post-RoPE
//    keys, as transformers' LlamaAttention appends them.
//  - ShiftKeys: re-rotates cached keys in place by a position delta (llama.cpp's context shift;
//    StreamingLLM attention sinks, Xiao et al. 2023, arXiv:2309.17453). RoPE rotations compose,
//    R(p + delta) = R(delta) R(p), so a key rotated at p becomes a key rotated at p + delta
//    without its unrotated value. The shift is a pure rotation: the attention factor A of
//    YaRN / LongRoPE, already in the cached key, is not applied again.
//
// Dimension legend: T = new tokens, H = query heads, Hkv = key/value heads, D = head_dim,
// S = cache slots (tokens the cache can hold), P = page_size.
//
// Cache layouts (elements; one KvCacheView describes k and v, which share the layout):
//   contiguous [S, Hkv, D]                 ContiguousKvCache
//   paged NHD  [pages, P, Hkv, D]          PagedKvCache (vLLM flash layout, FlashInfer NHD)
//   paged HND  [pages, Hkv, P, D]          PagedKvCache(..., head_major = true) (FlashInfer HND)
// Slot s lives in page s / P at row s % P. A sequence's slots come from its block table:
// slot = block_table[pos / P] * P + pos % P (SlotsFromBlockTable). A negative slot marks a
// padding token: it is rotated in q but nothing is written (as in vLLM).
#ifndef ROPEKIT_KV_CACHE_H_
#define ROPEKIT_KV_CACHE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit {

struct KvCacheView {
  void* k = nullptr;  // key cache
  void* v = nullptr;  // value cache (may be null for ShiftKeys)
  DType dtype = DType::kF32;
  int64_t num_slots = 0;     // S = pages * page_size
  int64_t num_heads = 0;     // Hkv
  int64_t head_dim = 0;      // D
  int64_t page_size = 0;     // P (contiguous: S)
  int64_t page_stride = 0;   // elements between pages
  int64_t token_stride = 0;  // elements between rows of a page
  int64_t head_stride = 0;   // elements between heads

  // Element offset of slot s (0 <= s < S).
  int64_t SlotOffset(int64_t slot) const {
    return slot / page_size * page_stride + slot % page_size * token_stride;
  }
};

// [max_tokens, Hkv, D] token-major buffers.
KvCacheView ContiguousKvCache(void* k, void* v, DType dtype, int64_t max_tokens, int64_t num_heads,
                              int64_t head_dim);
// [pages, P, Hkv, D] (NHD) or, with head_major, [pages, Hkv, P, D] (HND).
KvCacheView PagedKvCache(void* k, void* v, DType dtype, int64_t num_pages, int64_t page_size,
                         int64_t num_heads, int64_t head_dim, bool head_major = false);

// Slots of positions [first_position, first_position + count) of one sequence:
// block_table[pos / page_size] * page_size + pos % page_size. Throws Error when a position falls
// past the block table or a block id is negative.
std::vector<int64_t> SlotsFromBlockTable(std::span<const int32_t> block_table, int64_t page_size,
                                         int64_t first_position, int64_t count);

// Rotates q (in place when q.out == q.in, else out of place) and k at `positions` (the RoPE
// positions), and writes the rotated k to cache.k and v to cache.v at `slots` (the cache rows;
// they may differ from the positions, e.g. after a context shift). k and v are [T, Hkv, D] views
// with the cache's dtype, Hkv and D; q has the same dtype. Slots must be distinct and in
// [0, S), or negative (skipped). The cache entries equal ApplyRope(k) copied into the slots,
// bit for bit. Throws Error naming the argument on invalid shapes, overlaps, slots or positions.
void ApplyRopeAndAppend(const RopeTable& table, PositionSpan positions, const RopeOperand& q,
                        const TensorView& k, const TensorView& v, const KvCacheView& cache,
                        std::span<const int64_t> slots, const RotateOptions& options = {});

// The same with multimodal positions ([A, T], see ApplyRope with RopeAxes in rope.h): pair i of
// token t is rotated with positions.axes[a(i)][t] in q and k. The cache entries equal the
// multimodal ApplyRope(k) copied into the slots, bit for bit.
void ApplyRopeAndAppend(const RopeTable& table, const AxisPositions& positions,
                        const RopeAxes& axes, const RopeOperand& q, const TensorView& k,
                        const TensorView& v, const KvCacheView& cache,
                        std::span<const int64_t> slots, const RotateOptions& options = {});

// Re-rotates the keys cached at `slots` in place by `delta` positions (forward rotation by
// delta when delta > 0, backward by -delta when delta < 0; delta = 0 leaves them untouched).
// Only cache.k is read and written. The row of |delta| is formed like any table row but with
// A = 1. Frequencies are the table's: for types whose frequencies depend on the sequence length
// (dynamic NTK, LongRoPE), a shift is exact only if the cached keys were rotated with the same
// frequencies (see README, "Context shift"). options.direction must be kForward.
void ShiftKeys(const RopeTable& table, const KvCacheView& cache, std::span<const int64_t> slots,
               int64_t delta, const RotateOptions& options = {});

// The same for a strided [T, H, D] view of cached keys (e.g. a contiguous range of a cache).
void ShiftKeys(const RopeTable& table, const TensorView& keys, int64_t delta,
               const RotateOptions& options = {});

}  // namespace ropekit

#endif  // ROPEKIT_KV_CACHE_H_
