// test_cuda_activation.cpp: CUDA GELU (tanh) and SwiGLU against the CPU reference (ops/activation.h)
// on awkward and realistic sizes with extreme inputs (+-300, where the sigmoid saturates): fresh
// random inputs, outputs poisoned with NaN, gradients prefilled (accumulation), bitwise determinism;
// then bf16 (mixed precision) against the CPU fp32 op on the same bf16-rounded inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <initializer_list>
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

// ---- bf16 (docs/MIXED_PRECISION.md): all tensors bf16. The reference is the CPU fp32 op on the same
// bf16-rounded inputs (x, dout and the dinp prefill); errors are rel_l2_error = ||gpu - ref|| / ||ref||
// per tensor. u = 2^-8 is bf16's unit roundoff (8 significant bits: one rounding is off by at most u
// relative per element, ~2^-9.2 rms over random values).
// The GPU evaluates the fp32 formulas of the f32 path on exactly the CPU's inputs, so its fp32 values
// are within the f32 tolerance above (1e-5 relative, exp's last ulp) of the CPU's, and the stored
// bf16 value adds one rounding (backward: dinp is widened, the gradient added in fp32, the sum rounded
// once, as the CPU's dinp + g rounded). Bounds:
// - against the fp32 reference: u + 2e-5 at any size (the rounding alone is at most u; a hard bound);
// - against the reference rounded to bf16: the two agree except for one-ulp flips where the fp32
//   values straddle a rounding tie (probability ~ the fp32 difference / a bf16 ulp, ~1e-4 per
//   element), so on tensors of >= 4096 elements the bound is u / 16. Measured on an H200: out 0,
//   dinp up to 5e-6 against the rounded reference; up to 3e-3 against the fp32 one.
constexpr double kU = 1.0 / 256;
constexpr double kBf16Bound = kU + 2e-5, kBf16RoundedBound = kU / 16;
constexpr size_t kMinRoundedCheck = 4096;

bool bitwise_equal(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)) == 0;
}

// Checks a bf16 result against the fp32 reference (both bounds above); returns the two errors.
std::pair<double, double> check_bf16_output(const std::string& what, const std::vector<bf16>& got_bf16,
                                            const std::vector<float>& ref) {
  const auto got = test::from_bf16(got_bf16);
  const double raw = test::rel_l2_error(got, ref), rounded = test::rel_l2_error(got, test::round_bf16(ref));
  EXPECT_LE(raw, kBf16Bound) << what << " (vs fp32 reference)";
  if (ref.size() >= kMinRoundedCheck) EXPECT_LE(rounded, kBf16RoundedBound) << what << " (vs bf16-rounded reference)";
  return {raw, rounded};
}

// A bf16 device copy of v, starting `offset` elements into the buffer (offset 1: a misaligned view).
test::DeviceBuffer bf16_buffer(const std::vector<float>& v, int64_t offset) {
  std::vector<bf16> h(v.size() + static_cast<size_t>(offset), bf16(0.0f));
  const auto r = test::to_bf16(v);
  std::copy(r.begin(), r.end(), h.begin() + offset);
  return test::DeviceBuffer(h);
}

Tensor bf16_view(const test::DeviceBuffer& buf, int64_t offset, std::initializer_list<int64_t> shape,
                 const char* name) {
  return Tensor(static_cast<bf16*>(buf.data()) + offset, DType::bf16, shape, name, Device::cuda);
}

std::vector<bf16> download_from(const test::DeviceBuffer& buf, int64_t offset) {
  auto v = buf.download<bf16>();
  v.erase(v.begin(), v.begin() + offset);
  return v;
}

