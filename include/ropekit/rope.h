// ropekit: rotary position embedding (RoPE), public API.
//
// RoFormer (Su et al. 2021, arXiv:2104.09864): each pair of channels (a, b) of a query or key at
// integer position p is rotated by the angle theta_i = p * w_i, where w_i = base^(-2i/R) is the
// inverse frequency of pair i and R the rotary dimension:
//   a' = a cos(theta_i) - b sin(theta_i)
//   b' = b cos(theta_i) + a sin(theta_i)
// so that <R(m) q, R(n) k> depends only on n - m. Scaling variants (PI, NTK, YaRN, Llama-3.1,
// LongRoPE, ...) change only the inverse frequencies w_i and a magnitude factor A that multiplies
// cos and sin; the rotation kernel is the same for all of them.
//
// Dimension legend: T = tokens, H = heads, D = head_dim, R = rotary_dim (even, R <= D),
// N = R / 2 = number of rotated pairs.
//
// Channel layouts (one head, D = 8, R = 6; c = rotated, p = passed through unchanged):
//
//   kHalfSplit (GPT-NeoX / Hugging Face "rotate_half"): pair i = channels (i, i + N)
//     channel:  0  1  2  3  4  5  6  7
//     pair:     0  1  2  0  1  2  p  p        [a0 a1 a2 b0 b1 b2 | p p]
//
//   kInterleaved (GPT-J / Meta LLaMA / RoFormer): pair i = channels (2i, 2i + 1)
//     channel:  0  1  2  3  4  5  6  7
//     pair:     0  0  1  1  2  2  p  p        [a0 b0 a1 b1 a2 b2 | p p]
//
// Hugging Face LLaMA-family checkpoints have their q/k projection rows permuted so that kHalfSplit
// applied to them equals Meta's kInterleaved rotation on the original weights.
#ifndef ROPEKIT_ROPE_H_
#define ROPEKIT_ROPE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ropekit/error.h"

namespace ropekit {

class ThreadPool;

// Frequency-scaling variants, with Hugging Face `transformers` semantics (rope_type names).
enum class RopeType {
  kDefault,   // "default": w_i = base^(-2i/R)
  kLinear,    // "linear": position interpolation (Chen et al. 2023), w_i / factor
  kDynamic,   // "dynamic": dynamic NTK, base grows with the current sequence length
  kYarn,      // "yarn": YaRN (Peng et al. 2023), ramp between interpolation and extrapolation
  kLongRope,  // "longrope": LongRoPE / Phi-3 "su", per-pair rescale factors
  kLlama3,    // "llama3": Llama 3.1 smooth band
  kNtk,       // fixed NTK-aware base scaling: base' = base * alpha^(R/(R-2))
  kSentinel,
};

// Name as written in a config ("default", "linear", "dynamic", "yarn", "longrope", "llama3",
// "ntk"); ParseRopeType throws Error for unknown names.
std::string_view RopeTypeName(RopeType type);
RopeType ParseRopeType(std::string_view name);

enum class Layout { kHalfSplit, kInterleaved, kSentinel };
std::string_view LayoutName(Layout layout);  // "neox" or "gptj"
Layout ParseLayout(std::string_view name);   // accepts neox|half|halfsplit, gptj|interleaved

// How cos/sin values are formed.
//  kExact: inverse frequencies and angles in double (angle = p * w with the rounding error of
//    the product carried along), cos/sin evaluated in double and rounded once to float32.
//    |error| <= 1.2e-7 (A <= 2) for p < 2^24, <= 4e-7 up to 2^31 - 1.
//  kHf: reproduces transformers' float32 order of operations: w_i in float32 as HF forms it,
//    theta = fl32(p) * w_i in float32, cos/sin of that float angle, times fl32(A).
enum class Numerics { kExact, kHf, kSentinel };
std::string_view NumericsName(Numerics numerics);  // "exact" or "hf"
Numerics ParseNumerics(std::string_view name);

// All parameters that determine the inverse frequencies and attention factor. Field names follow
// the Hugging Face config keys. Only the fields of the chosen type are read.
struct RopeParams {
  RopeType type = RopeType::kDefault;
  double base = 10000.0;  // rope_theta
  int head_dim = 0;       // D
  int rotary_dim = 0;     // R = int(head_dim * partial_rotary_factor); even, 2 <= R <= D
  int64_t max_position_embeddings = 2048;

