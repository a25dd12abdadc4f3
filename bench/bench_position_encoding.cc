// Cost of the position-encoding hooks in one causal pass of the tiny-model shape (H = 4 heads,
// T tokens, d = 128), reported per logit (bias hooks) or per embedding element (embedding hook).
// The logit-bias hooks run once per (head, query row) over keys 0..i, in the contiguous-range
// form a model uses and in the per-key PositionSpan form.
//
// Dimension legend: T = tokens, H = heads, d = embedding width.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "bench_support.h"
#include "ropekit/position_encoding.h"

namespace ropekit {
namespace {

constexpr int kHeads = 4;
constexpr int kDim = 128;

PositionEncoding MakeLogitEncoding(PositionEncodingKind kind) {
  PositionEncodingSpec spec;
  spec.kind = kind;
  spec.num_heads = kHeads;
  return PositionEncoding(spec);
}

// A counter that reads as nanoseconds per unit of work: the inverted rate of work * 1e-9 units.
benchmark::Counter NsPer(double work_per_iteration) {
  return benchmark::Counter(
      work_per_iteration * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

double CausalLogits(int64_t tokens) { return double(kHeads) * tokens * (tokens + 1) / 2; }

void BM_LogitBias(benchmark::State& state, PositionEncodingKind kind, bool key_range,
                  bool backward) {
  const int64_t tokens = state.range(0);
  const PositionEncoding pe = MakeLogitEncoding(kind);
  std::vector<float> params(pe.num_parameters(), 0.1f), grad_params(params.size(), 0.0f);
  std::vector<int64_t> keys(tokens);
  for (int64_t j = 0; j < tokens; ++j) keys[j] = j;
  std::vector<float> row(tokens, 0.0f);
  for (auto _ : state) {
    for (int h = 0; h < kHeads; ++h) {
      for (int64_t i = 0; i < tokens; ++i) {
        const std::span<const int64_t> visible(keys.data(), i + 1);
        if (backward) {
          if (key_range) {
            pe.AddLogitBiasBackward(i, 0, i + 1, h, row.data(), grad_params);
          } else {
            pe.AddLogitBiasBackward(i, visible, h, row.data(), grad_params);
          }
        } else if (key_range) {
          pe.AddLogitBias(i, 0, i + 1, h, params, row.data());
        } else {
          pe.AddLogitBias(i, visible, h, params, row.data());
        }
      }
    }
    benchmark::DoNotOptimize(row.data());
    benchmark::DoNotOptimize(grad_params.data());
  }
  state.counters["ns_per_logit"] = NsPer(CausalLogits(tokens));
}

void BM_EmbeddingAdd(benchmark::State& state, PositionEncodingKind kind) {
  const int64_t tokens = state.range(0);
  PositionEncodingSpec spec;
  spec.kind = kind;
  spec.dim = kDim;
  spec.max_positions = tokens;
  spec.embedding_scale = EmbeddingScale::kSqrtDim;
  const PositionEncoding pe(spec);
  std::vector<float> params(pe.num_parameters(), 0.01f);
  std::vector<int64_t> positions(tokens);
  for (int64_t t = 0; t < tokens; ++t) positions[t] = t;
  std::vector<float> x(tokens * kDim, 0.01f);
  for (auto _ : state) {
    pe.AddToEmbeddings(positions, params, x.data(), kDim);
    benchmark::DoNotOptimize(x.data());
  }
  state.counters["ns_per_element"] = NsPer(double(tokens) * kDim);
}

BENCHMARK_CAPTURE(BM_LogitBias, alibi_range, PositionEncodingKind::kAlibi, true, false)->Arg(1024);
BENCHMARK_CAPTURE(BM_LogitBias, alibi_span, PositionEncodingKind::kAlibi, false, false)->Arg(1024);
BENCHMARK_CAPTURE(BM_LogitBias, t5_range, PositionEncodingKind::kT5, true, false)->Arg(1024);
BENCHMARK_CAPTURE(BM_LogitBias, t5_span, PositionEncodingKind::kT5, false, false)->Arg(1024);
BENCHMARK_CAPTURE(BM_LogitBias, t5_backward_range, PositionEncodingKind::kT5, true, true)
    ->Arg(1024);
BENCHMARK_CAPTURE(BM_EmbeddingAdd, sinusoidal, PositionEncodingKind::kSinusoidal)->Arg(1024);
BENCHMARK_CAPTURE(BM_EmbeddingAdd, learned, PositionEncodingKind::kLearned)->Arg(1024);

}  // namespace
}  // namespace ropekit

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  ropekit::bench::PrintMachine("bench_position_encoding");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
