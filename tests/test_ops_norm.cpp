// test_ops_norm.cpp: LayerNorm and RMSNorm (ops/norm.h) against float64 references and finite
// differences, on awkward sizes, rows with a large offset (1000 + noise), near-constant and constant
// rows; accumulation into prefilled gradients; bitwise determinism across calls and thread counts;
// shape errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "ops/norm.h"
#include "ops/residual.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::awkward_sizes;
using test::randn;
using test::tensor_of;
using test::to_double;

constexpr float kEps = 1e-5f;

// x: (N, C); w, b: (C) (b empty = no bias). Returns out (N, C); mean, rstd: (N) if non-null. float64.
std::vector<double> layernorm_ref(const std::vector<double>& x, const std::vector<double>& w,
                                  const std::vector<double>& b, int64_t N, int64_t C,
                                  std::vector<double>* mean = nullptr, std::vector<double>* rstd = nullptr) {
  std::vector<double> out(x.size());
  for (int64_t n = 0; n < N; ++n) {
    double m = 0, v = 0;
    for (int64_t i = 0; i < C; ++i) m += x[n * C + i];
    m /= C;
    for (int64_t i = 0; i < C; ++i) v += (x[n * C + i] - m) * (x[n * C + i] - m);
    v /= C;
    const double r = 1.0 / std::sqrt(v + kEps);
    for (int64_t i = 0; i < C; ++i) out[n * C + i] = (x[n * C + i] - m) * r * w[i] + (b.empty() ? 0.0 : b[i]);
    if (mean) mean->push_back(m);
    if (rstd) rstd->push_back(r);
  }
  return out;
}

// x: (N, C); w: (C). Returns out (N, C); rstd: (N) if non-null. float64.
std::vector<double> rmsnorm_ref(const std::vector<double>& x, const std::vector<double>& w, int64_t N, int64_t C,
                                std::vector<double>* rstd = nullptr) {
  std::vector<double> out(x.size());
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0;
    for (int64_t i = 0; i < C; ++i) ms += x[n * C + i] * x[n * C + i];
    const double r = 1.0 / std::sqrt(ms / C + kEps);
    for (int64_t i = 0; i < C; ++i) out[n * C + i] = x[n * C + i] * r * w[i];
    if (rstd) rstd->push_back(r);
  }
  return out;
}

std::string case_name(const std::string& tag, int64_t N, int64_t C) {
  return tag + " N=" + std::to_string(N) + " C=" + std::to_string(C);
}

// Weights near 1 and biases near 0, as in training, but not exactly (so a swapped w/b shows).
std::vector<float> weights(int64_t C, uint64_t seed) {
  auto w = randn(static_cast<size_t>(C), seed, 0.3f);
  for (float& v : w) v += 1.0f;
  return w;
}

// Forward, unit-scale rows: xhat is an fp32 product of values rounded once (mean, rstd stored as f32),
// so outputs (|out| up to ~4) carry a few ulp; observed worst ~5.5e-7 absolute.
constexpr double kFwdAtol = 2e-6, kFwdRtol = 2e-6;
// mean and rstd: float64 statistics rounded once to f32 (half an ulp; observed worst 5.8e-8 relative);
// the reference sums in another order, so allow 2 ulp.
constexpr double kStatAtol = 1e-9, kStatRtol = 2.4e-7;
// Backward, unit-scale rows: rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm xhat)) in fp32 has some
// cancellation, dweight sums up to N rows; observed worst ~1.2e-6 absolute against FD (which is
// accurate to ~1e-8).
constexpr double kBwdAtol = 1e-5, kBwdRtol = 1e-5;
// Rows 1000 + N(0, 1): the stored f32 mean is off by up to ulp(1000)/2 = 3e-5, which rstd (~1-1.5)
// carries into every xhat, whatever the accumulation precision: out and dinp see ~5e-5, and dweight
// (a sum of dout * xhat over 5 rows) up to ~4e-4 in the worst case (observed 1.2e-4).
constexpr double kOffsetAtol = 5e-4, kOffsetRtol = 1e-4;
// Near-constant rows 0.5 + 1e-3 N(0, 1): rstd ~ 1/sqrt(1e-6 + eps) ~ 300 amplifies the f32 mean error
// (ulp(0.5)/2 = 3e-8) to ~1e-5 in xhat (observed 6.5e-6 in out, 1.8e-5 in dweight).
constexpr double kNearConstFwdAtol = 2e-5, kNearConstBwdAtol = 1e-4, kNearConstRtol = 1e-4;

