// RoPE rotation throughput on LLaMA-7B-like shapes (32 query heads, 8 or 32 kv heads,
// head_dim 128), q and k together, against bounds measured in the same run:
//   Roof:  in place, a streaming pass that reads and writes the same q+k bytes once
//          (bench::StreamInPlace); out of place, a non-temporal copy of them into the outputs
//          (bench::StreamCopy). Both on the same threads, split by token rows like the rotation,
//          and timed alternately with the rotation in every repetition (bench::TimePaired), so
//          that each repetition's RoPE / Roof compares two measurements milliseconds apart; the
//          summary quotes the median of these ratios (the machine's bandwidth may drift between
//          minutes, which a roof measured after all rotation cases would not see).
//   Naive: (in place, half-split) the three-pass eager formula y = x*cos + rotate_half(x)*sin
//          with [T, D] cos/sin tables and temporaries, as PyTorch eager computes it.
// Data are N(0, 1) samples (as activations are; no subnormals). Bytes per second count the
// tensor bytes read plus written. After the Google Benchmark output a summary prints medians,
// the working set against the cache sizes, RoPE / Roof, RoPE / Naive and the 2-thread / 1-thread
// speed-up of every shape.
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
#include <tuple>
#include <vector>

#include "bench_main.h"
#include "bench_support.h"
#include "ropekit/half.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit {
namespace {

constexpr int64_t kHeads = 32, kDim = 128;

struct Shape {
  DType dtype;
  int64_t tokens, kv, threads;
  Layout layout;
  bool in_place;
  explicit Shape(const benchmark::State& s)
      : dtype(static_cast<DType>(s.range(0))),
        tokens(s.range(1)),
        kv(s.range(2)),
        threads(s.range(3)),
        layout(s.range(4) == 0 ? Layout::kHalfSplit : Layout::kInterleaved),
        in_place(s.range(5) != 0) {}
  int64_t q_elems() const { return tokens * kHeads * kDim; }
  int64_t k_elems() const { return tokens * kv * kDim; }
};

struct Buffers {
  std::vector<uint8_t> q, k, q_out, k_out;
  std::vector<int64_t> positions;
};

Buffers MakeBuffers(const Shape& s) {
  Buffers b;
  b.q = bench::RandomNormal(s.dtype, s.q_elems(), 1);
  b.k = bench::RandomNormal(s.dtype, s.k_elems(), 2);
  if (!s.in_place) {
    b.q_out.assign(b.q.size(), 0);
    b.k_out.assign(b.k.size(), 0);
  }
  // Decode-like offset: positions continue after a 1000-token prefix.
  for (int64_t t = 0; t < s.tokens; ++t) b.positions.push_back(1000 + t);
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

// Tensor bytes read plus written per call.
size_t TrafficBytes(const Buffers& b) { return 2 * (b.q.size() + b.k.size()); }

// `calls` calls per iteration (a batch of BM_Rope; 1 for BM_Naive).
void SetCounters(benchmark::State& state, const Buffers& b, int64_t calls = 1) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * calls * TrafficBytes(b)));
  state.counters["working_set"] =
      static_cast<double>(b.q.size() + b.k.size() + b.q_out.size() + b.k_out.size());
}

// One pass of the roof over the same bytes on the same threads (see the file comment): like the
// rotation, a call below RotateOptions::min_parallel_bytes stays on the calling thread.
void Roof(ThreadPool& pool, const Shape& s, Buffers& b) {
  const size_t qrow = b.q.size() / s.tokens, krow = b.k.size() / s.tokens;
  const bool split =
      static_cast<int64_t>(b.q.size() + b.k.size()) >= RotateOptions{}.min_parallel_bytes;
  ParallelFor(split ? &pool : nullptr, s.tokens, [&](size_t begin, size_t end, size_t) {
    if (s.in_place) {
      bench::StreamInPlace(b.q.data() + begin * qrow, (end - begin) * qrow);
      bench::StreamInPlace(b.k.data() + begin * krow, (end - begin) * krow);
    } else {
      bench::StreamCopy(b.q.data() + begin * qrow, b.q_out.data() + begin * qrow,
                        (end - begin) * qrow);
      bench::StreamCopy(b.k.data() + begin * krow, b.k_out.data() + begin * krow,
                        (end - begin) * krow);
    }
  });
}

