// test_ops_attention.cpp: causal MHA/GQA attention (CPU) against a naive float64 reference
// (forward + probabilities), central finite differences of that reference (backward), an analytic
// float64 backward for sizes too big for FD (T spanning several row blocks), extreme scores,
// accumulation, determinism and shape errors.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "ops/attention.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;
using test::to_double;

// Forward (out, probs): scores are fp32 dot products of length HS, softmax in fp32, out a P-weighted
// sum of V rows; N(0,1) inputs. Observed max error 5e-7 (HS = 19); 5e-6 leaves a 10x margin.
constexpr double kFwdAtol = 5e-6, kFwdRtol = 1e-5;
// Backward vs FD of the fp64 reference (FD truncation/rounding ~1e-9 with h = 1e-6 on this smooth
// loss): fp32 GEMM chains dP -> dS -> dQ/dK over up to T = 300 keys. Observed max error 1.3e-6.
constexpr double kBwdAtol = 2e-5, kBwdRtol = 1e-5;

struct Dims {
  int64_t B, T, NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HS=" + std::to_string(HS);
  }
};

// Naive fp64 reference. qkv: (B, T, C3); returns out (B, T, NH*HS); probs (B, NH, T, T) if given.
std::vector<double> ref_forward(const std::vector<double>& qkv, const Dims& d, std::vector<double>* probs = nullptr) {
  const int64_t C3 = d.C3(), CO = d.CO(), T = d.T, HS = d.HS;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  std::vector<double> out(d.B * T * CO, 0.0), s(T);
  if (probs) probs->assign(d.B * d.NH * T * T, 0.0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.NH; ++h) {
      const int64_t kvh = h / (d.NH / d.NKV);
      for (int64_t t = 0; t < T; ++t) {
        const double* q = &qkv[(b * T + t) * C3 + h * HS];
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t u = 0; u <= t; ++u) {
          const double* k = &qkv[(b * T + u) * C3 + (d.NH + kvh) * HS];
          double dot = 0;
          for (int64_t i = 0; i < HS; ++i) dot += q[i] * k[i];
          s[u] = dot * scale;
          mx = std::max(mx, s[u]);
        }
        double sum = 0;
        for (int64_t u = 0; u <= t; ++u) sum += (s[u] = std::exp(s[u] - mx));
        for (int64_t u = 0; u <= t; ++u) {
          const double p = s[u] / sum;
          if (probs) (*probs)[((b * d.NH + h) * T + t) * T + u] = p;
          const double* v = &qkv[(b * T + u) * C3 + (d.NH + d.NKV + kvh) * HS];
          for (int64_t i = 0; i < HS; ++i) out[(b * T + t) * CO + h * HS + i] += p * v[i];
        }
      }
    }
  return out;
}

// Analytic fp64 gradient of sum(out * dout) w.r.t. qkv (for sizes where FD is too slow).
std::vector<double> ref_backward(const std::vector<double>& qkv, const std::vector<float>& dout, const Dims& d) {
  const int64_t C3 = d.C3(), CO = d.CO(), T = d.T, HS = d.HS;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HS));
  std::vector<double> probs;
  ref_forward(qkv, d, &probs);
  std::vector<double> dq(qkv.size(), 0.0), dp(T);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.NH; ++h) {
      const int64_t kvh = h / (d.NH / d.NKV);
      auto at = [&](int64_t t, int64_t off) { return (b * T + t) * C3 + off; };
      for (int64_t t = 0; t < T; ++t) {
        const double* p = &probs[((b * d.NH + h) * T + t) * T];
        const float* go = &dout[(b * T + t) * CO + h * HS];
        double rowsum = 0;
        for (int64_t u = 0; u <= t; ++u) {
          double g = 0;
          for (int64_t i = 0; i < HS; ++i) {
            g += go[i] * qkv[at(u, (d.NH + d.NKV + kvh) * HS) + i];
            dq[at(u, (d.NH + d.NKV + kvh) * HS) + i] += p[u] * go[i];  // dV
          }
          dp[u] = g;
          rowsum += g * p[u];
        }
        for (int64_t u = 0; u <= t; ++u) {
          const double ds = p[u] * (dp[u] - rowsum) * scale;
          for (int64_t i = 0; i < HS; ++i) {
            dq[at(t, h * HS) + i] += ds * qkv[at(u, (d.NH + kvh) * HS) + i];  // dQ
            dq[at(u, (d.NH + kvh) * HS) + i] += ds * qkv[at(t, h * HS) + i];  // dK
          }
        }
      }
    }
  return dq;
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

