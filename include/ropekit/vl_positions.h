// ropekit: multimodal position ids for Qwen2-VL-family models (M-RoPE, arXiv:2409.12191), with
// the semantics of transformers' `Qwen2VLForConditionalGeneration.get_rope_index`:
//  - a text run of n tokens gets positions st, st + 1, ..., st + n - 1 on all three axes
//    (temporal, height, width), where st = (largest position so far) + 1, or 0 at the start;
//  - a vision item with grid (t, h, w) from the processor occupies t * (h / m) * (w / m) tokens
//    (m = spatial_merge_size), enumerated t-major, then h, then w, at positions
//    (t_idx, h_idx, w_idx) + st, where st is the start its preceding text run would continue at;
//  - so text after an image continues after the image's largest position, not after its token
//    count;
//  - rope_delta = (largest position + 1) - T: decoding token T + j gets T + j + rope_delta on
//    every axis.
// Qwen2.5-VL scales the temporal index of videos by seconds per grid step times
// tokens_per_second, truncated toward zero. Qwen3-VL passes one grid per video frame (t = 1),
// with timestamps as text. One sequence without padding per call.
//
// Dimension legend: T = tokens, A = 3 axes.
#ifndef ROPEKIT_VL_POSITIONS_H_
#define ROPEKIT_VL_POSITIONS_H_

#include <cstdint>
#include <span>
#include <vector>

namespace ropekit {

struct VisionGrid {
  int64_t t = 1;  // temporal patches
  int64_t h = 0;  // height patches (before the spatial merge)
  int64_t w = 0;  // width patches (before the spatial merge)
};

struct VlPositionOptions {
  int64_t image_token_id = -1;
  int64_t video_token_id = -1;
  int64_t spatial_merge_size = 2;
  // Qwen2.5-VL: seconds per temporal grid step of each video (empty: Qwen2-VL, index t_idx).
  std::vector<double> video_second_per_grid;
  double tokens_per_second = 0;
};

struct VlPositions {
  int64_t num_tokens = 0;    // T
  std::vector<int64_t> ids;  // [3, T], axis-major: ids[a * T + t]
  int64_t rope_delta = 0;    // max position + 1 - T
  std::span<const int64_t> axis(int a) const {
    return std::span<const int64_t>(ids).subspan(static_cast<size_t>(a * num_tokens),
                                                 static_cast<size_t>(num_tokens));
  }
};

// Builds the [3, T] position ids of one token sequence. Images and videos are consumed in order
// of appearance (image_grids for runs of image_token_id, video_grids for video_token_id). Throws
// Error when a run's length differs from its grid's token count, when grids and runs do not
// match in number, or when a grid's h or w is not a multiple of spatial_merge_size.
VlPositions QwenVlPositionIds(std::span<const int64_t> input_ids,
                              std::span<const VisionGrid> image_grids,
                              std::span<const VisionGrid> video_grids,
                              const VlPositionOptions& options);

}  // namespace ropekit

#endif  // ROPEKIT_VL_POSITIONS_H_