// dinp = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm xhat)): the fp32 rounding of dnorm = w dout
// (~ulp(dnorm)), and with FMA contraction its residual, is multiplied by rstd, which is 1/sqrt(eps) = 316
// for a constant row (e.g. C = 1, where the exact gradient is 0). So dinp's atol scales with max rstd.
double dinp_atol_scale(const std::vector<float>& rstd) {
  double m = 1.0;
  for (float r : rstd) m = std::max(m, static_cast<double>(r));
  return m;
}

// --- LayerNorm ----------------------------------------------------------------------------------

struct LayerNormCase {
  std::vector<float> x, w, b;  // b empty = no bias
  int64_t N, C;
};

// Runs layernorm_forward and compares out, mean, rstd with the float64 reference.
void check_layernorm_forward(LayerNormCase c, const std::string& what, double atol, double rtol) {
  const size_t n = c.x.size();
  std::vector<float> out(n, -7.0f), mean(static_cast<size_t>(c.N), -7.0f), rstd(static_cast<size_t>(c.N), -7.0f);
  Tensor bias = c.b.empty() ? Tensor() : tensor_of(c.b, {c.C}, "ln.bias");
  layernorm_forward(tensor_of(out, {c.N, c.C}, "out"), tensor_of(mean, {c.N}, "mean"), tensor_of(rstd, {c.N}, "rstd"),
                    tensor_of(c.x, {c.N, c.C}, "inp"), tensor_of(c.w, {c.C}, "ln.weight"), bias, kEps);
  std::vector<double> mref, rref;
  const auto ref = layernorm_ref(to_double(c.x), to_double(c.w), to_double(c.b), c.N, c.C, &mref, &rref);
  EXPECT_TRUE(all_close("layernorm out " + what, out, ref, atol, rtol));
  EXPECT_TRUE(all_close("layernorm mean " + what, mean, mref, kStatAtol, kStatRtol));
  EXPECT_TRUE(all_close("layernorm rstd " + what, rstd, rref, kStatAtol, kStatRtol));
}

// prefill[c] + sum_n d[n, c]: the expected dinp_sum of a backward whose final dinp is d (N, C)
std::vector<double> prefill_plus_column_sums(const std::vector<float>& prefill, const std::vector<double>& d, int64_t N,
                                             int64_t C) {
  std::vector<double> s = to_double(prefill);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) s[static_cast<size_t>(c)] += d[static_cast<size_t>(i * C + c)];
  return s;
}