  // linear, dynamic, yarn, llama3: required (>= 1). longrope: optional (0 = MPE / OMP).
  double factor = 0.0;
  // ntk: base scale alpha (>= 1).
  double ntk_alpha = 1.0;
  // yarn, longrope, llama3. 0 = use max_position_embeddings.
  int64_t original_max_position_embeddings = 0;
  // yarn.
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;          // 0 = absent
  double mscale_all_dim = 0.0;  // 0 = absent
  bool truncate = true;
  // yarn, longrope: explicit attention factor A (overrides the computed one).
  std::optional<double> attention_factor;
  // longrope: per-pair rescale factors, N entries each.
  std::vector<double> short_factor;
  std::vector<double> long_factor;
  // llama3.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;

  // Throws Error naming the first invalid field and its accepted range.
  void Validate() const;
};

// Per-pair inverse frequencies and the magnitude factor A, for one sequence length.
struct RopeFrequencies {
  Numerics numerics = Numerics::kExact;
  int rotary_dim = 0;             // R
  std::vector<double> inv_freq;   // [N]; under kHf every entry is a float32 value
  double attention_factor = 1.0;  // A; under kHf a float32 value
};

// Computes w and A. `seq_len` is the current sequence length (max position + 1) for the
// length-dependent types: dynamic (base grows when seq_len > max_position_embeddings) and
// longrope (long factors when seq_len > original_max_position_embeddings); 0 means "not given"
// (dynamic: max_position_embeddings; longrope: short factors). Validates `params`.
RopeFrequencies ComputeFrequencies(const RopeParams& params, Numerics numerics,
                                   int64_t seq_len = 0);

// Largest position accepted anywhere in ropekit.
inline constexpr int64_t kMaxPosition = 2147483647;  // 2^31 - 1

// A cos/sin table shared read-only by every head, layer and thread. Rows for positions below
// capacity() are precomputed; Reserve() grows it safely (readers keep the rows they hold). Rows
// for positions beyond the table are computed on the fly with identical values, so any position
// in [0, kMaxPosition] is valid. ApplyRope grows the table when a call needs few new rows
// compared with its work (at most max(16384, 4 T)), e.g. prefill or step-by-step decoding, and
// computes isolated far positions on the fly; call Reserve() to precompute a range up front.
class RopeTable {
 public:
  // Row layout: [cos_0 .. cos_{N-1} | sin_0 .. sin_{N-1}], attention factor applied, padded to
  // row_stride() floats.
  struct Rows {
    std::shared_ptr<const float[]> data;
    int64_t num_positions = 0;
    int64_t row_stride = 0;
  };

  explicit RopeTable(RopeFrequencies frequencies, int64_t initial_positions = 0);
  ~RopeTable();
  RopeTable(const RopeTable&) = delete;
  RopeTable& operator=(const RopeTable&) = delete;

  const RopeFrequencies& frequencies() const { return freq_; }
  int rotary_dim() const { return freq_.rotary_dim; }
  int num_pairs() const { return freq_.rotary_dim / 2; }
  int64_t row_stride() const { return row_stride_; }

  // Computes one row (cos then sin, N floats each) for position p in [0, kMaxPosition].
  void ComputeRow(int64_t position, float* cos, float* sin) const;

  // Ensures rows for positions [0, min(num_positions, max_capacity())) are precomputed; rows
  // beyond are computed on the fly. Thread-safe; growth is geometric, old snapshots stay valid.
  void Reserve(int64_t num_positions) const;
  // Most rows the table will hold (a 64 MiB budget).
  int64_t max_capacity() const;
  // The current precomputed rows; valid for as long as the returned object is held.
  Rows Snapshot() const;
  int64_t capacity() const;