// The rotation, timed alternately with the roof (counters bound_ns and ratio = RoPE / Roof time).
void BM_Rope(benchmark::State& state) {
  const Shape s(state);
  ThreadPool pool(s.threads);
  Buffers b = MakeBuffers(s);
  const TensorView q = ContiguousView(b.q.data(), s.dtype, s.tokens, kHeads, kDim);
  const TensorView k = ContiguousView(b.k.data(), s.dtype, s.tokens, s.kv, kDim);
  const TensorView qo =
      s.in_place ? q : ContiguousView(b.q_out.data(), s.dtype, s.tokens, kHeads, kDim);
  const TensorView ko =
      s.in_place ? k : ContiguousView(b.k_out.data(), s.dtype, s.tokens, s.kv, kDim);
  const RopeOperand ops[] = {{q, qo}, {k, ko}};
  RotateOptions options;
  options.layout = s.layout;
  options.pool = &pool;
  // Batches of at least 4 MiB of traffic, so that a small case's batch is timed in microseconds.
  const int64_t batch = std::max<int64_t>(1, (int64_t{4} << 20) / TrafficBytes(b));
  bench::TimePaired(
      state, batch, bench::PairClock::kWall, [&] { ApplyRope(Table(), b.positions, ops, options); },
      [&] { Roof(pool, s, b); });
  SetCounters(state, b, batch);
}

float LoadAs(DType dtype, uint16_t h) {
  return dtype == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
}
uint16_t StoreAs(DType dtype, float f) {
  return dtype == DType::kBF16 ? FloatToBf16(f) : FloatToF16(f);
}

// The eager formula, one full pass per operation with temporaries (fp32 arithmetic; 16-bit
// types round after every operation as eager does).
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
  const Shape s(state);
  ThreadPool pool(s.threads);
  Buffers b = MakeBuffers(s);
  std::vector<float> cos(s.tokens * kDim), sin(s.tokens * kDim);
  for (int64_t t = 0; t < s.tokens; ++t) {
    Table().ComputeRow(b.positions[t], cos.data() + t * kDim, sin.data() + t * kDim);
    std::copy_n(cos.data() + t * kDim, kDim / 2, cos.data() + t * kDim + kDim / 2);
    std::copy_n(sin.data() + t * kDim, kDim / 2, sin.data() + t * kDim + kDim / 2);
  }
  std::vector<uint8_t> tmp1(b.q.size()), tmp2(b.q.size());
  const DType dt = s.dtype;
  for (auto _ : state) {
    pool.ParallelFor(s.tokens, [&](size_t begin, size_t end, size_t) {
      const int64_t t0 = begin, nt = end - begin;
      for (auto [buf, heads] :
           {std::pair<std::vector<uint8_t>*, int64_t>{&b.q, kHeads}, {&b.k, s.kv}}) {
        const size_t off = t0 * heads * kDim;
        if (dt == DType::kF32) {
          float* x = reinterpret_cast<float*>(buf->data()) + off;
          NaiveThreePass(
              x, nt, heads, cos.data() + t0 * kDim, sin.data() + t0 * kDim,
              reinterpret_cast<float*>(tmp1.data()) + off,
              reinterpret_cast<float*>(tmp2.data()) + off, [](float v) { return v; },
              [](float v) { return v; });
        } else {
          uint16_t* x = reinterpret_cast<uint16_t*>(buf->data()) + off;
          NaiveThreePass(
              x, nt, heads, cos.data() + t0 * kDim, sin.data() + t0 * kDim,
              reinterpret_cast<uint16_t*>(tmp1.data()) + off,
              reinterpret_cast<uint16_t*>(tmp2.data()) + off,
              [dt](uint16_t h) { return LoadAs(dt, h); }, [dt](float f) { return StoreAs(dt, f); });
        }
      }
    });
    benchmark::ClobberMemory();
  }
  SetCounters(state, b);
}

constexpr int64_t kF32 = 0, kBf16 = 1, kF16 = 2;

// Every dtype, token count, kv count and thread count in place, half-split; the 4096-token,
// 8-kv shape also interleaved and out of place.
void Shapes(benchmark::internal::Benchmark* b, bool all_cases) {
  b->ArgNames({"dtype", "tokens", "kv_heads", "threads", "layout", "in_place"});
  for (int64_t dtype : {kF32, kBf16, kF16})
    for (int64_t tokens : {1, 512, 4096})
      for (int64_t kv : {8, 32})
        for (int64_t threads : {1, 2}) {
          b->Args({dtype, tokens, kv, threads, 0, 1});
          if (!all_cases || tokens != 4096 || kv != 8) continue;
          b->Args({dtype, tokens, kv, threads, 1, 1});
          b->Args({dtype, tokens, kv, threads, 0, 0});
          b->Args({dtype, tokens, kv, threads, 1, 0});
        }
}

