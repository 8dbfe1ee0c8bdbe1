// CUDA global gradient norm and AdamW against the CPU ops on the same inputs: awkward sizes, block
// boundaries, 2^26 elements, n = 0, squares that overflow fp32, determinism; AdamW over several steps
// with clipping active / inactive / off and weight decay on / off, reading the norm on the device.
//
// Tolerances: the norm is summed in double on both sides (different fixed orders, ~1e-16 relative),
// so after rounding to float they differ by at most 1 ulp (|d| <= 2^-23 |norm|). AdamW is the same
// float formula on both sides, but the compilers contract different multiply-adds into FMAs: a few
// roundings per element: m and v within 8 u of the magnitude of their two terms (m's may cancel),
// param within 1e-6 + 4e-6 |param| (the update is lr ~ 1e-3 times an O(1) ratio).
//
// adamw_update_flat on the GPU: bitwise equal to adamw_update per tensor on the GPU (both kernels
// run the same inlined per-element code, adamw_element in optim.cu, with the same clip and bias
// corrections), and against the CPU flat update within the tolerances above (not bitwise: gcc and
// nvcc contract different multiply-adds into FMAs). Padding between arena tensors stays exactly +0.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "ops/optim.h"
#include "support/gpu_util.h"
#include "support/scaled_compare.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::DeviceBuffer;
using test::model_like_specs;
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


// --- adamw_update_flat ----------------------------------------------------------------------------

void fill_arena(const Arena& a, uint64_t seed, float scale) {
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor t = a[i];
    const std::vector<float> r = test::randn(static_cast<size_t>(t.numel()), seed + 1000003 * i, scale);
    if (!r.empty()) std::memcpy(t.data, r.data(), r.size() * sizeof(float));
  }
}

std::vector<float> values(const Arena& a) {  // the whole block, padding included, from either device
  std::vector<float> h(a.bytes() / sizeof(float));
  tensor_to_host(h.data(), a.flat_f32());
  return h;
}

void upload(const Arena& dst, const Arena& host) { tensor_from_host(dst.flat_f32(), host.base()); }

std::vector<bool> padding_mask(const Arena& a) {
  std::vector<bool> pad(a.bytes() / sizeof(float), true);
  for (size_t i = 0; i < a.size(); ++i)
    for (int64_t k = 0; k < a.spec(i).numel(); ++k) pad[a.offset_elems(i) + static_cast<size_t>(k)] = false;
  return pad;
}

::testing::AssertionResult padding_is_zero(const std::string& what, const std::vector<float>& a,
                                           const std::vector<bool>& pad) {
  const float zero = 0.0f;
  for (size_t i = 0; i < a.size(); ++i)
    if (pad[i] && std::memcmp(&a[i], &zero, sizeof(float)) != 0)
      return ::testing::AssertionFailure() << what << ": padding element " << i << " is " << a[i] << ", not +0";
  return ::testing::AssertionSuccess();
}

Tensor ranges_tensor(std::vector<int32_t>& r) {
  return Tensor(r.data(), DType::i32, {static_cast<int64_t>(r.size() / 2), 2}, "decay_ranges");
}