 private:
  RopeFrequencies freq_;
  int64_t row_stride_;
  struct State;
  std::unique_ptr<State> state_;
};

// Storage types. kF64 (for torch.autograd.gradcheck and as a high-precision path) is accepted by
// the one-axis ApplyRope only, which rotates it on the double-precision reference path with the
// same float32 cos/sin values (rounded once to double: exact) and stores the double result; the
// SIMD kernels, the multimodal overload, RopePlan and the KV-cache calls take the other three.
enum class DType { kF32, kBF16, kF16, kF64, kSentinel };
std::string_view DTypeName(DType dtype);  // "float32", "bfloat16", "float16", "float64"
size_t DTypeSize(DType dtype);

// A strided [T, H, D] view; channels are contiguous. Strides are in elements and may describe
// token-major ([T, H, D]), head-major ([H, T, D]) or slices of a fused QKV buffer.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t num_tokens = 0;  // T
  int64_t num_heads = 0;   // H
  int64_t head_dim = 0;    // D
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

// Contiguous token-major [T, H, D] view.
TensorView ContiguousView(void* data, DType dtype, int64_t num_tokens, int64_t num_heads,
                          int64_t head_dim);

// Per-token positions, int32 or int64, in any order (no implicit arange).
class PositionSpan {
 public:
  PositionSpan(std::span<const int32_t> p) : i32_(p.data()), size_(p.size()) {}  // NOLINT
  PositionSpan(std::span<const int64_t> p) : i64_(p.data()), size_(p.size()) {}  // NOLINT
  PositionSpan(const std::vector<int32_t>& p) : PositionSpan(std::span<const int32_t>(p)) {}
  PositionSpan(const std::vector<int64_t>& p) : PositionSpan(std::span<const int64_t>(p)) {}
  int64_t size() const { return static_cast<int64_t>(size_); }
  int64_t operator[](size_t t) const { return i32_ ? int64_t{i32_[t]} : i64_[t]; }

 private:
  const int32_t* i32_ = nullptr;
  const int64_t* i64_ = nullptr;
  size_t size_ = 0;
};

enum class Direction {
  kForward,   // y = R(p) x
  kBackward,  // y = R(p)^T x = R(-p) x: the gradient of the forward rotation
};

enum class Backend {
  kAuto,       // SIMD unless the environment variable ROPEKIT_BACKEND=reference is set
  kSimd,       // Highway kernel, best target of this CPU (runtime dispatch)
  kReference,  // plain scalar loops (double arithmetic)
};

struct RotateOptions {
  Layout layout = Layout::kHalfSplit;
  Direction direction = Direction::kForward;
  Backend backend = Backend::kAuto;
  ThreadPool* pool = nullptr;  // nullptr: run on the calling thread
  // A call that reads fewer tensor bytes (all operands) runs on the calling thread even with a
  // pool: waking a worker costs more than it saves on small calls (a decode step). 0 splits
  // every call over the pool (tests of thread-count independence use it).
  int64_t min_parallel_bytes = int64_t{2} << 20;
};

// One tensor to rotate: `out` may be `in` itself (in-place) or a disjoint buffer of the same
// shape and dtype (out-of-place; pass-through channels [R, D) are copied).
struct RopeOperand {
  TensorView in;
  TensorView out;
};

// Rotates every operand (e.g. q with H heads and k with Hkv heads) by the same per-token
// positions. Work is split over tokens with static partitioning: results are bitwise identical
// for any thread count. A call with a kF64 operand runs on the reference path (see DType).
// Throws Error on invalid shapes, dtypes, overlaps or positions.
void ApplyRope(const RopeTable& table, PositionSpan positions, std::span<const RopeOperand> ops,
               const RotateOptions& options = {});

// Convenience: in-place rotation of one tensor.
void ApplyRopeInPlace(const RopeTable& table, PositionSpan positions, const TensorView& x,
                      const RotateOptions& options = {});

// ---- Multimodal / N-axis positions (M-RoPE) ------------------------------------------------
//
// Qwen2-VL (Wang et al. 2024, arXiv:2409.12191) gives every token A = 3 position ids (temporal,
// height, width) and rotates each pair i with the position of one axis a(i):
//   theta_i = p_{a(i)} * w_i      (w_i and A unchanged: scaling types combine as for text)
// so a table row of position p serves every axis. Two rules map pairs to axes, both as in
// transformers:
//  - chunked (Qwen2-VL / Qwen2.5-VL `mrope_section` = [s_0, s_1, ...], sum = N; transformers'
//    `apply_multimodal_rotary_pos_emb`): pairs [0, s_0) follow axis 0, the next s_1 axis 1, ...
//    With A = 2 and two halves this is the 2-D axial RoPE of vision transformers.
//  - interleaved (Qwen3-VL `mrope_interleaved`, transformers' `apply_interleaved_mrope`): pair i
//    follows axis a = i mod A when a > 0 and i < A * s_a; every other pair follows axis 0.
// With one axis (empty `sections`) this is ordinary RoPE.
struct RopeAxes {
  std::vector<int> sections;  // pairs per axis; empty = one axis (text-only RoPE)
  bool interleaved = false;

