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
#include <iostream>
#include <tuple>
#include <string>
#include <vector>

#include "ops/activation.h"
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

// ---- bf16 mixed precision (docs/MIXED_PRECISION.md) ---------------------------------------------
// Inputs are rounded to bf16 once; the CPU fp32 op runs on the rounded values. The GPU accumulates in
// fp32 too, so the differences are the bf16 rounding of bf16 outputs (at most 2^-9 relative per
// element: rel_l2 <= ~2e-3, bound 4e-3) and, for f32 outputs (dweight, dbias), fp32 summation order
// (bound 1e-5). Fused GELU: cuBLASLt's epilogue evaluates GELU (tanh form) in its own fp32 code, and
// its output is rounded to bf16 (bound 8e-3); DGELU multiplies the fp32 product by gelu'(pre) before
// rounding (bound 8e-3).
constexpr double kBf16Out = 4e-3, kF32Out = 1e-5, kGeluOut = 8e-3;

struct Bf16Case {
  std::vector<float> inp, w, b, dout, dinp0, dw0, db0;  // bf16-rounded where the GPU reads bf16
};

Bf16Case bf16_case(int64_t N, int64_t IC, int64_t OC, uint64_t seed) {
  return {test::round_bf16(test::randn(N * IC, seed)),      test::round_bf16(test::randn(OC * IC, seed + 1, 0.5f)),
          test::round_bf16(test::randn(OC, seed + 2)),      test::round_bf16(test::randn(N * OC, seed + 3)),
          test::round_bf16(test::randn(N * IC, seed + 4)),  test::randn(OC * IC, seed + 5),
          test::randn(OC, seed + 6)};
}

void check_linear_bf16(int64_t N, int64_t IC, int64_t OC, bool bias, uint64_t seed) {
  const std::string what = dims(N, IC, OC, bias) + " bf16 seed=" + std::to_string(seed);
  reserve(N, OC);
  const Bf16Case c = bf16_case(N, IC, OC, seed);
  std::vector<float> out(N * OC), dinp = c.dinp0, dw = c.dw0, db = c.db0;
  linear_forward(tensor_of(out, {N, OC}, "out"), tensor_of(const_cast<std::vector<float>&>(c.inp), {N, IC}, "inp"),
                 tensor_of(const_cast<std::vector<float>&>(c.w), {OC, IC}, "weight"),
                 bias ? tensor_of(const_cast<std::vector<float>&>(c.b), {OC}, "bias") : Tensor());
  linear_backward(tensor_of(dinp, {N, IC}, "dinp"), tensor_of(dw, {OC, IC}, "dweight"),
                  bias ? tensor_of(db, {OC}, "dbias") : Tensor(),
                  tensor_of(const_cast<std::vector<float>&>(c.dout), {N, OC}, "dout"),
                  tensor_of(const_cast<std::vector<float>&>(c.inp), {N, IC}, "inp"),
                  tensor_of(const_cast<std::vector<float>&>(c.w), {OC, IC}, "weight"));
  auto run = [&] {
    DeviceBuffer d_inp(test::to_bf16(c.inp)), d_w(test::to_bf16(c.w)), d_b(test::to_bf16(c.b)),
        d_dout(test::to_bf16(c.dout)), d_dinp(test::to_bf16(c.dinp0)), d_dw(c.dw0), d_db(c.db0), d_out(N * OC * 2);
    d_out.poison();
    const Tensor t_inp = d_inp.tensor(DType::bf16, {N, IC}, "inp"), t_w = d_w.tensor(DType::bf16, {OC, IC}, "weight");
    linear_forward(d_out.tensor(DType::bf16, {N, OC}, "out"), t_inp, t_w,
                   bias ? d_b.tensor(DType::bf16, {OC}, "bias") : Tensor());
    linear_backward(d_dinp.tensor(DType::bf16, {N, IC}, "dinp"), d_dw.tensor(DType::f32, {OC, IC}, "dweight"),
                    bias ? d_db.tensor(DType::f32, {OC}, "dbias") : Tensor(),
                    d_dout.tensor(DType::bf16, {N, OC}, "dout"), t_inp, t_w);
    return GpuOut{test::from_bf16(d_out.download<bf16>()), test::from_bf16(d_dinp.download<bf16>()),
                  d_dw.download<float>(), d_db.download<float>()};
  };
  const GpuOut g = run(), g2 = run();
  const double e_out = test::rel_l2_error(g.out, out), e_dinp = test::rel_l2_error(g.dinp, dinp),
               e_dw = test::rel_l2_error(g.dw, dw), e_db = bias ? test::rel_l2_error(g.db, db) : 0.0;
  std::cout << "measured linear bf16 " << what << ": out " << e_out << " dinp " << e_dinp << " dweight " << e_dw
            << " dbias " << e_db << "\n";
  EXPECT_LE(e_out, kBf16Out) << what;
  EXPECT_LE(e_dinp, kBf16Out) << what;
  EXPECT_LE(e_dw, kF32Out) << what;
  EXPECT_LE(e_db, kF32Out) << what;
  if (!bias) EXPECT_TRUE(test::bitwise_equal("dbias untouched " + what, g.db, c.db0));
  EXPECT_TRUE(test::bitwise_equal("out run twice " + what, g.out, g2.out));
  EXPECT_TRUE(test::bitwise_equal("dinp run twice " + what, g.dinp, g2.dinp));
  EXPECT_TRUE(test::bitwise_equal("dweight run twice " + what, g.dw, g2.dw));
  EXPECT_TRUE(test::bitwise_equal("dbias run twice " + what, g.db, g2.db));
}

