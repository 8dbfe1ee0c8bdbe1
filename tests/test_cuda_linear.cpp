// CUDA linear (cuBLASLt GEMMs with the bias epilogue, two-pass bias gradient) against the CPU op on
// the same inputs: awkward sizes with and without bias, a GPT-2-small MLP shape, accumulation into
// pre-filled gradients, absent gradients, determinism.
//
// Tolerance: |gpu - cpu| <= 32 u * scale per element (support/scaled_compare.h), scale = the sum of
// the absolute values of the terms (|inp| |W|^T + |bias| forward; |dout| |W| + |dinp0|,
// |dout|^T |inp| + |dW0|, sum_n |dout| + |db0| backward): both sides are fp32 sums of the same terms
// in different orders (the dbias sums in chunks of 256 rows on the GPU, row by row on the CPU).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ops/gemm_cuda.h"
#include "ops/linear.h"
#include "support/gpu_util.h"
#include "support/scaled_compare.h"
#include "support/test_util.h"

namespace lmf {
namespace {

constexpr double kTol = 32 * test::kRoundoff;  // 1.9e-6 of the scale

using test::DeviceBuffer;
using test::tensor_of;

std::string dims(int64_t N, int64_t IC, int64_t OC, bool bias) {
  return "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC) +
         (bias ? " bias" : " no bias");
}

void reserve(int64_t N, int64_t OC) {
  cuda_reserve_workspace(std::max(kGemmWorkspaceBytes, linear_backward_cuda_workspace(N, OC)));
}

struct GpuOut {
  std::vector<float> out, dinp, dw, db;
};

// Forward and backward on the GPU from the given initial gradients (out poisoned first).
GpuOut run_gpu(const std::vector<float>& inp, const std::vector<float>& w, const std::vector<float>& b,
               const std::vector<float>& dout, const std::vector<float>& dinp0, const std::vector<float>& dw0,
               const std::vector<float>& db0, int64_t N, int64_t IC, int64_t OC, bool bias) {
  DeviceBuffer d_inp(inp), d_w(w), d_b(b), d_dout(dout), d_dinp(dinp0), d_dw(dw0), d_db(db0), d_out(N * OC * 4);
  d_out.poison();
  const Tensor t_inp = d_inp.tensor(DType::f32, {N, IC}, "inp"), t_w = d_w.tensor(DType::f32, {OC, IC}, "weight");
  linear_forward(d_out.tensor(DType::f32, {N, OC}, "out"), t_inp, t_w,
                 bias ? d_b.tensor(DType::f32, {OC}, "bias") : Tensor());
  linear_backward(d_dinp.tensor(DType::f32, {N, IC}, "dinp"), d_dw.tensor(DType::f32, {OC, IC}, "dweight"),
                  bias ? d_db.tensor(DType::f32, {OC}, "dbias") : Tensor(), d_dout.tensor(DType::f32, {N, OC}, "dout"),
                  t_inp, t_w);
  return {d_out.download<float>(), d_dinp.download<float>(), d_dw.download<float>(), d_db.download<float>()};
}

void check_linear(int64_t N, int64_t IC, int64_t OC, bool bias, uint64_t seed, bool twice) {
  const std::string what = dims(N, IC, OC, bias) + " seed=" + std::to_string(seed);
  reserve(N, OC);
  std::vector<float> inp = test::randn(N * IC, seed), w = test::randn(OC * IC, seed + 1, 0.5f),
                     b = test::randn(OC, seed + 2), dout = test::randn(N * OC, seed + 3),
                     dinp0 = test::randn(N * IC, seed + 4), dw0 = test::randn(OC * IC, seed + 5),
                     db0 = test::randn(OC, seed + 6);
  // CPU reference on the same inputs.
  std::vector<float> out(N * OC), dinp = dinp0, dw = dw0, db = db0;
  linear_forward(tensor_of(out, {N, OC}, "out"), tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"),
                 bias ? tensor_of(b, {OC}, "bias") : Tensor());
  linear_backward(tensor_of(dinp, {N, IC}, "dinp"), tensor_of(dw, {OC, IC}, "dweight"),
                  bias ? tensor_of(db, {OC}, "dbias") : Tensor(), tensor_of(dout, {N, OC}, "dout"),
                  tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"));
  const GpuOut g = run_gpu(inp, w, b, dout, dinp0, dw0, db0, N, IC, OC, bias);

  const std::vector<float> zeros(N * OC, 0.0f);
  EXPECT_TRUE(test::within_scale("out " + what, g.out, out,
                                 test::gemm_error_scale(false, true, N, OC, IC, 1.0f, inp, IC, w, IC, 0.0f, zeros, OC,
                                                        bias ? b : std::vector<float>{}),
                                 kTol));
  EXPECT_TRUE(test::within_scale(
      "dinp " + what, g.dinp, dinp,
      test::gemm_error_scale(false, false, N, IC, OC, 1.0f, dout, OC, w, IC, 1.0f, dinp0, IC), kTol));
  EXPECT_TRUE(test::within_scale("dweight " + what, g.dw, dw,
                                 test::gemm_error_scale(true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw0, IC),
                                 kTol));
  if (bias) {
    std::vector<float> db_scale(OC);
    for (int64_t c = 0; c < OC; ++c) {
      double s = std::fabs(db0[c]);
      for (int64_t n = 0; n < N; ++n) s += std::fabs(dout[n * OC + c]);
      db_scale[c] = static_cast<float>(s);
    }
    EXPECT_TRUE(test::within_scale("dbias " + what, g.db, db, db_scale, kTol));
  } else {
    EXPECT_TRUE(test::bitwise_equal("dbias untouched " + what, g.db, db0));
  }
  if (twice) {
    const GpuOut g2 = run_gpu(inp, w, b, dout, dinp0, dw0, db0, N, IC, OC, bias);
    EXPECT_TRUE(test::bitwise_equal("out run twice " + what, g.out, g2.out));
    EXPECT_TRUE(test::bitwise_equal("dinp run twice " + what, g.dinp, g2.dinp));
    EXPECT_TRUE(test::bitwise_equal("dweight run twice " + what, g.dw, g2.dw));
    EXPECT_TRUE(test::bitwise_equal("dbias run twice " + what, g.db, g2.db));
  }
}

TEST(CudaLinear, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed();
  uint64_t s = seed;
  for (int64_t N : test::awkward_sizes())
    for (int64_t IC : test::awkward_sizes())
      for (int64_t OC : test::awkward_sizes())
        for (bool bias : {false, true}) {
          check_linear(N, IC, OC, bias, s, false);
          s += 7;
        }
}

TEST(CudaLinear, Gpt2MlpShapeMatchesCpuAndIsDeterministic) {
  LMF_REQUIRE_GPU();
  check_linear(4096, 768, 3072, true, test::fresh_seed(), true);
}

TEST(CudaLinear, BiasGradientOverManyRowChunksIsDeterministic) {
  LMF_REQUIRE_GPU();
  // 1000 rows: 3 full chunks of 256 and a partial one; OC = 33 crosses a 32-column group.
  check_linear(1000, 19, 33, true, test::fresh_seed(), true);
}

TEST(CudaLinear, AbsentGradientsAreSkipped) {
  LMF_REQUIRE_GPU();
  const int64_t N = 19, IC = 7, OC = 111;
  reserve(N, OC);
  const uint64_t seed = test::fresh_seed();
  std::vector<float> inp = test::randn(N * IC, seed), w = test::randn(OC * IC, seed + 1),
                     dout = test::randn(N * OC, seed + 2), db0 = test::randn(OC, seed + 3);
  std::vector<float> db = db0;
  linear_backward(Tensor(), Tensor(), tensor_of(db, {OC}, "dbias"), tensor_of(dout, {N, OC}, "dout"),
                  tensor_of(inp, {N, IC}, "inp"), tensor_of(w, {OC, IC}, "weight"));
  DeviceBuffer d_inp(inp), d_w(w), d_dout(dout), d_db(db0);
  linear_backward(Tensor(), Tensor(), d_db.tensor(DType::f32, {OC}, "dbias"),
                  d_dout.tensor(DType::f32, {N, OC}, "dout"), d_inp.tensor(DType::f32, {N, IC}, "inp"),
                  d_w.tensor(DType::f32, {OC, IC}, "weight"));
  std::vector<float> scale(OC);
  for (int64_t c = 0; c < OC; ++c) {
    scale[c] = std::fabs(db0[c]);
    for (int64_t n = 0; n < N; ++n) scale[c] += std::fabs(dout[n * OC + c]);
  }
  EXPECT_TRUE(test::within_scale("dbias only, seed=" + std::to_string(seed), d_db.download<float>(), db, scale, kTol));
}

TEST(CudaLinear, DeviceMismatchIsAnError) {
  LMF_REQUIRE_GPU();
  std::vector<float> inp(4 * 3), w(5 * 3);
  DeviceBuffer out(4 * 5 * 4);
  EXPECT_THROW(linear_forward(out.tensor(DType::f32, {4, 5}, "out"), tensor_of(inp, {4, 3}, "inp"),
                              tensor_of(w, {5, 3}, "weight"), Tensor()),
               Error);
}

}  // namespace
}  // namespace lmf
