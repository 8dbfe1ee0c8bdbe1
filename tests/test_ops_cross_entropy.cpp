// test_ops_cross_entropy.cpp: LM head + softmax cross-entropy (CPU) against a naive float64
// reference (losses), central finite differences of grad_scale * sum(losses) (dx, dw), padded vocab
// rows, chunking (R < N, not dividing N), extreme logits, accumulation, determinism, errors.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/blas.h"
#include "ops/cross_entropy.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;
using test::to_double;

// Losses: logits are fp32 dot products of length C (|logit| up to ~30 for C = 111, error a few
// 1e-6), the logsumexp is summed in double. Observed max error 3.6e-6 (C = 111).
constexpr double kLossAtol = 1e-5, kLossRtol = 1e-5;
// Gradients vs FD of the fp64 reference (FD error ~1e-9 with h = 1e-6): fp32 softmax times an fp32
// GEMM over V (dx) or N (dw). Observed max error 8e-7.
constexpr double kGradAtol = 1e-5, kGradRtol = 1e-5;

struct Dims {
  int64_t N, C, V, Vp, R;
  std::string str() const {
    return "N=" + std::to_string(N) + " C=" + std::to_string(C) + " V=" + std::to_string(V) +
           " Vp=" + std::to_string(Vp) + " R=" + std::to_string(R);
  }
};

// Naive fp64 reference: per-row loss = logsumexp(x W[:V]^T) - logit[target].
std::vector<double> ref_losses(const std::vector<double>& x, const std::vector<double>& w,
                               const std::vector<int32_t>& tg, const Dims& d) {
  std::vector<double> losses(d.N), l(d.V);
  for (int64_t n = 0; n < d.N; ++n) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < d.V; ++j) {
      double s = 0;
      for (int64_t c = 0; c < d.C; ++c) s += x[n * d.C + c] * w[j * d.C + c];
      l[j] = s;
      mx = std::max(mx, s);
    }
    double sum = 0;
    for (int64_t j = 0; j < d.V; ++j) sum += std::exp(l[j] - mx);
    losses[n] = mx + std::log(sum) - l[tg[n]];
  }
  return losses;
}

double ref_total(const std::vector<double>& x, const std::vector<double>& w, const std::vector<int32_t>& tg,
                 const Dims& d, double grad_scale) {
  double s = 0;
  for (double l : ref_losses(x, w, tg, d)) s += l;
  return grad_scale * s;
}

// Analytic fp64 gradients of grad_scale * sum(losses) (for sizes where FD is too slow).
void ref_grads(const std::vector<double>& x, const std::vector<double>& w, const std::vector<int32_t>& tg,
               const Dims& d, double gs, std::vector<double>& dx, std::vector<double>& dw) {
  std::vector<double> l(d.V);
  for (int64_t n = 0; n < d.N; ++n) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < d.V; ++j) {
      double s = 0;
      for (int64_t c = 0; c < d.C; ++c) s += x[n * d.C + c] * w[j * d.C + c];
      mx = std::max(mx, l[j] = s);
    }
    for (int64_t j = 0; j < d.V; ++j) sum += std::exp(l[j] - mx);
    for (int64_t j = 0; j < d.V; ++j) {
      const double g = gs * (std::exp(l[j] - mx) / sum - (j == tg[n] ? 1.0 : 0.0));
      for (int64_t c = 0; c < d.C; ++c) {
        dx[n * d.C + c] += g * w[j * d.C + c];
        dw[j * d.C + c] += g * x[n * d.C + c];
      }
    }
  }
}

std::vector<double> plus(const std::vector<float>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] + b[i];
  return r;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// Runs the op; dx/dw are accumulated into when `grad`.