// Arenas of several shapes: a few ranges, > 32 and > 256 ranges (each capacity of the kernel's
// launch-argument table), and > 2 grid strides of elements (a thread crosses ranges between its
// elements). Three steps each with clipping active / inactive / off.
TEST(CudaOptim, AdamWFlatMatchesPerTensorBitwiseAndCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  const AdamCase cases[] = {{0.5f, 0.1f, "clip active"}, {1e6f, 0.1f, "clip inactive"}, {0.0f, 0.05f, "clip off"}};
  uint64_t s = seed;
  for (const auto& [layers, C] : {std::pair<int, int64_t>{2, 13}, std::pair<int, int64_t>{40, 5},
                                  std::pair<int, int64_t>{100, 3}, std::pair<int, int64_t>{2, 257}})
    for (const AdamCase& ac : cases) {
      const std::vector<TensorSpec> specs = model_like_specs(layers, C);
      Arena p("p", specs), m("m", specs), v("v", specs), g("g", specs);
      Arena dpa("dp_flat", specs, Device::cuda), dma("dm_flat", specs, Device::cuda),
          dva("dv_flat", specs, Device::cuda), dpb("dp_tensor", specs, Device::cuda),
          dmb("dm_tensor", specs, Device::cuda), dvb("dv_tensor", specs, Device::cuda), dg("dg", specs, Device::cuda);
      DeviceBuffer dnorm(4);
      std::vector<int32_t> r = adamw_decay_ranges(p);
      const std::vector<bool> pad = padding_mask(p);
      const int64_t n = p.flat_f32().numel();
      DeviceBuffer dcopy(static_cast<size_t>(n) * 2);  // the flat bf16 weight copy of mixed precision
      const Tensor copy_t = dcopy.tensor(DType::bf16, {n}, "params_bf16");
      const std::string what = std::string(ac.what) + " layers=" + std::to_string(layers) + " C=" +
                               std::to_string(C) + " n=" + std::to_string(n) + " S=" + std::to_string(r.size() / 2) +
                               " seed=" + std::to_string(seed);
      fill_arena(p, s++, 1.0f);
      for (int64_t step = 1; step <= 3; ++step) {
        fill_arena(g, s++, 0.5f);
        std::vector<float> norm(1);
        grad_global_norm(tensor_of(norm, {1}, "norm"), g.flat_f32());
        // Both GPU sides start from the CPU's state and norm value (see AdamWMatchesCpuOverSteps).
        for (const Arena* d : {&dpa, &dpb}) upload(*d, p);
        for (const Arena* d : {&dma, &dmb}) upload(*d, m);
        for (const Arena* d : {&dva, &dvb}) upload(*d, v);
        upload(dg, g);
        dnorm.upload(norm);
        const Tensor dn = dnorm.tensor(DType::f32, {1}, "norm");
        // Error scales of m and v per element (0 on padding: there they must match exactly).
        const float clip = ac.max_norm > 0.0f ? std::min(1.0f, ac.max_norm / (norm[0] + 1e-6f)) : 1.0f;
        const std::vector<float> m0 = values(m), v0 = values(v), g0 = values(g);
        std::vector<float> m_scale(n), v_scale(n);
        for (int64_t i = 0; i < n; ++i) {
          const float gc = clip * g0[i];
          m_scale[i] = beta1 * std::fabs(m0[i]) + (1.0f - beta1) * std::fabs(gc);
          v_scale[i] = beta2 * v0[i] + (1.0f - beta2) * gc * gc;
        }
        adamw_update_flat(p.flat_f32(), m.flat_f32(), v.flat_f32(), g.flat_f32(), ranges_tensor(r),
                          tensor_of(norm, {1}, "norm"), ac.max_norm, lr, beta1, beta2, eps, ac.weight_decay, step);
        adamw_update_flat(dpa.flat_f32(), dma.flat_f32(), dva.flat_f32(), dg.flat_f32(), ranges_tensor(r), dn,
                          ac.max_norm, lr, beta1, beta2, eps, ac.weight_decay, step, copy_t);
        for (size_t i = 0; i < specs.size(); ++i)
          adamw_update(dpb[i], dmb[i], dvb[i], dg[i], dn, ac.max_norm, lr, beta1, beta2, eps,
                       specs[i].shape.size() >= 2 ? ac.weight_decay : 0.0f, step);
        const std::string at = what + " step " + std::to_string(step);
        const std::vector<float> gp = values(dpa), gm = values(dma), gv = values(dva);
        ASSERT_TRUE(test::bitwise_equal("param flat vs per tensor, " + at, gp, values(dpb)));
        ASSERT_TRUE(test::bitwise_equal("m flat vs per tensor, " + at, gm, values(dmb)));
        ASSERT_TRUE(test::bitwise_equal("v flat vs per tensor, " + at, gv, values(dvb)));
        ASSERT_TRUE(padding_is_zero("param " + at, gp, pad));
        {  // the bf16 copy written in the same launch is the rounded new param, bit for bit
          const std::vector<bf16> copy = dcopy.download<bf16>(), want = test::to_bf16(gp);
          ASSERT_EQ(0, std::memcmp(copy.data(), want.data(), copy.size() * 2)) << "bf16 copy, " << at;
        }
        ASSERT_TRUE(padding_is_zero("m " + at, gm, pad));
        ASSERT_TRUE(padding_is_zero("v " + at, gv, pad));
        ASSERT_TRUE(test::within_scale("m vs cpu, " + at, gm, values(m), m_scale, 8 * test::kRoundoff));
        ASSERT_TRUE(test::within_scale("v vs cpu, " + at, gv, values(v), v_scale, 8 * test::kRoundoff));
        ASSERT_TRUE(test::all_close("param vs cpu, " + at, gp, test::to_double(values(p)), 1e-6, 4e-6));
      }
    }
}

