// Shared pieces of the Google Benchmark programs with a summary table (bench_rope,
// bench_engine): the default repetitions, the runs their summaries quote, and the paired timing
// that measures a case and its bound alternately in the same repetition.
#ifndef ROPEKIT_BENCH_BENCH_MAIN_H_
#define ROPEKIT_BENCH_BENCH_MAIN_H_

#include <benchmark/benchmark.h>
#include <time.h>

#include <cstdint>
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

// Which clock TimePaired reads: wall time (calls that use a thread pool) or the calling thread's
// CPU time (one-thread calls on a shared machine: time the scheduler gives to other processes is
// not counted).
enum class PairClock { kWall, kThreadCpu };

inline double ClockSeconds(PairClock clock) {
  timespec ts;
  clock_gettime(clock == PairClock::kWall ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Times `subject` and its bound `bound` alternately: every iteration of `state` runs `batch`
// calls of subject, then `batch` calls of bound, each batch timed on `clock`. The iteration time
// (the benchmark must use UseManualTime) is subject's batch, so the console's time column is per
// batch; the counters hold the times per call of subject ("ns") and bound ("bound_ns") and the
// ratio subject / bound of this repetition ("ratio"), so that each repetition's ratio compares
// two measurements taken within milliseconds of each other and the median over repetitions is
// robust to a machine whose speed drifts between minutes.
template <class Subject, class Bound>
void TimePaired(benchmark::State& state, int64_t batch, PairClock clock, Subject&& subject,
                Bound&& bound) {
  double subject_s = 0, bound_s = 0;
  for (auto _ : state) {
    const double t0 = ClockSeconds(clock);
    for (int64_t i = 0; i < batch; ++i) subject();
    benchmark::ClobberMemory();
    const double t1 = ClockSeconds(clock);
    for (int64_t i = 0; i < batch; ++i) bound();
    benchmark::ClobberMemory();
    const double t2 = ClockSeconds(clock);
    state.SetIterationTime(t1 - t0);
    subject_s += t1 - t0;
    bound_s += t2 - t1;
  }
  const double calls = static_cast<double>(state.iterations()) * static_cast<double>(batch);
  state.counters["ns"] = calls > 0 ? 1e9 * subject_s / calls : 0.0;
  state.counters["bound_ns"] = calls > 0 ? 1e9 * bound_s / calls : 0.0;
  state.counters["ratio"] = bound_s > 0 ? subject_s / bound_s : 0.0;
}

// The counter `name` of a run (0 when absent).
inline double Counter(const benchmark::BenchmarkReporter::Run& run, const char* name) {
  const auto it = run.counters.find(name);
  return it == run.counters.end() ? 0.0 : it->second.value;
}

}  // namespace ropekit::bench

#endif  // ROPEKIT_BENCH_BENCH_MAIN_H_