// Runs layernorm_forward + layernorm_backward (gradients prefilled) and compares the gradients with
// prefill + FD of loss = sum(layernorm(x, w, b) * r) over the packed parameters [x | w | b].
void check_layernorm_backward(LayerNormCase c, const std::string& what, double atol, double rtol,
                              double fd_h = 1e-6) {
  const int64_t N = c.N, C = c.C;
  const size_t n = c.x.size();
  const bool has_bias = !c.b.empty();
  auto r = randn(n, 101);
  const auto rd = to_double(r);
  std::vector<double> params = to_double(c.x);
  for (float v : c.w) params.push_back(v);
  for (float v : c.b) params.push_back(v);
  auto loss = [&](const std::vector<double>& p) {
    std::vector<double> x(p.begin(), p.begin() + n), w(p.begin() + n, p.begin() + n + C), b;
    if (has_bias) b.assign(p.begin() + n + C, p.end());
    const auto out = layernorm_ref(x, w, b, N, C);
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += out[i] * rd[i];
    return s;
  };
  const auto g = test::finite_diff(loss, params, fd_h);

  std::vector<float> out(n), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
  Tensor bias = has_bias ? tensor_of(c.b, {C}, "ln.bias") : Tensor();
  layernorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"),
                    tensor_of(c.x, {N, C}, "inp"), tensor_of(c.w, {C}, "ln.weight"), bias, kEps);
  auto dx = randn(n, 102, 0.5f), dw = randn(static_cast<size_t>(C), 103, 0.5f), db = randn(static_cast<size_t>(C), 104, 0.5f);
  std::vector<double> want_dx(n), want_dw(static_cast<size_t>(C)), want_db(static_cast<size_t>(C));
  for (size_t i = 0; i < n; ++i) want_dx[i] = dx[i] + g[i];
  for (int64_t i = 0; i < C; ++i) want_dw[i] = dw[i] + g[n + i];
  for (int64_t i = 0; i < C; ++i) want_db[i] = db[i] + (has_bias ? g[n + C + i] : 0.0);
  auto ds = randn(static_cast<size_t>(C), 105, 0.5f);  // dinp_sum: prefill + column sums of the final dinp
  const std::vector<double> want_ds = prefill_plus_column_sums(ds, want_dx, N, C);
  layernorm_backward(tensor_of(dx, {N, C}, "dinp"), tensor_of(dw, {C}, "dweight"),
                     has_bias ? tensor_of(db, {C}, "dbias") : Tensor(), tensor_of(r, {N, C}, "dout"),
                     tensor_of(c.x, {N, C}, "inp"), tensor_of(c.w, {C}, "ln.weight"), tensor_of(mean, {N}, "mean"),
                     tensor_of(rstd, {N}, "rstd"), tensor_of(ds, {C}, "dinp_sum"));
  EXPECT_TRUE(all_close("layernorm dinp " + what, dx, want_dx, atol * dinp_atol_scale(rstd), rtol));
  EXPECT_TRUE(all_close("layernorm dinp_sum " + what, ds, want_ds, static_cast<double>(N) * atol * dinp_atol_scale(rstd),
                        rtol));
  EXPECT_TRUE(all_close("layernorm dweight " + what, dw, want_dw, atol, rtol));
  // absent dbias: the prefill must be untouched
  EXPECT_TRUE(all_close("layernorm dbias " + what, db, want_db, atol, rtol));
}

TEST(OpsNorm, LayerNormForwardAwkwardSizes) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes())
      for (bool bias : {true, false}) {
        LayerNormCase c{randn(static_cast<size_t>(N * C), 1), weights(C, 2),
                        bias ? randn(static_cast<size_t>(C), 3, 0.3f) : std::vector<float>{}, N, C};
        check_layernorm_forward(c, case_name(bias ? "bias" : "no-bias", N, C), kFwdAtol, kFwdRtol);
      }
}

TEST(OpsNorm, LayerNormLeadingDimsFlatten) {
  const int64_t B = 2, T = 7, C = 19;
  auto x = randn(static_cast<size_t>(B * T * C), 4), w = weights(C, 5), b = randn(static_cast<size_t>(C), 6);
  std::vector<float> out(x.size()), mean(static_cast<size_t>(B * T)), rstd(static_cast<size_t>(B * T));
  layernorm_forward(tensor_of(out, {B, T, C}, "out"), tensor_of(mean, {B, T}, "mean"), tensor_of(rstd, {B, T}, "rstd"),
                    tensor_of(x, {B, T, C}, "inp"), tensor_of(w, {C}, "w"), tensor_of(b, {C}, "b"), kEps);
  EXPECT_TRUE(all_close("layernorm out (B, T, C)", out,
                        layernorm_ref(to_double(x), to_double(w), to_double(b), B * T, C), kFwdAtol, kFwdRtol));
}

TEST(OpsNorm, LayerNormBackwardFiniteDifferencesAccumulates) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes())
      for (bool bias : {true, false}) {
        const int64_t Nfd = N * C > 2500 ? 3 : N;  // FD cost is quadratic in the element count
        LayerNormCase c{randn(static_cast<size_t>(Nfd * C), 11), weights(C, 12),
                        bias ? randn(static_cast<size_t>(C), 13, 0.3f) : std::vector<float>{}, Nfd, C};
        check_layernorm_backward(c, case_name(bias ? "bias" : "no-bias", Nfd, C), kBwdAtol, kBwdRtol);
      }
}

