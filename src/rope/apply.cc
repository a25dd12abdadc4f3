// ApplyRope: validation at the API boundary, table growth, threading and backend choice.
// The rotation itself is in src/kernels/ (SIMD) and src/reference/rope.h (scalar oracle).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "src/kernels/rope_kernels.h"
#include "src/reference/rope.h"
#include "src/rope/apply_internal.h"

namespace ropekit {
namespace {

// Rows a single call may add to a table beyond 4 per token.
constexpr int64_t kGrowRowsPerCall = 16384;
bool UseReference(Backend backend) {
  if (backend == Backend::kReference) return true;
  if (backend == Backend::kSimd) return false;
  const char* env = std::getenv("ROPEKIT_BACKEND");
  return env != nullptr && std::string(env) == "reference";
}

// Byte range [lo, hi) touched by a view (channels contiguous).
std::pair<int64_t, int64_t> ByteRange(const TensorView& v) {
  int64_t lo = 0, hi = v.head_dim - 1;
  const int64_t ts = (v.num_tokens - 1) * v.token_stride;
  const int64_t hs = (v.num_heads - 1) * v.head_stride;
  lo += std::min<int64_t>(0, ts) + std::min<int64_t>(0, hs);
  hi += std::max<int64_t>(0, ts) + std::max<int64_t>(0, hs);
  const int64_t base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(v.data));
  const int64_t size = static_cast<int64_t>(DTypeSize(v.dtype));
  return {base + lo * size, base + (hi + 1) * size};
}

// Whether two non-empty views share any element. Exact for views with the same positive token
// stride whose heads fit inside one token stride (token-major tensors and slices of a fused QKV
// buffer); otherwise conservative (the byte ranges intersect).
bool ViewsOverlap(const TensorView& a, const TensorView& b) {
  const auto [a_lo, a_hi] = ByteRange(a);
  const auto [b_lo, b_hi] = ByteRange(b);
  if (!(a_lo < b_hi && b_lo < a_hi)) return false;
  const int64_t es = static_cast<int64_t>(DTypeSize(a.dtype));
  if (DTypeSize(b.dtype) != DTypeSize(a.dtype)) return true;
  const int64_t ts = a.token_stride * es;
  const auto footprint = [&](const TensorView& v) {
    return ((v.num_heads - 1) * v.head_stride + v.head_dim) * es;
  };
  if (a.token_stride != b.token_stride || ts <= 0 || a.head_stride <= 0 || b.head_stride <= 0 ||
      footprint(a) > ts || footprint(b) > ts) {
    return true;
  }
  // Token t of a and token t + j of b can only meet for the one or two j with
  // |diff + j ts| < ts, where diff is the distance between the views' first elements.
  const int64_t diff = static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.data)) -
                       static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.data));
  const int64_t max_shift = std::max(a.num_tokens, b.num_tokens) - 1;
  const int64_t j_lo = std::max(-max_shift, (-diff - footprint(b)) / ts - 1);
  const int64_t j_hi = std::min(max_shift, (ts - diff) / ts + 1);
  for (int64_t j = j_lo; j <= j_hi; ++j) {
    for (int64_t ha = 0; ha < a.num_heads; ++ha) {
      const int64_t a0 = ha * a.head_stride * es, a1 = a0 + a.head_dim * es;
      for (int64_t hb = 0; hb < b.num_heads; ++hb) {
        const int64_t b0 = diff + j * ts + hb * b.head_stride * es, b1 = b0 + b.head_dim * es;
        if (a0 < b1 && b0 < a1) return true;
      }
    }
  }
  return false;
}

