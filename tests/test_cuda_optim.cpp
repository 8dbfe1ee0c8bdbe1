// CUDA global gradient norm and AdamW against the CPU ops on the same inputs: awkward sizes, block
// boundaries, 2^26 elements, n = 0, squares that overflow fp32, determinism; AdamW over several steps
// with clipping active / inactive / off and weight decay on / off, reading the norm on the device.
//
// Tolerances: the norm is summed in double on both sides (different fixed orders, ~1e-16 relative),
// so after rounding to float they differ by at most 1 ulp (|d| <= 2^-23 |norm|). AdamW is the same
// float formula on both sides, but the compilers contract different multiply-adds into FMAs: a few
// roundings per element: m and v within 8 u of the magnitude of their two terms (m's may cancel),
// param within 1e-6 + 4e-6 |param| (the update is lr ~ 1e-3 times an O(1) ratio).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "ops/optim.h"
#include "support/gpu_util.h"
#include "support/scaled_compare.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::DeviceBuffer;
using test::tensor_of;

float cpu_norm(std::vector<float>& g) {
  std::vector<float> norm(1, -1.0f);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {static_cast<int64_t>(g.size())}, "grads"));
  return norm[0];
}

float gpu_norm(const std::vector<float>& g) {
  cuda_reserve_workspace(grad_global_norm_cuda_workspace(static_cast<int64_t>(g.size())));
  DeviceBuffer dg(g.size() * 4), norm(4);
  if (!g.empty()) dg.upload(g);
  norm.poison();
  grad_global_norm(norm.tensor(DType::f32, {1}, "norm"),
                   dg.tensor(DType::f32, {static_cast<int64_t>(g.size())}, "grads"));
  return norm.download<float>()[0];
}

TEST(CudaOptim, GradGlobalNormMatchesCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  std::vector<int64_t> sizes = test::awkward_sizes();
  for (int64_t n : {kNormBlock - 1, kNormBlock, kNormBlock + 1, 70 * kNormBlock + 123, int64_t{1} << 26})
    sizes.push_back(n);
  uint64_t s = seed;
  for (int64_t n : sizes) {
    std::vector<float> g = test::randn(n, s++, 0.3f);
    const float c = cpu_norm(g), d = gpu_norm(g);
    EXPECT_NEAR(d, c, std::ldexp(static_cast<double>(c), -23)) << "n=" << n << " seed=" << seed;
    EXPECT_EQ(gpu_norm(g), d) << "not deterministic, n=" << n << " seed=" << seed;
  }
  // Squares that overflow fp32 but not double.
  std::vector<float> big{3e20f, -4e20f};
  EXPECT_NEAR(gpu_norm(big), 5e20, 5e20 * 2e-7);
  // No elements: 0.
  EXPECT_EQ(gpu_norm({}), 0.0f);
}

struct AdamCase {
  float max_norm, weight_decay;
  const char* what;
};