std::vector<float> run(const Dims& d, std::vector<float>& x, std::vector<float>& w, std::vector<int32_t>& tg,
                       std::vector<float>* dx, std::vector<float>* dw, float grad_scale) {
  std::vector<float> losses(d.N, -1.0f), scratch(d.R * d.Vp, 5.0f);
  lm_head_cross_entropy(tensor_of(losses, {d.N}, "losses"), dx ? tensor_of(*dx, {d.N, d.C}, "dx") : Tensor(),
                        dw ? tensor_of(*dw, {d.Vp, d.C}, "dw") : Tensor(), tensor_of(x, {d.N, d.C}, "x"),
                        tensor_of(w, {d.Vp, d.C}, "w"), tensor_of(tg, {d.N}, "targets"),
                        tensor_of(scratch, {d.R, d.Vp}, "logits_scratch"), d.V, grad_scale);
  return losses;
}

// Inputs; rows V..Vp-1 of w are random too (not zero), so any use of them shows up.
struct Inputs {
  std::vector<float> x, w;
  std::vector<int32_t> tg;
};
Inputs make_inputs(const Dims& d, uint64_t seed) {
  return {randn(d.N * d.C, seed), randn(d.Vp * d.C, seed + 1), test::randint(d.N, seed + 2, static_cast<int32_t>(d.V))};
}

// V and C over the awkward sizes, Vp > V (padding) and Vp == V, R < N not dividing N, R == N, R > N.
const std::vector<Dims>& cases() {
  static const std::vector<Dims> c{{19, 7, 111, 128, 5}, {7, 19, 19, 64, 7}, {1, 1, 7, 8, 1},
                                   {7, 111, 19, 19, 3},  {19, 19, 1, 4, 19}, {7, 7, 111, 111, 9}};
  return c;
}

TEST(OpsCrossEntropy, LossesMatchReference) {
  uint64_t seed = 1;
  for (const Dims& d : cases()) {
    auto in = make_inputs(d, seed += 3);
    auto losses = run(d, in.x, in.w, in.tg, nullptr, nullptr, 1.0f);
    EXPECT_TRUE(all_close("losses " + d.str(), losses, ref_losses(to_double(in.x), to_double(in.w), in.tg, d),
                          kLossAtol, kLossRtol));
  }
}

// d(grad_scale * sum(losses)) by central differences, over every x and w element (padded rows
// included: their FD gradient is 0 and the op must leave them untouched), on top of a prefill.
TEST(OpsCrossEntropy, GradientsMatchFiniteDifferences) {
  uint64_t seed = 100;
  for (const Dims& d : cases())
    for (float gs : {1.0f, 0.37f}) {
      auto in = make_inputs(d, seed += 3);
      auto dx = randn(d.N * d.C, seed + 10), dw = randn(d.Vp * d.C, seed + 11);
      const auto dx0 = dx, dw0 = dw;
      auto losses = run(d, in.x, in.w, in.tg, &dx, &dw, gs);
      const auto xd = to_double(in.x), wd = to_double(in.w);
      auto fd_x = test::finite_diff([&](const std::vector<double>& v) { return ref_total(v, wd, in.tg, d, gs); }, xd);
      auto fd_w = test::finite_diff([&](const std::vector<double>& v) { return ref_total(xd, v, in.tg, d, gs); }, wd);
      const std::string what = d.str() + " grad_scale=" + std::to_string(gs);
      EXPECT_TRUE(all_close("losses " + what, losses, ref_losses(xd, wd, in.tg, d), kLossAtol, kLossRtol));
      EXPECT_TRUE(all_close("dx " + what, dx, plus(dx0, fd_x), kGradAtol, kGradRtol));
      EXPECT_TRUE(all_close("dw " + what, dw, plus(dw0, fd_w), kGradAtol, kGradRtol));
      // Padded rows: exactly the prefill (never written).
      for (int64_t i = d.V * d.C; i < d.Vp * d.C; ++i) ASSERT_EQ(dw[i], dw0[i]) << "padded dw[" << i << "] " << what;
    }
}

