// NF4 quantization with double-quantized block scales (see nf4.h for the formulas and sources).
//
// Dimension legend: n = matrix elements, b = 64-element block, s = 256-scale block.
#include "src/ops/nf4.h"

#include <algorithm>
#include <cmath>

#include "ropekit/error.h"

namespace ropekit::ops {
namespace {

// torch.linspace(start, end, steps) in float32 as PyTorch's CPU kernel computes it: the first
// half as start + i * step, the second half as end - (steps - 1 - i) * step.
std::vector<float> LinspaceF32(float start, float end, int steps) {
  std::vector<float> out(steps);
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int half = steps / 2;
  for (int i = 0; i < steps; ++i) {
    out[i] = i < half ? start + step * static_cast<float>(i)
                      : end - step * static_cast<float>(steps - 1 - i);
  }
  return out;
}

std::array<float, 256> MakeDynamic8() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent i in 0..6,
  // 2^i + 1 linspace(0.1, 1) boundaries, their 2^i midpoints times 10^(i - 6), both signs; then
  // 0 and 1; sorted. 2 * 127 + 2 = 256 values.
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const std::vector<float> b = LinspaceF32(0.1f, 1.0f, (1 << i) + 1);
    const float p = static_cast<float>(std::pow(10.0, i - 6));
    for (size_t k = 0; k + 1 < b.size(); ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(p * mean);
      data.push_back(-p * mean);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

uint8_t NearestNf4(float x) {
  // Midpoints between adjacent codes; x on a midpoint takes the lower code (bucketize,
  // right=False).
  const std::array<float, 16>& c = Nf4Codes();
  uint8_t q = 0;
  while (q < 15 && x > (c[q] + c[q + 1]) / 2.0f) ++q;
  return q;
}

uint8_t NearestDynamic8(float x) {
  // argmin |code - x|, the lower index on ties (torch.argmin returns the first minimum).
  const std::array<float, 256>& c = Dynamic8Codes();
  const auto it = std::lower_bound(c.begin(), c.end(), x);
  int hi = static_cast<int>(it - c.begin());
  if (hi == 0) return 0;
  if (hi == 256) return 255;
  const int lo = hi - 1;
  return static_cast<uint8_t>(std::fabs(c[lo] - x) <= std::fabs(c[hi] - x) ? lo : hi);
}

}  // namespace

const std::array<float, 16>& Nf4Codes() {
  // bitsandbytes functional.py, get_4bit_type("nf4") (QLoRA appendix E).
  static const std::array<float, 16> kCodes = {-1.0f,
                                               -0.6961928009986877f,
                                               -0.5250730514526367f,
                                               -0.39491748809814453f,
                                               -0.28444138169288635f,
                                               -0.18477343022823334f,
                                               -0.09105003625154495f,
                                               0.0f,
                                               0.07958029955625534f,
                                               0.16093020141124725f,
                                               0.24611230194568634f,
                                               0.33791524171829224f,
                                               0.44070982933044434f,
                                               0.5626170039176941f,
                                               0.7229568362236023f,
                                               1.0f};
  return kCodes;
}

const std::array<float, 256>& Dynamic8Codes() {
  static const std::array<float, 256> kCodes = MakeDynamic8();
  return kCodes;
}

int64_t Nf4Tensor::bytes() const {
  return static_cast<int64_t>(codes.size() + scale_codes.size() +
                              sizeof(float) * (scale_absmax.size() + 1));
}

Nf4Tensor QuantizeNf4(const float* w, int64_t rows, int64_t cols) {
  if (rows < 1 || cols < 1) throw Error("QuantizeNf4: the matrix must not be empty");
  Nf4Tensor t;
  t.rows = rows;
  t.cols = cols;
  const int64_t n = rows * cols;
  const int64_t nb = (n + kNf4Block - 1) / kNf4Block;
  std::vector<float> absmax(nb);
  t.codes.assign((n + 1) / 2, 0);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * kNf4Block, i1 = std::min(n, i0 + kNf4Block);
    float m = 0.0f;
    for (int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(w[i]));
    m = std::max(m, 1e-38f);  // bitsandbytes clamps absmax to at least 1e-38
    absmax[b] = m;
    for (int64_t i = i0; i < i1; ++i) {
      const float x = std::clamp(w[i] / m, -1.0f, 1.0f);
      const uint8_t q = NearestNf4(x);
      t.codes[i / 2] |= static_cast<uint8_t>(i % 2 == 0 ? q << 4 : q);
    }
  }
  // Double quantization of the scales: offset = mean (in double, rounded once), then 8-bit
  // dynamic codes of absmax - offset in blocks of 256.
  double sum = 0.0;
  for (float a : absmax) sum += a;
  t.scale_offset = static_cast<float>(sum / static_cast<double>(nb));
  const int64_t ns = (nb + kScaleBlock - 1) / kScaleBlock;
  t.scale_codes.resize(nb);
  t.scale_absmax.resize(ns);
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t b0 = s * kScaleBlock, b1 = std::min(nb, b0 + kScaleBlock);
    float m = 0.0f;
    for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(absmax[b] - t.scale_offset));
    m = std::max(m, 1e-38f);  // all scales equal: any code times a tiny absmax recovers them
    t.scale_absmax[s] = m;
    for (int64_t b = b0; b < b1; ++b) {
      t.scale_codes[b] = NearestDynamic8(std::clamp((absmax[b] - t.scale_offset) / m, -1.0f, 1.0f));
    }
  }
  return t;
}

float Nf4BlockScale(const Nf4Tensor& t, int64_t block) {
  return Dynamic8Codes()[t.scale_codes[block]] * t.scale_absmax[block / kScaleBlock] +
         t.scale_offset;
}

void DequantizeNf4Rows(const Nf4Tensor& t, int64_t row0, int64_t nrows, float* out) {
  const std::array<float, 16>& c = Nf4Codes();
  const int64_t i0 = row0 * t.cols, i1 = (row0 + nrows) * t.cols;
  int64_t i = i0;
  while (i < i1) {
    const int64_t b = i / kNf4Block;
    const int64_t end = std::min(i1, (b + 1) * kNf4Block);
    const float scale = Nf4BlockScale(t, b);
    for (; i < end; ++i) {
      const uint8_t byte = t.codes[i / 2];
      out[i - i0] = c[i % 2 == 0 ? byte >> 4 : byte & 15] * scale;
    }
  }
}

void DequantizeNf4(const Nf4Tensor& t, float* out, ThreadPool* pool) {
  constexpr int64_t kRowTile = 32;
  const int64_t tiles = (t.rows + kRowTile - 1) / kRowTile;
  ParallelFor(pool, static_cast<size_t>(tiles), [&](size_t begin, size_t end, size_t) {
    for (size_t k = begin; k < end; ++k) {
      const int64_t r0 = static_cast<int64_t>(k) * kRowTile;
      const int64_t nr = std::min(kRowTile, t.rows - r0);
      DequantizeNf4Rows(t, r0, nr, out + r0 * t.cols);
    }
  });
}

}  // namespace ropekit::ops
