// ropekit: the position encodings RoPE is compared with, behind one interface.
//
// A model config holds a PositionEncodingSpec; the model builds one PositionEncoding from it and
// calls it at three hook points. Each kind acts at exactly one of them (or none):
//
//   kind         acts on       hook the model calls                       trainable parameters
//   ----------   -----------   ----------------------------------------   ----------------------
//   kNone        nothing       (causal mask only; every hook is a no-op)  none
//   kRope        q and k       ApplyRope (ropekit/rope.h), after the q/k  none
//                              projections, before q.k
//   kSinusoidal  embeddings    AddToEmbeddings / AddToEmbeddingsBackward  none
//   kLearned     embeddings    AddToEmbeddings / AddToEmbeddingsBackward  [max_positions, d]
//   kAlibi       logits        AddLogitBias / AddLogitBiasBackward        none
//   kT5          logits        AddLogitBias / AddLogitBiasBackward        [num_buckets, H]
//
// Formulas (docs/position_encodings.md has the derivations and citations):
//  * Sinusoidal (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.5): for pair
//    i in [0, floor(d/2)), P[k, 2i] = sin(k / n^(2i/d)), P[k, 2i+1] = cos(k / n^(2i/d)), with the
//    model width d itself in the exponent. For odd d the last column is 0 (no pair is formed for
//    it). Angles in double, rounded once to float32.
//  * Learned absolute (Gehring et al. 2017; GPT/BERT): a trainable table row per position.
//  * ALiBi (Press, Smith & Lewis 2022, "Train Short, Test Long"): the scaled logit of query
//    position i and key position j of head h gets -m_h * (i - j); m_h are the paper's slopes.
//  * T5 relative bias (Raffel et al. 2020, sec. 2.1): logit gets table[bucket(j - i), h] with
//    T5's logarithmic bucketing of the relative position.
//  * NoPE (Haviv et al. 2022; Kazemnejad et al. 2023): no position information; a causal decoder
//    still infers positions by counting predecessors.
//
// Logit biases are added to the scaled logits q.k / sqrt(D) before the softmax, one row (one
// query, many keys) at a time and computed on the fly: no [T, T] tensor is ever formed, so any
// length works. Query and key positions are explicit, so KV-cache decoding (the query is not at
// the last row index) and non-contiguous positions work the same way as a full forward pass.
// The biases are defined for every (i, j); entries with j > i are removed by the causal mask.
//
// Parameters are owned by the caller (e.g. a model's flat parameter buffer): hooks take them as
// spans of num_parameters() floats, and backward hooks accumulate (+=) into gradient spans of the
// same size. Every accumulation runs in a fixed order (tokens, then keys, ascending), so
// gradients are bitwise reproducible. A PositionEncoding is immutable after construction and may
// be shared by any number of threads.
//
// Dimension legend: T = tokens, H = heads, d = embedding width (model dim).
#ifndef ROPEKIT_POSITION_ENCODING_H_
#define ROPEKIT_POSITION_ENCODING_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "ropekit/error.h"
#include "ropekit/logit_bias.h"
#include "ropekit/rope.h"

namespace ropekit {

enum class PositionEncodingKind { kNone, kRope, kSinusoidal, kLearned, kAlibi, kT5, kSentinel };

// "none", "rope", "sinusoidal", "learned", "alibi", "t5".
std::string_view PositionEncodingKindName(PositionEncodingKind kind);
// Accepts the names above and "nope" (an alias of "none"); throws Error listing them otherwise.
PositionEncodingKind ParsePositionEncodingKind(std::string_view name);

// Where a kind acts; exactly one is true for every kind except kNone (all false).
bool ActsOnEmbeddings(PositionEncodingKind kind);  // sinusoidal, learned
bool ActsOnQueryKey(PositionEncodingKind kind);    // rope
bool ActsOnLogits(PositionEncodingKind kind);      // alibi, t5

// Multiplier of the token embeddings before an absolute encoding is added (sinusoidal, learned):
// x' = scale * x + P[position]. The sinusoid has amplitude 1 while embeddings initialised with
// std 0.02 are ~50x smaller; Vaswani et al. (sec. 3.4) and fairseq multiply embeddings by sqrt(d).
enum class EmbeddingScale {
  kNone,     // "none": scale = 1
  kSqrtDim,  // "sqrt_dim": scale = sqrt(d)
  kSentinel,
};
std::string_view EmbeddingScaleName(EmbeddingScale scale);
EmbeddingScale ParseEmbeddingScale(std::string_view name);  // "none", "sqrt_dim" (alias "sqrt_d")

// What the learned table does with a position >= max_positions (negative positions are always an
// Error).
enum class OutOfRange {
  kError,  // "error" (default): throw Error naming the position and the table size
  kClamp,  // "clamp": use the last row, max_positions - 1 (its gradient gets those tokens too)
  kSentinel,
};
std::string_view OutOfRangeName(OutOfRange mode);
OutOfRange ParseOutOfRange(std::string_view name);

struct PositionEncodingSpec {
  PositionEncodingKind kind = PositionEncodingKind::kNone;