// A bigger vocabulary than FD allows: analytic fp64 gradients.
TEST(OpsCrossEntropy, GradientsLargeMatchReference) {
  const Dims d{111, 111, 1111, 1152, 19};
  auto in = make_inputs(d, 150);
  std::vector<float> dx(d.N * d.C, 0.0f), dw(d.Vp * d.C, 0.0f);
  auto losses = run(d, in.x, in.w, in.tg, &dx, &dw, 0.5f);
  std::vector<double> rdx(dx.size(), 0.0), rdw(dw.size(), 0.0);
  ref_grads(to_double(in.x), to_double(in.w), in.tg, d, 0.5, rdx, rdw);
  // Logits ~ N(0, 111): |logit| up to ~40, fp32 error ~1e-5 absolute.
  EXPECT_TRUE(
      all_close("losses " + d.str(), losses, ref_losses(to_double(in.x), to_double(in.w), in.tg, d), 1e-4, 1e-5));
  EXPECT_TRUE(all_close("dx " + d.str(), dx, rdx, 1e-4, 1e-4));
  EXPECT_TRUE(all_close("dw " + d.str(), dw, rdw, 1e-4, 1e-4));
}

// Chunks of R rows (R < N, R not dividing N) give the results of one chunk of N rows, up to fp32
// rounding: the chunk's GEMMs have M = R rows and OpenBLAS picks its kernels (and so the summation
// order) by M, so per-row results are not guaranteed bitwise equal across R (observed: losses equal,
// dx differs in the last bit for R <= 7); dW also groups the sum over rows differently. For a fixed R
// the results are deterministic (test below). Tolerance: a few fp32 ulps of |values| <= ~10.
TEST(OpsCrossEntropy, ChunkingDoesNotChangeResults) {
  const int64_t N = 19, C = 19, V = 111, Vp = 128;
  Dims full{N, C, V, Vp, N};
  auto in = make_inputs(full, 200);
  std::vector<float> dx_full(N * C, 0.0f), dw_full(Vp * C, 0.0f);
  auto l_full = run(full, in.x, in.w, in.tg, &dx_full, &dw_full, 1.0f);
  for (int64_t R : {1, 5, 7, 18, 25}) {
    Dims d{N, C, V, Vp, R};
    std::vector<float> dx(N * C, 0.0f), dw(Vp * C, 0.0f);
    auto l = run(d, in.x, in.w, in.tg, &dx, &dw, 1.0f);
    EXPECT_TRUE(all_close("losses " + d.str(), l, to_double(l_full), 1e-6, 1e-6));
    EXPECT_TRUE(all_close("dx " + d.str(), dx, to_double(dx_full), 1e-6, 1e-6));
    EXPECT_TRUE(all_close("dw " + d.str(), dw, to_double(dw_full), 1e-6, 1e-6));
    // Forward only (dx, dw absent): the same losses as with gradients, same R.
    EXPECT_TRUE(bitwise_equal(run(d, in.x, in.w, in.tg, nullptr, nullptr, 1.0f), l)) << "no-grad " << d.str();
  }
}

// Logits spread over +-300, and one target at a hugely negative logit (loss ~ 1e4): finite,
// accurate losses and gradients.
TEST(OpsCrossEntropy, ExtremeLogits) {
  const Dims d{7, 19, 111, 128, 3};
  auto in = make_inputs(d, 300);
  // x rows scaled so that logits ~ N(0, 300^2 / 3).
  for (auto& v : in.x) v *= 300.0f / std::sqrt(3.0f * d.C);
  // Row 0: w[target] = -100 * x[0] direction, so logit[target] ~ -100 |x0|^2 ~ -1e4 or less.
  const int32_t t0 = in.tg[0];
  for (int64_t c = 0; c < d.C; ++c) in.w[t0 * d.C + c] = -100.0f * in.x[c] / 300.0f;
  std::vector<float> dx(d.N * d.C, 0.0f), dw(d.Vp * d.C, 0.0f);
  auto losses = run(d, in.x, in.w, in.tg, &dx, &dw, 1.0f);
  const auto xd = to_double(in.x), wd = to_double(in.w);
  auto ref = ref_losses(xd, wd, in.tg, d);
  EXPECT_GT(ref[0], 1e3);
  // Logits of magnitude up to ~1e4 carry fp32 rounding of ~1e-3 absolute; losses ~1e2..1e4. Observed
  // max error 1.8e-4 absolute (1e-7 relative).
  EXPECT_TRUE(all_close("losses extreme", losses, ref, 1e-2, 1e-5));
  std::vector<double> rdx(dx.size(), 0.0), rdw(dw.size(), 0.0);
  ref_grads(xd, wd, in.tg, d, 1.0, rdx, rdw);
  // Softmax is nearly one-hot; probabilities carry the logit rounding (~1e-4) as relative error, and
  // gradients are scaled by |x| ~ 70. Observed max error 2.2e-4 absolute.
  EXPECT_TRUE(all_close("dx extreme", dx, rdx, 1e-3, 1e-3));
  EXPECT_TRUE(all_close("dw extreme", dw, rdw, 1e-3, 1e-3));
}