// Runs the op's forward; returns out, fills probs.
std::vector<float> run_forward(std::vector<float>& qkv, const Dims& d, std::vector<float>& probs) {
  std::vector<float> out(d.B * d.T * d.CO(), 77.0f);
  probs.assign(d.B * d.NH * d.T * d.T, 55.0f);  // everything overwritten, incl. the upper triangle
  attention_forward(tensor_of(out, {d.B, d.T, d.CO()}, "out"), tensor_of(probs, {d.B, d.NH, d.T, d.T}, "probs"),
                    tensor_of(qkv, {d.B, d.T, d.C3()}, "qkv"), static_cast<int>(d.NH), static_cast<int>(d.NKV));
  return out;
}

void run_backward(std::vector<float>& dqkv, std::vector<float>& dout, std::vector<float>& qkv,
                  std::vector<float>& probs, const Dims& d) {
  std::vector<float> dprobs(d.B * d.NH * d.T * d.T, -3.0f);
  attention_backward(tensor_of(dqkv, {d.B, d.T, d.C3()}, "dqkv"), tensor_of(dprobs, {d.B, d.NH, d.T, d.T}, "dprobs"),
                     tensor_of(dout, {d.B, d.T, d.CO()}, "dout"), tensor_of(qkv, {d.B, d.T, d.C3()}, "qkv"),
                     tensor_of(probs, {d.B, d.NH, d.T, d.T}, "probs"), static_cast<int>(d.NH), static_cast<int>(d.NKV));
}

// MHA, GQA (NH=4, NKV=2), MQA (NKV=1); T in {1, 7, 19}; HS over the awkward sizes; plus T = 300,
// which spans three row blocks of the CPU kernel (128 + 128 + 44).
const std::vector<Dims>& forward_cases() {
  static const std::vector<Dims> c{{2, 1, 4, 4, 7},   {2, 7, 4, 2, 7},   {1, 19, 4, 1, 7}, {2, 19, 4, 4, 19},
                                   {1, 7, 4, 2, 111}, {1, 19, 2, 1, 1},  {3, 7, 1, 1, 19}, {2, 19, 4, 2, 111},
                                   {1, 300, 4, 2, 7}, {1, 300, 2, 2, 19}};
  return c;
}

TEST(OpsAttention, ForwardMatchesReference) {
  uint64_t seed = 1;
  for (const Dims& d : forward_cases()) {
    auto qkv = randn(d.B * d.T * d.C3(), seed++);
    std::vector<float> probs;
    auto out = run_forward(qkv, d, probs);
    std::vector<double> ref_probs;
    auto ref = ref_forward(to_double(qkv), d, &ref_probs);
    EXPECT_TRUE(all_close("out " + d.str(), out, ref, kFwdAtol, kFwdRtol));
    // probs above the diagonal are exactly 0 in the reference, so this also checks the mask.
    EXPECT_TRUE(all_close("probs " + d.str(), probs, ref_probs, kFwdAtol, kFwdRtol));
  }
}

