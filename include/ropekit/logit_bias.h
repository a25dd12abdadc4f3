// ropekit: the narrow interface through which attention adds a position bias to its logits.
//
// Attention (the model's ops) needs only these hooks of a position encoding, so it depends on
// this interface rather than on PositionEncoding (ropekit/position_encoding.h), which implements
// it for ALiBi (Press, Smith & Lewis 2022, arXiv:2108.12409) and the T5 relative bias (Raffel et
// al. 2020, arXiv:1910.10683, sec. 2.1); every other kind reports acts_on_logits() == false.
//
// A hook works on one query row of one head: logits[j] += bias(head, query_position, key j),
// added to the scaled logits q.k / sqrt(D) before the softmax, computed on the fly (no [T, T]
// tensor). `params` are the bias's trainable parameters owned by the caller (the T5 table;
// empty for ALiBi); backward hooks accumulate (+=) into gradient spans of the same size, in a
// fixed order, so gradients are bitwise reproducible. Implementations are immutable and may be
// shared by any number of threads.
//
// Dimension legend: H = heads, Tk = keys of the row.
#ifndef ROPEKIT_LOGIT_BIAS_H_
#define ROPEKIT_LOGIT_BIAS_H_

#include <cstdint>
#include <span>

#include "ropekit/rope.h"  // PositionSpan

namespace ropekit {

class LogitBias {
 public:
  virtual ~LogitBias() = default;

  // False when the bias is zero for every (query, key, head): attention then skips the hooks.
  virtual bool acts_on_logits() const = 0;

  // logits[j] += bias(head, query_position, key_positions[j]) for j in [0, Tk).
  virtual void AddLogitBias(int64_t query_position, PositionSpan key_positions, int head,
                            std::span<const float> params, float* logits) const = 0;
  // Its backward: grad_params += d(bias) / d(params) * grad_logits[j], over j ascending.
  virtual void AddLogitBiasBackward(int64_t query_position, PositionSpan key_positions, int head,
                                    const float* grad_logits,
                                    std::span<float> grad_params) const = 0;

  // The same two hooks for the contiguous keys first_key .. first_key + num_keys - 1, bitwise
  // identical to the PositionSpan versions (and faster: no position is read per key).
  virtual void AddLogitBias(int64_t query_position, int64_t first_key, int64_t num_keys, int head,
                            std::span<const float> params, float* logits) const = 0;
  virtual void AddLogitBiasBackward(int64_t query_position, int64_t first_key, int64_t num_keys,
                                    int head, const float* grad_logits,
                                    std::span<float> grad_params) const = 0;

 protected:
  LogitBias() = default;
  LogitBias(const LogitBias&) = default;
  LogitBias& operator=(const LogitBias&) = default;
};

}  // namespace ropekit

#endif  // ROPEKIT_LOGIT_BIAS_H_