  // Embedding encodings (sinusoidal, learned).
  int dim = 0;  // d, the embedding width (>= 1)
  EmbeddingScale embedding_scale = EmbeddingScale::kNone;
  // learned: rows of the table (>= 1). sinusoidal: rows precomputed at construction (0 = none;
  // other positions are computed on the fly with identical values).
  int64_t max_positions = 0;
  OutOfRange out_of_range = OutOfRange::kError;  // learned only
  double sinusoidal_base = 10000.0;              // n (> 1)

  // Logit encodings (alibi, t5).
  int num_heads = 0;  // H (>= 1)
  int num_buckets = 32;
  int max_distance = 128;
  bool bidirectional = false;  // t5: false = causal (decoder), true = encoder

  // Trainable tables (learned, t5) are initialised by InitParameters with normal(0, init_std).
  double init_std = 0.02;

  // rope: applied by the model through ApplyRope with a RopeTable built from these.
  RopeParams rope;
  Layout rope_layout = Layout::kHalfSplit;
  Numerics rope_numerics = Numerics::kExact;

  // Throws Error naming the first invalid field (of the chosen kind) and its accepted range.
  // Fields that belong to other kinds are ignored, except that embedding_scale must stay kNone
  // for kinds that do not act on embeddings (it would otherwise be silently ignored).
  void Validate() const;
};

// ---------------------------------------------------------------------------------------------
// Building blocks (also used by the command line and tests).

// ALiBi slopes m_0..m_{H-1}, exactly as the paper's reference get_slopes: for H a power of two,
// m_h = s * s^h with s = 2^(-8/H) (so m_h = 2^(-8(h+1)/H)); otherwise, with P the largest power
// of two below H, the P slopes for P heads followed by the first H - P of every second slope for
// 2P heads (m_0, m_2, m_4, ... of the 2P sequence). H >= 1.
std::vector<double> AlibiSlopes(int num_heads);

// T5's _relative_position_bucket for relative_position = key_position - query_position.
// causal: n = max(0, -relative_position); bidirectional: num_buckets is halved, keys after the
// query use the upper half, n = |relative_position|. Then with E = num_buckets / 2 exact buckets
// (of the possibly halved count B): n < E -> n; otherwise
// min(B - 1, E + trunc(log(n / E) / log(max_distance / E) * (B - E))), evaluated in float32 in
// T5's order of operations. Throws Error for invalid num_buckets / max_distance.
int T5RelativeBucket(int64_t relative_position, bool bidirectional, int num_buckets,
                     int max_distance);

// Row `position` (>= 0) of the sinusoidal table: `dim` floats written to `row`.
void SinusoidalRow(int64_t position, int dim, double base, float* row);
// Rows [0, num_positions) as a [num_positions, dim] row-major table.
std::vector<float> SinusoidalTable(int64_t num_positions, int dim, double base);

// normal(0, std) samples from a seeded generator (splitmix64 + Box-Muller in double), identical
// on every platform; used by PositionEncoding::InitParameters.
void FillNormal(uint64_t seed, double std, std::span<float> out);

// ---------------------------------------------------------------------------------------------

// Implements LogitBias (ropekit/logit_bias.h), the hooks attention calls: ALiBi and T5 act on
// the logits, every other kind does not.
class PositionEncoding : public LogitBias {
 public:
  // Validates `spec` (throws Error) and precomputes what it can (sinusoidal rows, ALiBi slopes,
  // T5 buckets for distances below max_distance).
  explicit PositionEncoding(const PositionEncodingSpec& spec);

  const PositionEncodingSpec& spec() const { return spec_; }
  PositionEncodingKind kind() const { return spec_.kind; }
  bool acts_on_embeddings() const { return ActsOnEmbeddings(spec_.kind); }
  bool acts_on_query_key() const { return ActsOnQueryKey(spec_.kind); }
  bool acts_on_logits() const override { return ActsOnLogits(spec_.kind); }