TEST(CudaActivation, GeluBf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  double worst[4] = {};  // out, out (rounded ref), dinp, dinp (rounded ref)
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{5 * 768}, int64_t{333 * 7}, int64_t{333 * 3080}})
    for (int64_t offset : {int64_t{0}, int64_t{1}}) {  // 1: misaligned, the scalar path
      const uint64_t seed = test::fresh_seed();
      const std::string what = "bf16 gelu n=" + std::to_string(n) + " offset=" + std::to_string(offset) +
                               " seed=" + std::to_string(seed);
      auto x = test::round_bf16(inputs(n, seed)), dy = test::round_bf16(randn(static_cast<size_t>(n), seed + 1));
      const auto dx0 = test::round_bf16(randn(static_cast<size_t>(n), seed + 2, 0.5f));
      std::vector<float> out(x.size()), dx = dx0;
      gelu_forward(tensor_of(out, {n}, "out"), tensor_of(x, {n}, "inp"));
      gelu_backward(tensor_of(dx, {n}, "dinp"), tensor_of(dy, {n}, "dout"), tensor_of(x, {n}, "inp"));
      std::vector<bf16> first_out, first_dx;
      for (int run = 0; run < 2; ++run) {
        test::DeviceBuffer gx = bf16_buffer(x, offset), gdy = bf16_buffer(dy, offset), gdx = bf16_buffer(dx0, offset),
                           gout((n + offset) * sizeof(bf16));
        gout.poison();
        gelu_forward(bf16_view(gout, offset, {n}, "out"), bf16_view(gx, offset, {n}, "inp"));
        gelu_backward(bf16_view(gdx, offset, {n}, "dinp"), bf16_view(gdy, offset, {n}, "dout"),
                      bf16_view(gx, offset, {n}, "inp"));
        auto o = download_from(gout, offset), d = download_from(gdx, offset);
        if (run == 0) {
          const auto [e_out, e_out_r] = check_bf16_output("gelu out " + what, o, out);
          const auto [e_dx, e_dx_r] = check_bf16_output("gelu dinp " + what, d, dx);
          int i = 0;
          for (double e : {e_out, e_out_r, e_dx, e_dx_r}) worst[i] = std::max(worst[i], e), ++i;
          first_out = std::move(o);
          first_dx = std::move(d);
        } else {
          EXPECT_TRUE(bitwise_equal(o, first_out)) << "gelu out not deterministic " << what;
          EXPECT_TRUE(bitwise_equal(d, first_dx)) << "gelu dinp not deterministic " << what;
        }
      }
    }
  std::printf("[ measured ] bf16 gelu, worst rel_l2: out %.3g (vs bf16-rounded ref %.3g), dinp %.3g (%.3g); bounds "
              "%.3g, %.3g\n",
              worst[0], worst[1], worst[2], worst[3], kBf16Bound, kBf16RoundedBound);
}

TEST(CudaActivation, SwigluBf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  double worst[4] = {};
  for (int64_t N : {int64_t{1}, int64_t{5}, int64_t{333}})
    for (int64_t F : {int64_t{1}, int64_t{7}, int64_t{768}, int64_t{3080}})
      for (int64_t offset : {int64_t{0}, int64_t{1}}) {
        const uint64_t seed = test::fresh_seed();
        const std::string what = "bf16 swiglu N=" + std::to_string(N) + " F=" + std::to_string(F) +
                                 " offset=" + std::to_string(offset) + " seed=" + std::to_string(seed);
        auto x = test::round_bf16(inputs(N * 2 * F, seed)), dy = test::round_bf16(randn(static_cast<size_t>(N * F), seed + 1));
        const auto dx0 = test::round_bf16(randn(x.size(), seed + 2, 0.5f));
        std::vector<float> out(static_cast<size_t>(N * F)), dx = dx0;
        swiglu_forward(tensor_of(out, {N, F}, "out"), tensor_of(x, {N, 2 * F}, "inp"));
        swiglu_backward(tensor_of(dx, {N, 2 * F}, "dinp"), tensor_of(dy, {N, F}, "dout"),
                        tensor_of(x, {N, 2 * F}, "inp"));
        std::vector<bf16> first_out, first_dx;
        for (int run = 0; run < 2; ++run) {
          test::DeviceBuffer gx = bf16_buffer(x, offset), gdy = bf16_buffer(dy, offset),
                             gdx = bf16_buffer(dx0, offset), gout((N * F + offset) * sizeof(bf16));
          gout.poison();
          swiglu_forward(bf16_view(gout, offset, {N, F}, "out"), bf16_view(gx, offset, {N, 2 * F}, "inp"));
          swiglu_backward(bf16_view(gdx, offset, {N, 2 * F}, "dinp"), bf16_view(gdy, offset, {N, F}, "dout"),
                          bf16_view(gx, offset, {N, 2 * F}, "inp"));
          auto o = download_from(gout, offset), d = download_from(gdx, offset);
          if (run == 0) {
            const auto [e_out, e_out_r] = check_bf16_output("swiglu out " + what, o, out);
            const auto [e_dx, e_dx_r] = check_bf16_output("swiglu dinp " + what, d, dx);
            int i = 0;
            for (double e : {e_out, e_out_r, e_dx, e_dx_r}) worst[i] = std::max(worst[i], e), ++i;
            first_out = std::move(o);
            first_dx = std::move(d);
          } else {
            EXPECT_TRUE(bitwise_equal(o, first_out)) << "swiglu out not deterministic " << what;
            EXPECT_TRUE(bitwise_equal(d, first_dx)) << "swiglu dinp not deterministic " << what;
          }
        }
      }
  std::printf("[ measured ] bf16 swiglu, worst rel_l2: out %.3g (vs bf16-rounded ref %.3g), dinp %.3g (%.3g); "
              "bounds %.3g, %.3g\n",
              worst[0], worst[1], worst[2], worst[3], kBf16Bound, kBf16RoundedBound);
}

TEST(CudaActivation, Bf16DtypeMixIsAnError) {
  LMF_REQUIRE_GPU();
  DeviceBuffer d(256);
  try {
    gelu_backward(d.tensor(DType::f32, {8}, "gelu.dinp"), d.tensor(DType::bf16, {8}, "dout"),
                  d.tensor(DType::bf16, {8}, "inp"));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'gelu.dinp'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lmf
