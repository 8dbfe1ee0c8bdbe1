// test_ops_linear.cpp: linear_forward / linear_backward (CPU, OpenBLAS) against a naive float64
// reference (forward), central finite differences of that reference (backward), plus accumulation,
// absent outputs, determinism and shape errors.
#include <cstring>
#include <limits>
#include <functional>
#include <string>
#include <vector>

#include "ops/linear.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;
using test::to_double;

// Forward: each output is a length-IC dot product accumulated in fp32 (BLAS order) vs fp64. With
// N(0,1) inputs and IC <= 111 the partial sums reach ~30, so the fp32 error is up to ~2e-5 (observed
// 1.9e-5 at IC = 111); atol 1e-4 keeps a 5x margin and still catches any wrong term (errors ~1).
constexpr double kFwdAtol = 1e-4, kFwdRtol = 1e-5;
// Backward: dinp/dweight/dbias are fp32 sums over OC/N terms (observed max error 1.3e-5); the FD
// reference is exact to ~1e-9 here because the loss is linear in every input.
constexpr double kBwdAtol = 1e-4, kBwdRtol = 1e-5;

// Naive fp64 reference. out: (N, OC); inp: (N, IC); w: (OC, IC); b: (OC) or empty.
std::vector<double> ref_forward(const std::vector<double>& inp, const std::vector<double>& w,
                                const std::vector<double>& b, int64_t N, int64_t IC, int64_t OC) {
  std::vector<double> out(N * OC);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < IC; ++i) s += inp[n * IC + i] * w[o * IC + i];
      out[n * OC + o] = s;
    }
  return out;
}

double dot(const std::vector<double>& a, const std::vector<float>& r) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * r[i];
  return s;
}

std::vector<double> plus(const std::vector<float>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] + b[i];
  return r;
}

// Runs fn and checks it throws lmf::Error whose message contains `needle`.
void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

std::string dims(int64_t N, int64_t IC, int64_t OC, bool bias) {
  return "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC) +
         (bias ? " bias" : " no bias");
}

TEST(OpsLinear, ForwardMatchesReferenceOnAwkwardSizes) {
  uint64_t seed = 1;
  for (int64_t N : test::awkward_sizes())
    for (int64_t IC : test::awkward_sizes())
      for (int64_t OC : test::awkward_sizes())
        for (bool with_bias : {false, true}) {
          auto inp = randn(N * IC, seed++), w = randn(OC * IC, seed++), b = randn(OC, seed++);
          std::vector<float> out(N * OC, 123.0f);  // overwritten, not accumulated
          linear_forward(tensor_of(out, {N, OC}, "out"), tensor_of(inp, {N, IC}, "inp"),
                         tensor_of(w, {OC, IC}, "weight"), with_bias ? tensor_of(b, {OC}, "bias") : Tensor());
          auto ref =
              ref_forward(to_double(inp), to_double(w), with_bias ? to_double(b) : std::vector<double>{}, N, IC, OC);
          EXPECT_TRUE(all_close("out " + dims(N, IC, OC, with_bias), out, ref, kFwdAtol, kFwdRtol));
        }
}