TEST(CudaOptim, AdamWMatchesCpuOverSteps) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  const AdamCase cases[] = {{0.5f, 0.1f, "clip active, wd"},
                            {1e6f, 0.1f, "clip inactive, wd"},
                            {0.0f, 0.0f, "clip off, no wd"},
                            {1.0f, 0.0f, "clip active, no wd"}};
  std::vector<int64_t> sizes = test::awkward_sizes();
  sizes.push_back(int64_t{1} << 20);
  uint64_t s = seed;
  for (const AdamCase& ac : cases)
    for (int64_t n : sizes) {
      const std::string what = std::string(ac.what) + " n=" + std::to_string(n) + " seed=" + std::to_string(seed);
      std::vector<float> p = test::randn(n, s++), m(n, 0.0f), v(n, 0.0f);
      DeviceBuffer dp(p), dm(m), dv(v), dg(n * 4), dnorm(4);
      for (int64_t step = 1; step <= 3; ++step) {
        std::vector<float> g = test::randn(n, s++, 0.5f), norm(1);
        grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(g, {n}, "g"));
        // Each step starts both sides from the CPU's state and the same norm value, so only this
        // step's update is compared (bias corrections differ per step).
        dp.upload(p);
        dm.upload(m);
        dv.upload(v);
        dg.upload(g);
        dnorm.upload(norm);
        // Error scales of m and v: the magnitudes of their two terms (m's may cancel).
        const float clip = ac.max_norm > 0.0f ? std::min(1.0f, ac.max_norm / (norm[0] + 1e-6f)) : 1.0f;
        std::vector<float> m_scale(n), v_scale(n);
        for (int64_t i = 0; i < n; ++i) {
          const float gc = clip * g[i];
          m_scale[i] = beta1 * std::fabs(m[i]) + (1.0f - beta1) * std::fabs(gc);
          v_scale[i] = beta2 * v[i] + (1.0f - beta2) * gc * gc;
        }
        adamw_update(tensor_of(p, {n}, "p"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(g, {n}, "g"),
                     tensor_of(norm, {1}, "norm"), ac.max_norm, lr, beta1, beta2, eps, ac.weight_decay, step);
        adamw_update(dp.tensor(DType::f32, {n}, "p"), dm.tensor(DType::f32, {n}, "m"), dv.tensor(DType::f32, {n}, "v"),
                     dg.tensor(DType::f32, {n}, "g"), dnorm.tensor(DType::f32, {1}, "norm"), ac.max_norm, lr, beta1,
                     beta2, eps, ac.weight_decay, step);
        const std::string at = what + " step " + std::to_string(step);
        EXPECT_TRUE(test::within_scale("m " + at, dm.download<float>(), m, m_scale, 8 * test::kRoundoff));
        EXPECT_TRUE(test::within_scale("v " + at, dv.download<float>(), v, v_scale, 8 * test::kRoundoff));
        EXPECT_TRUE(test::all_close("param " + at, dp.download<float>(), test::to_double(p), 1e-6, 4e-6));
      }
    }
}

// The trainer's sequence on the device: norm, then AdamW reading it, twice from the same state:
// bitwise equal, and close to the CPU.
TEST(CudaOptim, NormThenAdamWOnDeviceIsDeterministic) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const int64_t n = 3 * kNormBlock + 17;
  cuda_reserve_workspace(grad_global_norm_cuda_workspace(n));
  const std::vector<float> p0 = test::randn(n, seed), m0 = test::randn(n, seed + 1, 0.01f),
                           v0 = test::uniform(n, seed + 2, 0.0f, 1e-3f), g = test::randn(n, seed + 3, 0.5f);
  std::vector<float> out[2];
  for (auto& o : out) {
    DeviceBuffer dp(p0), dm(m0), dv(v0), dg(g), dnorm(4);
    dnorm.poison();
    grad_global_norm(dnorm.tensor(DType::f32, {1}, "norm"), dg.tensor(DType::f32, {n}, "g"));
    adamw_update(dp.tensor(DType::f32, {n}, "p"), dm.tensor(DType::f32, {n}, "m"), dv.tensor(DType::f32, {n}, "v"),
                 dg.tensor(DType::f32, {n}, "g"), dnorm.tensor(DType::f32, {1}, "norm"), 1.0f, 1e-3f, 0.9f, 0.95f,
                 1e-8f, 0.1f, 7);
    o = dp.download<float>();
  }
  EXPECT_TRUE(test::bitwise_equal("param, run twice, seed=" + std::to_string(seed), out[0], out[1]));
  std::vector<float> p = p0, m = m0, v = v0, gc = g, norm(1);
  grad_global_norm(tensor_of(norm, {1}, "norm"), tensor_of(gc, {n}, "g"));
  adamw_update(tensor_of(p, {n}, "p"), tensor_of(m, {n}, "m"), tensor_of(v, {n}, "v"), tensor_of(gc, {n}, "g"),
               tensor_of(norm, {1}, "norm"), 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
  EXPECT_TRUE(test::all_close("param vs cpu, seed=" + std::to_string(seed), out[0], test::to_double(p), 1e-6, 4e-6));
}

}  // namespace
}  // namespace lmf
