// Engine-side RoPE calls on the LLaMA-3-8B attention shape (32 query heads, 8 kv heads, head_dim
// 128), one thread, with bounds measured in the same run:
//   Decode (1 token, in place on q and k):
//     ApplyRope  the general call (validation, overlap checks, table snapshot, dispatch),
//     Plan       RopePlan::Run (validated once),
//     Copy       memcpy of the same q + k bytes into a second buffer (read once, write once).
//   Append (decode: 1 token; prefill: 512 tokens; q in place, k and v into a contiguous cache):
//     Fused      ApplyRopeAndAppend (one pass),
//     Unfused    ApplyRope on q and k, then memcpy of k and v into the cache rows.
// The summary prints the median time per call and the ratios Plan / Copy and Fused / Unfused.
//
// Dimension legend: T = tokens, H = q heads, Hkv = kv heads, D = head_dim, S = cache slots.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bench_main.h"
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

void BM_DecodeApplyRope(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  std::vector<uint8_t> q = Values(dtype, kHeads * kDim, 1), k = Values(dtype, kKvHeads * kDim, 2);
  const TensorView qv = ContiguousView(q.data(), dtype, 1, kHeads, kDim);
  const TensorView kv = ContiguousView(k.data(), dtype, 1, kKvHeads, kDim);
  const RopeOperand ops[] = {{qv, qv}, {kv, kv}};
  int64_t p = 1000;
  for (auto _ : state) {
    int64_t pos[1] = {NextPosition(p)};
    ApplyRope(Table(), std::span<const int64_t>(pos, 1), ops);
    benchmark::ClobberMemory();
  }
}

void BM_DecodePlan(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  std::vector<uint8_t> q = Values(dtype, kHeads * kDim, 1), k = Values(dtype, kKvHeads * kDim, 2);
  const TensorView qv = ContiguousView(q.data(), dtype, 1, kHeads, kDim);
  const TensorView kv = ContiguousView(k.data(), dtype, 1, kKvHeads, kDim);
  const RopeOperand ops[] = {{qv, qv}, {kv, kv}};
  RopePlan plan(Table(), ops, 1);
  int64_t p = 1000;
  for (auto _ : state) {
    int64_t pos[1] = {NextPosition(p)};
    plan.Run(std::span<const int64_t>(pos, 1));
    benchmark::ClobberMemory();
  }
}

void BM_DecodeCopy(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  std::vector<uint8_t> q = Values(dtype, kHeads * kDim, 1), k = Values(dtype, kKvHeads * kDim, 2);
  std::vector<uint8_t> q2(q.size()), k2(k.size());
  for (auto _ : state) {
    std::memcpy(q2.data(), q.data(), q.size());
    std::memcpy(k2.data(), k.data(), k.size());
    benchmark::ClobberMemory();
  }
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

void BM_AppendFused(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1);
  AppendBuffers b = MakeAppend(dtype, tokens);
  const TensorView qv = ContiguousView(b.q.data(), dtype, tokens, kHeads, kDim);
  const TensorView kv = ContiguousView(b.k.data(), dtype, tokens, kKvHeads, kDim);
  const TensorView vv = ContiguousView(b.v.data(), dtype, tokens, kKvHeads, kDim);
  const KvCacheView cache =
      ContiguousKvCache(b.cache_k.data(), b.cache_v.data(), dtype, kSlots, kKvHeads, kDim);
  for (auto _ : state) {
    ApplyRopeAndAppend(Table(), b.positions, RopeOperand{qv, qv}, kv, vv, cache, b.positions);
    benchmark::ClobberMemory();
  }
}

void BM_AppendUnfused(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1);
  const size_t es = DTypeSize(dtype);
  AppendBuffers b = MakeAppend(dtype, tokens);
  const TensorView qv = ContiguousView(b.q.data(), dtype, tokens, kHeads, kDim);
  const TensorView kv = ContiguousView(b.k.data(), dtype, tokens, kKvHeads, kDim);
  const RopeOperand ops[] = {{qv, qv}, {kv, kv}};
  const size_t row = kKvHeads * kDim * es;
  for (auto _ : state) {
    ApplyRope(Table(), b.positions, ops);
    // Contiguous positions: one copy per tensor into rows 1000.. of the cache.
    std::memcpy(b.cache_k.data() + b.positions[0] * row, b.k.data(), tokens * row);
    std::memcpy(b.cache_v.data() + b.positions[0] * row, b.v.data(), tokens * row);
    benchmark::ClobberMemory();
  }
}

void DecodeArgs(benchmark::internal::Benchmark* b) { b->ArgNames({"dtype"})->Arg(0)->Arg(1); }
void AppendArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "tokens"});
  for (int dtype : {0, 1}) {
    for (int tokens : {1, 512}) b->Args({dtype, tokens});
  }
}

BENCHMARK(BM_DecodeApplyRope)->Apply(DecodeArgs);
BENCHMARK(BM_DecodePlan)->Apply(DecodeArgs);
BENCHMARK(BM_DecodeCopy)->Apply(DecodeArgs);
BENCHMARK(BM_AppendFused)->Apply(AppendArgs);
BENCHMARK(BM_AppendUnfused)->Apply(AppendArgs);

class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (!bench::IsSummaryRun(run)) continue;
      const auto [name, shape] = bench::SplitRunName(run);
      ns_[shape][name] = run.GetAdjustedCPUTime();
    }
  }
  void PrintSummary() const {
    std::printf(
        "\nMedian CPU ns per call (one thread; CPU time, not wall time, because the machine may be "
        "shared)\n");
    for (const auto& [shape, by] : ns_) {
      auto get = [&](const char* n) {
        const auto it = by.find(n);
        return it == by.end() ? 0.0 : it->second;
      };
      const double apply = get("BM_DecodeApplyRope"), plan = get("BM_DecodePlan");
      const double copy = get("BM_DecodeCopy");
      if (plan > 0) {
        std::printf("decode %-14s ApplyRope %8.1f  Plan %8.1f  Copy %8.1f  Plan/Copy %5.2f\n",
                    shape.c_str(), apply, plan, copy, copy > 0 ? plan / copy : 0.0);
      }
      const double fused = get("BM_AppendFused"), unfused = get("BM_AppendUnfused");
      if (fused > 0) {
        std::printf("append %-22s Fused %10.1f  Unfused %10.1f  Fused/Unfused %5.2f\n",
                    shape.c_str(), fused, unfused, unfused > 0 ? fused / unfused : 0.0);
      }
    }
  }

 private:
  std::map<std::string, std::map<std::string, double>> ns_;
};

}  // namespace
}  // namespace ropekit

int main(int argc, char** argv) {
  ropekit::bench::InitializeWithRepetitions(argc, argv);
  std::printf("SIMD target: %s\n", ropekit::SimdTargetName().c_str());
  ropekit::SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintSummary();
  benchmark::Shutdown();
  return 0;
}
