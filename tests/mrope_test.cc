// Multimodal / N-axis RoPE (M-RoPE) through the public API:
//  - against an independent float64 implementation written here from transformers' semantics
//    (`apply_multimodal_rotary_pos_emb`: cos/sin of every axis over the full head, split into
//    mrope_section * 2 channel chunks, chunk j from axis j mod A; `apply_interleaved_mrope`:
//    start from axis 0, axis a overwrites pairs a, a + A, ... below A * s_a);
//  - bit-identical to one-axis RoPE when every axis carries the same positions;
//  - the relative property per axis: <R(m) q, R(n) k> depends on n - m on every axis;
//  - configs (Qwen2-VL rope_scaling mrope, Qwen3-VL text_config / rope_parameters);
//  - the Qwen2-VL position ids of get_rope_index on worked examples derived by hand.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ropekit/half.h"
#include "ropekit/hf_config.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "ropekit/vl_positions.h"

namespace ropekit {
namespace {

using ::testing::HasSubstr;

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// transformers-style oracle for one head of one token, float64: emb = cat(freqs, freqs) per axis
// (half-split channel c uses pair c mod N), the axis of each channel chosen as transformers does,
// then x * cos + rotate_half(x) * sin. `layout` kInterleaved maps pair i to channels 2i, 2i + 1
// with the same axis choice per pair.
void OracleHead(const double* x, double* y, const std::vector<double>& inv_freq, double attn,
                const std::vector<std::vector<int64_t>>& pos, int64_t t,
                const std::vector<int>& sections, bool interleaved, Layout layout, int head_dim) {
  const int n = static_cast<int>(inv_freq.size());
  const int num_axes = static_cast<int>(pos.size());
  // Axis per pair.
  std::vector<int> axis(n, 0);
  if (num_axes > 1 && !interleaved) {
    // Chunks of the full channel dim: sections twice over; chunk j takes axis j mod A.
    std::vector<int> chunks = sections;
    chunks.insert(chunks.end(), sections.begin(), sections.end());
    int c = 0;
    for (size_t j = 0; j < chunks.size(); ++j) {
      for (int k = 0; k < chunks[j]; ++k, ++c) {
        if (c < n) axis[c] = static_cast<int>(j % num_axes);
        // The second copy (channels n..2n) must agree with the first.
        if (c >= n) EXPECT_EQ(axis[c - n], static_cast<int>(j % num_axes));
      }
    }
  } else if (num_axes > 1) {
    for (int a = 1; a < num_axes; ++a) {
      for (int i = a; i < num_axes * sections[a]; i += num_axes) axis[i] = a;
    }
  }
  for (int i = 0; i < n; ++i) {
    const double theta = static_cast<double>(pos[axis[i]][t]) * inv_freq[i];
    const double c = attn * std::cos(theta), s = attn * std::sin(theta);
    const int ia = layout == Layout::kHalfSplit ? i : 2 * i;
    const int ib = layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
    y[ia] = x[ia] * c - x[ib] * s;
    y[ib] = x[ib] * c + x[ia] * s;
  }
  for (int k = 2 * n; k < head_dim; ++k) y[k] = x[k];
}

double Load(const std::vector<uint8_t>& buf, DType dtype, size_t k) {
  switch (dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, buf.data() + 4 * k, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, buf.data() + 2 * k, 2);
      return Bf16ToFloat(h);
    }
    default: {
      uint16_t h;
      std::memcpy(&h, buf.data() + 2 * k, 2);
      return F16ToFloat(h);
    }
  }
}

