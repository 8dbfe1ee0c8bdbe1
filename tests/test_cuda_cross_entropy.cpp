// CUDA LM head + softmax cross-entropy against the CPU op on the same inputs: awkward sizes (padding
// Vp > V and Vp == V; chunks R < N not dividing N, R == N, R > N), extreme logits, the GPT-2 shape
// (V = 50257, Vp = 50304, C = 768, N = 2048, R = 768), accumulation into pre-filled dx/dw, padded
// rows of dw unchanged, padded columns of the scratch holding a zero gradient (the GEMMs run over
// Vp columns), rows of the scratch past N never touched, forward-only, a bad target, determinism.
//
// Tolerances come from the size of the terms (support/scaled_compare.h), u = 2^-24:
// - a logit is an fp32 dot product of length C, off by at most ~32 u S_n between the two backends,
//   S_n = max_j sum_c |x_nc| |w_jc|;
// - loss_n = lse - logit[target]: |gpu - cpu| <= 64 u S_n + 1e-6 (exp and the double sum add ~1e-7);
// - dlogits = grad_scale (p - onehot) carry that logit error as a relative error of p (2 * 32 u S
//   with S = max_n S_n) plus a few u of rounding; with e_nj = |dlogit_nj| + |grad_scale| p_nj (which
//   bounds both), dx and dw must agree within 32 u (1 + 2 S) times the scales |e| |W| + |dx0| and
//   |e|^T |x| + |dw0| (GEMMs of absolute values).
// The bf16 path (mixed precision) has its own section below, with its own bounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/blas.h"
#include "ops/cross_entropy.h"
#include "ops/gemm_cuda.h"
#include "support/gpu_util.h"
#include "support/scaled_compare.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::DeviceBuffer;
using test::kRoundoff;
using test::tensor_of;

struct Dims {
  int64_t N, C, V, Vp, R;
  std::string str() const {
    return "N=" + std::to_string(N) + " C=" + std::to_string(C) + " V=" + std::to_string(V) +
           " Vp=" + std::to_string(Vp) + " R=" + std::to_string(R);
  }
};

struct Inputs {
  std::vector<float> x, w, dx0, dw0;
  std::vector<int32_t> tg;
};

// x ~ N(0, 1); w ~ N(0, w_scale^2) with its padded rows V..Vp-1 large (5), so any use of them shows;
// dx0, dw0 (the gradients accumulated into) ~ N(0, (grad_scale / 10)^2), below the gradients' size.
Inputs make_inputs(const Dims& d, uint64_t seed, float w_scale, float grad_scale) {
  Inputs in;
  in.x = test::randn(d.N * d.C, seed);
  in.w = test::randn(d.Vp * d.C, seed + 1, w_scale);
  for (int64_t i = d.V * d.C; i < d.Vp * d.C; ++i) in.w[i] *= 5.0f / w_scale;
  in.tg = test::randint(d.N, seed + 2, static_cast<int32_t>(d.V));
  in.dx0 = test::randn(d.N * d.C, seed + 3, 0.1f * grad_scale);
  in.dw0 = test::randn(d.Vp * d.C, seed + 4, 0.1f * grad_scale);
  return in;
}

struct Out {
  std::vector<float> losses, dx, dw, scratch;
};

Out run_gpu(const Dims& d, const Inputs& in, float grad_scale, bool grad) {
  DeviceBuffer x(in.x), w(in.w), tg(in.tg), dx(in.dx0), dw(in.dw0), losses(d.N * 4), scratch(d.R * d.Vp * 4);
  losses.poison();
  scratch.poison();
  lm_head_cross_entropy(losses.tensor(DType::f32, {d.N}, "losses"),
                        grad ? dx.tensor(DType::f32, {d.N, d.C}, "dx") : Tensor(),
                        grad ? dw.tensor(DType::f32, {d.Vp, d.C}, "dw") : Tensor(),
                        x.tensor(DType::f32, {d.N, d.C}, "x"), w.tensor(DType::f32, {d.Vp, d.C}, "w"),
                        tg.tensor(DType::i32, {d.N}, "targets"), scratch.tensor(DType::f32, {d.R, d.Vp}, "scratch"),
                        d.V, grad_scale);
  return {losses.download<float>(), dx.download<float>(), dw.download<float>(), scratch.download<float>()};
}

