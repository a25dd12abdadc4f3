// bf16 matrix products on AVX512-BF16 (see bf16_matmul.h for the contract and the error bound).
//
// Dimension legend: M = rows, K = input features, N = output features, R = reduced dimension,
// P = ceil(R / 2) bf16 pairs, MR = rows of a register tile (8), NR = its columns (32, two vectors
// of 16 float32 lanes).
//
// Every product is C[rows, cols] (+)= A[rows, R] B[cols, R]^T with both operands as uint32 bf16
// pairs along R:
//   A(i, p) = a[i * a_row + p * a_pair]  (row-major rows: a_row = P, a_pair = 1; pair-interleaved
//                                          columns: a_row = 1, a_pair = row stride),
//   B(j, p) = b[p * ldb + j]             (pair-interleaved, ldb a multiple of 32, zero padded).
// The register tile broadcasts A's pair for each of MR rows and multiplies it with two vectors of
// B's pairs (VDPBF16PS), accumulating MR x 32 outputs in 16 registers. Highway 1.0.3's
// ReorderWidenMulAccumulate for bf16 emulates the product with shifts and float32 FMAs on every
// x86 target (no VDPBF16PS), so it cannot beat float32; the kernel therefore uses the intrinsics
// in functions compiled for AVX512-BF16 and is called only after a run-time CPU check.
#include "src/ops/bf16_matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "ropekit/error.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#define ROPEKIT_HAVE_AVX512BF16_KERNEL 1
#include <immintrin.h>
#define ROPEKIT_BF16_TARGET \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")))
#else
#define ROPEKIT_HAVE_AVX512BF16_KERNEL 0
#endif

namespace ropekit::ops {
namespace {

constexpr int64_t kMr = 8;
constexpr int64_t kNr = 32;
// Output block of one parallel task: the tiling changes no bit of any output (see the header).
constexpr int64_t kTaskRows = 64;
constexpr int64_t kTaskCols = 128;
// Below this many multiply-adds a product runs on the calling thread.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

void CheckDims(int64_t m, int64_t k, int64_t n, const char* op) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m < 0 || k < 0 || n < 0 || m > kMax || k > kMax || n > kMax) {
    throw Error(std::string(op) + ": dimensions M=" + std::to_string(m) + " K=" +
                std::to_string(k) + " N=" + std::to_string(n) + " must be in [0, 2^31 - 1]");
  }
}

ThreadPool* PoolFor(ThreadPool* pool, int64_t work) {
  return work < kMinParallelWork ? nullptr : pool;
}

// Scratch buffers of the calling thread, reused across calls (packing allocates nothing in the
// steady state).
std::vector<uint32_t>& Scratch(int which) {
  thread_local std::vector<uint32_t> buffers[2];
  return buffers[which];
}

#if ROPEKIT_HAVE_AVX512BF16_KERNEL

// Rounds 32 floats (lo: first 16, hi: last 16) to bf16, in order.
ROPEKIT_BF16_TARGET inline __m512i Round32(__m512 lo, __m512 hi) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// dst[p] (p < P = ceil(cols / 2)) = the bf16 pairs of src[0, cols); src has `cols` floats.
ROPEKIT_BF16_TARGET void ConvertRow(const float* src, int64_t cols, uint32_t* dst) {
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    _mm512_storeu_si512(dst + c / 2,
                        Round32(_mm512_loadu_ps(src + c), _mm512_loadu_ps(src + c + 16)));
  }
  if (c < cols) {  // zero-filled tail: an odd column count gets a zero high half
    const int64_t rest = cols - c;
    const __mmask16 m0 = static_cast<__mmask16>(rest >= 16 ? 0xFFFF : (1u << rest) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(rest <= 16 ? 0 : (1u << (rest - 16)) - 1);
    const __m512i v =
        Round32(_mm512_maskz_loadu_ps(m0, src + c), _mm512_maskz_loadu_ps(m1, src + c + 16));
    const int64_t pairs = CeilDiv(rest, 2);
    _mm512_mask_storeu_epi32(dst + c / 2, static_cast<__mmask16>((1u << pairs) - 1), v);
  }
}

