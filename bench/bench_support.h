// Shared harness of the benchmark programs: the machine description every benchmark prints first
// (CPU model, SIMD target, cache sizes read from sysfs or sysconf), working-set labels against
// those caches, random normal test data (the distribution of real activations: no subnormals, no
// tiny values) and the memory roofs measured in the same run:
//   StreamInPlace: reads and writes every byte once in place (the traffic of an in-place
//                  rotation), as 32-bit integer XOR with a run-time zero, so no floating-point
//                  special case can slow it down;
//   StreamCopy:    copies with non-temporal stores (no read of the destination: the traffic of an
//                  out-of-place rotation).
// Both use the best Highway target of the CPU, as the library's kernels do. Also the timed
// training loop of the model benchmarks (TimeTraining on RandomBytes).
//
// Dimension legend: n = elements, bytes = buffer size in bytes.
#ifndef ROPEKIT_BENCH_BENCH_SUPPORT_H_
#define ROPEKIT_BENCH_BENCH_SUPPORT_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ropekit/model.h"
#include "ropekit/rope.h"

namespace ropekit::bench {

struct CacheLevel {
  int level = 0;
  std::string type;   // "Data", "Unified", "Instruction"
  int64_t bytes = 0;  // per instance (as sysfs reports it)
};

std::string CpuModel();  // /proc/cpuinfo "model name"
// cpu0's data caches from sysfs (or glibc's sysconf where sysfs hides them), no i-caches.
std::vector<CacheLevel> DataCaches();
// Prints CPU, SIMD target, caches and the number of online CPUs, one "# " line each.
void PrintMachine(const char* program);
// "L1", "L2", "L3" (the smallest data cache that holds `bytes`) or "> L3" / "> L2".
std::string CacheFit(int64_t bytes);

// n samples of N(0, 1) from a fixed seed, stored as `dtype` (rounded to nearest even).
std::vector<uint8_t> RandomNormal(DType dtype, int64_t n, uint64_t seed);

// Memory roofs (see the file comment). `bytes` need not be a multiple of the vector size.
void StreamInPlace(uint8_t* data, size_t bytes);
void StreamCopy(const uint8_t* src, uint8_t* dst, size_t bytes);

double Median(std::vector<double> v);

// n random byte tokens in [0, 255] (std::mt19937 with `seed`, uniform): the training corpus of
// the model benchmarks.
std::vector<int32_t> RandomBytes(size_t n, uint32_t seed = 1);

// The training loop the model benchmarks time: `tc` (batch, sequence length and precision set by
// the caller; no evaluation) on `text` from `state`: a 2-step warm-up Train (allocations, page
// faults), then `repeats` timed Train calls of `steps` steps each. Returns the median wall-clock
// seconds of one call; `state` and `tc` are left as after the last call, for further runs.
double TimeTraining(Model& model, OptimizerState& state, TrainConfig& tc,
                    std::span<const int32_t> text, int64_t steps, int64_t repeats,
                    ThreadPool* pool);

}  // namespace ropekit::bench

#endif  // ROPEKIT_BENCH_BENCH_SUPPORT_H_