// The CPU op with one chunk of all N rows, so the scratch ends up holding every row's dlogits.
Out run_cpu_full(const Dims& d, Inputs in, float grad_scale) {
  Out o{std::vector<float>(d.N), in.dx0, in.dw0, std::vector<float>(d.N * d.Vp)};
  lm_head_cross_entropy(tensor_of(o.losses, {d.N}, "losses"), tensor_of(o.dx, {d.N, d.C}, "dx"),
                        tensor_of(o.dw, {d.Vp, d.C}, "dw"), tensor_of(in.x, {d.N, d.C}, "x"),
                        tensor_of(in.w, {d.Vp, d.C}, "w"), tensor_of(in.tg, {d.N}, "targets"),
                        tensor_of(o.scratch, {d.N, d.Vp}, "scratch"), d.V, grad_scale);
  return o;
}

// S_n = max_j sum_c |x_nc| |w_jc| over the first V rows of w, in chunks of rows to bound memory.
std::vector<double> logit_scales(const Dims& d, const Inputs& in) {
  const std::vector<float> ax = test::abs_of(in.x), aw = test::abs_of(in.w);
  std::vector<double> s(d.N, 0.0);
  const int64_t chunk = 256;
  std::vector<float> t(chunk * d.V);
  for (int64_t n0 = 0; n0 < d.N; n0 += chunk) {
    const int64_t rows = std::min(chunk, d.N - n0);
    blas_sgemm(false, true, rows, d.V, d.C, 1.0f, ax.data() + n0 * d.C, d.C, aw.data(), d.C, 0.0f, t.data(), d.V);
    for (int64_t r = 0; r < rows; ++r)
      s[n0 + r] = *std::max_element(t.begin() + r * d.V, t.begin() + (r + 1) * d.V);
  }
  return s;
}

// Runs the GPU op (twice when `twice`) and the CPU op on the same inputs and compares everything.
void check(const Dims& d, const Inputs& in, float grad_scale, uint64_t seed, bool twice) {
  const std::string what = d.str() + " seed=" + std::to_string(seed);
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const Out g = run_gpu(d, in, grad_scale, true);
  const Out c = run_cpu_full(d, in, grad_scale);
  const std::vector<double> S = logit_scales(d, in);
  const double S_max = *std::max_element(S.begin(), S.end());

  // Losses.
  std::vector<float> loss_scale(d.N);
  for (int64_t n = 0; n < d.N; ++n) loss_scale[n] = static_cast<float>(S[n] + 1e-6 / (64 * kRoundoff));
  EXPECT_TRUE(test::within_scale("losses " + what, g.losses, c.losses, loss_scale, 64 * kRoundoff));

  // e = |dlogits| + |grad_scale| p from the CPU's dlogits (p = dlogit / grad_scale + onehot).
  std::vector<float> e(d.N * d.Vp, 0.0f);
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t j = 0; j < d.V; ++j) {
      const float dl = c.scratch[n * d.Vp + j];
      const float p = dl / grad_scale + (j == in.tg[n] ? 1.0f : 0.0f);
      e[n * d.Vp + j] = std::fabs(dl) + std::fabs(grad_scale) * std::fabs(p);
    }
  const double tol = 32 * kRoundoff * (1.0 + 2.0 * S_max);
  const std::vector<float> dx_scale =
      test::gemm_error_scale(false, false, d.N, d.C, d.V, 1.0f, e, d.Vp, in.w, d.C, 1.0f, in.dx0, d.C);
  // dx reduces over K = V: rounding errors of long sums grow like sqrt(K), so past K = 4096 the constant
  // grows with sqrt(V / 4096) (Qwen2's V = 151,936 measured 3.6x the flat constant on an H100)
  const double dx_tol = tol * std::max(1.0, std::sqrt(static_cast<double>(d.V) / 4096.0));
  EXPECT_TRUE(test::within_scale("dx " + what, g.dx, c.dx, dx_scale, dx_tol));
  // dw: the first V rows against the scale; padded rows never written.
  const std::vector<float> dw_scale =
      test::gemm_error_scale(true, false, d.V, d.C, d.N, 1.0f, e, d.Vp, in.x, d.C, 1.0f, in.dw0, d.C);
  const std::vector<float> g_dw(g.dw.begin(), g.dw.begin() + d.V * d.C), c_dw(c.dw.begin(), c.dw.begin() + d.V * d.C);
  EXPECT_TRUE(test::within_scale("dw " + what, g_dw, c_dw,
                                 std::vector<float>(dw_scale.begin(), dw_scale.begin() + d.V * d.C), tol));
  EXPECT_TRUE(test::bitwise_equal("padded rows of dw " + what,
                                  std::vector<float>(g.dw.begin() + d.V * d.C, g.dw.end()),
                                  std::vector<float>(in.dw0.begin() + d.V * d.C, in.dw0.end())));
  // Scratch: the GEMMs run over all Vp columns, so a processed row's padded columns hold the zero
  // gradient written by the row kernel; rows past N (R > N) still hold the poison.
  const int64_t used_rows = std::min(d.R, d.N);
  bool scratch_ok = true;
  for (int64_t r = 0; r < d.R && scratch_ok; ++r)
    for (int64_t j = r < used_rows ? d.V : 0; j < d.Vp; ++j) {
      const float v = g.scratch[r * d.Vp + j];
      if (r < used_rows ? v != 0.0f : !test::is_poison(v)) {
        ADD_FAILURE() << what << ": scratch[" << r << ", " << j << "] = " << v
                      << (r < used_rows ? " (expected the zero gradient of a padded column)" : " (was written)");
        scratch_ok = false;
        break;
      }
    }

  // Forward only: the same losses, bitwise (same GEMM plan, same row kernel).
  const Out f = run_gpu(d, in, grad_scale, false);
  EXPECT_TRUE(test::bitwise_equal("forward-only losses " + what, f.losses, g.losses));
  EXPECT_TRUE(test::bitwise_equal("forward-only leaves dx " + what, f.dx, in.dx0));
  if (twice) {
    const Out g2 = run_gpu(d, in, grad_scale, true);
    EXPECT_TRUE(test::bitwise_equal("losses run twice " + what, g.losses, g2.losses));
    EXPECT_TRUE(test::bitwise_equal("dx run twice " + what, g.dx, g2.dx));
    EXPECT_TRUE(test::bitwise_equal("dw run twice " + what, g.dw, g2.dw));
  }
}