// dst[X] (X a multiple of 16) = pairs (row0[x], row1[x]) for x < cols, zeros after; row1 may be
// null (zeros).
ROPEKIT_BF16_TARGET void InterleaveRows(const float* row0, const float* row1, int64_t cols,
                                        int64_t padded, uint32_t* dst) {
  // Round32 puts row0's 16 values in bf16 lanes 0..15 and row1's in 16..31; the permutation
  // makes lane 2j = row0[j], lane 2j + 1 = row1[j].
  alignas(64) static constexpr uint16_t kIdx[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                    21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                    11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t x = 0; x < padded; x += 16) {
    const int64_t rest = std::max<int64_t>(0, std::min<int64_t>(16, cols - x));
    const __mmask16 m = static_cast<__mmask16>(rest == 16 ? 0xFFFF : (1u << rest) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(m, row0 + x);
    const __m512 b = row1 ? _mm512_maskz_loadu_ps(m, row1 + x) : _mm512_setzero_ps();
    _mm512_storeu_si512(dst + x, _mm512_permutexvar_epi16(idx, Round32(a, b)));
  }
}

// The register tile: rows [0, MR) of A times columns [0, ncols <= 32) of B, over P pairs.
template <int MR>
ROPEKIT_BF16_TARGET void Tile(const uint32_t* a, int64_t a_row, int64_t a_pair, const uint32_t* b,
                              int64_t ldb, int64_t pairs, float* c, int64_t ldc, int64_t ncols,
                              bool accumulate) {
  __m512 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ldb));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ldb + 16));
    const uint32_t* ap = a + p * a_pair;
    for (int i = 0; i < MR; ++i) {
      const __m512bh av =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(ap[i * a_row])));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>(ncols >= 16 ? 0xFFFF : (1u << ncols) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(ncols >= 32   ? 0xFFFF
                                              : ncols <= 16 ? 0
                                                            : (1u << (ncols - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    __m512 r0 = acc0[i], r1 = acc1[i];
    if (accumulate) {
      r0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), r0);
      r1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), r1);
    }
    _mm512_mask_storeu_ps(ci, m0, r0);
    _mm512_mask_storeu_ps(ci + 16, m1, r1);
  }
}

// Rows [r0, r1) x columns [c0, c1) of C.
ROPEKIT_BF16_TARGET void Block(const uint32_t* a, int64_t a_row, int64_t a_pair, const uint32_t* b,
                               int64_t ldb, int64_t pairs, float* c, int64_t ldc, int64_t r0,
                               int64_t r1, int64_t c0, int64_t c1, bool accumulate) {
  for (int64_t j = c0; j < c1; j += kNr) {
    const int64_t nc = std::min(kNr, c1 - j);
    int64_t i = r0;
    for (; i + kMr <= r1; i += kMr) {
      Tile<kMr>(a + i * a_row, a_row, a_pair, b + j, ldb, pairs, c + i * ldc + j, ldc, nc,
                accumulate);
    }
    const uint32_t* ai = a + i * a_row;
    float* ci = c + i * ldc + j;
    switch (r1 - i) {
      case 7:
        Tile<7>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 6:
        Tile<6>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 5:
        Tile<5>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 4:
        Tile<4>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 3:
        Tile<3>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 2:
        Tile<2>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      case 1:
        Tile<1>(ai, a_row, a_pair, b + j, ldb, pairs, ci, ldc, nc, accumulate);
        break;
      default:
        break;
    }
  }
}

bool CpuHasBf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

#else  // no kernel in this build: the entry points are never reached (Bf16MatmulAvailable()).

void ConvertRow(const float*, int64_t, uint32_t*) {}
void InterleaveRows(const float*, const float*, int64_t, int64_t, uint32_t*) {}
void Block(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, float*, int64_t,
           int64_t, int64_t, int64_t, int64_t, bool) {}
bool CpuHasBf16() { return false; }

#endif

bool DisabledByEnv() {
  const char* v = std::getenv("ROPEKIT_BF16_MATMUL");
  return v != nullptr && std::string(v) == "off";
}

void RequireKernel(const char* op) {
  if (!Bf16MatmulAvailable()) {
    throw Error(std::string(op) + ": " + Bf16MatmulDescription());
  }
}