TEST(CudaLinear, Bf16MatchesCpuOnRoundedInputs) {
  LMF_REQUIRE_GPU();
  uint64_t s = test::fresh_seed();
  // bf16 rows must be 2-byte aligned only; odd sizes take cuBLASLt's unaligned paths.
  for (auto [N, IC, OC] : {std::tuple<int64_t, int64_t, int64_t>{1, 8, 8}, {7, 19, 33}, {111, 64, 50},
                           {333, 768, 2304}, {4096, 768, 3072}, {4096, 3072, 768}})
    for (bool bias : {false, true}) check_linear_bf16(N, IC, OC, bias, s += 11);
}

// Fused GELU forward (GELU_AUX_BIAS) and the fused backward of the next layer (DGELU) against the CPU
// composition linear -> gelu and linear_backward -> gelu_backward, and bitwise repeatable (outputs
// poisoned before the second run). Sizes: odd and tail tiles (rows, F and C off the tile grid), GPT-2's.
TEST(CudaLinear, Bf16FusedGeluEpiloguesMatchCpu) {
  LMF_REQUIRE_GPU();
  for (auto [N, C, F] : {std::tuple<int64_t, int64_t, int64_t>{5, 16, 24}, {333, 64, 256}, {1000, 200, 328},
                         {2048, 768, 3072}}) {
    const uint64_t seed = test::fresh_seed();
    const std::string what = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " F=" + std::to_string(F) +
                             " seed=" + std::to_string(seed);
    reserve(N, std::max(C, F));
    // fc: (F, C) weight; mproj: (C, F) weight
    std::vector<float> x = test::round_bf16(test::randn(N * C, seed)),
                       wfc = test::round_bf16(test::randn(F * C, seed + 1, 0.2f)),
                       bfc = test::round_bf16(test::randn(F, seed + 2)),
                       wm = test::round_bf16(test::randn(C * F, seed + 3, 0.2f)),
                       dy = test::round_bf16(test::randn(N * C, seed + 4)), dwm0 = test::randn(C * F, seed + 5),
                       dbm0 = test::randn(C, seed + 6);
    // CPU: pre = x Wfc^T + b; act = gelu(pre); d_act = dy Wm; d_pre = d_act * gelu'(pre); dWm += dy^T act
    std::vector<float> pre(N * F), act(N * F), dact(N * F, 0.0f), dpre(N * F, 0.0f), dwm = dwm0, dbm = dbm0;
    linear_forward(tensor_of(pre, {N, F}, "pre"), tensor_of(x, {N, C}, "x"), tensor_of(wfc, {F, C}, "wfc"),
                   tensor_of(bfc, {F}, "bfc"));
    gelu_forward(tensor_of(act, {N, F}, "act"), tensor_of(pre, {N, F}, "pre"));
    // backward reads what the GPU stored: bf16 pre and act
    std::vector<float> pre_r = test::round_bf16(pre), act_r = test::round_bf16(act);
    linear_backward(tensor_of(dact, {N, F}, "dact"), tensor_of(dwm, {C, F}, "dwm"), tensor_of(dbm, {C}, "dbm"),
                    tensor_of(dy, {N, C}, "dy"), tensor_of(act_r, {N, F}, "act"), tensor_of(wm, {C, F}, "wm"));
    gelu_backward(tensor_of(dpre, {N, F}, "dpre"), tensor_of(dact, {N, F}, "dact"), tensor_of(pre_r, {N, F}, "pre"));

    DeviceBuffer d_x(test::to_bf16(x)), d_wfc(test::to_bf16(wfc)), d_bfc(test::to_bf16(bfc)), d_wm(test::to_bf16(wm)),
        d_dy(test::to_bf16(dy)), d_dwm(dwm0), d_dbm(dbm0), d_pre(N * F * 2), d_act(N * F * 2), d_dpre(N * F * 2);
    for (DeviceBuffer* b : {&d_pre, &d_act, &d_dpre}) b->poison();
    const Tensor t_pre = d_pre.tensor(DType::bf16, {N, F}, "pre"), t_act = d_act.tensor(DType::bf16, {N, F}, "act");
    linear_gelu_forward(t_act, t_pre, d_x.tensor(DType::bf16, {N, C}, "x"), d_wfc.tensor(DType::bf16, {F, C}, "wfc"),
                        d_bfc.tensor(DType::bf16, {F}, "bfc"));
    const std::vector<float> g_pre = test::from_bf16(d_pre.download<bf16>()), g_act = test::from_bf16(d_act.download<bf16>());
    for (DeviceBuffer* b : {&d_pre, &d_act}) b->poison();
    linear_gelu_forward(t_act, t_pre, d_x.tensor(DType::bf16, {N, C}, "x"), d_wfc.tensor(DType::bf16, {F, C}, "wfc"),
                        d_bfc.tensor(DType::bf16, {F}, "bfc"));
    EXPECT_TRUE(test::bitwise_equal("pre run twice " + what, test::from_bf16(d_pre.download<bf16>()), g_pre));
    EXPECT_TRUE(test::bitwise_equal("act run twice " + what, test::from_bf16(d_act.download<bf16>()), g_act));
    // backward from the CPU's rounded activations, so that it is checked on its own
    d_pre.upload(test::to_bf16(pre_r));
    d_act.upload(test::to_bf16(act_r));
    linear_backward_dgelu(d_dpre.tensor(DType::bf16, {N, F}, "dpre"), d_dwm.tensor(DType::f32, {C, F}, "dwm"),
                          d_dbm.tensor(DType::f32, {C}, "dbm"), d_dy.tensor(DType::bf16, {N, C}, "dy"), t_act,
                          d_wm.tensor(DType::bf16, {C, F}, "wm"), t_pre);
    const double e_pre = test::rel_l2_error(g_pre, pre), e_act = test::rel_l2_error(g_act, act),
                 e_dpre = test::rel_l2_error(test::from_bf16(d_dpre.download<bf16>()), dpre),
                 e_dwm = test::rel_l2_error(d_dwm.download<float>(), dwm),
                 e_dbm = test::rel_l2_error(d_dbm.download<float>(), dbm);
    std::cout << "measured fused gelu bf16 " << what << ": pre " << e_pre << " act " << e_act << " dpre " << e_dpre
              << " dW " << e_dwm << " db " << e_dbm << "\n";
    EXPECT_LE(e_pre, kBf16Out) << what;
    EXPECT_LE(e_act, kGeluOut) << what;
    EXPECT_LE(e_dpre, kGeluOut) << what;
    EXPECT_LE(e_dwm, kF32Out) << what;
    EXPECT_LE(e_dbm, kF32Out) << what;
    const std::vector<float> g_dpre = test::from_bf16(d_dpre.download<bf16>());
    d_dpre.poison();
    linear_backward_dgelu(d_dpre.tensor(DType::bf16, {N, F}, "dpre"), Tensor(), Tensor(),
                          d_dy.tensor(DType::bf16, {N, C}, "dy"), t_act, d_wm.tensor(DType::bf16, {C, F}, "wm"), t_pre);
    EXPECT_TRUE(test::bitwise_equal("dpre run twice " + what, test::from_bf16(d_dpre.download<bf16>()), g_dpre));
  }
}

TEST(CudaLinear, Bf16OnTheCpuAndMixedDtypesAreErrors) {
  LMF_REQUIRE_GPU();
  std::vector<bf16> hb(4 * 3);
  Tensor cpu_bf16(hb.data(), DType::bf16, {4, 3}, "inp");
  DeviceBuffer out(4 * 5 * 2), w(5 * 3 * 2), wf(5 * 3 * 4);
  EXPECT_THROW(linear_forward(out.tensor(DType::bf16, {4, 5}, "out"), cpu_bf16, w.tensor(DType::bf16, {5, 3}, "w"),
                              Tensor()),
               Error);
  DeviceBuffer inp(4 * 3 * 2);
  EXPECT_THROW(linear_forward(out.tensor(DType::bf16, {4, 5}, "out"), inp.tensor(DType::bf16, {4, 3}, "inp"),
                              wf.tensor(DType::f32, {5, 3}, "w"), Tensor()),
               Error);
}

}  // namespace
}  // namespace lmf
