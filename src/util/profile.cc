// See ropekit/profile.h.
#include "src/util/profile.h"

#include <atomic>
#include <mutex>

namespace ropekit {
namespace {

std::atomic<bool> g_on{false};
std::mutex g_mutex;
std::vector<OpTime>& Totals() {
  static std::vector<OpTime>* totals = new std::vector<OpTime>();
  return *totals;
}

}  // namespace

void SetOpProfiling(bool on) { g_on.store(on, std::memory_order_relaxed); }

std::vector<OpTime> OpProfile() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return Totals();
}

void ResetOpProfile() {
  std::lock_guard<std::mutex> lock(g_mutex);
  Totals().clear();
}

OpTimer::OpTimer(const char* name) : name_(name), on_(g_on.load(std::memory_order_relaxed)) {
  if (on_) start_ = std::chrono::steady_clock::now();
}

void OpTimer::Stop() {
  if (!on_) return;
  on_ = false;
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::lock_guard<std::mutex> lock(g_mutex);
  for (OpTime& t : Totals()) {
    if (t.name == name_) {
      t.seconds += s;
      ++t.calls;
      return;
    }
  }
  Totals().push_back({name_, s, 1});
}

}  // namespace ropekit