TEST(CudaCrossEntropy, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  // V and C over the awkward sizes; Vp > V and Vp == V; R < N not dividing N, R == N, R > N, R = 1.
  const std::vector<Dims> cases{{19, 7, 111, 128, 5},  {7, 19, 19, 64, 7},    {1, 1, 7, 8, 1},
                                {7, 111, 19, 19, 3},   {19, 19, 1, 4, 19},    {7, 7, 111, 111, 9},
                                {111, 19, 1111, 1152, 7}, {111, 111, 7, 8, 1}, {19, 1, 19, 19, 111}};
  uint64_t s = seed;
  for (const Dims& d : cases) {
    check(d, make_inputs(d, s, 1.0f, 0.37f), 0.37f, s, true);
    s += 5;
  }
}

// Logits spread over about +-300 (exp underflows for most of a row; softmax nearly one-hot).
TEST(CudaCrossEntropy, ExtremeLogitsMatchCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const Dims d{7, 19, 111, 128, 3};
  Inputs in = make_inputs(d, seed, 1.0f, 1.0f);
  for (auto& v : in.x) v *= 300.0f / std::sqrt(3.0f * d.C);
  check(d, in, 1.0f, seed, false);
}

TEST(CudaCrossEntropy, Gpt2ShapeMatchesCpuAndIsDeterministic) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const Dims d{2048, 768, 50257, 50304, 768};  // R does not divide N: chunks of 768, 768, 512
  const float grad_scale = 1.0f / static_cast<float>(d.N);
  check(d, make_inputs(d, seed, 0.02f, grad_scale), grad_scale, seed, true);
}

// A target outside [0, V) on the GPU (which the data loader should have caught): that row's loss is
// NaN, nothing is read out of bounds, and the other rows are unaffected.
TEST(CudaCrossEntropy, BadTargetGivesNaNLossOnly) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const Dims d{7, 19, 111, 128, 7};
  Inputs in = make_inputs(d, seed, 1.0f, 1.0f);
  const Out good = run_gpu(d, in, 1.0f, false);
  in.tg[3] = static_cast<int32_t>(d.V);
  in.tg[5] = -1;
  const Out bad = run_gpu(d, in, 1.0f, false);
  for (int64_t n = 0; n < d.N; ++n) {
    if (n == 3 || n == 5)
      EXPECT_TRUE(std::isnan(bad.losses[n])) << "row " << n << " seed=" << seed;
    else
      EXPECT_EQ(bad.losses[n], good.losses[n]) << "row " << n << " seed=" << seed;
  }
}

