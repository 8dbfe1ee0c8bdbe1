// test_ops_activation.cpp: GELU (tanh) and SwiGLU (ops/activation.h) against float64 references
// and finite differences, on awkward sizes and extreme inputs (around +-30 and +-300);
// accumulation into prefilled gradients; shape errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops/activation.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::awkward_sizes;
using test::randn;
using test::tensor_of;
using test::to_double;

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, float64
std::vector<double> gelu_ref(const std::vector<double>& x) {
  std::vector<double> out(x.size());
  const double k = std::sqrt(2.0 / M_PI);
  for (size_t i = 0; i < x.size(); ++i) out[i] = 0.5 * x[i] * (1.0 + std::tanh(k * (x[i] + 0.044715 * x[i] * x[i] * x[i])));
  return out;
}

// inp: (N, 2F) rows [gate | up]; returns (N, F) = silu(gate) * up, float64
std::vector<double> swiglu_ref(const std::vector<double>& inp, int64_t N, int64_t F) {
  std::vector<double> out(static_cast<size_t>(N * F));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < F; ++j) {
      const double g = inp[n * 2 * F + j], u = inp[n * 2 * F + F + j];
      out[n * F + j] = g / (1.0 + std::exp(-g)) * u;
    }
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

std::string case_name(int64_t N, int64_t C) { return "N=" + std::to_string(N) + " C=" + std::to_string(C); }

// Forward: the op's exp() is ~1-2 ulp; with the fp32 rounding of u = k (x + a x^3) (a few ulp of |2u|,
// up to ~20 where the output is not saturated) and of the final products, the observed worst errors
// are ~1.5e-7 relative and ~5e-7 absolute (for |x| up to ~10). Tolerance: ~10x that.
constexpr double kFwdAtol = 1e-6, kFwdRtol = 2e-6;
// Backward: the same sources plus the fp32 sum prefill + grad (observed worst ~4e-7 absolute); the FD
// reference itself is accurate to ~1e-8.
constexpr double kBwdAtol = 2e-6, kBwdRtol = 1e-5;

// Extreme inputs: values spread around -300, -30, 30, 300 (and a few exactly there).
std::vector<float> extreme_inputs(size_t n, uint64_t seed) {
  const float centers[4] = {-300.0f, -30.0f, 30.0f, 300.0f};
  auto noise = randn(n, seed, 2.0f);
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = centers[i % 4] + (i < 8 ? 0.0f : noise[i]);
  return x;
}

// --- GELU ---------------------------------------------------------------------------------------

// Checks gelu_backward (with a prefilled dinp) against FD of loss = sum(gelu(x) * r).
void check_gelu_backward(const std::vector<float>& x, int64_t N, int64_t C, const std::string& what) {
  const size_t n = x.size();
  auto r = randn(n, 31), dinp = randn(n, 32, 0.5f), inp = x;
  const auto rd = to_double(r);
  const auto g = test::finite_diff([&](const std::vector<double>& p) { return dot(gelu_ref(p), rd); }, to_double(x));
  std::vector<double> want(n);
  for (size_t i = 0; i < n; ++i) want[i] = dinp[i] + g[i];
  gelu_backward(tensor_of(dinp, {N, C}, "dinp"), tensor_of(r, {N, C}, "dout"), tensor_of(inp, {N, C}, "inp"));
  EXPECT_TRUE(all_finite(dinp)) << what;
  EXPECT_TRUE(all_close("gelu dinp " + what, dinp, want, kBwdAtol, kBwdRtol));
}

TEST(OpsActivation, GeluForwardAwkwardSizes) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes()) {
      const size_t n = static_cast<size_t>(N * C);
      auto x = randn(n, 1, 3.0f), out = std::vector<float>(n);
      gelu_forward(tensor_of(out, {N, C}, "out"), tensor_of(x, {N, C}, "inp"));
      EXPECT_TRUE(all_close("gelu out " + case_name(N, C), out, gelu_ref(to_double(x)), kFwdAtol, kFwdRtol));
    }
}

