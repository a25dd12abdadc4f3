// Tests of the float32 transformer ops (src/ops) against the scalar double references
// (src/reference/ops.h), of the references against central finite differences, and of thread
// count independence (bitwise).
//
// Tolerances: a float32 sum of n products has error <= n * u * sum|terms| (u = 2^-24, Higham
// "Accuracy and Stability of Numerical Algorithms", eq. 3.5), plus one rounding of each input
// or output; tests bound each element by kSlack * n * u * (sum of |terms|) with kSlack = 2 for
// the final rounding and exp/log evaluated in double. Central differences in double have
// truncation error O(h^2) and rounding O(u64 / h): with h = 1e-5 both are far below 1e-8.
#include "src/ops/ops.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ropekit/thread_pool.h"
#include "src/reference/ops.h"

namespace ropekit {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // float32 unit roundoff
constexpr double kSlack = 2.0;

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

TEST(OpsMatMul, ForwardAndBackwardMatchReferenceAndThreads) {
  const int64_t m = 67, k = 45, n = 301;  // not multiples of the tile sizes
  auto x = Random(m * k, 1), w = Random(n * k, 2), dy = Random(m * n, 3);
  std::vector<float> y(m * n), dx(m * k), dw(n * k, 0.0f);
  ops::MatMul(x.data(), w.data(), y.data(), m, k, n, nullptr);
  ops::MatMulBackwardInput(dy.data(), w.data(), dx.data(), m, k, n, nullptr);
  ops::MatMulBackwardWeight(dy.data(), x.data(), dw.data(), m, k, n, nullptr);
  auto xd = ToDouble(x), wd = ToDouble(w), dyd = ToDouble(dy);
  std::vector<double> yr(m * n), dxr(m * k), dwr(n * k);
  reference::MatMul(xd.data(), wd.data(), yr.data(), m, k, n);
  reference::MatMulBackward(xd.data(), wd.data(), dyd.data(), dxr.data(), dwr.data(), m, k, n);
  // Inputs are in [-1, 1]: sum of |terms| <= length.
  for (int64_t i = 0; i < m * n; ++i) ASSERT_NEAR(y[i], yr[i], kSlack * k * k * kU) << i;
  for (int64_t i = 0; i < m * k; ++i) ASSERT_NEAR(dx[i], dxr[i], kSlack * n * n * kU) << i;
  for (int64_t i = 0; i < n * k; ++i) ASSERT_NEAR(dw[i], dwr[i], kSlack * m * m * kU) << i;

  ThreadPool pool(3);
  std::vector<float> y3(m * n), dx3(m * k), dw3(n * k, 0.0f);
  ops::MatMul(x.data(), w.data(), y3.data(), m, k, n, &pool);
  ops::MatMulBackwardInput(dy.data(), w.data(), dx3.data(), m, k, n, &pool);
  ops::MatMulBackwardWeight(dy.data(), x.data(), dw3.data(), m, k, n, &pool);
  EXPECT_EQ(y, y3);
  EXPECT_EQ(dx, dx3);
  EXPECT_EQ(dw, dw3);

  // accumulate adds to the existing contents.
  std::vector<float> acc(m * n, 1.0f);
  ops::MatMul(x.data(), w.data(), acc.data(), m, k, n, nullptr, true);
  for (int64_t i = 0; i < m * n; ++i) ASSERT_NEAR(acc[i], yr[i] + 1.0, kSlack * (k + 1) * k * kU);
}

TEST(OpsRmsNorm, MatchesReferenceAndFiniteDifferences) {
  const int64_t m = 5, d = 37;
  const double eps = 1e-5;
  auto x = Random(m * d, 4), w = Random(d, 5), dy = Random(m * d, 6);
  std::vector<float> y(m * d), inv(m), dx(m * d), dw(d, 0.0f);
  ops::RmsNorm(x.data(), w.data(), y.data(), inv.data(), m, d, eps, nullptr);
  ops::RmsNormBackward(x.data(), w.data(), inv.data(), dy.data(), dx.data(), dw.data(), m, d,
                       nullptr);
  auto xd = ToDouble(x), wd = ToDouble(w), dyd = ToDouble(dy);
  std::vector<double> yr(m * d), dxr(m * d), dwr(d);
  reference::RmsNorm(xd.data(), wd.data(), yr.data(), m, d, eps);
  reference::RmsNormBackward(xd.data(), wd.data(), dyd.data(), dxr.data(), dwr.data(), m, d, eps);
  // x / rms is O(1) for uniform inputs (rms ~ 0.58): a few roundings of values <= 1 / rms.
  for (int64_t i = 0; i < m * d; ++i) ASSERT_NEAR(y[i], yr[i], 8 * kU * 4.0) << i;
  for (int64_t i = 0; i < m * d; ++i) ASSERT_NEAR(dx[i], dxr[i], kSlack * d * kU * 16.0) << i;
  for (int64_t i = 0; i < d; ++i) ASSERT_NEAR(dw[i], dwr[i], kSlack * m * kU * 4.0) << i;
  // Reference backward against central differences of L = sum(dy * y).
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
    std::vector<double> yy(m * d);
    reference::RmsNorm(xx.data(), ww.data(), yy.data(), m, d, eps);
    double s = 0;
    for (int64_t i = 0; i < m * d; ++i) s += yy[i] * dyd[i];
    return s;
  };
  const double h = 1e-5;
  for (int64_t i = 0; i < m * d; i += 7) {
    auto xp = xd, xm = xd;
    xp[i] += h;
    xm[i] -= h;
    EXPECT_NEAR((loss(xp, wd) - loss(xm, wd)) / (2 * h), dxr[i], 1e-7) << i;
  }
  for (int64_t i = 0; i < d; i += 5) {
    auto wp = wd, wm = wd;
    wp[i] += h;
    wm[i] -= h;
    EXPECT_NEAR((loss(xd, wp) - loss(xd, wm)) / (2 * h), dwr[i], 1e-7) << i;
  }
}

