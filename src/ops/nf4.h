// 4-bit NormalFloat (NF4) weights with double-quantized block scales, as QLoRA stores its frozen
// base (Dettmers et al. 2023, arXiv:2305.14314, section 3; bitsandbytes functional.py:
// quantize_4bit / dequantize_4bit with quant_type "nf4", blocksize 64, compress_statistics).
//
// Dimension legend: n = elements of the matrix (row-major [out, in], flattened), blocks of
// kNf4Block = 64 elements (the last one may be shorter), scale blocks of kScaleBlock = 256
// first-level scales.
//
//   per block b:       absmax_b = max |w_i|, q_i = nearest NF4 code of w_i / absmax_b (a value on
//                      a midpoint takes the lower code, as torch.bucketize in bitsandbytes'
//                      reference backend); codes packed two per byte, even index in the high
//                      nibble.
//   double quant:      c = mean_b(absmax_b); absmax_b - c quantized blockwise (256 per block,
//                      absmax scaling) to bitsandbytes' signed 8-bit dynamic map
//                      (create_dynamic_map(signed=True)): one byte per block scale, one float32
//                      absmax per 256 scales, one float32 c per matrix.
//   dequantize:        w_i = NF4[q_i] * (DYN8[s_b] * absmax2_(b / 256) + c), float32.
//
// Storage: n / 2 bytes of codes + ceil(n / 64) bytes of scales + 4 ceil(n / 16384) + 4 bytes, i.e.
// 4 + 8 / 64 + 32 / (64 * 256) = 4.127 bits per weight (the paper's 4.127, section 3).
#ifndef ROPEKIT_SRC_OPS_NF4_H_
#define ROPEKIT_SRC_OPS_NF4_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "ropekit/thread_pool.h"

namespace ropekit::ops {

inline constexpr int64_t kNf4Block = 64;
inline constexpr int64_t kScaleBlock = 256;

// The 16 NF4 code values of bitsandbytes (get_4bit_type("nf4"); QLoRA appendix E), ascending.
const std::array<float, 16>& Nf4Codes();
// bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True, max_exponent_bits=7,
// total_bits=8)): 256 values in [-1, 1], ascending.
const std::array<float, 256>& Dynamic8Codes();

struct Nf4Tensor {
  int64_t rows = 0, cols = 0;        // [out, in]
  std::vector<uint8_t> codes;        // ceil(n / 2): two 4-bit codes per byte
  std::vector<uint8_t> scale_codes;  // one per 64-block: 8-bit code of absmax_b - offset
  std::vector<float> scale_absmax;   // one per 256 scale codes
  float scale_offset = 0.0f;         // mean of the first-level absmax values
  int64_t size() const { return rows * cols; }
  int64_t bytes() const;  // storage of the four parts above
};

// Quantizes w [rows, cols] (row-major).
Nf4Tensor QuantizeNf4(const float* w, int64_t rows, int64_t cols);
// The first-level scale of block b after double quantization.
float Nf4BlockScale(const Nf4Tensor& t, int64_t block);
// Dequantizes rows [row0, row0 + nrows) into out [nrows, cols].
void DequantizeNf4Rows(const Nf4Tensor& t, int64_t row0, int64_t nrows, float* out);
// Dequantizes the whole matrix into out [rows, cols], split over the pool by rows.
void DequantizeNf4(const Nf4Tensor& t, float* out, ThreadPool* pool);

}  // namespace ropekit::ops

#endif  // ROPEKIT_SRC_OPS_NF4_H_