TEST(OpsNorm, LayerNormLargeOffsetRows) {
  for (int64_t C : {int64_t{19}, int64_t{111}}) {
    const int64_t N = 5;
    auto x = randn(static_cast<size_t>(N * C), 21);
    for (float& v : x) v += 1000.0f;
    LayerNormCase c{x, weights(C, 22), randn(static_cast<size_t>(C), 23, 0.3f), N, C};
    check_layernorm_forward(c, case_name("offset 1000", N, C), kOffsetAtol, kOffsetRtol);
    // step 1e-9 * |x| = 1e-6: small against the unit noise the function varies on
    check_layernorm_backward(c, case_name("offset 1000", N, C), kOffsetAtol, kOffsetRtol, 1e-9);
  }
}

TEST(OpsNorm, LayerNormNearConstantAndConstantRows) {
  const int64_t N = 4, C = 111;
  auto x = randn(static_cast<size_t>(N * C), 31, 1e-3f);
  for (float& v : x) v += 0.5f;
  LayerNormCase c{x, weights(C, 32), randn(static_cast<size_t>(C), 33, 0.3f), N, C};
  check_layernorm_forward(c, case_name("near-constant", N, C), kNearConstFwdAtol, kNearConstRtol);
  check_layernorm_backward(c, case_name("near-constant", N, C), kNearConstBwdAtol, kNearConstRtol);

  // Exactly constant rows: variance 0, rstd = 1/sqrt(eps), xhat = 0 exactly, so out = bias exactly.
  LayerNormCase k{std::vector<float>(static_cast<size_t>(N * C), 3.7f), weights(C, 34),
                  randn(static_cast<size_t>(C), 35, 0.3f), N, C};
  check_layernorm_forward(k, case_name("constant", N, C), 0.0, 0.0);
  check_layernorm_backward(k, case_name("constant", N, C), kBwdAtol, kBwdRtol);
}

// --- RMSNorm ------------------------------------------------------------------------------------

void check_rmsnorm_forward(std::vector<float> x, std::vector<float> w, int64_t N, int64_t C, const std::string& what,
                           double atol, double rtol) {
  std::vector<float> out(x.size(), -7.0f), rstd(static_cast<size_t>(N), -7.0f);
  rmsnorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(rstd, {N}, "rstd"), tensor_of(x, {N, C}, "inp"),
                  tensor_of(w, {C}, "rms.weight"), kEps);
  std::vector<double> rref;
  const auto ref = rmsnorm_ref(to_double(x), to_double(w), N, C, &rref);
  EXPECT_TRUE(all_close("rmsnorm out " + what, out, ref, atol, rtol));
  EXPECT_TRUE(all_close("rmsnorm rstd " + what, rstd, rref, kStatAtol, kStatRtol));
}