// rows x cols floats (row stride ld) -> rows x ceil(cols / 2) pairs, row-major.
void ConvertRows(const float* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                 ThreadPool* pool) {
  const int64_t pairs = CeilDiv(cols, 2);
  ParallelFor(PoolFor(pool, rows * cols * 64), static_cast<size_t>(CeilDiv(rows, 64)),
              [&](size_t begin, size_t end, size_t) {
                for (int64_t r = static_cast<int64_t>(begin) * 64;
                     r < std::min<int64_t>(rows, static_cast<int64_t>(end) * 64); ++r) {
                  ConvertRow(src + r * ld, cols, dst + r * pairs);
                }
              });
}

// rows x cols floats (row stride ld) -> ceil(rows / 2) x padded pairs of consecutive rows.
void InterleaveRowPairs(const float* src, int64_t rows, int64_t cols, int64_t ld, int64_t padded,
                        uint32_t* dst, ThreadPool* pool) {
  const int64_t pairs = CeilDiv(rows, 2);
  ParallelFor(PoolFor(pool, rows * cols * 64), static_cast<size_t>(CeilDiv(pairs, 32)),
              [&](size_t begin, size_t end, size_t) {
                for (int64_t p = static_cast<int64_t>(begin) * 32;
                     p < std::min<int64_t>(pairs, static_cast<int64_t>(end) * 32); ++p) {
                  const float* r0 = src + 2 * p * ld;
                  const float* r1 = 2 * p + 1 < rows ? r0 + ld : nullptr;
                  InterleaveRows(r0, r1, cols, padded, dst + p * padded);
                }
              });
}

// C[rows, cols] (+)= A B^T over `pairs` bf16 pairs (layouts in the file comment).
void Gemm(const uint32_t* a, int64_t a_row, int64_t a_pair, const uint32_t* b, int64_t ldb,
          int64_t pairs, float* c, int64_t rows, int64_t cols, bool accumulate, ThreadPool* pool) {
  const int64_t row_tasks = CeilDiv(rows, kTaskRows), col_tasks = CeilDiv(cols, kTaskCols);
  ParallelFor(PoolFor(pool, rows * cols * pairs * 2), static_cast<size_t>(row_tasks * col_tasks),
              [&](size_t begin, size_t end, size_t) {
                for (size_t t = begin; t < end; ++t) {
                  const int64_t r0 = static_cast<int64_t>(t) / col_tasks * kTaskRows;
                  const int64_t c0 = static_cast<int64_t>(t) % col_tasks * kTaskCols;
                  Block(a, a_row, a_pair, b, ldb, pairs, c, cols, r0,
                        std::min(rows, r0 + kTaskRows), c0, std::min(cols, c0 + kTaskCols),
                        accumulate);
                }
              });
}

void ZeroIfEmptyReduction(float* y, int64_t count, bool accumulate) {
  if (!accumulate) std::fill(y, y + count, 0.0f);
}

}  // namespace

bool Bf16MatmulAvailable() {
  static const bool available = ROPEKIT_HAVE_AVX512BF16_KERNEL && CpuHasBf16();
  return available && !DisabledByEnv();
}

std::string Bf16MatmulDescription() {
  if (Bf16MatmulAvailable()) {
    return "bf16 matmul: AVX512-BF16 kernel (VDPBF16PS, float32 accumulation)";
  }
  if (!ROPEKIT_HAVE_AVX512BF16_KERNEL) {
    return "bf16 matmul: this build has no AVX512-BF16 kernel (x86-64 GCC >= 10 or clang "
           "needed); bf16 runs as float32 sgemm on bf16-rounded operands (same numerics, no "
           "speed-up)";
  }
  if (CpuHasBf16()) {
    return "bf16 matmul: disabled by ROPEKIT_BF16_MATMUL=off; bf16 runs as float32 sgemm on "
           "bf16-rounded operands (same numerics, no speed-up)";
  }
  return "bf16 matmul: this CPU lacks AVX512-BF16; bf16 runs as float32 sgemm on bf16-rounded "
         "operands (same numerics, no speed-up)";
}