TEST(OpsSwiGlu, MatchesReferenceAndFiniteDifferences) {
  const int64_t n = 9001;
  auto g = Random(n, 7, 6.0f), u = Random(n, 8, 2.0f), dh = Random(n, 9);
  std::vector<float> h(n), dg(n), du(n);
  ops::SwiGlu(g.data(), u.data(), h.data(), n, nullptr);
  ops::SwiGluBackward(g.data(), u.data(), dh.data(), dg.data(), du.data(), n, nullptr);
  auto gd = ToDouble(g), ud = ToDouble(u), dhd = ToDouble(dh);
  std::vector<double> hr(n), dgr(n), dur(n);
  reference::SwiGlu(gd.data(), ud.data(), hr.data(), n);
  reference::SwiGluBackward(gd.data(), ud.data(), dhd.data(), dgr.data(), dur.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    // Float32 evaluation (swiglu_kernels.cc): z = exp(-|g|) within 1 ulp (2u relative),
    // p = 1 / (1 + z) two roundings, s and 1 - s one more product: each <= 7u relative;
    // h = g s u two more products: <= 9u relative. dsilu = s (1 + x), x = g (1 - s) (<= 8u
    // relative): 1 + x cancels near the zero of silu', so its error is absolute,
    // <= 8u |x| + u |1 + x|; dg = dh u dsilu adds 3 roundings. du = dh g s: <= 9u relative.
    const double s = 1.0 / (1.0 + std::exp(-gd[i])), x = gd[i] * (1.0 - s);
    ASSERT_NEAR(h[i], hr[i], 10 * kU * std::abs(hr[i]) + 1e-30) << i;
    ASSERT_NEAR(dg[i], dgr[i],
                std::abs(dhd[i] * ud[i] * s) * 10 * kU * (std::abs(x) + std::abs(1 + x)) +
                    4 * kU * std::abs(dgr[i]) + 1e-30)
        << i;
    ASSERT_NEAR(du[i], dur[i], 10 * kU * std::abs(dur[i]) + 1e-30) << i;
  }
  // Saturation: no overflow or NaN far out on either side.
  std::vector<float> gx = {-200.0f, -90.0f, 90.0f, 200.0f}, ux(4, 1.0f), dhx(4, 1.0f), hx(4),
                     dgx(4), dux(4);
  ops::SwiGlu(gx.data(), ux.data(), hx.data(), 4, nullptr);
  ops::SwiGluBackward(gx.data(), ux.data(), dhx.data(), dgx.data(), dux.data(), 4, nullptr);
  for (int i = 0; i < 4; ++i) {
    // silu(-90) = -90 e^-90 ~ -7e-38: zero within 1e-30.
    EXPECT_NEAR(hx[i], gx[i] > 0 ? gx[i] : 0.0f, 1e-30) << gx[i];
    EXPECT_NEAR(dgx[i], gx[i] > 0 ? 1.0f : 0.0f, 1e-30) << gx[i];
    EXPECT_EQ(dux[i], hx[i]) << gx[i];
  }
  const double step = 1e-5;
  for (int64_t i = 0; i < n; i += 997) {
    double hp, hm;
    double gp = gd[i] + step, gm = gd[i] - step;
    reference::SwiGlu(&gp, &ud[i], &hp, 1);
    reference::SwiGlu(&gm, &ud[i], &hm, 1);
    EXPECT_NEAR((hp - hm) / (2 * step) * dhd[i], dgr[i], 1e-8) << i;
  }
  ThreadPool pool(2);
  std::vector<float> h2(n);
  ops::SwiGlu(g.data(), u.data(), h2.data(), n, &pool);
  EXPECT_EQ(h, h2);
}