// Gradients prefilled; compared with prefill + FD of loss = sum(rmsnorm(x, w) * r) over [x | w].
void check_rmsnorm_backward(std::vector<float> x, std::vector<float> w, int64_t N, int64_t C, const std::string& what,
                            double atol, double rtol, double fd_h = 1e-6) {
  const size_t n = x.size();
  auto r = randn(n, 201);
  const auto rd = to_double(r);
  std::vector<double> params = to_double(x);
  for (float v : w) params.push_back(v);
  auto loss = [&](const std::vector<double>& p) {
    const auto out = rmsnorm_ref(std::vector<double>(p.begin(), p.begin() + n), std::vector<double>(p.begin() + n, p.end()),
                                 N, C);
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += out[i] * rd[i];
    return s;
  };
  const auto g = test::finite_diff(loss, params, fd_h);
  std::vector<float> out(n), rstd(static_cast<size_t>(N));
  rmsnorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(rstd, {N}, "rstd"), tensor_of(x, {N, C}, "inp"),
                  tensor_of(w, {C}, "rms.weight"), kEps);
  auto dx = randn(n, 202, 0.5f), dw = randn(static_cast<size_t>(C), 203, 0.5f);
  std::vector<double> want_dx(n), want_dw(static_cast<size_t>(C));
  for (size_t i = 0; i < n; ++i) want_dx[i] = dx[i] + g[i];
  for (int64_t i = 0; i < C; ++i) want_dw[i] = dw[i] + g[n + i];
  auto ds = randn(static_cast<size_t>(C), 204, 0.5f);
  const std::vector<double> want_ds = prefill_plus_column_sums(ds, want_dx, N, C);
  rmsnorm_backward(tensor_of(dx, {N, C}, "dinp"), tensor_of(dw, {C}, "dweight"), tensor_of(r, {N, C}, "dout"),
                   tensor_of(x, {N, C}, "inp"), tensor_of(w, {C}, "rms.weight"), tensor_of(rstd, {N}, "rstd"),
                   tensor_of(ds, {C}, "dinp_sum"));
  EXPECT_TRUE(all_close("rmsnorm dinp " + what, dx, want_dx, atol * dinp_atol_scale(rstd), rtol));
  EXPECT_TRUE(all_close("rmsnorm dinp_sum " + what, ds, want_ds, static_cast<double>(N) * atol * dinp_atol_scale(rstd),
                        rtol));
  EXPECT_TRUE(all_close("rmsnorm dweight " + what, dw, want_dw, atol, rtol));
}

TEST(OpsNorm, RmsNormForwardAwkwardSizes) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes())
      check_rmsnorm_forward(randn(static_cast<size_t>(N * C), 41), weights(C, 42), N, C, case_name("", N, C), kFwdAtol,
                            kFwdRtol);
}

TEST(OpsNorm, RmsNormBackwardFiniteDifferencesAccumulates) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : awkward_sizes()) {
      const int64_t Nfd = N * C > 2500 ? 3 : N;
      check_rmsnorm_backward(randn(static_cast<size_t>(Nfd * C), 43), weights(C, 44), Nfd, C, case_name("", Nfd, C),
                             kBwdAtol, kBwdRtol);
    }
}

TEST(OpsNorm, RmsNormLargeOffsetNearConstantAndZeroRows) {
  const int64_t N = 4, C = 111;
  // 1000 + N(0, 1): mean square ~1e6, well conditioned; unit-scale tolerances apply.
  auto x = randn(static_cast<size_t>(N * C), 51);
  for (float& v : x) v += 1000.0f;
  check_rmsnorm_forward(x, weights(C, 52), N, C, "offset 1000", kFwdAtol, kFwdRtol);
  check_rmsnorm_backward(x, weights(C, 52), N, C, "offset 1000", kBwdAtol, kBwdRtol, 1e-9);
  // near-constant rows
  auto y = randn(static_cast<size_t>(N * C), 53, 1e-3f);
  for (float& v : y) v += 0.5f;
  check_rmsnorm_forward(y, weights(C, 54), N, C, "near-constant", kFwdAtol, kFwdRtol);
  check_rmsnorm_backward(y, weights(C, 54), N, C, "near-constant", kBwdAtol, kBwdRtol);
  // all-zero rows: rstd = 1/sqrt(eps), out = 0, finite gradients
  std::vector<float> z(static_cast<size_t>(N * C), 0.0f);
  check_rmsnorm_forward(z, weights(C, 55), N, C, "zero rows", 0.0, 0.0);
  check_rmsnorm_backward(z, weights(C, 55), N, C, "zero rows", kBwdAtol, kBwdRtol);
}

// --- determinism --------------------------------------------------------------------------------

