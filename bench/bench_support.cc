// See bench_support.h. The two roof kernels are compiled once per SIMD target (Highway dynamic
// dispatch), like the library's kernels.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench_support.cc"
#include "hwy/cache_control.h"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace ropekit::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// x ^= zero over 32-bit lanes; `zero` is read at run time so the pass cannot be elided.
void XorInPlace(uint32_t* p, size_t n, uint32_t zero) {
  const hn::ScalableTag<uint32_t> d;
  const size_t N = hn::Lanes(d);
  const auto z = hn::Set(d, zero);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Xor(hn::LoadU(d, p + i), z), d, p + i);
  for (; i < n; ++i) p[i] ^= zero;
}

// Non-temporal copy; `dst` must be aligned to the vector size (the caller copies the unaligned
// head byte by byte).
void NonTemporalCopy(const uint32_t* src, uint32_t* dst, size_t n) {
  const hn::ScalableTag<uint32_t> d;
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::Stream(hn::LoadU(d, src + i), d, dst + i);
  for (; i < n; ++i) dst[i] = src[i];
  hwy::FlushStream();
}

}  // namespace HWY_NAMESPACE
}  // namespace ropekit::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "bench_support.h"
#include "hwy/aligned_allocator.h"
#include "ropekit/half.h"

namespace ropekit::bench {

HWY_EXPORT(XorInPlace);
HWY_EXPORT(NonTemporalCopy);

namespace {
volatile uint32_t g_zero = 0;

std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

int64_t ParseSize(const std::string& s) {  // sysfs "48K", "1024K", "32768K", "1M"
  if (s.empty()) return 0;
  int64_t v = std::atoll(s.c_str());
  const char unit = s.back();
  if (unit == 'K') v <<= 10;
  if (unit == 'M') v <<= 20;
  if (unit == 'G') v <<= 30;
  return v;
}

std::string Bytes(int64_t b) {
  char buf[32];
  if (b >= (int64_t{1} << 20)) {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", b / 1048576.0);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f KiB", b / 1024.0);
  }
  return buf;
}
}  // namespace

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

// sysfs first; where a VM hides it, glibc's sysconf (from cpuid; "unified" assumed for L2+).
std::vector<CacheLevel> DataCaches() {
  std::vector<CacheLevel> out;
  const std::vector<CacheLevel> from_sysconf = {{1, "Data", sysconf(_SC_LEVEL1_DCACHE_SIZE)},
                                                {2, "Unified", sysconf(_SC_LEVEL2_CACHE_SIZE)},
                                                {3, "Unified", sysconf(_SC_LEVEL3_CACHE_SIZE)}};
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const std::string level = ReadLine(dir + "level");
    if (level.empty()) break;
    CacheLevel c;
    c.level = std::atoi(level.c_str());
    c.type = ReadLine(dir + "type");
    c.bytes = ParseSize(ReadLine(dir + "size"));
    if (c.type != "Instruction") out.push_back(c);
  }
  if (out.empty()) {
    for (const CacheLevel& c : from_sysconf) {
      if (c.bytes > 0) out.push_back(c);
    }
  }
  return out;
}

void PrintMachine(const char* program) {
  std::printf("# %s\n# CPU: %s (%u online CPUs)\n# SIMD target: %s\n# caches:", program,
              CpuModel().c_str(), std::thread::hardware_concurrency(), SimdTargetName().c_str());
  for (const CacheLevel& c : DataCaches()) std::printf(" L%d %s", c.level, Bytes(c.bytes).c_str());
  const bool sysfs = !ReadLine("/sys/devices/system/cpu/cpu0/cache/index0/level").empty();
  std::printf(" (%s)\n", sysfs ? "sysfs, per instance" : "no sysfs: glibc sysconf from cpuid");
}

std::string CacheFit(int64_t bytes) {
  std::string last = "L1";
  for (const CacheLevel& c : DataCaches()) {
    if (bytes <= c.bytes) return "L" + std::to_string(c.level);
    last = "> L" + std::to_string(c.level);
  }
  return last;
}

std::vector<uint8_t> RandomNormal(DType dtype, int64_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint8_t> out(static_cast<size_t>(n) * DTypeSize(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const float x = dist(gen);
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &x, 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(x) : FloatToF16(x);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

void StreamInPlace(uint8_t* data, size_t bytes) {
  const uint32_t zero = g_zero;
  const size_t head = std::min(bytes, (4 - reinterpret_cast<uintptr_t>(data) % 4) % 4);
  for (size_t i = 0; i < head; ++i) data[i] ^= static_cast<uint8_t>(zero);
  const size_t words = (bytes - head) / 4;
  HWY_DYNAMIC_DISPATCH(XorInPlace)(reinterpret_cast<uint32_t*>(data + head), words, zero);
  for (size_t i = head + 4 * words; i < bytes; ++i) data[i] ^= static_cast<uint8_t>(zero);
}

void StreamCopy(const uint8_t* src, uint8_t* dst, size_t bytes) {
  // Align the destination to 64 bytes (the widest vector), then copy whole 32-bit words.
  size_t head = std::min(bytes, (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64);
  std::memcpy(dst, src, head);
  const size_t words = (bytes - head) / 4;
  if (reinterpret_cast<uintptr_t>(src + head) % 4 == 0) {
    HWY_DYNAMIC_DISPATCH(NonTemporalCopy)
    (reinterpret_cast<const uint32_t*>(src + head), reinterpret_cast<uint32_t*>(dst + head), words);
  } else {
    std::memcpy(dst + head, src + head, 4 * words);
  }
  std::memcpy(dst + head + 4 * words, src + head + 4 * words, bytes - head - 4 * words);
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<int32_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(0, 255);
  std::vector<int32_t> text(n);
  for (auto& t : text) t = dist(gen);
  return text;
}

double TimeTraining(Model& model, OptimizerState& state, TrainConfig& tc,
                    std::span<const int32_t> text, int64_t steps, int64_t repeats,
                    ThreadPool* pool) {
  auto now = [] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  tc.steps = 2;
  tc.eval_interval = 0;
  Train(model, state, tc, text, {}, pool);
  std::vector<double> runs;
  for (int64_t r = 0; r < repeats; ++r) {
    tc.steps = state.step + steps;
    const double t0 = now();
    Train(model, state, tc, text, {}, pool);
    runs.push_back(now() - t0);
  }
  return Median(runs);
}

}  // namespace ropekit::bench
#endif  // HWY_ONCE
