// RopePlan: validate once, rotate many times (see include/ropekit/rope.h). A decode step calls
// the rotation once per layer with one token; the general ApplyRope spends most of such a call
// on argument checks, overlap tests and the table snapshot, which a plan does once.
#include <algorithm>
#include <string>
#include <vector>

#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "src/kernels/rope_kernels.h"
#include "src/rope/apply_internal.h"

namespace ropekit {

struct RopePlan::State {
  const RopeTable* table = nullptr;
  std::vector<RopeOperand> ops;
  int64_t num_tokens = 0;
  RotateOptions options;
  RopeTable::Rows rows;
  int64_t max_rows = 0;
  bool reference = false;
};

RopePlan::RopePlan(const RopeTable& table, std::span<const RopeOperand> ops, int64_t num_tokens,
                   const RotateOptions& options)
    : state_(std::make_unique<State>()) {
  internal::ValidateCall(table, options);
  if (num_tokens < 0) throw Error("num_tokens must be >= 0");
  internal::ValidateOperands(ops, num_tokens, table.rotary_dim());
  State& s = *state_;
  s.table = &table;
  s.ops.assign(ops.begin(), ops.end());
  s.num_tokens = num_tokens;
  s.options = options;
  s.rows = table.Snapshot();
  s.max_rows = table.max_capacity();
  s.reference = internal::UseReferenceBackend(options.backend);
}

RopePlan::~RopePlan() = default;
RopePlan::RopePlan(RopePlan&&) noexcept = default;
RopePlan& RopePlan::operator=(RopePlan&&) noexcept = default;

int64_t RopePlan::num_tokens() const { return state_->num_tokens; }

void RopePlan::Run(PositionSpan positions) {
  State& s = *state_;
  if (positions.size() != s.num_tokens) {
    throw Error("positions has " + std::to_string(positions.size()) +
                " entries but the plan was made for " + std::to_string(s.num_tokens) + " tokens");
  }
  int64_t needed_rows = 0;
  for (int64_t t = 0; t < s.num_tokens; ++t) {
    const int64_t p = positions[t];
    if (p < 0 || p > kMaxPosition) {
      throw Error("positions[" + std::to_string(t) + "] = " + std::to_string(p) +
                  " is out of range [0, " + std::to_string(kMaxPosition) + "]");
    }
    if (p < s.max_rows) needed_rows = std::max(needed_rows, p + 1);
  }
  if (s.num_tokens == 0) return;
  if (s.reference) {
    ApplyRope(*s.table, positions, s.ops, s.options);
    return;
  }
  if (needed_rows > s.rows.num_positions) {
    internal::GrowTable(*s.table, needed_rows, s.num_tokens);
    s.rows = s.table->Snapshot();
  }
  RotateJob job;
  job.ops = s.ops;
  job.positions = &positions;
  job.rows = s.rows.data.get();
  job.num_rows = s.rows.num_positions;
  job.row_stride = s.rows.row_stride;
  job.table = s.table;
  job.num_pairs = s.table->num_pairs();
  job.layout = s.options.layout;
  job.direction = s.options.direction;
  if (s.options.pool == nullptr || s.num_tokens == 1) {
    RotateTokensPlannedSimd(job, 0, s.num_tokens);
    return;
  }
  ParallelFor(s.options.pool, static_cast<size_t>(s.num_tokens),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                RotateTokensPlannedSimd(job, static_cast<int64_t>(begin),
                                        static_cast<int64_t>(end));
              });
}

}  // namespace ropekit