// loss = sum(out * r): dout = r; d loss / d qkv by central differences of the fp64 reference,
// compared on top of a nonzero prefill (backward accumulates).
TEST(OpsAttention, BackwardMatchesFiniteDifferences) {
  // FD cost = 2 * numel(qkv) forward evaluations: keep numel(qkv) x forward flops modest.
  const std::vector<Dims> cases{{2, 1, 4, 4, 7},   {2, 7, 4, 2, 7},   {1, 19, 4, 1, 7},
                                {1, 19, 2, 2, 19}, {1, 7, 2, 1, 111}, {1, 19, 4, 2, 1}};
  uint64_t seed = 100;
  for (const Dims& d : cases) {
    auto qkv = randn(d.B * d.T * d.C3(), seed++);
    auto r = randn(d.B * d.T * d.CO(), seed++);
    auto dqkv = randn(qkv.size(), seed++);
    const auto dqkv0 = dqkv;
    std::vector<float> probs;
    run_forward(qkv, d, probs);
    run_backward(dqkv, r, qkv, probs, d);
    auto fd =
        test::finite_diff([&](const std::vector<double>& x) { return dot(ref_forward(x, d), r); }, to_double(qkv));
    EXPECT_TRUE(all_close("dqkv " + d.str(), dqkv, plus(dqkv0, fd), kBwdAtol, kBwdRtol));
  }
}

// Sizes where FD is too slow (several row blocks, HS = 111): the analytic fp64 backward, itself
// validated against FD by the test above through the same formulas.
TEST(OpsAttention, BackwardLargeMatchesReference) {
  const std::vector<Dims> cases{{1, 300, 4, 2, 7}, {1, 300, 2, 2, 19}, {2, 19, 4, 2, 111}};
  uint64_t seed = 200;
  for (const Dims& d : cases) {
    auto qkv = randn(d.B * d.T * d.C3(), seed++);
    auto r = randn(d.B * d.T * d.CO(), seed++);
    auto dqkv = randn(qkv.size(), seed++);
    const auto dqkv0 = dqkv;
    std::vector<float> probs;
    run_forward(qkv, d, probs);
    run_backward(dqkv, r, qkv, probs, d);
    auto g = ref_backward(to_double(qkv), r, d);
    EXPECT_TRUE(all_close("dqkv " + d.str(), dqkv, plus(dqkv0, g), kBwdAtol, kBwdRtol));
  }
  // The analytic reference agrees with FD (so it is a valid stand-in above).
  const Dims small{1, 7, 4, 2, 7};
  auto qkv = randn(small.T * small.C3(), 299);
  auto r = randn(small.T * small.CO(), 298);
  auto fd =
      test::finite_diff([&](const std::vector<double>& x) { return dot(ref_forward(x, small), r); }, to_double(qkv));
  auto g = ref_backward(to_double(qkv), r, small);
  EXPECT_TRUE(all_close("analytic reference vs FD", test::to_float(g), fd, 1e-6, 1e-6));
}

// Queries at +-300 and unit keys: scores spread over hundreds, softmax nearly one-hot; values +-300.
TEST(OpsAttention, ExtremeScoresStayFiniteAndAccurate) {
  for (const Dims& d : {Dims{2, 19, 4, 2, 7}, Dims{1, 300, 2, 1, 19}}) {
    auto qkv = test::uniform(d.B * d.T * d.C3(), 7, -1.0f, 1.0f);
    auto big = test::uniform(qkv.size(), 8, -300.0f, 300.0f);
    for (int64_t row = 0; row < d.B * d.T; ++row)
      for (int64_t c = 0; c < d.C3(); ++c)
        if (c < d.NH * d.HS || c >= (d.NH + d.NKV) * d.HS) qkv[row * d.C3() + c] = big[row * d.C3() + c];
    std::vector<float> probs;
    auto out = run_forward(qkv, d, probs);
    std::vector<double> ref_probs;
    auto ref = ref_forward(to_double(qkv), d, &ref_probs);
    // Scores carry fp32 errors of ~300 * 6e-8 * HS ~ 1e-4, which shift probabilities by ~1e-4 relative;
    // out is a mix of values of magnitude 300. Observed: out 9e-3 abs, probs 1.6e-5 abs.
    EXPECT_TRUE(all_close("out extreme " + d.str(), out, ref, 3e-2, 1e-3));
    EXPECT_TRUE(all_close("probs extreme " + d.str(), probs, ref_probs, 1e-4, 1e-3));
    auto r = randn(d.B * d.T * d.CO(), 9);
    std::vector<float> dqkv(qkv.size(), 0.0f);
    run_backward(dqkv, r, qkv, probs, d);
    for (size_t i = 0; i < dqkv.size(); ++i) ASSERT_TRUE(std::isfinite(dqkv[i])) << "dqkv[" << i << "] " << d.str();
  }
}