  // Trainable parameters: learned max_positions * d (row-major [max_positions, d]),
  // t5 num_buckets * H (row-major [num_buckets, H], as T5's relative_attention_bias), else 0.
  int64_t num_parameters() const;
  // Writes normal(0, init_std) samples for `seed`; params.size() must equal num_parameters().
  void InitParameters(uint64_t seed, std::span<float> params) const;

  // The scale applied to embeddings by AddToEmbeddings (1 or sqrt(d)).
  double embedding_scale() const { return embedding_scale_; }
  // The ALiBi slopes (empty unless kind is alibi).
  const std::vector<double>& alibi_slopes() const { return slopes_; }
  // Bucket of T5 for key_position - query_position under this spec (t5 only).
  int Bucket(int64_t relative_position) const;
  // rope only: ComputeFrequencies(spec.rope, spec.rope_numerics, seq_len), for the RopeTable the
  // model passes to ApplyRope (with spec.rope_layout) on q and k.
  RopeFrequencies RopeFrequenciesFor(int64_t seq_len = 0) const;

  // Embedding hook. embeddings: [T, d] rows, row t at embeddings + t * row_stride
  // (row_stride >= d). Row t becomes scale * x_t + P[positions[t]] (computed in double, rounded
  // once to float). No-op for kinds that do not act on embeddings. `params` is the learned table
  // (ignored by other kinds).
  void AddToEmbeddings(PositionSpan positions, std::span<const float> params, float* embeddings,
                       int64_t row_stride) const;
  // Its backward. grad: [T, d] rows holding dL/dx' on entry and dL/dx = scale * dL/dx' on return.
  // learned: grad_params[position row] += dL/dx'_t for t = 0..T-1 in order (clamped positions
  // accumulate into the last row). No-op for kinds that do not act on embeddings.
  void AddToEmbeddingsBackward(PositionSpan positions, float* grad, int64_t row_stride,
                               std::span<float> grad_params) const;

  // Logit hook for one query row of one head: logits[j] += bias(head, query_position,
  // key_positions[j]) for j in [0, key_positions.size()); alibi: -m_head * (i - j) (computed in
  // double, rounded once); t5: params[bucket(j - i) * H + head]. No-op for other kinds.
  void AddLogitBias(int64_t query_position, PositionSpan key_positions, int head,
                    std::span<const float> params, float* logits) const override;
  // Its backward: t5: grad_params[bucket(j - i) * H + head] += grad_logits[j], summed in double
  // over j ascending, then added once per bucket. alibi has no parameters (the logit gradient
  // passes through unchanged), so this is a no-op for every kind but t5.
  void AddLogitBiasBackward(int64_t query_position, PositionSpan key_positions, int head,
                            const float* grad_logits, std::span<float> grad_params) const override;

  // The same two hooks for the contiguous keys first_key, first_key + 1, ...,
  // first_key + num_keys - 1 (a full causal pass: first_key = 0, num_keys = i + 1; KV-cache
  // decoding: the cached range). Bitwise identical to the PositionSpan versions, and several
  // times faster: no position is read or checked per key, and T5 buckets come from a table or
  // are the constant end buckets beyond max_distance. The model's attention should use these.
  void AddLogitBias(int64_t query_position, int64_t first_key, int64_t num_keys, int head,
                    std::span<const float> params, float* logits) const override;
  void AddLogitBiasBackward(int64_t query_position, int64_t first_key, int64_t num_keys, int head,
                            const float* grad_logits, std::span<float> grad_params) const override;

 private:
  void CheckLogitArgs(int64_t query_position, int head) const;
  void CheckKeyRange(int64_t first_key, int64_t num_keys) const;
  void CheckParams(size_t size, const char* what) const;
  int64_t LearnedRow(int64_t position) const;
  // The checks AddToEmbeddings and its backward share: row_stride >= dim, `rows` (named
  // rows_name) not null, the learned table's size, every position (before any write).
  void CheckEmbeddingCall(PositionSpan positions, const float* rows, const char* rows_name,
                          int64_t row_stride, size_t params_size, const char* params_what) const;

  PositionEncodingSpec spec_;
  double embedding_scale_ = 1.0;
  std::vector<double> slopes_;     // alibi: [H]
  std::vector<float> sinusoidal_;  // sinusoidal: [max_positions, d]
  std::vector<int32_t> buckets_;   // t5: buckets for distances; see Bucket()
};

}  // namespace ropekit

#endif  // ROPEKIT_POSITION_ENCODING_H_