// token_logprobs (the batch-invariant sampler's logprobs, ops/cross_entropy.h) of the logits x W^T is
// exactly minus the loss lm_head_cross_entropy computes for the same rows and targets; bad tokens and
// shapes are errors naming the op.
TEST(OpsCrossEntropy, TokenLogprobsAreMinusTheLossBitwise) {
  for (const Dims& d : cases()) {
    Inputs in = make_inputs(d, 77);
    const std::vector<float> losses = run(d, in.x, in.w, in.tg, nullptr, nullptr, 1.0f);
    std::vector<float> logits(static_cast<size_t>(d.N * d.Vp)), lp(static_cast<size_t>(d.N), 1.0f);
    blas_sgemm(false, true, d.N, d.Vp, d.C, 1.0f, in.x.data(), d.C, in.w.data(), d.C, 0.0f, logits.data(), d.Vp);
    token_logprobs(tensor_of(lp, {d.N}, "logprobs"), tensor_of(logits, {d.N, d.Vp}, "logits"),
                   tensor_of(in.tg, {d.N}, "tokens"), d.V);
    for (int64_t n = 0; n < d.N; ++n) {
      const float want = -losses[static_cast<size_t>(n)];
      EXPECT_EQ(std::memcmp(&lp[static_cast<size_t>(n)], &want, sizeof(float)), 0)
          << d.str() << " row " << n << ": " << lp[static_cast<size_t>(n)] << " vs " << want;
    }
    std::vector<int32_t> bad = in.tg;
    bad[0] = static_cast<int32_t>(d.V);
    expect_error_naming([&] {
      token_logprobs(tensor_of(lp, {d.N}, "logprobs"), tensor_of(logits, {d.N, d.Vp}, "logits"),
                     tensor_of(bad, {d.N}, "tokens"), d.V);
    }, "token_logprobs: token");
  }
}

TEST(OpsCrossEntropy, Deterministic) {
  const Dims d{111, 19, 1111, 1152, 7};
  auto in = make_inputs(d, 400);
  std::vector<float> dx[2], dw[2], l[2];
  for (int k = 0; k < 2; ++k) {
    dx[k].assign(d.N * d.C, 0.0f);
    dw[k].assign(d.Vp * d.C, 0.0f);
    l[k] = run(d, in.x, in.w, in.tg, &dx[k], &dw[k], 1.0f / d.N);
  }
  EXPECT_TRUE(bitwise_equal(l[0], l[1]));
  EXPECT_TRUE(bitwise_equal(dx[0], dx[1]));
  EXPECT_TRUE(bitwise_equal(dw[0], dw[1]));
}