std::vector<uint8_t> Encode(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out(v.size() * DTypeSize(dtype));
  for (size_t k = 0; k < v.size(); ++k) {
    if (dtype == DType::kF32) {
      std::memcpy(out.data() + 4 * k, &v[k], 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(v[k]) : FloatToF16(v[k]);
      std::memcpy(out.data() + 2 * k, &h, 2);
    }
  }
  return out;
}

double HalfUlp(DType dtype, double v) {
  const int bits = dtype == DType::kF32 ? 24 : dtype == DType::kBF16 ? 8 : 11;
  const int min_exp = dtype == DType::kF16 ? -14 : -126;
  const int e = std::max(v > 0 ? std::ilogb(v) : min_exp, min_exp);
  return std::ldexp(1.0, e - bits);
}

struct MCase {
  RopeParams params;
  std::vector<int> sections;
  bool interleaved;
};

RopeParams Params(RopeType type, int head_dim, double base) {
  RopeParams p;
  p.type = type;
  p.head_dim = head_dim;
  p.rotary_dim = head_dim;
  p.base = base;
  p.max_position_embeddings = 32768;
  if (type == RopeType::kYarn) {
    p.factor = 4;
    p.original_max_position_embeddings = 8192;
  } else if (type == RopeType::kLinear) {
    p.factor = 2;
  }
  return p;
}

TEST(MRope, MatchesFloat64OracleEveryDtypeLayoutDirectionScaling) {
  const MCase cases[] = {
      {Params(RopeType::kDefault, 128, 1e6), {16, 24, 24}, false},  // Qwen2-VL-7B
      {Params(RopeType::kDefault, 128, 5e6), {24, 20, 20}, true},   // Qwen3-VL
      {Params(RopeType::kYarn, 128, 1e6), {16, 24, 24}, false},     // YaRN: A != 1
      {Params(RopeType::kLinear, 64, 1e4), {16, 16}, false},        // 2-D axial halves
      {Params(RopeType::kYarn, 96, 1e4), {16, 16, 16}, true},       // interleaved + A != 1
      {Params(RopeType::kDefault, 40, 1e4), {3, 5, 4, 8}, false},   // 4 axes, odd counts
  };
  const int64_t T = 23, H = 3;
  std::mt19937 rng(7);
  for (const MCase& c : cases) {
    const RopeFrequencies freq = ComputeFrequencies(c.params, Numerics::kExact);
    const RopeTable table(freq, 512);
    const int D = c.params.head_dim, n = D / 2;
    const int A = static_cast<int>(c.sections.size());
    std::vector<std::vector<int64_t>> pos(A, std::vector<int64_t>(T));
    for (auto& axis : pos) {
      for (auto& p : axis) p = rng() % 100000;
      axis[0] = 0;
      axis[1] = 300;    // in the table
      axis[2] = 70000;  // on the fly
    }
    std::vector<PositionSpan> spans(pos.begin(), pos.end());
    const RopeAxes axes{c.sections, c.interleaved};
    const std::vector<float> x = RandomFloats(T * H * D, rng());
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
        for (Direction dir : {Direction::kForward, Direction::kBackward}) {
          for (Backend backend : {Backend::kSimd, Backend::kReference}) {
            const std::vector<uint8_t> in = Encode(x, dtype);
            std::vector<uint8_t> out(in.size());
            const RopeOperand op{ContiguousView(const_cast<uint8_t*>(in.data()), dtype, T, H, D),
                                 ContiguousView(out.data(), dtype, T, H, D)};
            RotateOptions options;
            options.layout = layout;
            options.direction = dir;
            options.backend = backend;
            ApplyRope(table, AxisPositions{spans}, axes, std::span<const RopeOperand>(&op, 1),
                      options);
            std::vector<double> xd(D), yd(D);
            for (int64_t t = 0; t < T; ++t) {
              for (int64_t h = 0; h < H; ++h) {
                const size_t off = (t * H + h) * D;
                for (int k = 0; k < D; ++k) xd[k] = Load(in, dtype, off + k);
                // Backward = forward with negated angles: transpose of the rotation.
                OracleHead(xd.data(), yd.data(), freq.inv_freq, freq.attention_factor, pos, t,
                           c.sections, c.interleaved, layout, D);
                if (dir == Direction::kBackward) {
                  // R(p)^T x: rotate by the negated angle, i.e. apply the oracle with -sin.
                  std::vector<double> xr = xd;
                  for (int i = 0; i < n; ++i) {
                    const int ia = layout == Layout::kHalfSplit ? i : 2 * i;
                    const int ib = layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
                    xr[ib] = -xd[ib];  // conj: R(-t) x = S R(t) S x with S = diag(1, -1)
                  }
                  OracleHead(xr.data(), yd.data(), freq.inv_freq, freq.attention_factor, pos, t,
                             c.sections, c.interleaved, layout, D);
                  for (int i = 0; i < n; ++i) {
                    const int ib = layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
                    yd[ib] = -yd[ib];
                  }
                }
                // Bound: table entries (A cos, A sin rounded once to float32 from a value
                // accurate to ~1e-15) are off by at most 2^-24 A; float32 arithmetic adds
                // 2^-23 (|x_a c| + |x_b s|) (one product rounding and one fused add); the
                // 16-bit store adds half an ulp of the result.
                for (int i = 0; i < n; ++i) {
                  const int ia = layout == Layout::kHalfSplit ? i : 2 * i;
                  const int ib = layout == Layout::kHalfSplit ? i + n : 2 * i + 1;
                  const double mag = freq.attention_factor * (std::abs(xd[ia]) + std::abs(xd[ib]));
                  for (int k : {ia, ib}) {
                    const double tab = std::ldexp(mag, -24) * 1.01;
                    const double arith = std::ldexp(mag, -23) * 1.01;
                    const double tol = tab + arith + HalfUlp(dtype, std::abs(yd[k]) + tab + arith);
                    ASSERT_NEAR(Load(out, dtype, off + k), yd[k], tol)
                        << axes.Describe() << " " << DTypeName(dtype) << " " << LayoutName(layout)
                        << " dir " << static_cast<int>(dir) << " backend "
                        << static_cast<int>(backend) << " t " << t << " h " << h << " ch " << k;
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(MRope, EqualAxesAreBitIdenticalToTextRope) {
  RopeParams p = Params(RopeType::kYarn, 128, 1e6);
  const RopeTable table(ComputeFrequencies(p, Numerics::kExact), 64);
  const int64_t T = 37, H = 5, D = 128;
  std::vector<int64_t> pos(T);
  std::mt19937 rng(3);
  for (auto& v : pos) v = rng() % 5000;  // rows both in the table and past it
  pos[0] = 2147483647;
  const std::vector<float> x = RandomFloats(T * H * D, 11);
  ThreadPool pool(2);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (Layout layout : {Layout::kHalfSplit, Layout::kInterleaved}) {
      for (const RopeAxes& axes : {RopeAxes{{16, 24, 24}, false}, RopeAxes{{24, 20, 20}, true},
                                   RopeAxes{{32, 32}, false}}) {
        const std::vector<uint8_t> in = Encode(x, dtype);
        std::vector<uint8_t> text(in.size()), multi(in.size());
        RotateOptions options;
        options.layout = layout;
        options.pool = &pool;
        options.min_parallel_bytes = 0;  // split even this small call
        const RopeOperand op_text{ContiguousView(const_cast<uint8_t*>(in.data()), dtype, T, H, D),
                                  ContiguousView(text.data(), dtype, T, H, D)};
        ApplyRope(table, PositionSpan(pos), std::span<const RopeOperand>(&op_text, 1), options);
        std::vector<PositionSpan> spans(axes.num_axes(), PositionSpan(pos));
        const RopeOperand op_multi{op_text.in, ContiguousView(multi.data(), dtype, T, H, D)};
        ApplyRope(table, AxisPositions{spans}, axes, std::span<const RopeOperand>(&op_multi, 1),
                  options);
        ASSERT_EQ(text, multi) << axes.Describe() << " " << DTypeName(dtype);
      }
    }
  }
}

TEST(MRope, RelativePropertyPerAxis) {
  // <R(m) q, R(n) k> depends only on n - m per axis: shifting one axis's positions of q and k by
  // the same amount leaves the score unchanged up to rounding; a different offset on that axis
  // alone changes it. Rounding: each rotated channel errs by <= 3 * 2^-24 (|x_a| + |x_b|) (table
  // entry + product + fused add), so one score errs by <= sum_c |dq_c| |k_c| + |q_c| |dk_c|
  // <= 2 * 3 sqrt(2) * sqrt(2) * 2^-24 |q| |k| = 12 * 2^-24 |q| |k| (Cauchy-Schwarz over pairs);
  // the difference of two scores by twice that.
  RopeParams p = Params(RopeType::kDefault, 64, 100.0);  // base 100: every axis turns visibly
  const RopeTable table(ComputeFrequencies(p, Numerics::kExact));
  const RopeAxes axes{{8, 12, 12}, false};
  const int D = 64;
  const std::vector<float> q = RandomFloats(D, 5), k = RandomFloats(D, 6);
  auto score = [&](std::vector<int64_t> pq, std::vector<int64_t> pk) {
    std::vector<float> rq = q, rk = k;
    for (auto [v, pp] : {std::pair{&rq, &pq}, std::pair{&rk, &pk}}) {
      std::vector<std::vector<int64_t>> per_axis;
      for (int64_t x : *pp) per_axis.push_back({x});
      std::vector<PositionSpan> spans(per_axis.begin(), per_axis.end());
      const TensorView view = ContiguousView(v->data(), DType::kF32, 1, 1, D);
      const RopeOperand op{view, view};
      ApplyRope(table, AxisPositions{spans}, axes, std::span<const RopeOperand>(&op, 1));
    }
    double s = 0;
    for (int c = 0; c < D; ++c) s += double{rq[c]} * rk[c];
    return s;
  };
  double qn = 0, kn = 0;
  for (int c = 0; c < D; ++c) {
    qn += double{q[c]} * q[c];
    kn += double{k[c]} * k[c];
  }
  const double tol = 24 * std::ldexp(1.0, -24) * std::sqrt(qn * kn);
  const double base = score({3, 10, 20}, {7, 4, 25});
  for (int axis = 0; axis < 3; ++axis) {
    std::vector<int64_t> pq = {3, 10, 20}, pk = {7, 4, 25};
    pq[axis] += 1000;
    pk[axis] += 1000;
    EXPECT_NEAR(score(pq, pk), base, tol) << "axis " << axis;
    pk[axis] += 300;  // a different offset on this axis alone changes the score
    EXPECT_GT(std::abs(score(pq, pk) - base), 100 * tol) << "axis " << axis;
  }
}

TEST(MRope, PairAxesRules) {
  EXPECT_EQ(RopeAxes{}.PairAxes(4), (std::vector<uint8_t>{0, 0, 0, 0}));
  EXPECT_EQ((RopeAxes{{1, 2, 3}, false}.PairAxes(6)), (std::vector<uint8_t>{0, 1, 1, 2, 2, 2}));
  // Interleaved [3, 2, 2] over 7 pairs: T H W T H W T (pairs 6 and beyond: T).
  EXPECT_EQ((RopeAxes{{3, 2, 2}, true}.PairAxes(7)), (std::vector<uint8_t>{0, 1, 2, 0, 1, 2, 0}));
  // Qwen3-VL [24, 20, 20] over 64 pairs: THW repeated 20 times, then 4 T.
  const std::vector<uint8_t> q3 = RopeAxes{{24, 20, 20}, true}.PairAxes(64);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(q3[i], i < 60 ? i % 3 : 0) << i;
  EXPECT_THAT(([] {
                RopeAxes{{16, 24, 23}, false}.PairAxes(64);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("sum to 63")));
  EXPECT_THAT(([] {
                RopeAxes{{0, 32, 32}, false}.PairAxes(64);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("sections[0] = 0")));
  EXPECT_THAT(([] {
                RopeAxes{{4, 30, 30}, true}.PairAxes(64);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("needs 3 * 30 = 90")));
}

TEST(MRope, ArgumentErrors) {
  const RopeTable table(ComputeFrequencies(Params(RopeType::kDefault, 8, 1e4), Numerics::kExact));
  std::vector<float> x(2 * 8);
  const TensorView view = ContiguousView(x.data(), DType::kF32, 2, 1, 8);
  const RopeOperand op{view, view};
  const std::vector<int64_t> a = {0, 1}, b = {0, 1, 2}, bad = {0, -1};
  const RopeAxes axes{{1, 1, 2}, false};
  std::vector<PositionSpan> two = {PositionSpan(a), PositionSpan(a)};
  EXPECT_THAT(([&] {
                ApplyRope(table, AxisPositions{two}, axes, {&op, 1});
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("positions have 2 axes")));
  std::vector<PositionSpan> ragged = {PositionSpan(a), PositionSpan(b), PositionSpan(a)};
  EXPECT_THAT(([&] {
                ApplyRope(table, AxisPositions{ragged}, axes, {&op, 1});
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("axis 1 has 3 entries")));
  std::vector<PositionSpan> negative = {PositionSpan(a), PositionSpan(a), PositionSpan(bad)};
  EXPECT_THAT(([&] {
                ApplyRope(table, AxisPositions{negative}, axes, {&op, 1});
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("positions[2][1] = -1")));
}

TEST(MRopeConfig, Qwen2VlRopeScalingMrope) {
  const HfRopeConfig c = ParseHfConfig(R"({
    "model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
    "num_key_value_heads": 4, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})");
  EXPECT_EQ(c.params.type, RopeType::kDefault);
  EXPECT_EQ(c.params.head_dim, 128);
  EXPECT_EQ(c.axes.sections, (std::vector<int>{16, 24, 24}));
  EXPECT_FALSE(c.axes.interleaved);
  EXPECT_THAT(
      ([] {
        ParseHfConfig(R"({"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
      "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 20]}})");
      }),
      ::testing::ThrowsMessage<Error>(HasSubstr("rope_scaling.mrope_section: sections")));
  EXPECT_THAT(
      ([] {
        ParseHfConfig(R"({"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
      "rope_theta": 1e6, "rope_scaling": {"type": "mrope"}})");
      }),
      ::testing::ThrowsMessage<Error>(HasSubstr("rope_scaling.mrope_section is required")));
}

TEST(MRopeConfig, Qwen3VlTextConfigAndRopeParameters) {
  const HfRopeConfig c = ParseHfConfig(R"({
    "model_type": "qwen3_vl",
    "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "head_dim": 128,
      "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 262144,
      "rope_theta": 5000000,
      "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                       "mrope_interleaved": true}},
    "vision_config": {"hidden_size": 1152, "num_heads": 16}})");
  EXPECT_EQ(c.model_type, "qwen3_vl_text");
  EXPECT_EQ(c.params.base, 5000000);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.axes.sections, (std::vector<int>{24, 20, 20}));
  EXPECT_TRUE(c.axes.interleaved);
  const HfRopeConfig v5 = ParseHfConfig(R"({
    "model_type": "qwen3_vl",
    "text_config": {"hidden_size": 2048, "head_dim": 128, "num_attention_heads": 16,
      "rope_parameters": {"rope_type": "default", "rope_theta": 5000000,
                          "mrope_section": [24, 20, 20], "mrope_interleaved": true}}})");
  EXPECT_EQ(v5.model_type, "qwen3_vl");
  EXPECT_TRUE(v5.axes.interleaved);
  EXPECT_EQ(v5.axes.sections, (std::vector<int>{24, 20, 20}));
  // Text-only configs have one axis.
  const HfRopeConfig text = ParseHfConfig(R"({"model_type": "llama", "hidden_size": 64,
    "num_attention_heads": 2, "rope_theta": 10000})");
  EXPECT_FALSE(text.axes.multimodal());
}

// get_rope_index worked examples (derived by hand from the rules in vl_positions.h).
TEST(VlPositions, VideoThenTextDocstringExample) {
  // A video with grid (3, 4, 4) and spatial merge 2: 3 x 2 x 2 = 12 tokens, then 5 text tokens.
  std::vector<int64_t> ids(12, 99);
  for (int k = 0; k < 5; ++k) ids.push_back(1);
  VlPositionOptions o;
  o.video_token_id = 99;
  o.image_token_id = 98;
  const VisionGrid video{3, 4, 4};
  const VlPositions p = QwenVlPositionIds(ids, {}, {&video, 1}, o);
  const std::vector<int64_t> t = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7};
  const std::vector<int64_t> h = {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 3, 4, 5, 6, 7};
  const std::vector<int64_t> w = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 3, 4, 5, 6, 7};
  EXPECT_EQ(std::vector<int64_t>(p.axis(0).begin(), p.axis(0).end()), t);
  EXPECT_EQ(std::vector<int64_t>(p.axis(1).begin(), p.axis(1).end()), h);
  EXPECT_EQ(std::vector<int64_t>(p.axis(2).begin(), p.axis(2).end()), w);
  EXPECT_EQ(p.rope_delta, 8 - 17);
}

TEST(VlPositions, ImageInTheMiddleAndTwoAdjacentImages) {
  // Text "a <vision_start>", image grid (1, 4, 6) -> 1 x 2 x 3 = 6 tokens, then 3 text tokens.
  // Text 0, 1; image starts at 2: t = 2; h = 2, 2, 2, 3, 3, 3; w = 2, 3, 4, 2, 3, 4;
  // text continues at max + 1 = 5: 5, 6, 7. delta = 8 - 11 = -3.
  std::vector<int64_t> ids = {10, 11, 7, 7, 7, 7, 7, 7, 12, 13, 14};
  VlPositionOptions o;
  o.image_token_id = 7;
  const VisionGrid g{1, 4, 6};
  const VlPositions p = QwenVlPositionIds(ids, {&g, 1}, {}, o);
  EXPECT_EQ(std::vector<int64_t>(p.axis(0).begin(), p.axis(0).end()),
            (std::vector<int64_t>{0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7}));
  EXPECT_EQ(std::vector<int64_t>(p.axis(1).begin(), p.axis(1).end()),
            (std::vector<int64_t>{0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7}));
  EXPECT_EQ(std::vector<int64_t>(p.axis(2).begin(), p.axis(2).end()),
            (std::vector<int64_t>{0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(p.rope_delta, -3);
  // Two adjacent 2 x 2 images (grids (1, 4, 4)): the second starts at max + 1 of the first.
  // First: t 0, h 0 0 1 1, w 0 1 0 1 (max 1); second at 2: t 2, h 2 2 3 3, w 2 3 2 3.
  const std::vector<int64_t> two(8, 7);
  const VisionGrid grids[] = {{1, 4, 4}, {1, 4, 4}};
  const VlPositions q = QwenVlPositionIds(two, grids, {}, o);
  EXPECT_EQ(std::vector<int64_t>(q.axis(0).begin(), q.axis(0).end()),
            (std::vector<int64_t>{0, 0, 0, 0, 2, 2, 2, 2}));
  EXPECT_EQ(std::vector<int64_t>(q.axis(1).begin(), q.axis(1).end()),
            (std::vector<int64_t>{0, 0, 1, 1, 2, 2, 3, 3}));
  EXPECT_EQ(std::vector<int64_t>(q.axis(2).begin(), q.axis(2).end()),
            (std::vector<int64_t>{0, 1, 0, 1, 2, 3, 2, 3}));
  EXPECT_EQ(q.rope_delta, 4 - 8);
}

TEST(VlPositions, Qwen25TimeScaledVideoAndErrors) {
  // Qwen2.5-VL: t index = long(t_idx * second_per_grid * tokens_per_second) = long(t * 0.5 * 2.5)
  // = 0, 1, 2 (1.25 -> 1, 2.5 -> 2) for a (3, 2, 2) grid with merge 2 (one token per frame).
  std::vector<int64_t> ids = {5, 9, 9, 9};
  VlPositionOptions o;
  o.video_token_id = 9;
  o.video_second_per_grid = {0.5};
  o.tokens_per_second = 2.5;
  const VisionGrid g{3, 2, 2};
  const VlPositions p = QwenVlPositionIds(ids, {}, {&g, 1}, o);
  EXPECT_EQ(std::vector<int64_t>(p.axis(0).begin(), p.axis(0).end()),
            (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(std::vector<int64_t>(p.axis(1).begin(), p.axis(1).end()),
            (std::vector<int64_t>{0, 1, 1, 1}));
  EXPECT_THAT(([&] {
                QwenVlPositionIds(std::vector<int64_t>{9, 9}, {}, {&g, 1}, o);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("has only 2 tokens")));
  EXPECT_THAT(([&] { QwenVlPositionIds(ids, {}, {}, o); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("video_second_per_grid has 1 entries")));
  const VisionGrid odd{1, 3, 2};
  o.video_second_per_grid.clear();
  EXPECT_THAT(([&] { QwenVlPositionIds(ids, {}, {}, o); }),
              ::testing::ThrowsMessage<Error>(HasSubstr("only 0 video grids")));
  EXPECT_THAT(([&] {
                QwenVlPositionIds(ids, {}, {&odd, 1}, o);
              }),
              ::testing::ThrowsMessage<Error>(HasSubstr("multiples of spatial_merge_size")));
}

}  // namespace
}  // namespace ropekit