// All outputs of forward + backward of both norms, on a size large enough to run in parallel.
std::vector<float> run_norms_once(int threads) {
  const int64_t N = 300, C = 111;
  const size_t n = static_cast<size_t>(N * C);
  auto x = randn(n, 61), w = weights(C, 62), b = randn(static_cast<size_t>(C), 63), dout = randn(n, 64);
  std::vector<float> out(n), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
  auto dx = randn(n, 65), dw = randn(static_cast<size_t>(C), 66), db = randn(static_cast<size_t>(C), 67);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  layernorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"),
                    tensor_of(x, {N, C}, "inp"), tensor_of(w, {C}, "w"), tensor_of(b, {C}, "b"), kEps);
  layernorm_backward(tensor_of(dx, {N, C}, "dinp"), tensor_of(dw, {C}, "dw"), tensor_of(db, {C}, "db"),
                     tensor_of(dout, {N, C}, "dout"), tensor_of(x, {N, C}, "inp"), tensor_of(w, {C}, "w"),
                     tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"));
  std::vector<float> all = out;
  for (auto* v : {&mean, &rstd, &dx, &dw, &db}) all.insert(all.end(), v->begin(), v->end());
  rmsnorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(rstd, {N}, "rstd"), tensor_of(x, {N, C}, "inp"),
                  tensor_of(w, {C}, "w"), kEps);
  rmsnorm_backward(tensor_of(dx, {N, C}, "dinp"), tensor_of(dw, {C}, "dw"), tensor_of(dout, {N, C}, "dout"),
                   tensor_of(x, {N, C}, "inp"), tensor_of(w, {C}, "w"), tensor_of(rstd, {N}, "rstd"));
  omp_set_num_threads(saved);
  for (auto* v : {&out, &rstd, &dx, &dw}) all.insert(all.end(), v->begin(), v->end());
  return all;
}

TEST(OpsNorm, BitwiseDeterministicAcrossCallsAndThreadCounts) {
  const auto a = run_norms_once(omp_get_max_threads());
  const auto b = run_norms_once(omp_get_max_threads());
  const auto c = run_norms_once(1);
  const auto d = run_norms_once(3);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << "two identical calls differ";
  EXPECT_EQ(0, std::memcmp(a.data(), c.data(), a.size() * sizeof(float))) << "1 thread differs from default";
  EXPECT_EQ(0, std::memcmp(a.data(), d.data(), a.size() * sizeof(float))) << "3 threads differ from default";
}

// --- fused residual + norm ----------------------------------------------------------------------

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The CPU fused op is residual_forward followed by the norm: res, out, mean, rstd bitwise equal to
// the two calls, for LayerNorm (with and without bias) and RMSNorm, on awkward sizes, with res a
// separate buffer or aliasing a or b.
TEST(OpsNorm, ResidualNormForwardEqualsResidualThenNormExactly) {
  for (int64_t N : awkward_sizes())
    for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{111}, int64_t{768}})
      for (int alias = 0; alias < 3; ++alias) {  // 0: res separate, 1: res = a, 2: res = b
        const std::string what = case_name("alias=" + std::to_string(alias), N, C);
        const size_t n = static_cast<size_t>(N * C);
        const auto a0 = randn(n, 301), b0 = randn(n, 302, 0.5f), w = weights(C, 303);
        const auto bias = randn(static_cast<size_t>(C), 304, 0.3f);
        // unfused reference: residual_forward into a separate buffer, then the norm
        auto ra = a0, rb = b0, wr = w, br = bias;
        std::vector<float> res_ref(n), out_ref(n), mean_ref(static_cast<size_t>(N)), rstd_ref(static_cast<size_t>(N));
        residual_forward(tensor_of(res_ref, {N, C}, "res"), tensor_of(ra, {N, C}, "a"), tensor_of(rb, {N, C}, "b"));
        for (int kind = 0; kind < 3; ++kind) {  // 0: layernorm + bias, 1: layernorm, 2: rmsnorm
          const std::string k = what + " kind=" + std::to_string(kind);
          if (kind < 2)
            layernorm_forward(tensor_of(out_ref, {N, C}, "out"), tensor_of(mean_ref, {N}, "mean"),
                              tensor_of(rstd_ref, {N}, "rstd"), tensor_of(res_ref, {N, C}, "res"),
                              tensor_of(wr, {C}, "w"), kind == 0 ? tensor_of(br, {C}, "bias") : Tensor(), kEps);
          else
            rmsnorm_forward(tensor_of(out_ref, {N, C}, "out"), tensor_of(rstd_ref, {N}, "rstd"),
                            tensor_of(res_ref, {N, C}, "res"), tensor_of(wr, {C}, "w"), kEps);
          auto a = a0, b = b0, ww = w, bb = bias;
          std::vector<float> res_buf(n, -7.0f), out(n, -7.0f), mean(static_cast<size_t>(N), -7.0f),
              rstd(static_cast<size_t>(N), -7.0f);
          std::vector<float>& res = alias == 1 ? a : alias == 2 ? b : res_buf;
          if (kind < 2)
            residual_layernorm_forward(tensor_of(res, {N, C}, "res"), tensor_of(out, {N, C}, "out"),
                                       tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"),
                                       tensor_of(a, {N, C}, "a"), tensor_of(b, {N, C}, "b"), tensor_of(ww, {C}, "w"),
                                       kind == 0 ? tensor_of(bb, {C}, "bias") : Tensor(), kEps);
          else
            residual_rmsnorm_forward(tensor_of(res, {N, C}, "res"), tensor_of(out, {N, C}, "out"),
                                     tensor_of(rstd, {N}, "rstd"), tensor_of(a, {N, C}, "a"),
                                     tensor_of(b, {N, C}, "b"), tensor_of(ww, {C}, "w"), kEps);
          EXPECT_TRUE(bitwise_equal(res, res_ref)) << "res " << k;
          EXPECT_TRUE(bitwise_equal(out, out_ref)) << "out " << k;
          if (kind < 2) EXPECT_TRUE(bitwise_equal(mean, mean_ref)) << "mean " << k;
          EXPECT_TRUE(bitwise_equal(rstd, rstd_ref)) << "rstd " << k;
        }
      }
}