// ---- bf16 (docs/MIXED_PRECISION.md): bf16 x, w (the bf16 weight copy), logits_scratch, dx; f32
// losses, dw. The reference is the CPU fp32 op (one chunk of all N rows) on the same bf16-rounded x,
// w and dx0. Errors are rel_l2_error = ||gpu - ref|| / ||ref|| per output; u = 2^-8 is bf16's unit
// roundoff (8 significant bits: one rounding is off by <= u relative, ~2^-9.2 rms on random values).
//
// Products of bf16 values are exact in fp32 and both sides accumulate in fp32, so to first order the
// only difference in the logits is their rounding to bf16 on the GPU: l_gpu = l + dl, |dl| <= u |l|.
// With m_n = sum_j p_nj |l_nj| (row n, first V columns, from the CPU's fp32 logits and softmax):
// - losses: loss = lse(l) - l_t, so d loss = sum_j p_j dl_j - dl_t and |d loss_n| <= u (m_n + |l_nt|).
//   Bound: u ||m + |l_t| ||_2 / ||loss||_2 (a worst case: every rounding aligned).
// - dlogits = g (p - onehot), g = grad_scale: d p_j = p_j (dl_j - sum_k p_k dl_k), so
//   |d p_j| <= u p_j (|l_j| + m_n); the stored bf16 value adds one more rounding, u |dlogit_j|. With
//   e_nj = |g| p_nj (|l_nj| + m_n) + |dlogit_nj|:  |d dlogit_nj| <= u e_nj.
//   Checked on the rows the scratch holds at the end (the last chunk): bound u ||e|| / ||dlogits||.
// - dw = dw0 + dlogits^T x (fp32 C; dw0 f32, x exact on both sides): |d dw| <= u (e^T |x|);
//   bound u ||e^T |x| || / ||dw||.
// - dx = bf16(dx0 + dlogits W) (dx0 and W exact on both sides): |d dx| <= u (e |W|) + u |dx|;
//   bound u ||e |W| || / ||dx|| + u.
// Each bound gets x1.25 for second-order terms (exp(x) - 1 > x) and fp32 summation-order
// differences (~1e-6 relative), plus 1e-6 absolute (V = 1: loss 0 exactly on both sides).
// The worst measured errors are printed ("measured"); they come out well below these worst cases.
constexpr double kBf16U = 1.0 / 256;
constexpr double kBf16Slack = 1.25;

struct Bf16Inputs {
  std::vector<bf16> x, w, dx0;  // bf16 copies the GPU reads
  std::vector<float> xf, wf, dx0f, dw0;  // the same values in fp32 for the CPU; dw0 f32 (as on the GPU)
  std::vector<int32_t> tg;
};

// x ~ N(0, 1); w ~ N(0, (logit_std^2 / C)) so logits are ~N(0, logit_std^2), padded rows V..Vp-1 = 5 (any
// use of them shows); dx0 ~ N(0, (0.1 g logit_std / sqrt(C))^2) and dw0 ~ N(0, (0.1 g)^2): nonzero, below
// the gradients' size.
Bf16Inputs make_bf16_inputs(const Dims& d, uint64_t seed, float logit_std, float grad_scale) {
  Bf16Inputs in;
  const float w_scale = logit_std / std::sqrt(static_cast<float>(d.C));
  std::vector<float> w = test::randn(d.Vp * d.C, seed + 1, w_scale);
  for (int64_t i = d.V * d.C; i < d.Vp * d.C; ++i) w[i] = 5.0f;
  in.x = test::to_bf16(test::randn(d.N * d.C, seed));
  in.w = test::to_bf16(w);
  in.dx0 = test::to_bf16(test::randn(d.N * d.C, seed + 3, 0.1f * grad_scale * w_scale));
  in.xf = test::from_bf16(in.x);
  in.wf = test::from_bf16(in.w);
  in.dx0f = test::from_bf16(in.dx0);
  in.dw0 = test::randn(d.Vp * d.C, seed + 4, 0.1f * grad_scale);
  in.tg = test::randint(d.N, seed + 2, static_cast<int32_t>(d.V));
  return in;
}

struct Bf16Out {
  std::vector<float> losses, dw;
  std::vector<bf16> dx, scratch;
};

Bf16Out run_gpu_bf16(const Dims& d, const Bf16Inputs& in, float grad_scale, bool grad) {
  DeviceBuffer x(in.x), w(in.w), tg(in.tg), dx(in.dx0), dw(in.dw0), losses(d.N * 4), scratch(d.R * d.Vp * 2);
  losses.poison();
  scratch.poison();
  lm_head_cross_entropy(losses.tensor(DType::f32, {d.N}, "losses"),
                        grad ? dx.tensor(DType::bf16, {d.N, d.C}, "dx") : Tensor(),
                        grad ? dw.tensor(DType::f32, {d.Vp, d.C}, "dw") : Tensor(),
                        x.tensor(DType::bf16, {d.N, d.C}, "x"), w.tensor(DType::bf16, {d.Vp, d.C}, "w"),
                        tg.tensor(DType::i32, {d.N}, "targets"), scratch.tensor(DType::bf16, {d.R, d.Vp}, "scratch"),
                        d.V, grad_scale);
  return {losses.download<float>(), dw.download<float>(), dx.download<bf16>(), scratch.download<bf16>()};
}

