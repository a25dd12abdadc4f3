// Per-op wall-clock profile of the model's forward, backward and optimizer step, for
// benchmarks (bench_model --profile). Off by default; when on, the time each op spends on the
// calling thread (its workers included, as wall time) is added to a total named after the op.
// Costs two clock reads per op when on, one relaxed load when off.
#ifndef ROPEKIT_PROFILE_H_
#define ROPEKIT_PROFILE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace ropekit {

struct OpTime {
  std::string name;  // e.g. "fwd attention", "bwd matmul mlp"
  double seconds = 0.0;
  int64_t calls = 0;
};

void SetOpProfiling(bool on);
// Totals since the last reset, in the order the ops were first seen.
std::vector<OpTime> OpProfile();
void ResetOpProfile();

}  // namespace ropekit

#endif  // ROPEKIT_PROFILE_H_