void PackBf16Weight(const float* w, int64_t n, int64_t k, bool backward, Bf16Weight* out,
                    ThreadPool* pool) {
  CheckDims(n, k, 0, "PackBf16Weight");
  RequireKernel("PackBf16Weight");
  out->n = n;
  out->k = k;
  const int64_t k2 = CeilDiv(k, 2), np = RoundUp(n, kNr);
  // fwd[p][j] = pair (w[j, 2p], w[j, 2p + 1]): row-convert, then transpose the pairs.
  std::vector<uint32_t>& rows = Scratch(0);
  rows.resize(static_cast<size_t>(n * k2));
  ConvertRows(w, n, k, k, rows.data(), pool);
  out->fwd.assign(static_cast<size_t>(k2 * np), 0u);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {  // 16 x 16 blocks keep both sides in cache lines
    for (int64_t p0 = 0; p0 < k2; p0 += 16) {
      for (int64_t j = j0; j < std::min(n, j0 + 16); ++j) {
        for (int64_t p = p0; p < std::min(k2, p0 + 16); ++p) {
          out->fwd[p * np + j] = rows[j * k2 + p];
        }
      }
    }
  }
  if (backward) {
    const int64_t kp = RoundUp(k, kNr);
    out->bwd.resize(static_cast<size_t>(CeilDiv(n, 2) * kp));
    InterleaveRowPairs(w, n, k, k, kp, out->bwd.data(), pool);
  } else {
    out->bwd.clear();
  }
}

void MatMulBf16(const float* x, const Bf16Weight& w, float* y, int64_t m, ThreadPool* pool,
                bool accumulate) {
  CheckDims(m, w.k, w.n, "MatMulBf16");
  RequireKernel("MatMulBf16");
  if (m == 0 || w.n == 0) return;
  if (w.k == 0) return ZeroIfEmptyReduction(y, m * w.n, accumulate);
  const int64_t k2 = CeilDiv(w.k, 2);
  std::vector<uint32_t>& a = Scratch(0);
  a.resize(static_cast<size_t>(m * k2));
  ConvertRows(x, m, w.k, w.k, a.data(), pool);
  Gemm(a.data(), k2, 1, w.fwd.data(), RoundUp(w.n, kNr), k2, y, m, w.n, accumulate, pool);
}

void MatMulBackwardInputBf16(const float* dy, const Bf16Weight& w, float* dx, int64_t m,
                             ThreadPool* pool, bool accumulate) {
  CheckDims(m, w.k, w.n, "MatMulBackwardInputBf16");
  RequireKernel("MatMulBackwardInputBf16");
  if (w.bwd.empty() && w.n > 0 && w.k > 0) {
    throw Error("MatMulBackwardInputBf16: the weight was packed without its backward layout");
  }
  if (m == 0 || w.k == 0) return;
  if (w.n == 0) return ZeroIfEmptyReduction(dx, m * w.k, accumulate);
  const int64_t n2 = CeilDiv(w.n, 2);
  std::vector<uint32_t>& a = Scratch(0);
  a.resize(static_cast<size_t>(m * n2));
  ConvertRows(dy, m, w.n, w.n, a.data(), pool);
  Gemm(a.data(), n2, 1, w.bwd.data(), RoundUp(w.k, kNr), n2, dx, m, w.k, accumulate, pool);
}

void MatMulBackwardWeightBf16(const float* dy, const float* x, float* dw, int64_t m, int64_t k,
                              int64_t n, ThreadPool* pool) {
  CheckDims(m, k, n, "MatMulBackwardWeightBf16");
  RequireKernel("MatMulBackwardWeightBf16");
  if (m == 0 || n == 0 || k == 0) return;
  // dw[n, k] = sum_t dy[t, n] x[t, k]: both operands as pairs of consecutive rows t.
  const int64_t m2 = CeilDiv(m, 2), np = RoundUp(n, 16), kp = RoundUp(k, kNr);
  std::vector<uint32_t>& a = Scratch(0);
  std::vector<uint32_t>& b = Scratch(1);
  a.resize(static_cast<size_t>(m2 * np));
  b.resize(static_cast<size_t>(m2 * kp));
  InterleaveRowPairs(dy, m, n, n, np, a.data(), pool);
  InterleaveRowPairs(x, m, k, k, kp, b.data(), pool);
  Gemm(a.data(), 1, np, b.data(), kp, m2, dw, n, k, /*accumulate=*/true, pool);
}

}  // namespace ropekit::ops