void ValidateView(const TensorView& v, const std::string& name, int64_t num_tokens, int rotary_dim,
                  bool allow_f64 = false) {
  const bool supported = v.dtype == DType::kF32 || v.dtype == DType::kBF16 ||
                         v.dtype == DType::kF16 || (allow_f64 && v.dtype == DType::kF64);
  if (!supported) {
    throw Error(name + ".dtype must be float32, bfloat16 or float16" +
                std::string(allow_f64 ? " (or float64)" : ""));
  }
  if (v.num_tokens != num_tokens) {
    throw Error(name + ".num_tokens (" + std::to_string(v.num_tokens) +
                ") must equal the number of positions (" + std::to_string(num_tokens) + ")");
  }
  if (v.num_heads < 0) throw Error(name + ".num_heads must be >= 0");
  if (v.head_dim < rotary_dim) {
    throw Error(name + ".head_dim (" + std::to_string(v.head_dim) + ") must be >= rotary_dim (" +
                std::to_string(rotary_dim) + ")");
  }
  if (v.num_tokens > 0 && v.num_heads > 0 && v.data == nullptr) throw Error(name + ".data is null");
  // Heads of one token, and tokens, must not overlap each other.
  if (v.num_heads > 1 && std::abs(v.head_stride) < v.head_dim) {
    throw Error(name + ".head_stride (" + std::to_string(v.head_stride) +
                ") makes heads overlap: |head_stride| must be >= head_dim (" +
                std::to_string(v.head_dim) + ")");
  }
  if (v.num_tokens > 1) {
    const int64_t span = (v.num_heads - 1) * std::abs(v.head_stride) + v.head_dim;
    if (std::abs(v.token_stride) < span &&
        !(std::abs(v.head_stride) >= v.num_tokens * std::abs(v.token_stride) &&
          std::abs(v.token_stride) >= v.head_dim)) {
      throw Error(name + ".token_stride (" + std::to_string(v.token_stride) +
                  ") makes tokens overlap for head_stride " + std::to_string(v.head_stride));
    }
  }
}

}  // namespace

TensorView ContiguousView(void* data, DType dtype, int64_t num_tokens, int64_t num_heads,
                          int64_t head_dim) {
  return TensorView{data, dtype, num_tokens, num_heads, head_dim, num_heads * head_dim, head_dim};
}

