// Qwen2-VL-family position ids (see include/ropekit/vl_positions.h).
//
// Dimension legend: T = tokens; axes 0 = temporal, 1 = height, 2 = width.
#include "ropekit/vl_positions.h"

#include <algorithm>
#include <string>

#include "ropekit/error.h"

namespace ropekit {

VlPositions QwenVlPositionIds(std::span<const int64_t> input_ids,
                              std::span<const VisionGrid> image_grids,
                              std::span<const VisionGrid> video_grids,
                              const VlPositionOptions& options) {
  const int64_t m = options.spatial_merge_size;
  if (m < 1) throw Error("spatial_merge_size must be >= 1");
  if (!options.video_second_per_grid.empty() &&
      options.video_second_per_grid.size() != video_grids.size()) {
    throw Error("video_second_per_grid has " +
                std::to_string(options.video_second_per_grid.size()) + " entries but there are " +
                std::to_string(video_grids.size()) + " video grids");
  }
  const int64_t T = static_cast<int64_t>(input_ids.size());
  VlPositions out;
  out.num_tokens = T;
  out.ids.assign(static_cast<size_t>(3 * T), 0);
  int64_t next = 0;  // largest position so far + 1
  size_t image = 0, video = 0;
  auto set = [&](int64_t t, int64_t pt, int64_t ph, int64_t pw) {
    out.ids[t] = pt;
    out.ids[T + t] = ph;
    out.ids[2 * T + t] = pw;
    next = std::max(next, std::max(pt, std::max(ph, pw)) + 1);
  };
  int64_t t = 0;
  while (t < T) {
    const int64_t id = input_ids[t];
    const bool is_image = id == options.image_token_id;
    const bool is_video = !is_image && id == options.video_token_id;
    if (!is_image && !is_video) {
      set(t, next, next, next);
      ++t;
      continue;
    }
    const char* kind = is_image ? "image" : "video";
    const size_t index = is_image ? image++ : video++;
    const std::span<const VisionGrid> grids = is_image ? image_grids : video_grids;
    if (index >= grids.size()) {
      throw Error(std::string("token ") + std::to_string(t) + " starts " + kind + " " +
                  std::to_string(index) + " but only " + std::to_string(grids.size()) + " " + kind +
                  " grids were given");
    }
    const VisionGrid& g = grids[index];
    if (g.t < 1 || g.h < 1 || g.w < 1 || g.h % m != 0 || g.w % m != 0) {
      throw Error(std::string(kind) + " grid " + std::to_string(index) + " (" +
                  std::to_string(g.t) + ", " + std::to_string(g.h) + ", " + std::to_string(g.w) +
                  "): t, h, w must be >= 1 and h, w multiples of spatial_merge_size " +
                  std::to_string(m));
    }
    const int64_t gh = g.h / m, gw = g.w / m;
    const int64_t count = g.t * gh * gw;
    // The item takes the next `count` tokens (adjacent items are told apart by their grids).
    int64_t run = 0;
    while (run < count && t + run < T && input_ids[t + run] == id) ++run;
    if (run != count) {
      throw Error(std::string(kind) + " " + std::to_string(index) + " at token " +
                  std::to_string(t) + " has only " + std::to_string(run) +
                  " tokens but its grid (" + std::to_string(g.t) + ", " + std::to_string(g.h) +
                  ", " + std::to_string(g.w) + ") with spatial_merge_size " + std::to_string(m) +
                  " needs " + std::to_string(count));
    }
    const int64_t st = next;
    const bool scaled = is_video && !options.video_second_per_grid.empty();
    for (int64_t k = 0; k < count; ++k) {
      const int64_t ti = k / (gh * gw), hi = k / gw % gh, wi = k % gw;
      // Qwen2.5-VL: long(t_idx * second_per_grid_t * tokens_per_second) truncates toward zero.
      const int64_t tt = scaled ? static_cast<int64_t>(static_cast<double>(ti) *
                                                       options.video_second_per_grid[index] *
                                                       options.tokens_per_second)
                                : ti;
      set(t + k, st + tt, st + hi, st + wi);
    }
    t += count;
  }
  if (image != image_grids.size() || video != video_grids.size()) {
    throw Error("the tokens hold " + std::to_string(image) + " images and " +
                std::to_string(video) + " videos but " + std::to_string(image_grids.size()) +
                " image grids and " + std::to_string(video_grids.size()) +
                " video grids were given");
  }
  out.rope_delta = next - T;
  return out;
}

}  // namespace ropekit