TEST(OpsActivation, GeluBackwardFiniteDifferencesAccumulates) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes()) {
      const int64_t Nfd = N * C > 2500 ? 5 : N;  // FD cost grows with the element count
      check_gelu_backward(randn(static_cast<size_t>(Nfd * C), 2, 3.0f), Nfd, C, case_name(Nfd, C));
    }
}

TEST(OpsActivation, GeluExtremeInputs) {
  const int64_t N = 4, C = 19;
  auto x = extreme_inputs(static_cast<size_t>(N * C), 3), out = std::vector<float>(x.size());
  gelu_forward(tensor_of(out, {N, C}, "out"), tensor_of(x, {N, C}, "inp"));
  EXPECT_TRUE(all_finite(out));
  EXPECT_TRUE(all_close("gelu out extreme", out, gelu_ref(to_double(x)), kFwdAtol, kFwdRtol));
  check_gelu_backward(x, N, C, "extreme");
}

// --- SwiGLU -------------------------------------------------------------------------------------

// Checks swiglu_backward (with a prefilled dinp) against FD of loss = sum(swiglu(inp) * r).
void check_swiglu_backward(const std::vector<float>& inp_in, int64_t N, int64_t F, const std::string& what) {
  auto inp = inp_in;
  auto r = randn(static_cast<size_t>(N * F), 41), dinp = randn(inp.size(), 42, 0.5f);
  const auto rd = to_double(r);
  const auto g = test::finite_diff([&](const std::vector<double>& p) { return dot(swiglu_ref(p, N, F), rd); },
                                   to_double(inp));
  std::vector<double> want(inp.size());
  for (size_t i = 0; i < inp.size(); ++i) want[i] = dinp[i] + g[i];
  swiglu_backward(tensor_of(dinp, {N, 2 * F}, "dinp"), tensor_of(r, {N, F}, "dout"),
                  tensor_of(inp, {N, 2 * F}, "inp"));
  EXPECT_TRUE(all_finite(dinp)) << what;
  EXPECT_TRUE(all_close("swiglu dinp " + what, dinp, want, kBwdAtol, kBwdRtol));
}

TEST(OpsActivation, SwigluForwardAwkwardSizes) {
  for (int64_t N : awkward_sizes())
    for (int64_t F : awkward_sizes()) {
      auto inp = randn(static_cast<size_t>(N * 2 * F), 5, 3.0f), out = std::vector<float>(static_cast<size_t>(N * F));
      swiglu_forward(tensor_of(out, {N, F}, "out"), tensor_of(inp, {N, 2 * F}, "inp"));
      EXPECT_TRUE(all_close("swiglu out " + case_name(N, F), out, swiglu_ref(to_double(inp), N, F), kFwdAtol,
                            kFwdRtol));
    }
}

TEST(OpsActivation, SwigluLeadingDimsFlatten) {
  const int64_t B = 2, T = 7, F = 19;
  auto inp = randn(static_cast<size_t>(B * T * 2 * F), 6, 2.0f), out = std::vector<float>(static_cast<size_t>(B * T * F));
  swiglu_forward(tensor_of(out, {B, T, F}, "out"), tensor_of(inp, {B, T, 2 * F}, "inp"));
  EXPECT_TRUE(all_close("swiglu out (B, T, F)", out, swiglu_ref(to_double(inp), B * T, F), kFwdAtol, kFwdRtol));
}

TEST(OpsActivation, SwigluBackwardFiniteDifferencesAccumulates) {
  for (int64_t N : awkward_sizes())
    for (int64_t F : awkward_sizes()) {
      const int64_t Nfd = N * F > 2500 ? 3 : N;
      check_swiglu_backward(randn(static_cast<size_t>(Nfd * 2 * F), 7, 3.0f), Nfd, F, case_name(Nfd, F));
    }
}