TEST(OpsSoftmax, RowsSumToOneAndBackwardMatchesFormula) {
  const int64_t m = 3, n = 50;
  auto x = Random(m * n, 10, 20.0f);
  auto p = x;
  ops::Softmax(p.data(), m, n, nullptr);
  auto dp = Random(m * n, 11);
  std::vector<float> dx(m * n);
  ops::SoftmaxBackward(p.data(), dp.data(), dx.data(), m, n, nullptr);
  for (int64_t r = 0; r < m; ++r) {
    double sum = 0, mx = -1e30;
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, double{x[r * n + c]});
    double z = 0;
    for (int64_t c = 0; c < n; ++c) z += std::exp(x[r * n + c] - mx);
    for (int64_t c = 0; c < n; ++c) {
      const double pr = std::exp(x[r * n + c] - mx) / z;
      EXPECT_NEAR(p[r * n + c], pr, kSlack * kU * pr + 1e-45);
      sum += p[r * n + c];
    }
    EXPECT_NEAR(sum, 1.0, n * kU);
    // Softmax outputs sum to one, so the gradient rows sum to zero.
    double gsum = 0;
    for (int64_t c = 0; c < n; ++c) gsum += dx[r * n + c];
    EXPECT_NEAR(gsum, 0.0, 4 * n * kU);
  }
}

TEST(OpsCrossEntropy, MatchesReferenceAndIgnoresNegativeTargets) {
  const int64_t m = 6, v = 256;
  auto logits = Random(m * v, 12, 8.0f);
  std::vector<int32_t> targets = {0, 255, 17, 128, -1, 3};
  std::vector<float> losses(m), dl(m * v);
  ops::CrossEntropy(logits.data(), targets.data(), losses.data(), dl.data(), 0.5f, m, v, nullptr);
  auto ld = ToDouble(logits);
  std::vector<int32_t> t2 = targets;
  t2[4] = 0;
  std::vector<double> lr(m), dlr(m * v);
  reference::CrossEntropy(ld.data(), t2.data(), lr.data(), dlr.data(), 0.5, m, v);
  for (int64_t r = 0; r < m; ++r) {
    if (targets[r] < 0) {
      EXPECT_EQ(losses[r], 0.0f);
      for (int64_t c = 0; c < v; ++c) EXPECT_EQ(dl[r * v + c], 0.0f);
      continue;
    }
    EXPECT_NEAR(losses[r], lr[r], kSlack * kU * std::abs(lr[r]) + 1e-7);
    for (int64_t c = 0; c < v; ++c)
      ASSERT_NEAR(dl[r * v + c], dlr[r * v + c], kSlack * kU * std::abs(dlr[r * v + c]) + 1e-12);
  }
  std::vector<int32_t> bad = {256};
  EXPECT_THROW(
      ops::CrossEntropy(logits.data(), bad.data(), losses.data(), nullptr, 1.0f, 1, v, nullptr),
      Error);
}

struct AttentionCase {
  const char* name;
  PositionEncodingKind kind;
  int64_t heads, kv_heads, tq, tk;
  int64_t key_stride = 1;  // key j at position key_stride * j + (key_stride - 1)
};

class OpsAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(OpsAttention, ForwardBackwardMatchReferenceAndFiniteDifferences) {
  const AttentionCase tc = GetParam();
  const int64_t B = 2, D = 12, H = tc.heads, Hkv = tc.kv_heads, Tq = tc.tq, Tk = tc.tk;
  PositionEncodingSpec spec;
  spec.kind = tc.kind;
  spec.num_heads = static_cast<int>(H);
  spec.num_buckets = 8;
  spec.max_distance = 16;
  PositionEncoding pe(spec);
  std::vector<float> bias_params(pe.num_parameters());
  pe.InitParameters(3, bias_params);
  for (float& b : bias_params) b *= 50.0f;  // make the bias matter
  auto q = Random(B * Tq * H * D, 20), k = Random(B * Tk * Hkv * D, 21),
       v = Random(B * Tk * Hkv * D, 22), dout = Random(B * Tq * H * D, 23);
  // Queries are the last Tq of the Tk positions (a decode step when Tq < Tk).
  std::vector<int64_t> qpos(Tq), kpos(Tk);
  // Non-contiguous keys (stride > 1) take the hooks' per-key path, contiguous ones the range path.
  for (int64_t j = 0; j < Tk; ++j) kpos[j] = tc.key_stride * j + (tc.key_stride - 1);
  for (int64_t i = 0; i < Tq; ++i) qpos[i] = kpos[Tk - Tq + i];
  ops::AttentionArgs a;
  a.batch = B;
  a.tq = Tq;
  a.tk = Tk;
  a.heads = H;
  a.kv_heads = Hkv;
  a.head_dim = D;
  a.q = q.data();
  a.q_row_stride = H * D;
  a.q_batch_stride = Tq * H * D;
  a.k = k.data();
  a.v = v.data();
  a.kv_row_stride = Hkv * D;
  a.kv_batch_stride = Tk * Hkv * D;
  std::vector<float> out(B * Tq * H * D), probs(B * H * Tq * Tk);
  a.out = out.data();
  a.out_row_stride = H * D;
  a.out_batch_stride = Tq * H * D;
  a.q_positions = qpos;
  a.k_positions = kpos;
  a.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  a.logit_bias = &pe;
  a.bias_params = bias_params;
  a.probs = probs.data();
  ops::AttentionForward(a, nullptr);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), dbias(bias_params.size(), 0.0f);
  ops::AttentionBackward(a, dout.data(), dq.data(), dk.data(), dv.data(), dbias, nullptr);

  const double scale = a.scale;
  std::vector<double> dbias_ref(bias_params.size(), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    auto qd = std::vector<double>(q.begin() + b * Tq * H * D, q.begin() + (b + 1) * Tq * H * D);
    auto kd = std::vector<double>(k.begin() + b * Tk * Hkv * D, k.begin() + (b + 1) * Tk * Hkv * D);
    auto vd = std::vector<double>(v.begin() + b * Tk * Hkv * D, v.begin() + (b + 1) * Tk * Hkv * D);
    auto dod =
        std::vector<double>(dout.begin() + b * Tq * H * D, dout.begin() + (b + 1) * Tq * H * D);
    std::vector<double> o_ref(qd.size()), dq_ref(qd.size()), dk_ref(kd.size()), dv_ref(vd.size());
    reference::Attention(qd.data(), kd.data(), vd.data(), o_ref.data(), Tq, Tk, H, Hkv, D, qpos,
                         kpos, scale, &pe, bias_params);
    reference::AttentionBackward(qd.data(), kd.data(), vd.data(), dod.data(), dq_ref.data(),
                                 dk_ref.data(), dv_ref.data(), Tq, Tk, H, Hkv, D, qpos, kpos, scale,
                                 &pe, bias_params, dbias_ref);
    // Logits: D-term dot products of values in [-1, 1]; outputs: Tk-term convex combinations.
    // The softmax turns a logit error e into a relative probability error ~e.
    const double tol = kSlack * (D + Tk + 8) * kU * 8.0;
    for (size_t i = 0; i < qd.size(); ++i) {
      ASSERT_NEAR(out[b * Tq * H * D + i], o_ref[i], tol) << "out " << i;
      ASSERT_NEAR(dq[b * Tq * H * D + i], dq_ref[i], tol * D) << "dq " << i;
    }
    for (size_t i = 0; i < kd.size(); ++i) {
      ASSERT_NEAR(dk[b * Tk * Hkv * D + i], dk_ref[i], tol * D) << "dk " << i;
      ASSERT_NEAR(dv[b * Tk * Hkv * D + i], dv_ref[i], tol * Tq) << "dv " << i;
    }
    if (b == 0) {
      // Reference gradient against central differences of L = sum(dout * out).
      auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk,
                      const std::vector<double>& vv) {
        std::vector<double> o(qq.size());
        reference::Attention(qq.data(), kk.data(), vv.data(), o.data(), Tq, Tk, H, Hkv, D, qpos,
                             kpos, scale, &pe, bias_params);
        double s = 0;
        for (size_t i = 0; i < o.size(); ++i) s += o[i] * dod[i];
        return s;
      };
      const double h = 1e-5;
      for (size_t i = 0; i < qd.size(); i += 13) {
        auto p = qd, m = qd;
        p[i] += h;
        m[i] -= h;
        EXPECT_NEAR((loss(p, kd, vd) - loss(m, kd, vd)) / (2 * h), dq_ref[i], 1e-7);
      }
      for (size_t i = 0; i < kd.size(); i += 11) {
        auto p = kd, m = kd;
        p[i] += h;
        m[i] -= h;
        EXPECT_NEAR((loss(qd, p, vd) - loss(qd, m, vd)) / (2 * h), dk_ref[i], 1e-7);
        auto vp = vd, vm = vd;
        vp[i] += h;
        vm[i] -= h;
        EXPECT_NEAR((loss(qd, kd, vp) - loss(qd, kd, vm)) / (2 * h), dv_ref[i], 1e-7);
      }
    }
  }
  for (size_t i = 0; i < dbias.size(); ++i) {
    EXPECT_NEAR(dbias[i], dbias_ref[i], kSlack * B * Tq * Tk * kU) << "dbias " << i;
  }

  // Bitwise identical with a pool.
  ThreadPool pool(3);
  std::vector<float> out3(out.size()), probs3(probs.size());
  a.out = out3.data();
  a.probs = probs3.data();
  ops::AttentionForward(a, &pool);
  EXPECT_EQ(out, out3);
  std::vector<float> dq3(q.size()), dk3(k.size()), dv3(v.size()), dbias3(dbias.size(), 0.0f);
  ops::AttentionBackward(a, dout.data(), dq3.data(), dk3.data(), dv3.data(), dbias3, &pool);
  EXPECT_EQ(dq, dq3);
  EXPECT_EQ(dk, dk3);
  EXPECT_EQ(dv, dv3);
  EXPECT_EQ(dbias, dbias3);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, OpsAttention,
    ::testing::Values(AttentionCase{"mha_none", PositionEncodingKind::kNone, 3, 3, 9, 9},
                      AttentionCase{"gqa_alibi", PositionEncodingKind::kAlibi, 4, 2, 11, 11},
                      AttentionCase{"mqa_t5", PositionEncodingKind::kT5, 4, 1, 7, 7},
                      AttentionCase{"gqa_t5_decode", PositionEncodingKind::kT5, 6, 2, 3, 19},
                      AttentionCase{"decode_one", PositionEncodingKind::kAlibi, 2, 1, 1, 23},
                      AttentionCase{"strided_t5", PositionEncodingKind::kT5, 4, 2, 5, 9, 3},
                      AttentionCase{"strided_alibi", PositionEncodingKind::kAlibi, 2, 2, 9, 9, 2}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(OpsAttention, RejectsBadHeadCounts) {
  ops::AttentionArgs a;
  a.heads = 4;
  a.kv_heads = 3;
  a.head_dim = 2;
  EXPECT_THROW(ops::AttentionForward(a, nullptr), Error);
}

// ---- Fused (FlashAttention-2) attention ----------------------------------------------------

struct FlashCase {
  const char* name;
  PositionEncodingKind kind;
  int64_t heads, kv_heads, tq, tk;
  int64_t key_stride = 1;  // key j at position key_stride * j + (key_stride - 1)
};

class OpsFlashAttention : public ::testing::TestWithParam<FlashCase> {};

// The fused forward / backward against the float64 reference and against AttentionForward /
// AttentionBackward (the unfused float32 ops), for every logit hook, with several query and key
// tiles (partial last tiles, tiles above the diagonal skipped), then bitwise across pools.
TEST_P(OpsFlashAttention, MatchesReferenceUnfusedAndThreads) {
  const FlashCase tc = GetParam();
  const int64_t B = 2, D = 16, H = tc.heads, Hkv = tc.kv_heads, Tq = tc.tq, Tk = tc.tk;
  const int64_t group = H / Hkv;
  PositionEncodingSpec spec;
  spec.kind = tc.kind;
  spec.num_heads = static_cast<int>(H);
  spec.num_buckets = 8;
  spec.max_distance = 64;
  PositionEncoding pe(spec);
  std::vector<float> bias_params(pe.num_parameters());
  pe.InitParameters(5, bias_params);
  for (float& b : bias_params) b *= 50.0f;  // make the bias matter
  auto q = Random(B * Tq * H * D, 30), k = Random(B * Tk * Hkv * D, 31),
       v = Random(B * Tk * Hkv * D, 32), dout = Random(B * Tq * H * D, 33);
  std::vector<int64_t> qpos(Tq), kpos(Tk);
  for (int64_t j = 0; j < Tk; ++j) kpos[j] = tc.key_stride * j + (tc.key_stride - 1);
  for (int64_t i = 0; i < Tq; ++i) qpos[i] = kpos[Tk - Tq + i];
  ops::AttentionArgs a;
  a.batch = B;
  a.tq = Tq;
  a.tk = Tk;
  a.heads = H;
  a.kv_heads = Hkv;
  a.head_dim = D;
  a.q = q.data();
  a.q_row_stride = H * D;
  a.q_batch_stride = Tq * H * D;
  a.k = k.data();
  a.v = v.data();
  a.kv_row_stride = Hkv * D;
  a.kv_batch_stride = Tk * Hkv * D;
  a.out_row_stride = H * D;
  a.out_batch_stride = Tq * H * D;
  a.q_positions = qpos;
  a.k_positions = kpos;
  a.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  a.logit_bias = &pe;
  a.bias_params = bias_params;

  // Unfused float32 ops.
  std::vector<float> out_u(q.size()), probs(B * H * Tq * Tk);
  a.out = out_u.data();
  a.probs = probs.data();
  ops::AttentionForward(a, nullptr);
  std::vector<float> dq_u(q.size()), dk_u(k.size()), dv_u(v.size()), db_u(bias_params.size());
  ops::AttentionBackward(a, dout.data(), dq_u.data(), dk_u.data(), dv_u.data(), db_u, nullptr);
  // Fused.
  a.probs = nullptr;
  std::vector<float> out(q.size()), lse(B * H * Tq);
  a.out = out.data();
  ops::FlashAttentionForward(a, lse.data(), nullptr);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), db(bias_params.size(), 0.0f);
  ops::FlashAttentionBackward(a, lse.data(), dout.data(), dq.data(), dk.data(), dv.data(), db,
                              nullptr);

  // Error budget, u = 2^-24, |q|, |k|, |v|, |dout| <= 1 (worst case; kSlack as above):
  //  logits |s| <= S = scale D + max|bias|: a D-term dot product, the scale and the bias add
  //    give e_s <= kSlack (D + 2) u S;
  //  p = exp(s - lse): relative error eps_p <= 2 e_s + kSlack (Tk + 4) u (the float32 sum l of
  //    <= Tk terms, exp / log, the per-tile rescale);
  //  out = sum_j p_j v_j (convex): tol_out = eps_p + kSlack Tk u;
  //  dS = p (dP - delta) with |dP|, |delta| <= D: |err dS_ij| <= p_ij 2 D (eps_p + kSlack D u);
  //  dq = scale sum_j dS_ij k_j, sum_j p_ij = 1: tol_dq = scale 2 D (eps_p + kSlack (D + Tk) u);
  //  dk_j, dv_j sum over the group's <= group * Tq query rows, each p_ij <= 1:
  //    tol_dk = group Tq tol_dq, tol_dv = group Tq (eps_p + kSlack Tq group u);
  //  T5 table: sums of dS over B H Tq rows: tol_db = B H Tq 2 D (eps_p + kSlack (D + Tk) u).
  double max_bias = 0.0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Tq; ++i)
      for (int64_t j = 0; j < Tk; ++j)
        if (kpos[j] <= qpos[i])
          max_bias =
              std::max(max_bias, std::abs(reference::LogitBias(&pe, bias_params, qpos[i], kpos[j],
                                                               static_cast<int>(h))));
  const double e_s = kSlack * (D + 2) * kU * (a.scale * D + max_bias);
  const double eps_p = 2 * e_s + kSlack * (Tk + 4) * kU;
  const double tol_out = eps_p + kSlack * Tk * kU;
  const double tol_dq = a.scale * 2 * D * (eps_p + kSlack * (D + Tk) * kU);
  const double tol_dk = group * Tq * tol_dq;
  const double tol_dv = group * Tq * (eps_p + kSlack * Tq * group * kU);
  const double tol_db = B * H * Tq * 2 * D * (eps_p + kSlack * (D + Tk) * kU);

  std::vector<double> db_ref(bias_params.size(), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qo = b * Tq * H * D, ko = b * Tk * Hkv * D;
    auto slice = [](const std::vector<float>& x, int64_t at, int64_t n) {
      return std::vector<double>(x.begin() + at, x.begin() + at + n);
    };
    auto qd = slice(q, qo, Tq * H * D), kd = slice(k, ko, Tk * Hkv * D),
         vd = slice(v, ko, Tk * Hkv * D), dod = slice(dout, qo, Tq * H * D);
    std::vector<double> o_ref(qd.size()), dq_ref(qd.size()), dk_ref(kd.size()), dv_ref(vd.size());
    reference::Attention(qd.data(), kd.data(), vd.data(), o_ref.data(), Tq, Tk, H, Hkv, D, qpos,
                         kpos, a.scale, &pe, bias_params);
    reference::AttentionBackward(qd.data(), kd.data(), vd.data(), dod.data(), dq_ref.data(),
                                 dk_ref.data(), dv_ref.data(), Tq, Tk, H, Hkv, D, qpos, kpos,
                                 a.scale, &pe, bias_params, db_ref);
    for (size_t i = 0; i < qd.size(); ++i) {
      ASSERT_NEAR(out[qo + i], o_ref[i], tol_out) << "out " << i;
      // The unfused op obeys the same budget: the two differ by at most twice of it.
      ASSERT_NEAR(out[qo + i], out_u[qo + i], 2 * tol_out) << "out vs unfused " << i;
      ASSERT_NEAR(dq[qo + i], dq_ref[i], tol_dq) << "dq " << i;
      ASSERT_NEAR(dq[qo + i], dq_u[qo + i], 2 * tol_dq) << "dq vs unfused " << i;
    }
    for (size_t i = 0; i < kd.size(); ++i) {
      ASSERT_NEAR(dk[ko + i], dk_ref[i], tol_dk) << "dk " << i;
      ASSERT_NEAR(dv[ko + i], dv_ref[i], tol_dv) << "dv " << i;
      ASSERT_NEAR(dk[ko + i], dk_u[ko + i], 2 * tol_dk) << "dk vs unfused " << i;
      ASSERT_NEAR(dv[ko + i], dv_u[ko + i], 2 * tol_dv) << "dv vs unfused " << i;
    }
  }
  for (size_t i = 0; i < db.size(); ++i) {
    EXPECT_NEAR(db[i], db_ref[i], tol_db) << "dbias " << i;
    EXPECT_NEAR(db[i], db_u[i], 2 * tol_db) << "dbias vs unfused " << i;
  }
  // The log-sum-exp of every row against the reference logits.
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < Tq; ++i) {
      double mx = -INFINITY, sum = 0.0;
      std::vector<double> s(Tk, -INFINITY);
      for (int64_t j = 0; j < Tk; ++j) {
        if (kpos[j] > qpos[i]) continue;
        double dot = 0.0;
        for (int64_t c = 0; c < D; ++c)
          dot += double{q[(i * H + h) * D + c]} * k[(j * Hkv + h / group) * D + c];
        s[j] = a.scale * dot + reference::LogitBias(&pe, bias_params, qpos[i], kpos[j], int(h));
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j < Tk; ++j) sum += std::exp(s[j] - mx);
      // lse = m + log l: absolute error e_s + the relative error of l.
      ASSERT_NEAR(lse[h * Tq + i], mx + std::log(sum), e_s + eps_p + kU * std::abs(mx))
          << "lse h=" << h << " i=" << i;
    }
  }

  // Bitwise identical with pools of 2 and 3 workers.
  for (int workers : {2, 3}) {
    ThreadPool pool(workers);
    std::vector<float> out3(out.size()), lse3(lse.size());
    a.out = out3.data();
    ops::FlashAttentionForward(a, lse3.data(), &pool);
    EXPECT_EQ(out, out3);
    EXPECT_EQ(lse, lse3);
    std::vector<float> dq3(q.size()), dk3(k.size()), dv3(v.size()), db3(db.size(), 0.0f);
    ops::FlashAttentionBackward(a, lse3.data(), dout.data(), dq3.data(), dk3.data(), dv3.data(),
                                db3, &pool);
    EXPECT_EQ(dq, dq3);
    EXPECT_EQ(dk, dk3);
    EXPECT_EQ(dv, dv3);
    EXPECT_EQ(db, db3);
    // The unfused ops too (their T5 partial sums are per (batch, kv head) task).
    std::vector<float> out_u3(q.size()), probs3(probs.size());
    a.out = out_u3.data();
    a.probs = probs3.data();
    ops::AttentionForward(a, &pool);
    EXPECT_EQ(out_u, out_u3);
    std::vector<float> dq_u3(q.size()), dk_u3(k.size()), dv_u3(v.size()), db_u3(db_u.size());
    ops::AttentionBackward(a, dout.data(), dq_u3.data(), dk_u3.data(), dv_u3.data(), db_u3, &pool);
    EXPECT_EQ(dq_u, dq_u3);
    EXPECT_EQ(dk_u, dk_u3);
    EXPECT_EQ(dv_u, dv_u3);
    EXPECT_EQ(db_u, db_u3);
    a.probs = nullptr;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, OpsFlashAttention,
    ::testing::Values(FlashCase{"mha_none_3x3_tiles", PositionEncodingKind::kNone, 2, 2, 150, 150},
                      FlashCase{"gqa_none_exact_tiles", PositionEncodingKind::kNone, 4, 2, 128,
                                128},
                      FlashCase{"gqa_alibi", PositionEncodingKind::kAlibi, 4, 2, 130, 130},
                      FlashCase{"mqa_t5", PositionEncodingKind::kT5, 4, 1, 97, 97},
                      // Two kv-head tasks per sequence, above the size that runs on the pool.
                      FlashCase{"gqa_t5", PositionEncodingKind::kT5, 4, 2, 130, 130},
                      FlashCase{"gqa_t5_decode", PositionEncodingKind::kT5, 4, 2, 5, 140},
                      FlashCase{"decode_one_alibi", PositionEncodingKind::kAlibi, 2, 1, 1, 200},
                      FlashCase{"strided_t5", PositionEncodingKind::kT5, 2, 2, 70, 90, 3},
                      FlashCase{"strided_alibi", PositionEncodingKind::kAlibi, 2, 1, 80, 80, 2}),
    [](const auto& info) { return std::string(info.param.name); });