bool bitwise_equal_bf16(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}

// ||v||_2 in double.
double l2(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

struct Bf16Worst {
  double losses = 0, dlogits = 0, dx = 0, dw = 0;  // measured rel_l2
  double losses_used = 0, dlogits_used = 0, dx_used = 0, dw_used = 0;  // measured / bound
  void add(double& w, double& used, double err, double bound) {
    w = std::max(w, err);
    used = std::max(used, err / bound);
  }
};

// Checks one rel_l2 error against its bound and records it.
void expect_rel_l2(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref,
                   double bound, double& worst, double& used, Bf16Worst& all) {
  const double err = test::rel_l2_error(got, ref);
  all.add(worst, used, err, bound);
  EXPECT_LE(err, bound) << what << ": rel_l2 error " << err << " > bound " << bound;
}

void check_bf16(const Dims& d, const Bf16Inputs& in, float grad_scale, uint64_t seed, Bf16Worst& worst) {
  const std::string what = "bf16 " + d.str() + " seed=" + std::to_string(seed);
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const Bf16Out g = run_gpu_bf16(d, in, grad_scale, true);
  // CPU fp32 reference on the rounded values (scratch: every row's dlogits).
  Out c{std::vector<float>(d.N), in.dx0f, in.dw0, std::vector<float>(d.N * d.Vp)};
  {
    Bf16Inputs cin = in;
    lm_head_cross_entropy(tensor_of(c.losses, {d.N}, "losses"), tensor_of(c.dx, {d.N, d.C}, "dx"),
                          tensor_of(c.dw, {d.Vp, d.C}, "dw"), tensor_of(cin.xf, {d.N, d.C}, "x"),
                          tensor_of(cin.wf, {d.Vp, d.C}, "w"), tensor_of(cin.tg, {d.N}, "targets"),
                          tensor_of(c.scratch, {d.N, d.Vp}, "scratch"), d.V, grad_scale);
  }

  // From the CPU's fp32 logits (in chunks of rows, to bound memory) and dlogits: |l_nt|, m_n and e.
  std::vector<double> m(d.N), lt(d.N);
  std::vector<float> e(d.N * d.Vp, 0.0f);  // padded columns: 0 (dlogits 0 there on both sides)
  {
    const int64_t chunk = 256;
    std::vector<float> t(chunk * d.V);
    std::vector<double> p(d.V);
    for (int64_t n0 = 0; n0 < d.N; n0 += chunk) {
      const int64_t rows = std::min(chunk, d.N - n0);
      blas_sgemm(false, true, rows, d.V, d.C, 1.0f, in.xf.data() + n0 * d.C, d.C, in.wf.data(), d.C, 0.0f, t.data(),
                 d.V);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        const float* l = t.data() + r * d.V;
        const float* dl = c.scratch.data() + n * d.Vp;
        double mn = 0;
        for (int64_t j = 0; j < d.V; ++j) {
          p[j] = static_cast<double>(dl[j]) / grad_scale + (j == in.tg[n] ? 1.0 : 0.0);
          mn += p[j] * std::fabs(l[j]);
        }
        m[n] = mn;
        lt[n] = std::fabs(l[in.tg[n]]);
        for (int64_t j = 0; j < d.V; ++j)
          e[n * d.Vp + j] =
              static_cast<float>(std::fabs(grad_scale) * p[j] * (std::fabs(l[j]) + mn) + std::fabs(dl[j]));
      }
    }
  }

  // losses
  double loss_err_norm = 0;
  for (int64_t n = 0; n < d.N; ++n) loss_err_norm += (m[n] + lt[n]) * (m[n] + lt[n]);
  const double loss_bound =
      kBf16Slack * kBf16U * std::sqrt(loss_err_norm) / std::max(l2(c.losses), 1e-30) + 1e-6;
  expect_rel_l2("losses " + what, g.losses, c.losses, loss_bound, worst.losses, worst.losses_used, worst);

  // dlogits: the scratch holds the last chunk's rows [n_last, N) (first R rows of the scratch); its
  // padded columns hold the zero gradient; rows past N (R > N) still hold the poison.
  const int64_t used_rows = std::min(d.R, d.N), n_last = (d.N - 1) / used_rows * used_rows,
                last_rows = d.N - n_last;
  std::vector<float> g_dl, c_dl, e_dl;
  bool scratch_ok = true;
  for (int64_t r = 0; r < d.R && scratch_ok; ++r)
    for (int64_t j = 0; j < d.Vp; ++j) {
      const float v = static_cast<float>(g.scratch[r * d.Vp + j]);
      if (r < last_rows && j < d.V) {
        g_dl.push_back(v);
        c_dl.push_back(c.scratch[(n_last + r) * d.Vp + j]);
        e_dl.push_back(e[(n_last + r) * d.Vp + j]);
        continue;
      }
      // rows in [last_rows, used_rows) hold an earlier chunk's dlogits: only their padded columns are checked
      const bool ok = r < used_rows ? (j < d.V || v == 0.0f) : std::isnan(v);
      if (!ok) {
        ADD_FAILURE() << what << ": scratch[" << r << ", " << j << "] = " << v
                      << (r < used_rows ? " (expected the zero gradient of a padded column)" : " (was written)");
        scratch_ok = false;
        break;
      }
    }
  expect_rel_l2("dlogits (last chunk) " + what, g_dl, c_dl,
                kBf16Slack * kBf16U * l2(e_dl) / std::max(l2(c_dl), 1e-30) + 1e-6, worst.dlogits,
                worst.dlogits_used, worst);

  // dw: first V rows; padded rows must be untouched (dlogits 0 there, dw0 + 0 exactly).
  {
    const std::vector<float> ax = test::abs_of(in.xf);
    std::vector<float> s(d.Vp * d.C, 0.0f);
    blas_sgemm(true, false, d.V, d.C, d.N, 1.0f, e.data(), d.Vp, ax.data(), d.C, 0.0f, s.data(), d.C);
    s.resize(d.V * d.C);
    const std::vector<float> g_dw(g.dw.begin(), g.dw.begin() + d.V * d.C), c_dw(c.dw.begin(), c.dw.begin() + d.V * d.C);
    expect_rel_l2("dw " + what, g_dw, c_dw, kBf16Slack * kBf16U * l2(s) / std::max(l2(c_dw), 1e-30) + 1e-6,
                  worst.dw, worst.dw_used, worst);
    EXPECT_TRUE(test::bitwise_equal("padded rows of dw " + what,
                                    std::vector<float>(g.dw.begin() + d.V * d.C, g.dw.end()),
                                    std::vector<float>(in.dw0.begin() + d.V * d.C, in.dw0.end())));
  }
  // dx
  {
    const std::vector<float> aw = test::abs_of(in.wf);
    std::vector<float> s(d.N * d.C, 0.0f);
    blas_sgemm(false, false, d.N, d.C, d.V, 1.0f, e.data(), d.Vp, aw.data(), d.C, 0.0f, s.data(), d.C);
    expect_rel_l2("dx " + what, test::from_bf16(g.dx), c.dx,
                  kBf16Slack * (kBf16U * l2(s) / std::max(l2(c.dx), 1e-30) + kBf16U) + 1e-6, worst.dx, worst.dx_used,
                  worst);
  }

  // Forward only: the same losses bitwise, dx untouched. Run twice: bitwise identical.
  const Bf16Out f = run_gpu_bf16(d, in, grad_scale, false);
  EXPECT_TRUE(test::bitwise_equal("bf16 forward-only losses " + what, f.losses, g.losses));
  EXPECT_TRUE(bitwise_equal_bf16(f.dx, in.dx0)) << "bf16 forward-only changed dx " << what;
  const Bf16Out g2 = run_gpu_bf16(d, in, grad_scale, true);
  EXPECT_TRUE(test::bitwise_equal("bf16 losses run twice " + what, g.losses, g2.losses));
  EXPECT_TRUE(bitwise_equal_bf16(g.dx, g2.dx)) << "bf16 dx run twice differs " << what;
  EXPECT_TRUE(test::bitwise_equal("bf16 dw run twice " + what, g.dw, g2.dw));
  EXPECT_TRUE(bitwise_equal_bf16(g.scratch, g2.scratch)) << "bf16 scratch run twice differs " << what;
}

