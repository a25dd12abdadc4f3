// RoPE rotation throughput on LLaMA-7B-like shapes (32 query heads, 8 or 32 kv heads,
// head_dim 128), in-place on q and k together, against two bounds measured in the same run:
//   Copy:  memcpy of the same q+k bytes (read once, write once) on the same threads,
//   Naive: the three-pass eager formula y = x*cos + rotate_half(x)*sin with [T, D] cos/sin
//          tables and temporaries, as PyTorch eager computes it.
// Bytes per second count the tensor bytes read plus written. After the Google Benchmark output
// a summary prints medians and the ratio of RoPE to Copy (the memory roof).
//
// Dimension legend: T = tokens, H = q heads, Hkv = kv heads, D = head_dim.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "src/util/half.h"

namespace ropekit {
namespace {

constexpr int64_t kHeads = 32, kDim = 128;

struct Buffers {
  std::vector<uint8_t> q, k;
  std::vector<int64_t> positions;
};

Buffers MakeBuffers(DType dtype, int64_t tokens, int64_t kv_heads) {
  Buffers b;
  const size_t es = DTypeSize(dtype);
  b.q.resize(tokens * kHeads * kDim * es);
  b.k.resize(tokens * kv_heads * kDim * es);
  for (size_t i = 0; i < b.q.size(); ++i) b.q[i] = static_cast<uint8_t>(i * 37 % 61);
  for (size_t i = 0; i < b.k.size(); ++i) b.k[i] = static_cast<uint8_t>(i * 53 % 59);
  // Decode-like offset: positions continue after a 1000-token prefix.
  for (int64_t t = 0; t < tokens; ++t) b.positions.push_back(1000 + t);
  return b;
}

const RopeTable& Table() {
  static const RopeTable* table = [] {
    RopeParams p;
    p.head_dim = p.rotary_dim = kDim;
    return new RopeTable(ComputeFrequencies(p, Numerics::kExact), 8192);
  }();
  return *table;
}

DType DTypeArg(int64_t v) { return v == 0 ? DType::kF32 : DType::kBF16; }

void SetCounters(benchmark::State& state, size_t tensor_bytes) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * tensor_bytes);
}

void BM_Rope(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1), kv = state.range(2);
  ThreadPool pool(state.range(3));
  Buffers b = MakeBuffers(dtype, tokens, kv);
  const TensorView q = ContiguousView(b.q.data(), dtype, tokens, kHeads, kDim);
  const TensorView k = ContiguousView(b.k.data(), dtype, tokens, kv, kDim);
  const RopeOperand ops[] = {{q, q}, {k, k}};
  RotateOptions options;
  options.pool = &pool;
  for (auto _ : state) {
    ApplyRope(Table(), b.positions, ops, options);
    benchmark::ClobberMemory();
  }
  SetCounters(state, b.q.size() + b.k.size());
}

void BM_Copy(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1), kv = state.range(2);
  ThreadPool pool(state.range(3));
  Buffers src = MakeBuffers(dtype, tokens, kv), dst = MakeBuffers(dtype, tokens, kv);
  for (auto _ : state) {
    pool.ParallelFor(tokens, [&](size_t begin, size_t end, size_t) {
      const size_t qrow = src.q.size() / tokens, krow = src.k.size() / tokens;
      std::memcpy(dst.q.data() + begin * qrow, src.q.data() + begin * qrow, (end - begin) * qrow);
      std::memcpy(dst.k.data() + begin * krow, src.k.data() + begin * krow, (end - begin) * krow);
    });
    benchmark::ClobberMemory();
  }
  SetCounters(state, src.q.size() + src.k.size());
}

// The eager formula, one full pass per operation with temporaries (fp32 arithmetic; bf16
// rounds after every operation as eager bf16 does).
template <typename T, typename Load, typename Store>
void NaiveThreePass(T* x, int64_t tokens, int64_t heads, const float* cos, const float* sin,
                    T* tmp1, T* tmp2, Load load, Store store) {
  const int64_t half = kDim / 2;
  const int64_t n = tokens * heads * kDim;
  for (int64_t e = 0; e < n; ++e) {  // pass 1: x * cos
    const int64_t t = e / (heads * kDim), c = e % kDim;
    tmp1[e] = store(load(x[e]) * cos[t * kDim + c]);
  }
  for (int64_t e = 0; e < n; ++e) {  // pass 2: rotate_half(x) * sin
    const int64_t t = e / (heads * kDim), c = e % kDim;
    const float r = c < half ? -load(x[e + half]) : load(x[e - half]);
    tmp2[e] = store(r * sin[t * kDim + c]);
  }
  for (int64_t e = 0; e < n; ++e) x[e] = store(load(tmp1[e]) + load(tmp2[e]));  // pass 3
}

