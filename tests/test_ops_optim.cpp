// test_ops_optim.cpp: grad_global_norm against a float64 reference (and thread-count independence),
// adamw_update over several steps against a float64 reimplementation of torch.optim.AdamW with
// clipping on/off and weight decay on/off, determinism and shape errors.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/optim.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;

double ref_norm(const std::vector<float>& g) {
  double s = 0;
  for (float v : g) s += static_cast<double>(v) * v;
  return std::sqrt(s);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

float op_norm(std::vector<float>& g) {
  std::vector<float> norm(1, -1.0f);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {static_cast<int64_t>(g.size())}, "grads"));
  return norm[0];
}

void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// Sizes: awkward small ones, exactly one block (2^14), and 70 blocks + 123 (crosses the 64-block
// group boundary of the CPU kernel and ends in a partial block).
TEST(OpsOptim, GradGlobalNormMatchesReference) {
  uint64_t seed = 1;
  std::vector<int64_t> sizes = test::awkward_sizes();
  sizes.push_back(1 << 14);
  sizes.push_back(70 * (1 << 14) + 123);
  for (int64_t n : sizes) {
    auto g = randn(n, seed++, 0.3f);
    // The sum is exact to ~1e-15 in double; only the final rounding to fp32 (6e-8) remains.
    const double ref = ref_norm(g);
    const float got = op_norm(g);
    EXPECT_NEAR(got, ref, 2e-7 * ref) << "n=" << n;
  }
  // Any shape is accepted: the norm is over every element.
  auto g = randn(7 * 19 * 3, 77);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {7, 19, 3}, "grads"));
  EXPECT_NEAR(norm[0], ref_norm(g), 2e-7 * ref_norm(g));
  // Huge values whose squares overflow fp32 but not double.
  std::vector<float> big{3e20f, -4e20f};
  EXPECT_NEAR(op_norm(big), 5e20, 5e20 * 2e-7);
}

TEST(OpsOptim, GradGlobalNormIndependentOfThreadCount) {
  auto g = randn(70 * (1 << 14) + 123, 5);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const float one = op_norm(g);
  omp_set_num_threads(3);
  const float three = op_norm(g);
  omp_set_num_threads(saved);
  const float dflt = op_norm(g);
  EXPECT_EQ(std::memcmp(&one, &three, sizeof(float)), 0) << one << " vs " << three;
  EXPECT_EQ(std::memcmp(&one, &dflt, sizeof(float)), 0) << one << " vs " << dflt;
}

// float64 torch.optim.AdamW (single-tensor path), after clip_grad_norm_-style clipping with the
// header's clip factor min(1, max_norm / (norm + 1e-6)):
//   param *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2
//   param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
struct RefAdamW {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& grad, double max_norm, double lr, double b1, double b2, double eps, double wd,
            int64_t t) {
    double norm = 0;
    for (float g : grad) norm += static_cast<double>(g) * g;
    norm = std::sqrt(norm);
    const double clip = max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    for (size_t i = 0; i < p.size(); ++i) {
      const double g = clip * grad[i];
      p[i] *= 1 - lr * wd;
      m[i] += (1 - b1) * (g - m[i]);
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + eps);
    }
  }
};

