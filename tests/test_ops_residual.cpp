// test_ops_residual.cpp: residual add (ops/residual.h) against a float64 reference and finite
// differences, on awkward sizes; accumulation into prefilled gradients; aliasing; shape errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ops/residual.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::awkward_sizes;
using test::randn;
using test::tensor_of;
using test::to_double;

// out = a + b in float64. a, b: (n)
std::vector<double> residual_ref(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = a[i] + b[i];
  return out;
}

std::string case_name(int64_t N, int64_t C) { return "N=" + std::to_string(N) + " C=" + std::to_string(C); }

// One fp32 add of exact inputs is correctly rounded: at most half an ulp, rtol 2^-24 ~ 6e-8.
constexpr double kFwdAtol = 0.0, kFwdRtol = 6.0e-8;
// prefill + dout is one fp32 rounding of exact values; the FD gradient of a linear loss is exact up to
// ~1e-9 (roundoff of the double loss over the step).
constexpr double kBwdAtol = 1e-7, kBwdRtol = 1e-7;

TEST(OpsResidual, ForwardAwkwardSizes) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes()) {
      const size_t n = static_cast<size_t>(N * C);
      auto a = randn(n, 1), b = randn(n, 2), out = std::vector<float>(n, -1.0f);
      residual_forward(tensor_of(out, {N, C}, "out"), tensor_of(a, {N, C}, "a"), tensor_of(b, {N, C}, "b"));
      EXPECT_TRUE(all_close("residual out " + case_name(N, C), out, residual_ref(to_double(a), to_double(b)),
                            kFwdAtol, kFwdRtol));
    }
}

TEST(OpsResidual, ForwardInPlaceAliasing) {
  const int64_t B = 2, T = 19, C = 111;
  const size_t n = static_cast<size_t>(B * T * C);
  auto a = randn(n, 3), b = randn(n, 4);
  const auto ref = residual_ref(to_double(a), to_double(b));
  auto x = a;  // out aliases a (x = x + b)
  residual_forward(tensor_of(x, {B, T, C}, "x"), tensor_of(x, {B, T, C}, "x"), tensor_of(b, {B, T, C}, "b"));
  EXPECT_TRUE(all_close("residual out aliasing a", x, ref, kFwdAtol, kFwdRtol));
  auto y = b;  // out aliases b
  residual_forward(tensor_of(y, {B, T, C}, "y"), tensor_of(a, {B, T, C}, "a"), tensor_of(y, {B, T, C}, "y"));
  EXPECT_TRUE(all_close("residual out aliasing b", y, ref, kFwdAtol, kFwdRtol));
}

TEST(OpsResidual, BackwardFiniteDifferencesAccumulates) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes()) {
      const int64_t Nfd = N * C > 2500 ? 5 : N;  // FD cost is quadratic in the element count
      const size_t n = static_cast<size_t>(Nfd * C);
      auto a = randn(n, 10), b = randn(n, 11), r = randn(n, 12);
      // loss(a, b) = sum((a + b) * r), parameters packed as [a | b]
      std::vector<double> params = to_double(a);
      for (float v : b) params.push_back(v);
      const std::vector<double> rd = to_double(r);
      auto loss = [&](const std::vector<double>& p) {
        std::vector<double> pa(p.begin(), p.begin() + n), pb(p.begin() + n, p.end());
        const auto out = residual_ref(pa, pb);
        double s = 0;
        for (size_t i = 0; i < n; ++i) s += out[i] * rd[i];
        return s;
      };
      const auto g = test::finite_diff(loss, params);
      auto da = randn(n, 13, 0.5f), db = randn(n, 14, 0.5f);  // prefill: backward must accumulate
      std::vector<double> want_a(n), want_b(n);
      for (size_t i = 0; i < n; ++i) {
        want_a[i] = da[i] + g[i];
        want_b[i] = db[i] + g[n + i];
      }
      residual_backward(tensor_of(da, {Nfd, C}, "da"), tensor_of(db, {Nfd, C}, "db"), tensor_of(r, {Nfd, C}, "dout"));
      EXPECT_TRUE(all_close("residual da " + case_name(Nfd, C), da, want_a, kBwdAtol, kBwdRtol));
      EXPECT_TRUE(all_close("residual db " + case_name(Nfd, C), db, want_b, kBwdAtol, kBwdRtol));
    }
}

