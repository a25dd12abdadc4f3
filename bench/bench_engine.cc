// Engine-side RoPE calls on the LLaMA-3-8B attention shape (32 query heads, 8 kv heads, head_dim
// 128), one thread. Every case is timed alternately with its bound in the same repetition
// (bench::TimePaired), and the summary prints the median over repetitions of each time and of
// the per-repetition ratio:
//   Decode (1 token, in place on q and k; buffers start `offset` bytes after a 64-byte boundary,
//   0 as engines allocate, or 16 as a plain malloc may return):
//     ApplyRope  the general call (validation, overlap checks, table snapshot, dispatch),
//     Plan       RopePlan::Run (validated once),
//     bound: Copy, memcpy of the same q + k bytes into a second buffer (read once, write once).
//   Append (decode: 1 token; prefill: 512 tokens; q in place, k and v into a contiguous cache):
//     Fused      ApplyRopeAndAppend (one pass),
//     bound: Unfused, ApplyRope on q and k, then memcpy of k and v into the cache rows.
// Times are the calling thread's CPU time (the machine may be shared).
//
// Dimension legend: T = tokens, H = q heads, Hkv = kv heads, D = head_dim, S = cache slots.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bench_main.h"
#include "bench_support.h"
#include "ropekit/kv_cache.h"
#include "ropekit/rope.h"

namespace ropekit {
namespace {

constexpr int64_t kHeads = 32, kKvHeads = 8, kDim = 128, kSlots = 4096;

DType DTypeArg(int64_t v) { return v == 0 ? DType::kF32 : DType::kBF16; }

const RopeTable& Table() {
  static const RopeTable* table = [] {
    RopeParams p;
    p.head_dim = p.rotary_dim = kDim;
    p.base = 500000.0;
    return new RopeTable(ComputeFrequencies(p, Numerics::kExact), 8192);
  }();
  return *table;
}

// Normal-range values (no subnormals, which would slow the arithmetic down), stored as dtype.
std::vector<uint8_t> Values(DType dtype, size_t count, int seed) {
  std::vector<uint8_t> b(count * DTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) {
    const float f = 0.5f + static_cast<float>((i * (31 + seed)) % 59) / 59.0f;
    if (dtype == DType::kF32) {
      std::memcpy(b.data() + 4 * i, &f, 4);
    } else {
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint16_t h = static_cast<uint16_t>(bits >> 16);
      std::memcpy(b.data() + 2 * i, &h, 2);
    }
  }
  return b;
}

// Position p advances per iteration (decode), wrapping inside the table.
int64_t NextPosition(int64_t& p) {
  p = p + 1 < 8000 ? p + 1 : 1000;
  return p;
}

// `bytes` bytes (filled like Values) starting `offset` bytes after a 64-byte boundary.
class OffsetBuffer {
 public:
  OffsetBuffer(const std::vector<uint8_t>& values, size_t offset)
      : storage_(values.size() + 128), size_(values.size()) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = storage_.data() + ((64 - base % 64) % 64) + offset;
    std::memcpy(data_, values.data(), size_);
  }
  uint8_t* data() { return data_; }
  size_t size() const { return size_; }