namespace internal {

void ValidateCall(const RopeTable& table, const RotateOptions& options) {
  if (options.layout != Layout::kHalfSplit && options.layout != Layout::kInterleaved) {
    throw Error("layout must be neox (half-split) or gptj (interleaved)");
  }
  if (options.direction != Direction::kForward && options.direction != Direction::kBackward) {
    throw Error("direction must be forward or backward");
  }
}

int64_t CheckPositions(const RopeTable& table, PositionSpan positions, const std::string& name) {
  const int64_t max_rows = table.max_capacity();
  int64_t needed_rows = 0;
  for (int64_t t = 0; t < positions.size(); ++t) {
    const int64_t p = positions[t];
    if (p < 0 || p > kMaxPosition) {
      throw Error(name + "[" + std::to_string(t) + "] = " + std::to_string(p) +
                  " is out of range [0, " + std::to_string(kMaxPosition) + "]");
    }
    if (p < max_rows) needed_rows = std::max(needed_rows, p + 1);
  }
  return needed_rows;
}

void ValidateOperands(std::span<const RopeOperand> ops, int64_t num_tokens, int rotary_dim,
                      bool allow_f64) {
  for (size_t k = 0; k < ops.size(); ++k) {
    const std::string name = "operand " + std::to_string(k);
    const RopeOperand& op = ops[k];
    ValidateView(op.in, name + " input", num_tokens, rotary_dim, allow_f64);
    ValidateView(op.out, name + " output", num_tokens, rotary_dim, allow_f64);
    if (op.in.dtype != op.out.dtype || op.in.num_heads != op.out.num_heads ||
        op.in.head_dim != op.out.head_dim) {
      throw Error(name + ": output must have the input's dtype, num_heads and head_dim");
    }
    if (num_tokens == 0 || op.in.num_heads == 0) continue;
    const bool same = op.in.data == op.out.data && op.in.token_stride == op.out.token_stride &&
                      op.in.head_stride == op.out.head_stride;
    if (!same && ViewsOverlap(op.in, op.out)) {
      throw Error(name +
                  ": output overlaps input without being the same view (in-place needs "
                  "identical data pointer and strides)");
    }
    for (size_t j = 0; j < k; ++j) {
      if (ops[j].in.num_heads > 0 && ViewsOverlap(ops[j].out, op.out)) {
        throw Error(name + ": output overlaps the output of operand " + std::to_string(j));
      }
    }
  }
}

void ValidateTensor(const TensorView& v, const std::string& name, int64_t num_tokens,
                    int rotary_dim) {
  ValidateView(v, name, num_tokens, rotary_dim);
}

bool Overlap(const TensorView& a, const TensorView& b) { return ViewsOverlap(a, b); }

void GrowTable(const RopeTable& table, int64_t needed_rows, int64_t num_tokens) {
  // Grow only when the new rows are few compared with the work (prefill, or decoding step by
  // step past the end); a few far-away positions are cheaper to compute on the fly.
  const int64_t capacity = table.capacity();
  if (needed_rows > capacity &&
      needed_rows - capacity <= std::max<int64_t>(kGrowRowsPerCall, 4 * num_tokens)) {
    table.Reserve(needed_rows);
  }
}

bool UseReferenceBackend(Backend backend) { return UseReference(backend); }

// RotateOptions::min_parallel_bytes defaults to 2 MiB: waking a worker costs a few microseconds
// on an idle machine and much more on a busy one, while rotating 1 MiB takes 10-50 us on one
// core, so from 2 MiB a second thread saves more than it costs. bench/bench_rope (32 + 8 heads x
// 128, AMD EPYC, idle): 512 tokens (5.2 MiB in 16-bit, 10.5 MiB in fp32) run 1.4-1.9x faster
// on two threads than on one.
ThreadPool* PoolFor(const RotateOptions& options, int64_t bytes) {
  return bytes >= options.min_parallel_bytes ? options.pool : nullptr;
}

int64_t CallBytes(std::span<const RopeOperand> ops, int64_t num_tokens) {
  int64_t per_token = 0;
  for (const RopeOperand& op : ops) {
    per_token += op.in.num_heads * op.in.head_dim * static_cast<int64_t>(DTypeSize(op.in.dtype));
  }
  return per_token * num_tokens;
}

HeadRows TokenHeads(const RopeOperand& op, int64_t t) {
  const int64_t es = static_cast<int64_t>(DTypeSize(op.in.dtype));
  HeadRows heads;
  heads.in = static_cast<const uint8_t*>(op.in.data) + t * op.in.token_stride * es;
  heads.out = static_cast<uint8_t*>(op.out.data) + t * op.out.token_stride * es;
  heads.in_head_stride = op.in.head_stride;
  heads.out_head_stride = op.out.head_stride;
  heads.num_heads = op.in.num_heads;
  heads.head_dim = op.in.head_dim;
  return heads;
}

std::vector<RotateHeadsFn> ResolveOperandFns(std::span<const RopeOperand> ops,
                                             const RotateOptions& options) {
  std::vector<RotateHeadsFn> fns;
  fns.reserve(ops.size());
  for (const RopeOperand& op : ops) {
    fns.push_back(ResolveRotateHeads(op.in.dtype, options.layout, options.direction));
  }
  return fns;
}

void RotateTokenRow(std::span<const RopeOperand> ops, std::span<const RotateHeadsFn> fns, int64_t t,
                    const float* row, int num_pairs) {
  for (size_t k = 0; k < ops.size(); ++k) {
    fns[k](TokenHeads(ops[k], t), row, row + num_pairs, static_cast<size_t>(num_pairs));
  }
}

}  // namespace internal

