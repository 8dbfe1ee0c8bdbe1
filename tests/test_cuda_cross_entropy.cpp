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
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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
  EXPECT_TRUE(test::within_scale("dx " + what, g.dx, c.dx, dx_scale, tol));
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