TEST(OpsResidual, BackwardSkipsAbsentGradient) {
  const int64_t N = 7, C = 19;
  const size_t n = static_cast<size_t>(N * C);
  auto dout = randn(n, 20), db = randn(n, 21);
  std::vector<double> want(n);
  for (size_t i = 0; i < n; ++i) want[i] = static_cast<double>(db[i]) + dout[i];
  residual_backward(Tensor(), tensor_of(db, {N, C}, "db"), tensor_of(dout, {N, C}, "dout"));
  EXPECT_TRUE(all_close("residual db with da absent", db, want, kBwdAtol, kBwdRtol));
  auto da = randn(n, 22);
  std::vector<double> want_a(n);
  for (size_t i = 0; i < n; ++i) want_a[i] = static_cast<double>(da[i]) + dout[i];
  residual_backward(tensor_of(da, {N, C}, "da"), Tensor(), tensor_of(dout, {N, C}, "dout"));
  EXPECT_TRUE(all_close("residual da with db absent", da, want_a, kBwdAtol, kBwdRtol));
}

TEST(OpsResidual, RejectsShapeMismatchNamingTensor) {
  std::vector<float> out(7 * 19), a(7 * 19), b(7 * 18);
  EXPECT_THROW(residual_forward(tensor_of(out, {7, 19}, "out"), tensor_of(a, {7, 19}, "a"),
                                tensor_of(b, {7, 18}, "resid_b")),
               Error);
  try {
    residual_forward(tensor_of(out, {7, 19}, "out"), tensor_of(a, {7, 19}, "a"), tensor_of(b, {7, 18}, "resid_b"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'resid_b'"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("(7, 18)"));
  }
  std::vector<float> da(7 * 18), dout(7 * 19);
  try {
    residual_backward(tensor_of(da, {7, 18}, "grad_a"), Tensor(), tensor_of(dout, {7, 19}, "dout"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'grad_a'"));
  }
}

// bf16 runs on the GPU only (docs/MIXED_PRECISION.md): bf16 tensors on the CPU fail with one line
// naming a tensor; a dtype mix fails naming the odd tensor.
TEST(OpsResidual, Bf16OnTheCpuAndDtypeMixesAreErrors) {
  std::vector<bf16> a(8), b(8), out(8);
  std::vector<float> f(8);
  const Tensor ta(a.data(), DType::bf16, {8}, "res_a"), tb(b.data(), DType::bf16, {8}, "res_b"),
      tout(out.data(), DType::bf16, {8}, "res_out");
  try {
    residual_forward(tout, ta, tb);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("residual_forward: bf16 tensors run on the GPU only ('res_out')"));
  }
  try {
    residual_backward(ta, Tensor(), tb);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("residual_backward: bf16 tensors run on the GPU only ('res_b')"));
  }
  try {
    residual_forward(tensor_of(f, {8}, "out"), ta, tensor_of(f, {8}, "b"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'res_a' has dtype bf16, expected f32"));
  }
}

TEST(OpsResidual, ScaleIsOneMultiplyPerElementAndNegationIsExact) {
  for (int64_t n : awkward_sizes()) {
    std::vector<float> in = randn(n, 11), out(static_cast<size_t>(n), 7.0f);
    scale_forward(tensor_of(out, {n}, "out"), tensor_of(in, {n}, "in"), -1.0f);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], -in[i]) << "n=" << n << " i=" << i;
    scale_forward(tensor_of(out, {n}, "out"), tensor_of(in, {n}, "in"), 0.37f);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 0.37f * in[i]) << "n=" << n << " i=" << i;
  }
  std::vector<float> a(4), b(5);
  EXPECT_THROW(scale_forward(tensor_of(a, {4}, "out"), tensor_of(b, {5}, "in"), 2.0f), Error);
}

}  // namespace
}  // namespace lmf
