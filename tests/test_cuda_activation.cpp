// test_cuda_activation.cpp: CUDA GELU (tanh) and SwiGLU against the CPU reference (ops/activation.h)
// on awkward and realistic sizes with extreme inputs (+-300, where the sigmoid saturates): fresh
// random inputs, outputs poisoned with NaN, gradients prefilled (accumulation), bitwise determinism.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ops/activation.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::DeviceBuffer;
using test::randn;
using test::tensor_of;
using test::to_double;

// The only difference from the CPU is exp: CUDA's expf (<= 2 ulp) against the CPU's Cephes exp_f32
// (<= 1.4 ulp), both with the argument clamped to +-87. Outputs x * sigmoid and the derivatives
// (|gelu'| <= 1.13, silu' similar) inherit a few ulp relative: 1e-5 relative, 1e-6 absolute near 0.
constexpr double kAtol = 1e-6, kRtol = 1e-5;

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// n inputs ~ N(0, 3^2) with extremes in the first elements.
std::vector<float> inputs(int64_t n, uint64_t seed) {
  auto x = randn(static_cast<size_t>(n), seed, 3.0f);
  const float extremes[] = {300.0f, -300.0f, 20.0f, -20.0f, 1e-3f, -1e-3f, 0.0f};
  for (size_t i = 0; i < std::size(extremes) && i + 1 < x.size(); ++i) x[i + 1] = extremes[i];
  return x;
}

TEST(CudaActivation, GeluMatchesCpu) {
  LMF_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{111}, int64_t{4096} * 768}) {
    const uint64_t seed = test::fresh_seed();
    const std::string what = "n=" + std::to_string(n) + " seed=" + std::to_string(seed);
    auto x = inputs(n, seed);
    auto dy = randn(static_cast<size_t>(n), seed + 1);
    const auto dx0 = randn(static_cast<size_t>(n), seed + 2, 0.5f);
    // CPU reference
    std::vector<float> out(x.size()), dx = dx0;
    gelu_forward(tensor_of(out, {n}, "out"), tensor_of(x, {n}, "inp"));
    gelu_backward(tensor_of(dx, {n}, "dinp"), tensor_of(dy, {n}, "dout"), tensor_of(x, {n}, "inp"));
    // GPU, twice
    DeviceBuffer gx(x), gdy(dy), gout(x.size() * sizeof(float)), gdx(dx0);
    std::vector<float> first_out, first_dx;
    for (int run = 0; run < 2; ++run) {
      gout.poison();
      gdx.upload(dx0);
      gelu_forward(gout.tensor(DType::f32, {n}, "out"), gx.tensor(DType::f32, {n}, "inp"));
      gelu_backward(gdx.tensor(DType::f32, {n}, "dinp"), gdy.tensor(DType::f32, {n}, "dout"),
                    gx.tensor(DType::f32, {n}, "inp"));
      auto o = gout.download<float>(), d = gdx.download<float>();
      if (run == 0) {
        EXPECT_TRUE(all_close("gelu out " + what, o, to_double(out), kAtol, kRtol));
        EXPECT_TRUE(all_close("gelu dinp " + what, d, to_double(dx), kAtol, kRtol));
        first_out = std::move(o);
        first_dx = std::move(d);
      } else {
        EXPECT_TRUE(bitwise_equal(o, first_out)) << "gelu out not deterministic " << what;
        EXPECT_TRUE(bitwise_equal(d, first_dx)) << "gelu dinp not deterministic " << what;
      }
    }
  }
}

TEST(CudaActivation, SwigluMatchesCpu) {
  LMF_REQUIRE_GPU();
  const std::pair<int64_t, int64_t> sizes[] = {{1, 1}, {7, 19}, {19, 111}, {111, 7}, {1, 111}, {4096, 2048}};
  for (auto [N, F] : sizes) {
    const uint64_t seed = test::fresh_seed();
    const std::string what =
        "N=" + std::to_string(N) + " F=" + std::to_string(F) + " seed=" + std::to_string(seed);
    auto x = inputs(N * 2 * F, seed);
    auto dy = randn(static_cast<size_t>(N * F), seed + 1);
    const auto dx0 = randn(x.size(), seed + 2, 0.5f);
    std::vector<float> out(static_cast<size_t>(N * F)), dx = dx0;
    swiglu_forward(tensor_of(out, {N, F}, "out"), tensor_of(x, {N, 2 * F}, "inp"));
    swiglu_backward(tensor_of(dx, {N, 2 * F}, "dinp"), tensor_of(dy, {N, F}, "dout"), tensor_of(x, {N, 2 * F}, "inp"));
    DeviceBuffer gx(x), gdy(dy), gout(out.size() * sizeof(float)), gdx(dx0);
    std::vector<float> first_out, first_dx;
    for (int run = 0; run < 2; ++run) {
      gout.poison();
      gdx.upload(dx0);
      swiglu_forward(gout.tensor(DType::f32, {N, F}, "out"), gx.tensor(DType::f32, {N, 2 * F}, "inp"));
      swiglu_backward(gdx.tensor(DType::f32, {N, 2 * F}, "dinp"), gdy.tensor(DType::f32, {N, F}, "dout"),
                      gx.tensor(DType::f32, {N, 2 * F}, "inp"));
      auto o = gout.download<float>(), d = gdx.download<float>();
      if (run == 0) {
        EXPECT_TRUE(all_close("swiglu out " + what, o, to_double(out), kAtol, kRtol));
        EXPECT_TRUE(all_close("swiglu dinp " + what, d, to_double(dx), kAtol, kRtol));
        first_out = std::move(o);
        first_dx = std::move(d);
      } else {
        EXPECT_TRUE(bitwise_equal(o, first_out)) << "swiglu out not deterministic " << what;
        EXPECT_TRUE(bitwise_equal(d, first_dx)) << "swiglu dinp not deterministic " << what;
      }
    }
  }
}

}  // namespace
}  // namespace lmf