void print_bf16_worst(const char* test, const Bf16Worst& w) {
  std::printf("%s measured worst rel_l2 (fraction of its bound): losses %.3g (%.2f), dlogits %.3g (%.2f), "
              "dx %.3g (%.2f), dw %.3g (%.2f)\n",
              test, w.losses, w.losses_used, w.dlogits, w.dlogits_used, w.dx, w.dx_used, w.dw, w.dw_used);
}

// Qwen2's vocabulary (151,936, above 65,536: 32-bit ids end to end): fp32 and bf16 against the CPU.
TEST(CudaCrossEntropy, Qwen2VocabularyMatchesCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const Dims d{96, 64, 151936, 151936, 40};  // chunks of 40, 40, 16
  const float grad_scale = 1.0f / static_cast<float>(d.N);
  Inputs in = make_inputs(d, seed, 0.02f, grad_scale);
  for (int64_t n = 0; n < d.N; ++n)  // targets across the whole range, the top ids included
    in.tg[static_cast<size_t>(n)] = static_cast<int32_t>(d.V - 1 - (n * 1583) % d.V);
  check(d, in, grad_scale, seed, true);
  Bf16Worst worst;
  check_bf16(d, make_bf16_inputs(d, seed + 1, 0.02f * std::sqrt(64.0f), grad_scale), grad_scale, seed + 1, worst);
  print_bf16_worst("lm_head_cross_entropy bf16 V=151936", worst);
}