// The trainer's sequence on the device: the norm into a poisoned buffer, then the flat update reading
// it; twice from the same state: bitwise equal runs, and bitwise equal to whole-array adamw_update
// when the table is empty (no decay) or covers everything (decay everywhere, padding included).
TEST(CudaOptim, AdamWFlatAfterDeviceNormIsDeterministic) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  const std::vector<TensorSpec> specs = model_like_specs(3, 131);
  Arena p("p", specs), m("m", specs), v("v", specs), g("g", specs);
  fill_arena(p, seed, 1.0f);
  fill_arena(m, seed + 1, 0.01f);
  fill_arena(g, seed + 2, 0.5f);
  for (size_t i = 0; i < v.size(); ++i) {
    const std::vector<float> r = test::uniform(static_cast<size_t>(v[i].numel()), seed + 3 + i, 0.0f, 1e-3f);
    if (!r.empty()) std::memcpy(v[i].data, r.data(), r.size() * sizeof(float));
  }
  const int64_t n = p.flat_f32().numel();
  cuda_reserve_workspace(grad_global_norm_cuda_workspace(n));
  std::vector<int32_t> tables[3] = {adamw_decay_ranges(p), {}, {0, static_cast<int32_t>(n)}};
  const char* names[3] = {"matrices", "empty table", "full table"};
  Arena dp("dp", specs, Device::cuda), dm("dm", specs, Device::cuda), dv("dv", specs, Device::cuda),
      dg("dg", specs, Device::cuda);
  upload(dg, g);
  DeviceBuffer dnorm(4);
  for (int t = 0; t < 3; ++t) {
    const std::string what = std::string(names[t]) + " seed=" + std::to_string(seed);
    std::vector<float> out[3];
    for (int run = 0; run < 3; ++run) {
      upload(dp, p);
      upload(dm, m);
      upload(dv, v);
      dnorm.poison();
      grad_global_norm(dnorm.tensor(DType::f32, {1}, "norm"), dg.flat_f32());
      const Tensor dn = dnorm.tensor(DType::f32, {1}, "norm");
      if (run < 2)
        adamw_update_flat(dp.flat_f32(), dm.flat_f32(), dv.flat_f32(), dg.flat_f32(), ranges_tensor(tables[t]), dn,
                          1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7);
      else if (t > 0)  // whole-array reference for the empty and full tables
        adamw_update(dp.flat_f32(), dm.flat_f32(), dv.flat_f32(), dg.flat_f32(), dn, 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f,
                     t == 2 ? 0.1f : 0.0f, 7);
      else
        for (size_t i = 0; i < specs.size(); ++i)
          adamw_update(dp[i], dm[i], dv[i], dg[i], dn, 1.0f, 1e-3f, 0.9f, 0.95f, 1e-8f,
                       specs[i].shape.size() >= 2 ? 0.1f : 0.0f, 7);
      out[run] = values(dp);
    }
    EXPECT_TRUE(test::bitwise_equal("param, run twice, " + what, out[0], out[1]));
    EXPECT_TRUE(test::bitwise_equal("param vs adamw_update, " + what, out[0], out[2]));
    EXPECT_TRUE(padding_is_zero("param " + what, out[0], padding_mask(p)));
  }
}

TEST(CudaOptim, CastToBf16RoundsToNearestEven) {
  LMF_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1} << 20}) {
    const uint64_t seed = test::fresh_seed();
    std::vector<float> x = test::randn(static_cast<size_t>(n), seed, 3.0f);
    if (n > 4) {  // ties and specials: exactly halfway between two bf16 values, NaN, inf
      x[0] = 1.0f + 1.0f / 256;  // halfway: rounds to even (1.0)
      x[1] = 1.0f + 3.0f / 256;  // halfway: rounds to even (1 + 4/256)
      x[2] = std::numeric_limits<float>::infinity();
      x[3] = -0.0f;
    }
    DeviceBuffer dx(x), dy(static_cast<size_t>(n) * 2);
    dy.poison();
    cast_to_bf16(dy.tensor(DType::bf16, {n}, "copy"), dx.tensor(DType::f32, {n}, "master"));
    const std::vector<bf16> got = dy.download<bf16>(), want = test::to_bf16(x);
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * 2)) << "n=" << n << " seed=" << seed;
  }
}

// The non-finite guard: the same counter and first-bad-step record as the CPU op, over a sequence of
// finite and non-finite losses and norms (NaN, +Inf, -Inf), on the device without a host sync.
TEST(CudaOptim, NonFiniteGuardMatchesCpu) {
  LMF_REQUIRE_GPU();
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::pair<float, float>> steps = {{2.5f, 1.0f}, {3.0f, 0.5f}, {nan, 1.0f}, {1.0f, inf},
                                                      {1.0f, 1.0f}, {-inf, 2.0f}};
  std::vector<int32_t> cpu = {7, 0};
  DeviceBuffer guard(std::vector<int32_t>{7, 0}), loss(4), norm(4);
  for (const auto& [l, n] : steps) {
    std::vector<float> hl = {l}, hn = {n};
    nonfinite_guard(tensor_of(cpu, {2}, "guard"), tensor_of(hl, {1}, "loss"), tensor_of(hn, {1}, "norm"));
    loss.upload(hl);
    norm.upload(hn);
    nonfinite_guard(guard.tensor(DType::i32, {2}, "guard"), loss.tensor(DType::f32, {1}, "loss"),
                    norm.tensor(DType::f32, {1}, "norm"));
    EXPECT_EQ(guard.download<int32_t>(), cpu);
  }
  EXPECT_EQ(cpu, (std::vector<int32_t>{13, 10})) << "six steps counted from 7; the third (step 10) was the first bad";
}

}  // namespace
}  // namespace lmf