BENCHMARK(BM_Rope)->Apply([](auto* b) {
  Shapes(b, true);
  b->UseManualTime();
});
BENCHMARK(BM_Naive)->Apply([](auto* b) {
  Shapes(b, false);
  b->UseRealTime();
});

// Collects the median of every case and prints the ratios at the end.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (!bench::IsSummaryRun(run)) continue;
      const auto it = run.counters.find("bytes_per_second");
      if (it == run.counters.end()) continue;
      const auto [name, shape] = bench::SplitRunName(run);
      Case& c = cases_[shape];
      c.gbs[name] = it->second.value / 1e9;
      if (name == "BM_Rope") {
        // The roof's GB/s from its time per call; RoPE / Roof as the median of the ratios.
        const double bound_ns = bench::Counter(run, "bound_ns"),
                     ratio = bench::Counter(run, "ratio");
        if (bound_ns > 0 && ratio > 0) {
          c.gbs["BM_Roof"] = c.gbs[name] * ratio;
          c.pct_roof = 100.0 / ratio;
        }
      }
      const auto ws = run.counters.find("working_set");
      if (ws != run.counters.end()) c.working_set = static_cast<int64_t>(ws->second.value);
    }
  }
  void PrintSummary() const {
    std::printf(
        "\nMedians over repetitions, GB/s of tensor bytes read + written. Roof: in place, a "
        "streaming read+write of the\nsame bytes; out of place, a non-temporal copy; timed "
        "alternately with the rotation in every repetition on the\nsame threads (Roof GB/s here "
        "= RoPE GB/s x the median ratio). %%roof: median of the per-repetition\nratios. 2T/1T: "
        "RoPE speed-up of 2 threads over 1.\n");
    std::printf("%-5s %6s %3s %3s %-5s %-3s %9s %-5s | %7s %7s %7s | %5s %6s %5s\n", "dtype",
                "tokens", "kv", "thr", "layout", "ip", "work set", "fits", "RoPE", "Roof", "Naive",
                "%roof", "xNaive", "2T/1T");
    for (const auto& [shape, c] : cases_) {
      int dtype = 0, tokens = 0, kv = 0, threads = 0, layout = 0, in_place = 0;
      std::sscanf(shape.c_str(), "/dtype:%d/tokens:%d/kv_heads:%d/threads:%d/layout:%d/in_place:%d",
                  &dtype, &tokens, &kv, &threads, &layout, &in_place);
      const double rope = c.Get("BM_Rope"), roof = c.Get("BM_Roof"), naive = c.Get("BM_Naive");
      std::string one_thread = shape;
      const size_t at = one_thread.find("/threads:");
      one_thread.replace(at, 10, "/threads:1");
      const auto one = cases_.find(one_thread);
      const double base = one == cases_.end() ? 0.0 : one->second.Get("BM_Rope");
      char naive_col[16] = "", speed_col[16] = "";
      if (naive > 0) std::snprintf(naive_col, sizeof(naive_col), "%5.1fx", rope / naive);
      if (threads > 1 && base > 0)
        std::snprintf(speed_col, sizeof(speed_col), "%5.2f", rope / base);
      std::printf("%-5s %6d %3d %3d %-6s %-3s %7.2fMB %-5s | %7.2f %7.2f %7.2f | %4.0f%% %6s %5s\n",
                  dtype == 0   ? "fp32"
                  : dtype == 1 ? "bf16"
                               : "fp16",
                  tokens, kv, threads, layout == 0 ? "half" : "inter", in_place ? "in" : "out",
                  c.working_set / 1e6, bench::CacheFit(c.working_set).c_str(), rope, roof, naive,
                  c.pct_roof, naive_col, speed_col);
    }
  }

 private:
  struct Case {
    std::map<std::string, double> gbs;
    int64_t working_set = 0;
    double pct_roof = 0;  // 100 / median(RoPE time / Roof time)
    double Get(const char* n) const {
      const auto it = gbs.find(n);
      return it == gbs.end() ? 0.0 : it->second;
    }
  };
  std::map<std::string, Case> cases_;
};

}  // namespace
}  // namespace ropekit

int main(int argc, char** argv) {
  ropekit::bench::InitializeWithRepetitions(argc, argv);
  ropekit::bench::PrintMachine("bench_rope");
  ropekit::SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintSummary();
  benchmark::Shutdown();
  return 0;
}