// Several steps; (max_norm, weight_decay) = clipping active + decay, clipping inactive (max_norm
// above the norm) without decay, clipping off (max_norm = 0, norm tensor absent) + decay.
TEST(OpsOptim, AdamWMatchesTorchFormula) {
  struct Case {
    float max_norm, wd;
    bool pass_norm;
  };
  const std::vector<Case> cases{{1.0f, 0.1f, true}, {1e6f, 0.0f, true}, {0.0f, 0.1f, false}, {0.0f, 0.1f, true}};
  // lr large against |param| ~ 0.1 so that the update itself is checked, not just the fp32 rounding
  // of param.
  const float lr = 2e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  uint64_t seed = 10;
  for (const Case& c : cases)
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{111}, int64_t{40000}}) {
      auto p = randn(n, seed++, 0.1f), m = std::vector<float>(n, 0.0f), v = std::vector<float>(n, 0.0f);
      RefAdamW ref{test::to_double(p), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
      for (int64_t t = 1; t <= 6; ++t) {
        // Gradients of varying scale; every 5th element always ~1e-8 (sqrt(v) ~ eps: eps matters);
        // at t = 3 every 3rd gradient is exactly 0.
        auto g = randn(n, seed++, t % 2 ? 2.0f : 0.05f);
        for (int64_t i = 0; i < n; i += 5) g[i] *= 1e-8f;
        if (t == 3)
          for (int64_t i = 1; i < n; i += 3) g[i] = 0.0f;
        std::vector<float> norm(1);
        grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
        adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"),
                     tensor_of(g, {n}, "grad"), c.pass_norm ? tensor_of(norm, {1}, "norm") : Tensor(), c.max_norm, lr,
                     b1, b2, eps, c.wd, t);
        ref.step(g, c.max_norm, lr, b1, b2, eps, c.wd, t);
        const std::string what = "n=" + std::to_string(n) + " step=" + std::to_string(t) +
                                 " max_norm=" + std::to_string(c.max_norm) + " wd=" + std::to_string(c.wd);
        // fp32 per-element arithmetic, ~1e-7 relative per operation, a handful of operations per step;
        // the clip factor carries the fp32 rounding of the norm. m = b1 m + (1 - b1) g cancels when m
        // and g have opposite signs, so the error is relative to the array's scale, not per element:
        // atol = 1e-5 (param, v) or 1e-4 (m) times max |ref|. Observed: 2.7e-7 (param), 1.6e-7 (v) and
        // 5e-6 (m, n = 1 where m cancels to a fraction of its terms) of the scale. A wrong eps, bias
        // correction, clip or decay shows up at >= 1e-3 of the scale.
        EXPECT_TRUE(all_close("param " + what, p, ref.p, 1e-5 * max_abs(ref.p), 1e-5));
        EXPECT_TRUE(all_close("m " + what, m, ref.m, 1e-4 * max_abs(ref.m), 1e-5));
        EXPECT_TRUE(all_close("v " + what, v, ref.v, 1e-5 * max_abs(ref.v), 1e-5));
      }
    }
}

// With clipping active the result differs from clipping off (the clip is really applied).
TEST(OpsOptim, AdamWClipChangesTheUpdate) {
  const int64_t n = 19;
  auto p0 = randn(n, 1), g = randn(n, 2, 10.0f);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
  ASSERT_GT(norm[0], 1.0f);
  std::vector<float> results[2];
  for (int k = 0; k < 2; ++k) {
    auto p = p0, m = randn(n, 3), v = randn(n, 4, 0.0f);
    for (auto& x : v) x = 0.01f;
    adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(g, {n}, "grad"),
                 tensor_of(norm, {1}, "norm"), k == 0 ? 1.0f : 0.0f, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f, 5);
    results[k] = p;
  }
  EXPECT_NE(results[0], results[1]);
}

TEST(OpsOptim, AdamWDeterministic) {
  const int64_t n = 100003;
  auto p0 = randn(n, 1), g = randn(n, 2);
  std::vector<float> norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "grads"));
  std::vector<float> out[2];
  for (int k = 0; k < 2; ++k) {
    auto p = p0;
    std::vector<float> m(n, 0.1f), v(n, 0.2f);
    adamw_update(tensor_of(p, {n}, "param"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(g, {n}, "grad"),
                 tensor_of(norm, {1}, "norm"), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3);
    out[k] = p;
  }
  EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), n * sizeof(float)), 0);
}

TEST(OpsOptim, BadShapesNameTheTensor) {
  std::vector<float> p(19), m(19), v(18), g(19), norm(2);
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "fc.weight"), tensor_of(m, {19}, "fc.weight.m"),
                     tensor_of(v, {18}, "fc.weight.v"), tensor_of(g, {19}, "grad"), Tensor(), 0.0f, 1e-3f, 0.9f, 0.95f,
                     1e-8f, 0.0f, 1);
      },
      "fc.weight.v");
  std::vector<float> v19(19);
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "param"), tensor_of(m, {19}, "m"), tensor_of(v19, {19}, "v"),
                     tensor_of(g, {19}, "grad"), Tensor(), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1);
      },
      "absent");
  expect_error_naming(
      [&] {
        adamw_update(tensor_of(p, {19}, "param"), tensor_of(m, {19}, "m"), tensor_of(v19, {19}, "v"),
                     tensor_of(g, {19}, "grad"), Tensor(), 0.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 0);
      },
      "step=0");
  expect_error_naming([&] { grad_global_norm(tensor_of(norm, {2}, "grad_norm"), tensor_of(g, {19}, "grads")); },
                      "grad_norm");
}

}  // namespace
}  // namespace lmf
