// Shared pieces of the Google Benchmark programs with a summary table (bench_rope,
// bench_engine): the default repetitions and the runs their summaries quote.
#ifndef ROPEKIT_BENCH_BENCH_MAIN_H_
#define ROPEKIT_BENCH_BENCH_MAIN_H_

#include <benchmark/benchmark.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace ropekit::bench {

// benchmark::Initialize with 5 repetitions reported as aggregates (median, mean, stddev), unless
// the command line sets --benchmark_repetitions itself.
inline void InitializeWithRepetitions(int argc, char** argv) {
  static std::string reps = "--benchmark_repetitions=5";
  static std::string only_agg = "--benchmark_report_aggregates_only=true";
  static std::vector<char*> args;
  args.assign(argv, argv + argc);
  bool has_reps = false;
  for (int i = 1; i < argc; ++i) {
    has_reps |= std::strstr(argv[i], "benchmark_repetitions") != nullptr;
  }
  if (!has_reps) {
    args.push_back(reps.data());
    args.push_back(only_agg.data());
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
}

// The run a summary quotes for a case: its median aggregate, or the run itself when there are
// no repetitions.
inline bool IsSummaryRun(const benchmark::BenchmarkReporter::Run& run) {
  using Run = benchmark::BenchmarkReporter::Run;
  const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
  const bool single = run.run_type == Run::RT_Iteration && run.repetitions <= 1;
  return median || single;
}

// "BM_Rope/dtype:0/tokens:512/..." -> {"BM_Rope", "/dtype:0/tokens:512/..."}: the benchmark and
// the case (its arguments).
inline std::pair<std::string, std::string> SplitRunName(
    const benchmark::BenchmarkReporter::Run& run) {
  const std::string name = run.run_name.str();
  const size_t slash = name.find('/');
  return {name.substr(0, slash), name.substr(slash)};
}

}  // namespace ropekit::bench

#endif  // ROPEKIT_BENCH_BENCH_MAIN_H_