bool ElementsDistinct(std::span<const int64_t> shape, std::span<const int64_t> strides) {
  if (shape.size() != strides.size()) throw Error("ElementsDistinct: shape and strides differ");
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, extent) of dimensions > 1
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 0) return true;
    if (shape[i] > 1) dims.emplace_back(std::llabs(strides[i]), shape[i]);
  }
  // Sorted by stride, each dimension must step over everything the smaller ones cover.
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;
  for (const auto& [stride, extent] : dims) {
    if (stride < span) return false;
    span = stride * (extent - 1) + span;
  }
  return true;
}

void ApplyRope(const RopeTable& table, PositionSpan positions, std::span<const RopeOperand> ops,
               const RotateOptions& options) {
  internal::ValidateCall(table, options);
  const int64_t num_tokens = positions.size();
  // The table grows to cover every position it can hold; rarer positions past its memory limit
  // are computed on the fly.
  const int64_t needed_rows = internal::CheckPositions(table, positions, "positions");
  internal::ValidateOperands(ops, num_tokens, table.rotary_dim(), /*allow_f64=*/true);
  if (num_tokens == 0) return;
  internal::GrowTable(table, needed_rows, num_tokens);
  const RopeTable::Rows rows = table.Snapshot();
  const int n = table.num_pairs();
  const bool reference = UseReference(options.backend) ||
                         std::any_of(ops.begin(), ops.end(), [](const RopeOperand& op) {
                           return op.in.dtype == DType::kF64;
                         });
  const auto range_fn = [&](size_t begin, size_t end, size_t /*worker*/) {
    if (reference) {
      reference::ApplyRopeTokens(ops, n, options.layout, options.direction,
                                 static_cast<int64_t>(begin), static_cast<int64_t>(end),
                                 [&](int64_t t, float* cos, float* sin) {
                                   const int64_t p = positions[t];
                                   if (p < rows.num_positions) {
                                     const float* row = rows.data.get() + p * rows.row_stride;
                                     std::memcpy(cos, row, n * sizeof(float));
                                     std::memcpy(sin, row + n, n * sizeof(float));
                                   } else {
                                     table.ComputeRow(p, cos, sin);
                                   }
                                 });
      return;
    }
    RotateJob job;
    job.ops = ops;
    job.positions = &positions;
    job.rows = rows.data.get();
    job.num_rows = rows.num_positions;
    job.row_stride = rows.row_stride;
    job.num_pairs = n;
    job.layout = options.layout;
    job.direction = options.direction;
    // Runs of tokens inside the table go to the kernel; a token past it gets its row computed
    // here and rotated with the same arithmetic (RotateHeads).
    std::vector<RotateHeadsFn> fns;
    std::vector<float> scratch;
    int64_t run = static_cast<int64_t>(begin);
    for (int64_t t = run; t < static_cast<int64_t>(end); ++t) {
      const int64_t p = positions[t];
      if (p < rows.num_positions) continue;
      if (run < t) RotateTokensSimd(job, run, t);
      if (fns.empty()) {
        fns = internal::ResolveOperandFns(ops, options);
        scratch.resize(2 * static_cast<size_t>(n));
      }
      table.ComputeRow(p, scratch.data(), scratch.data() + n);
      internal::RotateTokenRow(ops, fns, t, scratch.data(), n);
      run = t + 1;
    }
    if (run < static_cast<int64_t>(end)) RotateTokensSimd(job, run, static_cast<int64_t>(end));
  };
  ParallelFor(internal::PoolFor(options, internal::CallBytes(ops, num_tokens)),
              static_cast<size_t>(num_tokens), range_fn);
}

void ApplyRopeInPlace(const RopeTable& table, PositionSpan positions, const TensorView& x,
                      const RotateOptions& options) {
  const RopeOperand op{x, x};
  ApplyRope(table, positions, std::span<const RopeOperand>(&op, 1), options);
}

}  // namespace ropekit