struct DecodeCase {
  const char* name;
  PositionEncodingKind kind;
  int64_t heads, kv_heads, tk, head_dim;
  int64_t key_stride = 1;  // key j at position key_stride * j + (key_stride - 1)
  int64_t query_key = -1;  // the query sits at key query_key's position (-1: the last key)
};

class OpsDecodeAttention : public ::testing::TestWithParam<DecodeCase> {};

// DecodeAttention (one query, no BLAS) against the float64 reference and AttentionForward, for
// every logit hook, masked keys (a query before the last key), head_dim with and without a
// vector tail; then bitwise: the result does not depend on the scratch's old contents or on
// where the query and output rows sit.
TEST_P(OpsDecodeAttention, MatchesReferenceAndUnfused) {
  const DecodeCase tc = GetParam();
  const int64_t H = tc.heads, Hkv = tc.kv_heads, Tk = tc.tk, D = tc.head_dim;
  PositionEncodingSpec spec;
  spec.kind = tc.kind;
  spec.num_heads = static_cast<int>(H);
  spec.num_buckets = 8;
  spec.max_distance = 64;
  PositionEncoding pe(spec);
  std::vector<float> bias_params(pe.num_parameters());
  pe.InitParameters(7, bias_params);
  for (float& b : bias_params) b *= 50.0f;  // make the bias matter
  auto q = Random(H * D, 40), k = Random(Tk * Hkv * D, 41), v = Random(Tk * Hkv * D, 42);
  std::vector<int64_t> kpos(Tk), qpos(1);
  for (int64_t j = 0; j < Tk; ++j) kpos[j] = tc.key_stride * j + (tc.key_stride - 1);
  qpos[0] = kpos[tc.query_key < 0 ? Tk - 1 : tc.query_key];
  ops::AttentionArgs a;
  a.tq = 1;
  a.tk = Tk;
  a.heads = H;
  a.kv_heads = Hkv;
  a.head_dim = D;
  a.q = q.data();
  a.q_row_stride = a.q_batch_stride = H * D;
  a.k = k.data();
  a.v = v.data();
  a.kv_row_stride = Hkv * D;
  a.kv_batch_stride = Tk * Hkv * D;
  a.out_row_stride = a.out_batch_stride = H * D;
  a.q_positions = qpos;
  a.k_positions = kpos;
  a.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  a.logit_bias = &pe;
  a.bias_params = bias_params;
  std::vector<float> out(H * D), out_u(H * D), scratch(Tk, 0.0f);
  a.out = out_u.data();
  ops::AttentionForward(a, nullptr);
  a.out = out.data();
  ops::DecodeAttention(a, scratch);

  // Error budget as for the fused attention above (|q|, |k|, |v| <= 1, u = 2^-24):
  //  logits: a D-term dot product, the scale and the bias add: e_s <= kSlack (D + 2) u S with
  //    S = scale D + max|bias|;
  //  p_j = exp(s_j - max) / l: relative error eps_p <= 2 e_s + kSlack (Tk + 4) u (float32 exp,
  //    the float32 sum l of <= Tk terms, the division);
  //  out = sum_j p_j v_j (convex, |v| <= 1): tol_out = eps_p + kSlack Tk u.
  double max_bias = 0.0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < Tk; ++j)
      if (kpos[j] <= qpos[0])
        max_bias = std::max(max_bias, std::abs(reference::LogitBias(&pe, bias_params, qpos[0],
                                                                    kpos[j], static_cast<int>(h))));
  const double e_s = kSlack * (D + 2) * kU * (a.scale * D + max_bias);
  const double eps_p = 2 * e_s + kSlack * (Tk + 4) * kU;
  const double tol_out = eps_p + kSlack * Tk * kU;
  std::vector<double> o_ref(H * D);
  const auto qd = ToDouble(q), kd = ToDouble(k), vd = ToDouble(v);
  reference::Attention(qd.data(), kd.data(), vd.data(), o_ref.data(), 1, Tk, H, Hkv, D, qpos, kpos,
                       a.scale, &pe, bias_params);
  for (int64_t i = 0; i < H * D; ++i) {
    ASSERT_NEAR(out[i], o_ref[i], tol_out) << "out " << i;
    // AttentionForward obeys the same budget: the two differ by at most twice of it.
    ASSERT_NEAR(out[i], out_u[i], 2 * tol_out) << "out vs unfused " << i;
  }

  // Bitwise: dirty scratch, query and output rows moved by one float (another alignment).
  std::vector<float> q2(H * D + 1), out2(H * D + 1), dirty(Tk + 5, 1e30f);
  std::copy(q.begin(), q.end(), q2.begin() + 1);
  a.q = q2.data() + 1;
  a.out = out2.data() + 1;
  ops::DecodeAttention(a, dirty);
  EXPECT_TRUE(std::equal(out.begin(), out.end(), out2.begin() + 1));

  // Too little scratch, or more than one query, is an Error.
  std::vector<float> small(Tk - 1);
  EXPECT_THROW(ops::DecodeAttention(a, small), Error);
  a.tq = 2;
  EXPECT_THROW(ops::DecodeAttention(a, scratch), Error);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, OpsDecodeAttention,
    ::testing::Values(
        DecodeCase{"one_key", PositionEncodingKind::kNone, 2, 2, 1, 32},
        DecodeCase{"gqa_none", PositionEncodingKind::kNone, 4, 2, 130, 32},
        DecodeCase{"mha_tail_dims", PositionEncodingKind::kNone, 2, 2, 7, 12},
        DecodeCase{"gqa_alibi", PositionEncodingKind::kAlibi, 4, 2, 61, 32},
        DecodeCase{"mqa_t5_long", PositionEncodingKind::kT5, 4, 1, 300, 20},
        DecodeCase{"masked_prefix", PositionEncodingKind::kAlibi, 2, 1, 50, 16, 1, 30},
        DecodeCase{"strided_t5_masked", PositionEncodingKind::kT5, 2, 2, 90, 16, 3, 60},
        DecodeCase{"strided_first_key", PositionEncodingKind::kNone, 2, 1, 9, 16, 2, 0}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ropekit