TEST(OpsActivation, SwigluExtremeInputs) {
  const int64_t N = 4, F = 19;
  // gate and up both get values around +-30 and +-300
  auto inp = extreme_inputs(static_cast<size_t>(N * 2 * F), 8), out = std::vector<float>(static_cast<size_t>(N * F));
  swiglu_forward(tensor_of(out, {N, F}, "out"), tensor_of(inp, {N, 2 * F}, "inp"));
  EXPECT_TRUE(all_finite(out));
  EXPECT_TRUE(all_close("swiglu out extreme", out, swiglu_ref(to_double(inp), N, F), kFwdAtol, kFwdRtol));
  check_swiglu_backward(inp, N, F, "extreme");
}

// --- errors -------------------------------------------------------------------------------------

TEST(OpsActivation, RejectsBadShapesNamingTensor) {
  std::vector<float> a(7 * 19), b(7 * 18), c(7 * 38);
  try {
    gelu_forward(tensor_of(a, {7, 19}, "gelu_out"), tensor_of(b, {7, 18}, "fc_pre"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'fc_pre'"));
  }
  EXPECT_THROW(gelu_backward(tensor_of(b, {7, 18}, "dinp"), tensor_of(a, {7, 19}, "dout"),
                             tensor_of(a, {7, 19}, "inp")),
               Error);
  // swiglu: inp must be (N, 2F) for out (N, F)
  try {
    swiglu_forward(tensor_of(a, {7, 19}, "swiglu_out"), tensor_of(b, {7, 18}, "swiglu_in"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'swiglu_in'"));
  }
  EXPECT_NO_THROW(swiglu_forward(tensor_of(a, {7, 19}, "out"), tensor_of(c, {7, 38}, "inp")));
  EXPECT_THROW(swiglu_backward(tensor_of(a, {7, 19}, "dinp"), tensor_of(a, {7, 19}, "dout"),
                               tensor_of(c, {7, 38}, "inp")),
               Error);
}

// bf16 runs on the GPU only (docs/MIXED_PRECISION.md): bf16 tensors on the CPU fail with one line
// naming a tensor; a dtype mix fails naming the odd tensor.
TEST(OpsActivation, Bf16OnTheCpuAndDtypeMixesAreErrors) {
  std::vector<bf16> x(16), y(16), d(16);
  std::vector<float> f(16);
  const Tensor tx(x.data(), DType::bf16, {16}, "fc_pre"), ty(y.data(), DType::bf16, {16}, "fc_act"),
      td(d.data(), DType::bf16, {16}, "d_fc");
  auto expect_error = [](auto call, const char* text) {
    try {
      call();
      ADD_FAILURE() << "no error, expected: " << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr(text));
    }
  };
  expect_error([&] { gelu_forward(ty, tx); }, "gelu_forward: bf16 tensors run on the GPU only ('fc_pre')");
  expect_error([&] { gelu_backward(td, td, tx); }, "gelu_backward: bf16 tensors run on the GPU only");
  expect_error([&] { swiglu_forward(Tensor(y.data(), DType::bf16, {2, 4}, "sw_out"), Tensor(x.data(), DType::bf16, {2, 8}, "sw_in")); },
               "swiglu_forward: bf16 tensors run on the GPU only ('sw_in')");
  expect_error([&] { swiglu_backward(Tensor(d.data(), DType::bf16, {2, 8}, "sw_din"), Tensor(y.data(), DType::bf16, {2, 4}, "sw_dout"),
                                     Tensor(x.data(), DType::bf16, {2, 8}, "sw_in")); },
               "swiglu_backward: bf16 tensors run on the GPU only");
  expect_error([&] { gelu_forward(ty, tensor_of(f, {16}, "inp")); }, "'fc_act' has dtype bf16, expected f32");
}

}  // namespace
}  // namespace lmf