TEST(CudaCrossEntropy, Bf16AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  // N = 1, 7, 333; V prime / not a multiple of anything, Vp padded or == V; chunks: R > N, R == N,
  // R < N not dividing N (several chunks); odd C (rows of x and w not 16-byte aligned); V = 1.
  const std::vector<Dims> cases{{1, 19, 111, 128, 4},      {7, 111, 1111, 1152, 3}, {7, 64, 19, 19, 7},
                                {333, 64, 1111, 1152, 100}, {333, 7, 2003, 2048, 128}, {19, 19, 1, 8, 5},
                                {333, 128, 997, 1024, 333},
                                // the shared-memory row kernel (32K < Vp <= 55K): V not a multiple of 8, Vp == V
                                {5, 24, 40001, 40008, 3},  {3, 16, 36000, 36000, 2},
                                // the pipelined row kernel (chunks of more rows than SMs; 2 row buffers)
                                {300, 16, 36000, 36000, 300}, {200, 24, 40001, 40008, 199}};
  Bf16Worst worst;
  uint64_t s = seed;
  for (const Dims& d : cases) {
    for (float logit_std : {1.0f, 4.0f}) {
      check_bf16(d, make_bf16_inputs(d, s, logit_std, 0.37f), 0.37f, s, worst);
      s += 5;
    }
  }
  print_bf16_worst("lm_head_cross_entropy bf16 awkward", worst);
}

TEST(CudaCrossEntropy, Bf16Gpt2ShapeMatchesCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const Dims d{1024, 768, 50257, 50304, 400};  // chunks of 400, 400, 224
  const float grad_scale = 1.0f / static_cast<float>(d.N);
  Bf16Worst worst;
  // w ~ N(0, 0.02^2) at C = 768: logits ~N(0, 0.55^2), as at GPT-2 initialisation.
  check_bf16(d, make_bf16_inputs(d, seed, 0.02f * std::sqrt(768.0f), grad_scale), grad_scale, seed, worst);
  print_bf16_worst("lm_head_cross_entropy bf16 GPT-2 shape", worst);
}

// The pipelined row kernel (one block per SM, chunks of more rows than SMs) and the two-blocks-per-SM
// kernel (chunks of at most an SM count of rows) compute each row in the same order: the same bits.
TEST(CudaCrossEntropy, Bf16RowKernelsAgreeBitwise) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  const int64_t N = 300;
  const Dims one{N, 64, 50257, 50304, N}, chunked{N, 64, 50257, 50304, 100};  // 1 chunk of 300; 3 of 100
  const Bf16Inputs in = make_bf16_inputs(one, seed, 3.0f, 0.5f);
  const Bf16Out a = run_gpu_bf16(one, in, 0.5f, true), b = run_gpu_bf16(chunked, in, 0.5f, true);
  EXPECT_EQ(std::memcmp(a.losses.data(), b.losses.data(), N * sizeof(float)), 0) << "losses, seed=" << seed;
  // the last chunk's dlogits: rows 200..299, at scratch rows 200.. of one and 0.. of chunked
  const std::vector<bf16> last_a(a.scratch.begin() + 200 * one.Vp, a.scratch.begin() + N * one.Vp),
      last_b(b.scratch.begin(), b.scratch.begin() + 100 * one.Vp);
  EXPECT_TRUE(bitwise_equal_bf16(last_a, last_b)) << "dlogits, seed=" << seed;
}