void BM_Naive(benchmark::State& state) {
  const DType dtype = DTypeArg(state.range(0));
  const int64_t tokens = state.range(1), kv = state.range(2);
  ThreadPool pool(state.range(3));
  Buffers b = MakeBuffers(dtype, tokens, kv);
  std::vector<float> cos(tokens * kDim), sin(tokens * kDim);
  for (int64_t t = 0; t < tokens; ++t) {
    Table().ComputeRow(b.positions[t], cos.data() + t * kDim, sin.data() + t * kDim);
    std::copy_n(cos.data() + t * kDim, kDim / 2, cos.data() + t * kDim + kDim / 2);
    std::copy_n(sin.data() + t * kDim, kDim / 2, sin.data() + t * kDim + kDim / 2);
  }
  std::vector<uint8_t> tmp1(b.q.size()), tmp2(b.q.size());
  for (auto _ : state) {
    pool.ParallelFor(tokens, [&](size_t begin, size_t end, size_t) {
      const int64_t t0 = begin, nt = end - begin;
      for (auto [buf, heads] :
           {std::pair<std::vector<uint8_t>*, int64_t>{&b.q, kHeads}, {&b.k, kv}}) {
        const size_t off = t0 * heads * kDim;
        if (dtype == DType::kF32) {
          float* x = reinterpret_cast<float*>(buf->data()) + off;
          NaiveThreePass(
              x, nt, heads, cos.data() + t0 * kDim, sin.data() + t0 * kDim,
              reinterpret_cast<float*>(tmp1.data()) + off,
              reinterpret_cast<float*>(tmp2.data()) + off, [](float v) { return v; },
              [](float v) { return v; });
        } else {
          uint16_t* x = reinterpret_cast<uint16_t*>(buf->data()) + off;
          NaiveThreePass(x, nt, heads, cos.data() + t0 * kDim, sin.data() + t0 * kDim,
                         reinterpret_cast<uint16_t*>(tmp1.data()) + off,
                         reinterpret_cast<uint16_t*>(tmp2.data()) + off, Bf16ToFloat, FloatToBf16);
        }
      }
    });
    benchmark::ClobberMemory();
  }
  SetCounters(state, b.q.size() + b.k.size());
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "tokens", "kv_heads", "threads"});
  for (int64_t dtype : {0, 1})
    for (int64_t tokens : {1, 512, 4096})
      for (int64_t kv : {8, 32})
        for (int64_t threads : {1, 2}) b->Args({dtype, tokens, kv, threads});
  b->UseRealTime();
}

BENCHMARK(BM_Rope)->Apply(Shapes);
BENCHMARK(BM_Copy)->Apply(Shapes);
BENCHMARK(BM_Naive)->Apply(Shapes);

// Collects the median of every case and prints RoPE / Copy and RoPE / Naive at the end.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      const bool single = run.run_type == Run::RT_Iteration && run.repetitions <= 1;
      if (!median && !single) continue;
      const auto it = run.counters.find("bytes_per_second");
      if (it == run.counters.end()) continue;
      std::string name = run.run_name.str();  // BM_Rope/dtype:0/tokens:512/...
      const size_t slash = name.find('/');
      medians_[name.substr(slash)][name.substr(0, slash)] = it->second.value;
    }
  }
  void PrintSummary() const {
    std::printf(
        "\nMedian throughput (GB/s of tensor bytes read + written); Copy is the memory "
        "roof measured in this run\n");
    std::printf("%-8s %7s %4s %7s | %8s %8s %8s | %9s %9s\n", "dtype", "tokens", "kv", "threads",
                "RoPE", "Copy", "Naive", "RoPE/Copy", "RoPE/Naive");
    for (const auto& [shape, by_name] : medians_) {
      auto get = [&](const char* n) {
        const auto it = by_name.find(n);
        return it == by_name.end() ? 0.0 : it->second / 1e9;
      };
      int dtype = 0, tokens = 0, kv = 0, threads = 0;
      std::sscanf(shape.c_str(), "/dtype:%d/tokens:%d/kv_heads:%d/threads:%d", &dtype, &tokens, &kv,
                  &threads);
      const double rope = get("BM_Rope"), copy = get("BM_Copy"), naive = get("BM_Naive");
      std::printf("%-8s %7d %4d %7d | %8.2f %8.2f %8.2f | %8.0f%% %9.1fx\n",
                  dtype == 0 ? "fp32" : "bf16", tokens, kv, threads, rope, copy, naive,
                  copy > 0 ? 100 * rope / copy : 0.0, naive > 0 ? rope / naive : 0.0);
    }
  }

 private:
  std::map<std::string, std::map<std::string, double>> medians_;
};

}  // namespace
}  // namespace ropekit

int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  std::string reps = "--benchmark_repetitions=5";
  std::string only_agg = "--benchmark_report_aggregates_only=true";
  bool has_reps = false;
  for (int i = 1; i < argc; ++i)
    has_reps |= std::strstr(argv[i], "benchmark_repetitions") != nullptr;
  if (!has_reps) {
    args.push_back(reps.data());
    args.push_back(only_agg.data());
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  std::printf("SIMD target: %s\n", ropekit::SimdTargetName().c_str());
  ropekit::SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintSummary();
  benchmark::Shutdown();
  return 0;
}