TEST(OpsAttention, Deterministic) {
  const Dims d{2, 300, 4, 2, 19};
  auto qkv = randn(d.B * d.T * d.C3(), 400);
  auto r = randn(d.B * d.T * d.CO(), 401);
  std::vector<float> out[2], probs[2], dqkv[2];
  for (int k = 0; k < 2; ++k) {
    out[k] = run_forward(qkv, d, probs[k]);
    dqkv[k].assign(qkv.size(), 0.0f);
    run_backward(dqkv[k], r, qkv, probs[k], d);
  }
  EXPECT_TRUE(bitwise_equal(out[0], out[1]));
  EXPECT_TRUE(bitwise_equal(probs[0], probs[1]));
  EXPECT_TRUE(bitwise_equal(dqkv[0], dqkv[1]));
}

// Each head is computed by one thread with the same arithmetic: the thread count does not matter.
TEST(OpsAttention, IndependentOfThreadCount) {
  const Dims d{2, 150, 4, 2, 19};
  auto qkv = randn(d.B * d.T * d.C3(), 410);
  auto r = randn(d.B * d.T * d.CO(), 411);
  std::vector<float> out[2], probs[2], dqkv[2];
  const int saved = omp_get_max_threads();
  for (int k = 0; k < 2; ++k) {
    omp_set_num_threads(k == 0 ? 1 : 3);
    out[k] = run_forward(qkv, d, probs[k]);
    dqkv[k].assign(qkv.size(), 0.0f);
    run_backward(dqkv[k], r, qkv, probs[k], d);
  }
  omp_set_num_threads(saved);
  EXPECT_TRUE(bitwise_equal(out[0], out[1]));
  EXPECT_TRUE(bitwise_equal(probs[0], probs[1]));
  EXPECT_TRUE(bitwise_equal(dqkv[0], dqkv[1]));
}

TEST(OpsAttention, BadShapesNameTheTensor) {
  const Dims d{2, 7, 4, 2, 7};
  auto qkv = randn(d.B * d.T * d.C3(), 1);
  std::vector<float> out(d.B * d.T * d.CO()), probs(d.B * d.NH * d.T * d.T), bad(d.B * d.T * (d.CO() + 1));
  auto QKV = [&] { return tensor_of(qkv, {d.B, d.T, d.C3()}, "attn.qkv"); };
  auto PROBS = [&] { return tensor_of(probs, {d.B, d.NH, d.T, d.T}, "probs"); };
  expect_error_naming(
      [&] {
        attention_forward(tensor_of(bad, {d.B, d.T, d.CO() + 1}, "attn.out"), PROBS(), QKV(), 4, 2);
      },
      "attn.out");
  // NH=4, NKV=3: 3 does not divide 4.
  expect_error_naming(
      [&] {
        attention_forward(tensor_of(out, {d.B, d.T, d.CO()}, "out"), PROBS(), QKV(), 4, 3);
      },
      "n_kv_head=3");
  // C3 = 56 is not a multiple of NH + 2 NKV = 5.
  expect_error_naming(
      [&] {
        attention_forward(tensor_of(out, {d.B, d.T, d.CO()}, "out"), PROBS(), QKV(), 3, 1);
      },
      "attn.qkv");
  expect_error_naming(
      [&] {
        attention_backward(QKV(), tensor_of(probs, {d.B, d.NH, d.T * d.T}, "attn.dprobs"),
                           tensor_of(out, {d.B, d.T, d.CO()}, "dout"), QKV(), PROBS(), 4, 2);
      },
      "attn.dprobs");
}

}  // namespace
}  // namespace lmf