// token_logprobs (the batch-invariant sampler's logprobs) over the logits lm_head_cross_entropy left in
// its scratch (no gradient: the logits stay) is exactly minus its losses, for all rows at once and for the
// first few rows alone (another row kernel variant for GPT-2's vocabulary: the same bits), and for a
// small vocabulary (the register kernel).
TEST(CudaCrossEntropy, TokenLogprobsAreMinusTheLossBitwise) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const uint64_t seed = test::fresh_seed();
  for (const Dims& d : {Dims{300, 64, 50257, 50304, 300}, Dims{50, 64, 1000, 1024, 50}}) {
    const Bf16Inputs in = make_bf16_inputs(d, seed, 3.0f, 1.0f);
    const Bf16Out o = run_gpu_bf16(d, in, 1.0f, false);
    DeviceBuffer logits(o.scratch), tg(in.tg), lp(d.N * 4);
    for (const int64_t M : {d.N, int64_t{5}}) {
      lp.poison();
      token_logprobs(lp.tensor(DType::f32, {M}, "logprobs"), logits.tensor(DType::bf16, {M, d.Vp}, "logits"),
                     tg.tensor(DType::i32, {M}, "tokens"), d.V);
      const std::vector<float> got = lp.download<float>();
      for (int64_t i = 0; i < M; ++i) {
        const float want = -o.losses[static_cast<size_t>(i)];
        ASSERT_EQ(std::memcmp(&got[static_cast<size_t>(i)], &want, sizeof(float)), 0)
            << "row " << i << " of " << M << ": " << got[static_cast<size_t>(i)] << " vs " << want << ", V=" << d.V
            << " seed=" << seed;
      }
    }
  }
}

// A bf16 x with f32 partners (or the reverse) fails naming the tensor.
TEST(CudaCrossEntropy, Bf16DtypeMixesNameTheTensor) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  const Dims d{7, 19, 111, 128, 7};
  DeviceBuffer x(d.N * d.C * 4), w(d.Vp * d.C * 4), tg(std::vector<int32_t>(d.N, 0)), dx(d.N * d.C * 4),
      dw(d.Vp * d.C * 4), losses(d.N * 4), scratch(d.R * d.Vp * 4);
  auto call = [&](DType tx, DType tw, DType ts, DType tl, DType tdx, DType tdw) {
    lm_head_cross_entropy(losses.tensor(tl, {d.N}, "losses"), dx.tensor(tdx, {d.N, d.C}, "dx"),
                          dw.tensor(tdw, {d.Vp, d.C}, "dw"), x.tensor(tx, {d.N, d.C}, "x"),
                          w.tensor(tw, {d.Vp, d.C}, "w"), tg.tensor(DType::i32, {d.N}, "targets"),
                          scratch.tensor(ts, {d.R, d.Vp}, "scratch"), d.V, 1.0f);
  };
  auto expect_naming = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const DType b = DType::bf16, f = DType::f32;
  expect_naming([&] { call(b, f, b, f, b, f); }, "'w' has dtype f32, expected bf16");
  expect_naming([&] { call(b, b, f, f, b, f); }, "'scratch' has dtype f32, expected bf16");
  expect_naming([&] { call(b, b, b, b, b, f); }, "'losses' has dtype bf16, expected f32");
  expect_naming([&] { call(b, b, b, f, f, f); }, "'dx' has dtype f32, expected bf16");
  expect_naming([&] { call(b, b, b, f, b, b); }, "'dw' has dtype bf16, expected f32");
  expect_naming([&] { call(f, b, f, f, f, f); }, "'w' has dtype bf16, expected f32");
}

// loss_mean on the GPU against the CPU (both sum in double; the order differs: within 1e-6).
TEST(CudaLossMean, MatchesCpuAndAccumulates) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  for (int64_t n : {int64_t{1}, int64_t{19}, int64_t{16384}}) {
    std::vector<float> l = test::randn(static_cast<size_t>(n), seed + n, 3.0f), cpu = {7.0f};
    loss_mean(test::tensor_of(cpu, {1}, "dst"), test::tensor_of(l, {n}, "losses"), 0.5f, false);
    loss_mean(test::tensor_of(cpu, {1}, "dst"), test::tensor_of(l, {n}, "losses"), 0.5f, true);
    test::DeviceBuffer dl(l), dd(std::vector<float>{7.0f});
    dd.poison();
    loss_mean(dd.tensor(DType::f32, {1}, "dst"), dl.tensor(DType::f32, {n}, "losses"), 0.5f, false);
    loss_mean(dd.tensor(DType::f32, {1}, "dst"), dl.tensor(DType::f32, {n}, "losses"), 0.5f, true);
    const float gpu = dd.download<float>()[0];
    EXPECT_NEAR(gpu, cpu[0], 1e-6 * std::max(1.0f, std::fabs(cpu[0]))) << "n=" << n << " seed=" << seed;
  }
}

}  // namespace
}  // namespace lmf