// --- errors -------------------------------------------------------------------------------------

TEST(OpsNorm, RejectsBadShapesNamingTensor) {
  const int64_t N = 7, C = 19;
  std::vector<float> x(N * C), out(N * C), mean(N), rstd(N), w(C + 1), w_ok(C), short_stat(N - 1);
  try {
    layernorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd"),
                      tensor_of(x, {N, C}, "inp"), tensor_of(w, {C + 1}, "ln_1.weight"), Tensor(), kEps);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'ln_1.weight'"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("(20)"));
  }
  try {
    rmsnorm_forward(tensor_of(out, {N, C}, "out"), tensor_of(short_stat, {N - 1}, "rms_rstd"),
                    tensor_of(x, {N, C}, "inp"), tensor_of(w_ok, {C}, "w"), kEps);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'rms_rstd'"));
  }
  EXPECT_THROW(layernorm_backward(tensor_of(out, {C, N}, "dinp"), tensor_of(w_ok, {C}, "dw"), Tensor(),
                                  tensor_of(out, {N, C}, "dout"), tensor_of(x, {N, C}, "inp"),
                                  tensor_of(w_ok, {C}, "w"), tensor_of(mean, {N}, "mean"), tensor_of(rstd, {N}, "rstd")),
               Error);
  EXPECT_THROW(rmsnorm_backward(tensor_of(out, {N, C}, "dinp"), tensor_of(w, {C + 1}, "dw"),
                                tensor_of(out, {N, C}, "dout"), tensor_of(x, {N, C}, "inp"), tensor_of(w_ok, {C}, "w"),
                                tensor_of(rstd, {N}, "rstd")),
               Error);
}

// Calls f and expects an lmf::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F f, std::initializer_list<const char*> parts, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no error";
  } catch (const Error& e) {
    for (const char* p : parts) EXPECT_THAT(e.what(), ::testing::HasSubstr(p)) << what;
  }
}

