// RopePlan: validate once, rotate many times (see include/ropekit/rope.h). A decode step calls
// the rotation once per layer with one token; the general ApplyRope spends most of such a call
// on argument checks, overlap tests and the table snapshot, which a plan does once. The plan
// also resolves, once, the SIMD kernel of each operand (RotateHeads of the best target for its
// dtype, layout and direction) and the heads of each operand, so that a one-token Run() is a
// bounds test, a row lookup in the table snapshot and one kernel call per operand.
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
  std::vector<RotateHeadsFn> fns;     // per operand
  std::vector<HeadRows> first_token;  // per operand: token 0's heads (the one-token call)
  int64_t num_tokens = 0;
  int num_pairs = 0;
  RotateOptions options;
  ThreadPool* pool = nullptr;  // options.pool when the call is large enough to split
  RopeTable::Rows rows;
  int64_t max_rows = 0;
  bool reference = false;
  std::vector<float> scratch;  // one computed row (2N) for a position past the table

  // Row of position p for a one-token call; p is valid (checked by the caller).
  const float* Row(int64_t p);
  void RunTokens(PositionSpan positions);
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
  s.fns = internal::ResolveOperandFns(ops, options);
  for (const RopeOperand& op : ops) s.first_token.push_back(internal::TokenHeads(op, 0));
  s.num_tokens = num_tokens;
  s.num_pairs = table.num_pairs();
  s.options = options;
  s.pool = internal::PoolFor(options, internal::CallBytes(ops, num_tokens));
  s.rows = table.Snapshot();
  s.max_rows = table.max_capacity();
  s.reference = internal::UseReferenceBackend(options.backend);
  s.scratch.resize(2 * static_cast<size_t>(s.num_pairs));
}

RopePlan::~RopePlan() = default;
RopePlan::RopePlan(RopePlan&&) noexcept = default;
RopePlan& RopePlan::operator=(RopePlan&&) noexcept = default;

int64_t RopePlan::num_tokens() const { return state_->num_tokens; }

const float* RopePlan::State::Row(int64_t p) {
  if (p >= rows.num_positions && p < max_rows) {
    internal::GrowTable(*table, p + 1, 1);
    rows = table->Snapshot();
  }
  return internal::RowLookup(*table, rows).Row(p, scratch.data());
}

void RopePlan::State::RunTokens(PositionSpan positions) {
  const int64_t needed_rows = internal::CheckPositions(*table, positions, "positions");
  if (num_tokens == 0) return;
  if (reference) {
    ApplyRope(*table, positions, ops, options);
    return;
  }
  if (needed_rows > rows.num_positions) {
    internal::GrowTable(*table, needed_rows, num_tokens);
    rows = table->Snapshot();
  }
  const internal::RowLookup lookup(*table, rows);
  ParallelFor(pool, static_cast<size_t>(num_tokens),
              [&](size_t begin, size_t end, size_t /*worker*/) {
                std::vector<float> row_scratch(2 * static_cast<size_t>(num_pairs));
                for (size_t t = begin; t < end; ++t) {
                  const float* row = lookup.Row(positions[t], row_scratch.data());
                  internal::RotateTokenRow(ops, fns, static_cast<int64_t>(t), row, num_pairs);
                }
              });
}

void RopePlan::Run(PositionSpan positions) {
  State& s = *state_;
  if (positions.size() != s.num_tokens) {
    throw Error("positions has " + std::to_string(positions.size()) +
                " entries but the plan was made for " + std::to_string(s.num_tokens) + " tokens");
  }
  if (s.num_tokens != 1 || s.reference) {
    s.RunTokens(positions);
    return;
  }
  // The decode step: one token, one row, one kernel call per operand.
  const int64_t p = positions[0];
  const float* row;
  if (p >= 0 && p < s.rows.num_positions) {
    row = s.rows.data.get() + p * s.rows.row_stride;
  } else {
    internal::CheckPositions(*s.table, positions, "positions");
    row = s.Row(p);
  }
  const size_t n = static_cast<size_t>(s.num_pairs);
  for (size_t k = 0; k < s.fns.size(); ++k) s.fns[k](s.first_token[k], row, row + n, n);
}

}  // namespace ropekit