 private:
  std::vector<uint8_t> storage_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// One decode step's q and k (in place), and a second buffer for the copy bound.
struct DecodeBuffers {
  OffsetBuffer q, k, q2, k2;
  RopeOperand ops[2];
  DecodeBuffers(DType dtype, size_t offset)
      : q(Values(dtype, kHeads * kDim, 1), offset),
        k(Values(dtype, kKvHeads * kDim, 2), offset),
        q2(Values(dtype, kHeads * kDim, 3), offset),
        k2(Values(dtype, kKvHeads * kDim, 4), offset) {
    const TensorView qv = ContiguousView(q.data(), dtype, 1, kHeads, kDim);
    const TensorView kv = ContiguousView(k.data(), dtype, 1, kKvHeads, kDim);
    ops[0] = {qv, qv};
    ops[1] = {kv, kv};
  }
  void Copy() {
    std::memcpy(q2.data(), q.data(), q.size());
    std::memcpy(k2.data(), k.data(), k.size());
  }
};

// Calls per timed batch of a decode case (a few microseconds, well above the clock's resolution).
constexpr int64_t kDecodeBatch = 32;

void BM_DecodeApplyRope(benchmark::State& state) {
  DecodeBuffers b(DTypeArg(state.range(0)), static_cast<size_t>(state.range(1)));
  int64_t p = 1000;
  bench::TimePaired(
      state, kDecodeBatch, bench::PairClock::kThreadCpu,
      [&] {
        int64_t pos[1] = {NextPosition(p)};
        ApplyRope(Table(), std::span<const int64_t>(pos, 1), b.ops);
      },
      [&] { b.Copy(); });
}

void BM_DecodePlan(benchmark::State& state) {
  DecodeBuffers b(DTypeArg(state.range(0)), static_cast<size_t>(state.range(1)));
  RopePlan plan(Table(), b.ops, 1);
  int64_t p = 1000;
  bench::TimePaired(
      state, kDecodeBatch, bench::PairClock::kThreadCpu,
      [&] {
        int64_t pos[1] = {NextPosition(p)};
        plan.Run(std::span<const int64_t>(pos, 1));
      },
      [&] { b.Copy(); });
}

struct AppendBuffers {
  std::vector<uint8_t> q, k, v, cache_k, cache_v;
  std::vector<int64_t> positions;
};

AppendBuffers MakeAppend(DType dtype, int64_t tokens) {
  const size_t es = DTypeSize(dtype);
  AppendBuffers b;
  b.q = Values(dtype, tokens * kHeads * kDim, 1);
  b.k = Values(dtype, tokens * kKvHeads * kDim, 2);
  b.v = Values(dtype, tokens * kKvHeads * kDim, 3);
  b.cache_k.assign(kSlots * kKvHeads * kDim * es, 0);
  b.cache_v.assign(b.cache_k.size(), 0);
  for (int64_t t = 0; t < tokens; ++t) b.positions.push_back(1000 + t);
  return b;
}

void BM_Append(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1);
  const size_t es = DTypeSize(dtype);
  AppendBuffers b = MakeAppend(dtype, tokens);
  const TensorView qv = ContiguousView(b.q.data(), dtype, tokens, kHeads, kDim);
  const TensorView kv = ContiguousView(b.k.data(), dtype, tokens, kKvHeads, kDim);
  const TensorView vv = ContiguousView(b.v.data(), dtype, tokens, kKvHeads, kDim);
  const KvCacheView cache =
      ContiguousKvCache(b.cache_k.data(), b.cache_v.data(), dtype, kSlots, kKvHeads, kDim);
  const RopeOperand ops[] = {{qv, qv}, {kv, kv}};
  const size_t row = kKvHeads * kDim * es;
  // Prefill batches of one call (milliseconds); decode batches as the decode cases.
  const int64_t batch = tokens == 1 ? kDecodeBatch : 1;
  bench::TimePaired(
      state, batch, bench::PairClock::kThreadCpu,
      [&] {
        ApplyRopeAndAppend(Table(), b.positions, RopeOperand{qv, qv}, kv, vv, cache, b.positions);
      },
      [&] {
        ApplyRope(Table(), b.positions, ops);
        // Contiguous positions: one copy per tensor into rows 1000.. of the cache.
        std::memcpy(b.cache_k.data() + b.positions[0] * row, b.k.data(), tokens * row);
        std::memcpy(b.cache_v.data() + b.positions[0] * row, b.v.data(), tokens * row);
      });
}

void DecodeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "offset"});
  for (int dtype : {0, 1}) {
    for (int offset : {0, 16}) b->Args({dtype, offset});
  }
  b->UseManualTime()->Unit(benchmark::kNanosecond);
}
void AppendArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "tokens"});
  for (int dtype : {0, 1}) {
    for (int tokens : {1, 512}) b->Args({dtype, tokens});
  }
  b->UseManualTime()->Unit(benchmark::kNanosecond);
}

BENCHMARK(BM_DecodeApplyRope)->Apply(DecodeArgs);
BENCHMARK(BM_DecodePlan)->Apply(DecodeArgs);
BENCHMARK(BM_Append)->Apply(AppendArgs);

class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (!bench::IsSummaryRun(run)) continue;
      const auto [name, shape] = bench::SplitRunName(run);
      lines_.push_back({name, shape, bench::Counter(run, "ns"), bench::Counter(run, "bound_ns"),
                        bench::Counter(run, "ratio")});
    }
  }
  void PrintSummary() const {
    std::printf(
        "\nMedians over repetitions, CPU ns per call (one thread); each ratio is the median of "
        "per-repetition ratios\nof the case to its bound, timed alternately in the same "
        "repetition (decode bound: memcpy of the same bytes;\nappend bound: ApplyRope, then "
        "memcpy of k and v into the cache)\n");
    for (const Line& l : lines_) {
      const bool append = l.name == "BM_Append";
      std::printf("%-20s %-22s %10.1f  %-8s %10.1f  ratio %5.2f\n", l.name.c_str(), l.shape.c_str(),
                  l.ns, append ? "unfused" : "copy", l.bound_ns, l.ratio);
    }
  }

 private:
  struct Line {
    std::string name, shape;
    double ns, bound_ns, ratio;
  };
  std::vector<Line> lines_;
};

}  // namespace
}  // namespace ropekit

int main(int argc, char** argv) {
  ropekit::bench::InitializeWithRepetitions(argc, argv);
  ropekit::bench::PrintMachine("bench_engine");
  ropekit::SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintSummary();
  benchmark::Shutdown();
  return 0;
}
