// The scoped timer behind ropekit/profile.h.
#ifndef ROPEKIT_SRC_UTIL_PROFILE_H_
#define ROPEKIT_SRC_UTIL_PROFILE_H_

#include <chrono>

#include "ropekit/profile.h"

namespace ropekit {

// Adds the wall time from construction to destruction to the total `name` (a string literal)
// when profiling is on.
class OpTimer {
 public:
  explicit OpTimer(const char* name);
  ~OpTimer() { Stop(); }
  // Records the time so far and turns the timer off (for ops that end before the scope does).
  void Stop();
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  const char* name_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace ropekit

#endif  // ROPEKIT_SRC_UTIL_PROFILE_H_