TEST(OpsLinear, LeadingDimsFlatten) {
  const int64_t B = 3, T = 7, IC = 19, OC = 7;
  auto inp = randn(B * T * IC, 11), w = randn(OC * IC, 12), b = randn(OC, 13);
  std::vector<float> out(B * T * OC);
  linear_forward(tensor_of(out, {B, T, OC}, "out"), tensor_of(inp, {B, T, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"),
                 tensor_of(b, {OC}, "bias"));
  EXPECT_TRUE(all_close("out (B, T, OC)", out, ref_forward(to_double(inp), to_double(w), to_double(b), B * T, IC, OC),
                        kFwdAtol, kFwdRtol));
}

// loss = sum(out * r): dout = r; every gradient compared with central differences of the fp64
// reference, on top of a nonzero prefill (backward accumulates).
TEST(OpsLinear, BackwardMatchesFiniteDifferences) {
  struct Case {
    int64_t N, IC, OC;
  };
  // Every awkward size appears in every role; FD cost stays small (<= ~3k inputs x ~40k flops).
  const std::vector<Case> cases{{1, 1, 1},  {7, 19, 1},    {19, 7, 7},  {1, 111, 7},
                                {7, 1, 19}, {19, 19, 111}, {111, 7, 1}, {7, 111, 19}};
  uint64_t seed = 100;
  for (const Case& c : cases)
    for (bool with_bias : {false, true}) {
      const int64_t N = c.N, IC = c.IC, OC = c.OC;
      auto inp = randn(N * IC, seed++), w = randn(OC * IC, seed++), b = randn(OC, seed++);
      auto r = randn(N * OC, seed++);
      auto dinp = randn(N * IC, seed++), dw = randn(OC * IC, seed++), db = randn(OC, seed++);
      const auto dinp0 = dinp, dw0 = dw, db0 = db;
      linear_backward(tensor_of(dinp, {N, IC}, "dinp"), tensor_of(dw, {OC, IC}, "dweight"),
                      with_bias ? tensor_of(db, {OC}, "dbias") : Tensor(), tensor_of(r, {N, OC}, "dout"),
                      tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"));

      const auto inp_d = to_double(inp), w_d = to_double(w), b_d = to_double(b);
      const auto bias_or_empty = with_bias ? b_d : std::vector<double>{};
      auto fd_inp = test::finite_diff(
          [&](const std::vector<double>& x) { return dot(ref_forward(x, w_d, bias_or_empty, N, IC, OC), r); }, inp_d);
      auto fd_w = test::finite_diff(
          [&](const std::vector<double>& x) { return dot(ref_forward(inp_d, x, bias_or_empty, N, IC, OC), r); }, w_d);
      const std::string what = dims(N, IC, OC, with_bias);
      EXPECT_TRUE(all_close("dinp " + what, dinp, plus(dinp0, fd_inp), kBwdAtol, kBwdRtol));
      EXPECT_TRUE(all_close("dweight " + what, dw, plus(dw0, fd_w), kBwdAtol, kBwdRtol));
      if (with_bias) {
        auto fd_b = test::finite_diff(
            [&](const std::vector<double>& x) { return dot(ref_forward(inp_d, w_d, x, N, IC, OC), r); }, b_d);
        EXPECT_TRUE(all_close("dbias " + what, db, plus(db0, fd_b), kBwdAtol, kBwdRtol));
      } else {
        EXPECT_EQ(db, db0);
      }
    }
}

// Big sizes (FD would be too slow): analytic fp64 gradients written as plain loops.
TEST(OpsLinear, BackwardLargeMatchesReference) {
  const int64_t N = 111, IC = 111, OC = 111;
  auto inp = randn(N * IC, 201), w = randn(OC * IC, 202), r = randn(N * OC, 203);
  std::vector<float> dinp(N * IC, 0.5f), dw(OC * IC, -0.25f), db(OC, 2.0f);
  linear_backward(tensor_of(dinp, {N, IC}, "dinp"), tensor_of(dw, {OC, IC}, "dweight"), tensor_of(db, {OC}, "dbias"),
                  tensor_of(r, {N, OC}, "dout"), tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"));
  std::vector<double> ref_dinp(N * IC, 0.5), ref_dw(OC * IC, -0.25), ref_db(OC, 2.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      const double g = r[n * OC + o];
      ref_db[o] += g;
      for (int64_t i = 0; i < IC; ++i) {
        ref_dinp[n * IC + i] += g * w[o * IC + i];
        ref_dw[o * IC + i] += g * inp[n * IC + i];
      }
    }
  // Sums of 111 N(0,1) products: |value| ~ 10, fp32 error ~ 1e-5.
  EXPECT_TRUE(all_close("dinp 111^3", dinp, ref_dinp, 1e-4, 1e-5));
  EXPECT_TRUE(all_close("dweight 111^3", dw, ref_dw, 1e-4, 1e-5));
  EXPECT_TRUE(all_close("dbias 111^3", db, ref_db, 1e-4, 1e-5));
}

// Absent gradient outputs are skipped; the present ones are the same as when all are present.
TEST(OpsLinear, BackwardSkipsAbsentOutputs) {
  const int64_t N = 19, IC = 7, OC = 19;
  auto inp = randn(N * IC, 301), w = randn(OC * IC, 302), r = randn(N * OC, 303);
  std::vector<float> dinp(N * IC, 0.0f), dw(OC * IC, 0.0f), db(OC, 0.0f);
  auto call = [&](bool a, bool b, bool c) {
    linear_backward(a ? tensor_of(dinp, {N, IC}, "dinp") : Tensor(), b ? tensor_of(dw, {OC, IC}, "dweight") : Tensor(),
                    c ? tensor_of(db, {OC}, "dbias") : Tensor(), tensor_of(r, {N, OC}, "dout"),
                    tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"));
  };
  call(true, true, true);
  const auto all_dinp = dinp, all_dw = dw, all_db = db;
  std::fill(dinp.begin(), dinp.end(), 0.0f);
  std::fill(dw.begin(), dw.end(), 0.0f);
  std::fill(db.begin(), db.end(), 0.0f);
  call(true, false, false);
  EXPECT_EQ(dinp, all_dinp);
  EXPECT_EQ(dw, std::vector<float>(OC * IC, 0.0f));
  call(false, true, false);
  EXPECT_EQ(dw, all_dw);
  EXPECT_EQ(db, std::vector<float>(OC, 0.0f));
  call(false, false, true);
  EXPECT_EQ(db, all_db);
}

TEST(OpsLinear, Deterministic) {
  const int64_t N = 111, IC = 111, OC = 19;
  auto inp = randn(N * IC, 401), w = randn(OC * IC, 402), b = randn(OC, 403), r = randn(N * OC, 404);
  std::vector<float> out[2], dinp[2], dw[2], db[2];
  for (int k = 0; k < 2; ++k) {
    out[k].assign(N * OC, 0.0f);
    dinp[k].assign(N * IC, 0.0f);
    dw[k].assign(OC * IC, 0.0f);
    db[k].assign(OC, 0.0f);
    linear_forward(tensor_of(out[k], {N, OC}, "out"), tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"),
                   tensor_of(b, {OC}, "bias"));
    linear_backward(tensor_of(dinp[k], {N, IC}, "dinp"), tensor_of(dw[k], {OC, IC}, "dweight"),
                    tensor_of(db[k], {OC}, "dbias"), tensor_of(r, {N, OC}, "dout"), tensor_of(inp, {N, IC}, "inp"),
                    tensor_of(w, {OC, IC}, "weight"));
  }
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(out[0], out[1]));
  EXPECT_TRUE(same(dinp[0], dinp[1]));
  EXPECT_TRUE(same(dw[0], dw[1]));
  EXPECT_TRUE(same(db[0], db[1]));
}

TEST(OpsLinear, BadShapesNameTheTensor) {
  const int64_t N = 7, IC = 19, OC = 7;
  auto inp = randn(N * IC, 1), w = randn(OC * IC, 2), b = randn(OC + 1, 3), out = randn(N * OC, 4);
  auto wrong_inp = randn(N * (IC + 1), 5), out_bad = randn((N + 1) * OC, 8), dw = randn(OC * IC, 6),
       dw_bad = randn((OC + 1) * IC, 7);
  auto W = [&] { return tensor_of(w, {OC, IC}, "fc.weight"); };
  expect_error_naming(
      [&] {
        linear_forward(tensor_of(out, {N, OC}, "out"), tensor_of(inp, {N, IC}, "inp"), W(),
                       tensor_of(b, {OC + 1}, "fc.bias"));
      },
      "fc.bias");
  expect_error_naming(
      [&] {
        linear_forward(tensor_of(out, {N, OC}, "out"), tensor_of(wrong_inp, {N, IC + 1}, "h"), W(), Tensor());
      },
      "'h'");
  expect_error_naming(
      [&] {
        linear_forward(tensor_of(out_bad, {N + 1, OC}, "y"), tensor_of(inp, {N, IC}, "inp"), W(), Tensor());
      },
      "'y'");
  expect_error_naming(
      [&] {
        linear_backward(Tensor(), tensor_of(dw_bad, {OC + 1, IC}, "fc.dweight"), Tensor(),
                        tensor_of(out, {N, OC}, "dout"), tensor_of(inp, {N, IC}, "inp"), W());
      },
      "fc.dweight");
  expect_error_naming(
      [&] {
        linear_backward(tensor_of(wrong_inp, {N, IC + 1}, "dh"), tensor_of(dw, {OC, IC}, "dweight"), Tensor(),
                        tensor_of(out, {N, OC}, "dout"), tensor_of(inp, {N, IC}, "inp"), W());
      },
      "'dh'");
}

// Overwrite mode: dinp = dout W without reading dinp (NaN there must not matter), bitwise what
// Accumulate gives from zero; dweight/dbias still accumulate.
TEST(OpsLinear, OverwriteModeIgnoresOldDinp) {
  const int64_t N = 19, IC = 7, OC = 11;
  std::vector<float> inp = test::randn(N * IC, 1), w = test::randn(OC * IC, 2), dout = test::randn(N * OC, 3);
  std::vector<float> d_acc(N * IC, 0.0f), d_over(N * IC, std::numeric_limits<float>::quiet_NaN()), dw_a(OC * IC, 1.0f), dw_o(OC * IC, 1.0f);
  linear_backward(test::tensor_of(d_acc, {N, IC}, "dinp"), test::tensor_of(dw_a, {OC, IC}, "dw"), Tensor(),
                  test::tensor_of(dout, {N, OC}, "dout"), test::tensor_of(inp, {N, IC}, "inp"),
                  test::tensor_of(w, {OC, IC}, "w"));
  linear_backward(test::tensor_of(d_over, {N, IC}, "dinp"), test::tensor_of(dw_o, {OC, IC}, "dw"), Tensor(),
                  test::tensor_of(dout, {N, OC}, "dout"), test::tensor_of(inp, {N, IC}, "inp"),
                  test::tensor_of(w, {OC, IC}, "w"), GradMode::Overwrite);
  EXPECT_EQ(0, std::memcmp(d_acc.data(), d_over.data(), d_acc.size() * 4));
  EXPECT_EQ(0, std::memcmp(dw_a.data(), dw_o.data(), dw_a.size() * 4));
}

}  // namespace
}  // namespace lmf