TEST(OpsCrossEntropy, BadInputsNameTheTensor) {
  const Dims d{7, 19, 19, 24, 3};
  auto in = make_inputs(d, 500);
  std::vector<float> losses(d.N), scratch(d.R * d.Vp), dx(d.N * d.C), dw(d.Vp * d.C);
  auto call = [&](Tensor x, Tensor w, Tensor tg, Tensor dxt, Tensor dwt, int64_t V) {
    lm_head_cross_entropy(tensor_of(losses, {d.N}, "losses"), dxt, dwt, x, w, tg,
                          tensor_of(scratch, {d.R, d.Vp}, "logits_scratch"), V, 1.0f);
  };
  auto X = [&] { return tensor_of(in.x, {d.N, d.C}, "h_final"); };
  auto W = [&] { return tensor_of(in.w, {d.Vp, d.C}, "lm_head.weight"); };
  auto TG = [&] { return tensor_of(in.tg, {d.N}, "targets"); };
  // w with the wrong C.
  expect_error_naming(
      [&] {
        call(X(), tensor_of(in.w, {d.C, d.Vp}, "lm_head.weight"), TG(), Tensor(), Tensor(), d.V);
      },
      "lm_head.weight");
  // Target out of range: names the row and the value.
  in.tg[4] = static_cast<int32_t>(d.V);
  expect_error_naming([&] { call(X(), W(), TG(), Tensor(), Tensor(), d.V); }, "row 4 is 19");
  in.tg[4] = -2;
  expect_error_naming([&] { call(X(), W(), TG(), Tensor(), Tensor(), d.V); }, "row 4 is -2");
  in.tg[4] = 0;
  // vocab_size > Vp.
  expect_error_naming([&] { call(X(), W(), TG(), Tensor(), Tensor(), d.Vp + 1); }, "vocab_size=25");
  // dx without dw.
  expect_error_naming([&] { call(X(), W(), TG(), tensor_of(dx, {d.N, d.C}, "dh_final"), Tensor(), d.V); }, "dh_final");
  // dw with the wrong shape.
  expect_error_naming(
      [&] {
        call(X(), W(), TG(), tensor_of(dx, {d.N, d.C}, "dx"), tensor_of(dw, {d.C, d.Vp}, "lm_head.dweight"), d.V);
      },
      "lm_head.dweight");
}

// bf16 x / w / logits_scratch / dx run on the GPU only: on the CPU the op fails with one line naming
// the tensor, before anything is written.
TEST(OpsCrossEntropy, Bf16OnCpuIsAnErrorNamingTheTensor) {
  const Dims d{7, 19, 19, 24, 3};
  auto in = make_inputs(d, 600);
  std::vector<bf16> x(d.N * d.C), w(d.Vp * d.C), scratch(d.R * d.Vp), dx(d.N * d.C);
  std::vector<float> losses(d.N, -1.0f), dw(d.Vp * d.C, 0.0f);
  try {
    lm_head_cross_entropy(tensor_of(losses, {d.N}, "losses"), Tensor(dx.data(), DType::bf16, {d.N, d.C}, "dx"),
                          tensor_of(dw, {d.Vp, d.C}, "dw"), Tensor(x.data(), DType::bf16, {d.N, d.C}, "h_final"),
                          Tensor(w.data(), DType::bf16, {d.Vp, d.C}, "lm_head.weight_bf16"),
                          tensor_of(in.tg, {d.N}, "targets"),
                          Tensor(scratch.data(), DType::bf16, {d.R, d.Vp}, "logits_scratch"), d.V, 1.0f);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "lm_head_cross_entropy: bf16 tensors run on the GPU only ('h_final')");
  }
  for (float v : losses) EXPECT_EQ(v, -1.0f);
  for (float v : dw) EXPECT_EQ(v, 0.0f);
}

// loss_mean: dst = (accumulate ? dst : 0) + scale * mean(losses), the mean in double in index order.
TEST(LossMean, MeanScaleAndAccumulate) {
  for (int64_t n : test::awkward_sizes()) {
    std::vector<float> l = randn(static_cast<size_t>(n), 900 + n, 3.0f);
    double ref = 0;
    for (float v : l) ref += v;
    ref /= static_cast<double>(n);
    std::vector<float> dst = {123.0f};
    loss_mean(tensor_of(dst, {1}, "dst"), tensor_of(l, {n}, "losses"), 0.5f, false);
    EXPECT_EQ(dst[0], static_cast<float>(0.5 * ref)) << "n=" << n;
    loss_mean(tensor_of(dst, {1}, "dst"), tensor_of(l, {n}, "losses"), 0.25f, true);
    EXPECT_EQ(dst[0], static_cast<float>(static_cast<double>(static_cast<float>(0.5 * ref)) + 0.25 * ref)) << "n=" << n;
  }
  std::vector<float> two(2), l(3);
  EXPECT_THROW(loss_mean(tensor_of(two, {2}, "dst"), tensor_of(l, {3}, "losses"), 1.0f, false), Error);
}

}  // namespace
}  // namespace lmf