TEST(OpsNorm, ResidualNormRejectsBadShapesAndAliasing) {
  const int64_t N = 5, C = 7;
  std::vector<float> a(N * C), b(N * C), res(N * C), out(N * C), mean(N), rstd(N), w(C), b_short(N * C - 1);
  const Tensor ta = tensor_of(a, {N, C}, "a"), tres = tensor_of(res, {N, C}, "res"),
               tout = tensor_of(out, {N, C}, "out"), tmean = tensor_of(mean, {N}, "mean"),
               trstd = tensor_of(rstd, {N}, "rstd"), tw = tensor_of(w, {C}, "w");
  expect_error([&] { residual_rmsnorm_forward(tres, tout, trstd, ta, tensor_of(b_short, {N * C - 1}, "b_short"), tw,
                                              kEps); },
               {"residual_rmsnorm_forward", "'b_short'"}, "short b");
  expect_error([&] { residual_layernorm_forward(tres, tres, tmean, trstd, ta, tensor_of(b, {N, C}, "b"), tw,
                                                Tensor(), kEps); },
               {"residual_layernorm_forward", "'res'", "aliases"}, "out aliases res");
  expect_error([&] { residual_layernorm_forward(tres, tout, Tensor(), trstd, ta, tensor_of(b, {N, C}, "b"), tw,
                                                Tensor(), kEps); },
               {"residual_layernorm_forward", "absent"}, "mean absent");
}

// bf16 runs on the GPU only (docs/MIXED_PRECISION.md): a bf16 tensor on the CPU fails with one line
// naming it; a dtype mix fails naming the odd tensor.
TEST(OpsNorm, Bf16OnTheCpuAndDtypeMixesAreErrors) {
  const int64_t N = 3, C = 8;
  std::vector<bf16> xh(N * C), oh(N * C), dh(N * C), gh(N * C);
  std::vector<float> x(N * C), out(N * C), mean(N), rstd(N), w(C), dw(C);
  const Tensor bx(xh.data(), DType::bf16, {N, C}, "ln_inp"), bout(oh.data(), DType::bf16, {N, C}, "ln_out"),
      bdinp(dh.data(), DType::bf16, {N, C}, "ln_dinp"), bdout(gh.data(), DType::bf16, {N, C}, "ln_dout");
  const Tensor tmean = tensor_of(mean, {N}, "mean"), trstd = tensor_of(rstd, {N}, "rstd"), tw = tensor_of(w, {C}, "w"),
               tdw = tensor_of(dw, {C}, "dw");
  expect_error([&] { layernorm_forward(bout, tmean, trstd, bx, tw, Tensor(), kEps); },
               {"layernorm_forward: bf16 tensors run on the GPU only ('ln_inp')"}, "layernorm_forward bf16 cpu");
  expect_error([&] { rmsnorm_forward(bout, trstd, bx, tw, kEps); },
               {"rmsnorm_forward: bf16 tensors run on the GPU only ('ln_inp')"}, "rmsnorm_forward bf16 cpu");
  expect_error([&] { layernorm_backward(bdinp, tdw, Tensor(), bdout, bx, tw, tmean, trstd); },
               {"layernorm_backward: bf16 tensors run on the GPU only ('ln_inp')"}, "layernorm_backward bf16 cpu");
  expect_error([&] { rmsnorm_backward(bdinp, tdw, bdout, bx, tw, trstd); },
               {"rmsnorm_backward: bf16 tensors run on the GPU only ('ln_inp')"}, "rmsnorm_backward bf16 cpu");
  expect_error([&] { residual_layernorm_forward(bdinp, bout, tmean, trstd, bx, bdout, tw, Tensor(), kEps); },
               {"residual_layernorm_forward: bf16 tensors run on the GPU only ('ln_inp')"}, "fused ln bf16 cpu");
  expect_error([&] { residual_rmsnorm_forward(bdinp, bout, trstd, bx, bdout, tw, kEps); },
               {"residual_rmsnorm_forward: bf16 tensors run on the GPU only ('ln_inp')"}, "fused rms bf16 cpu");
  // mixes: f32 inp with a bf16 out; a bf16 weight (always f32)
  expect_error([&] { layernorm_forward(bout, tmean, trstd, tensor_of(x, {N, C}, "inp"), tw, Tensor(), kEps); },
               {"'ln_out'", "bf16", "expected f32"}, "f32 inp, bf16 out");
  std::vector<bf16> wh(C);
  expect_error([&] { rmsnorm_forward(tensor_of(out, {N, C}, "out"), trstd, tensor_of(x, {N, C}, "inp"),
                                     Tensor(wh.data(), DType::bf16, {C}, "rms_w"), kEps); },
               {"'rms_w'", "expected f32"}, "bf16 weight");
}

}  // namespace
}  // namespace lmf