  int num_axes() const { return sections.empty() ? 1 : static_cast<int>(sections.size()); }
  bool multimodal() const { return !sections.empty(); }
  // The axis of every pair, [num_pairs]. Throws Error naming `sections` and the accepted values
  // (1 <= A <= 8, every s_a >= 1 (interleaved: s_0 >= 0), sum = num_pairs, interleaved A s_a <=
  // num_pairs).
  std::vector<uint8_t> PairAxes(int num_pairs) const;
  // "chunked [16, 24, 24]" / "interleaved [24, 20, 20]" / "text (one axis)".
  std::string Describe() const;
};

// Positions of A axes, each with one entry per token ([A, T]).
struct AxisPositions {
  std::span<const PositionSpan> axes;
  int64_t num_tokens() const { return axes.empty() ? 0 : axes[0].size(); }
};

// Rotates every operand with per-axis positions: pair i of token t uses positions.axes[a(i)][t]
// (a from axes.PairAxes). positions.axes.size() must equal axes.num_axes(); every axis has T
// entries in [0, kMaxPosition]. When every axis carries the same positions the result is
// bit-identical to the one-axis ApplyRope. Threading and checks as in ApplyRope.
void ApplyRope(const RopeTable& table, const AxisPositions& positions, const RopeAxes& axes,
               std::span<const RopeOperand> ops, const RotateOptions& options = {});

// A prepared call for decode loops: the operands (buffers, shapes, strides), the token count, the
// options and the table are validated once, and each operand's SIMD kernel is chosen once; Run()
// then only checks the positions and rotates (one token: a row lookup and one kernel call per
// operand; more tokens: split over options.pool when large). The plan keeps a snapshot of the
// table's rows and refreshes it when a position needs rows the table can still grow to. It refers
// to `table` and to the operands' buffers: both must outlive it. Run() is not safe to call
// concurrently on one plan (make one per thread); results are bit-identical to ApplyRope.
class RopePlan {
 public:
  RopePlan(const RopeTable& table, std::span<const RopeOperand> ops, int64_t num_tokens,
           const RotateOptions& options = {});
  ~RopePlan();
  RopePlan(RopePlan&&) noexcept;
  RopePlan& operator=(RopePlan&&) noexcept;

  // positions.size() must equal num_tokens; each position in [0, kMaxPosition].
  void Run(PositionSpan positions);
  int64_t num_tokens() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Whether distinct indices of a strided array (strides in elements, any sign) address distinct
// elements: what any array written by a rotation must satisfy. The views of one call are checked
// by ApplyRope itself; this serves callers that split a larger array (e.g. a batch) into views.
bool ElementsDistinct(std::span<const int64_t> shape, std::span<const int64_t> strides);

// ---- Tables per sequence length ------------------------------------------------------------

// The sequence length the frequencies of `params` depend on, normalised so that every length
// giving the same frequencies gives the same value: 0 for the types that do not depend on it and
// for dynamic NTK up to max_position_embeddings; original + 1 for LongRoPE past its original
// length (long factors), else 0. `seq_len`: the current sequence length (0: not given). Throws
// Error for seq_len < 0.
int64_t FrequencySeqLen(const RopeParams& params, int64_t seq_len);

// Tables of one RopeParams, built on first use per (numerics, FrequencySeqLen(seq_len)) and shared
// (thread-safe). Bounded: dynamic NTK makes one table per length above max_position_embeddings,
// so the cache is emptied when it holds 32 tables (tables in use stay alive through their
// shared_ptr).
class RopeTableCache {
 public:
  explicit RopeTableCache(RopeParams params);  // validates params
  ~RopeTableCache();
  RopeTableCache(const RopeTableCache&) = delete;
  RopeTableCache& operator=(const RopeTableCache&) = delete;

  const RopeParams& params() const { return params_; }
  std::shared_ptr<const RopeTable> Get(Numerics numerics, int64_t seq_len = 0);

 private:
  RopeParams params_;
  struct State;
  std::unique_ptr<State> state_;
};

// Name of the SIMD target the dispatcher picks on this CPU (e.g. "AVX3", "AVX2", "SCALAR").
std::string SimdTargetName();

}  // namespace ropekit

#endif  // ROPEKIT_ROPE_H_
