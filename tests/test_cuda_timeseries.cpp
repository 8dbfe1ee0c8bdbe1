// The time-series ends on the GPU (ops/timeseries.h, ops/mse.h huber_horizons_loss,
// model/timeseries_ends.h) against the CPU reference: the point embedding and the forecast heads' loss
// op by op (f32 and bf16), training tiny-ts (fp32 follows the CPU's loss curve; bf16 trains; graph
// mode is bitwise eager), and forecasts. SKIPPED without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/arena.h"
#include "core/device.h"
#include "model/config.h"
#include "model/forecast.h"
#include "model/gpt.h"
#include "model/params.h"
#include "ops/gemm_cuda.h"
#include "ops/timeseries.h"
#include "support/gpu_util.h"
#include "support/test_util.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;

// max |a - b| / (|b| + floor) over the elements
double worst_rel(const std::vector<float>& a, const std::vector<float>& b, double floor) {
  EXPECT_EQ(a.size(), b.size());
  double w = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    w = std::max(w, std::fabs(static_cast<double>(a[i]) - b[i]) / (std::fabs(static_cast<double>(b[i])) + floor));
  return w;
}

TEST(CudaTimeSeries, PointEmbeddingMatchesCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(point_embedding_backward_cuda_workspace(3000, 96));
  for (const bool bf : {false, true}) {
    const int64_t N = 3000, C = 96;  // N spans several 512-row chunks of the backward, C a partial block
    const uint64_t seed = test::fresh_seed();
    std::vector<float> v = test::randn(N, seed), w = test::randn(2 * C, seed + 1), dx = test::randn(N * C, seed + 2);
    if (bf) dx = test::round_bf16(dx);
    std::vector<float> x(N * C), dw(2 * C, 0.5f);
    point_embedding_forward(test::tensor_of(x, {N, C}, "x"), test::tensor_of(v, {N}, "values"),
                            test::tensor_of(w, {2 * C, 1}, "w"));
    point_embedding_backward(test::tensor_of(dw, {2 * C, 1}, "dw"), test::tensor_of(dx, {N, C}, "dx"),
                             test::tensor_of(v, {N}, "values"), test::tensor_of(w, {2 * C, 1}, "w"));
    const DType adt = bf ? DType::bf16 : DType::f32;
    test::DeviceBuffer dv(v), dW(w), dX(N * C * (bf ? 2 : 4)), dDX = bf ? test::DeviceBuffer(test::to_bf16(dx))
                                                                        : test::DeviceBuffer(dx);
    dX.poison();
    point_embedding_forward(dX.tensor(adt, {N, C}, "x"), dv.tensor(DType::f32, {N}, "values"),
                            dW.tensor(DType::f32, {2 * C, 1}, "w"));
    const std::vector<float> gx = bf ? test::from_bf16(dX.download<bf16>()) : dX.download<float>();
    // f32: precise expf against the CPU's exp_f32 (a few ulps); bf16: one rounding of the result
    EXPECT_LT(worst_rel(gx, bf ? test::round_bf16(x) : x, 1e-3), bf ? 8e-3 : 1e-5) << "forward, bf16=" << bf;
    std::vector<float> gdw_runs[2];
    for (auto& out : gdw_runs) {
      test::DeviceBuffer dDW(std::vector<float>(2 * C, 0.5f));
      point_embedding_backward(dDW.tensor(DType::f32, {2 * C, 1}, "dw"), dDX.tensor(adt, {N, C}, "dx"),
                               dv.tensor(DType::f32, {N}, "values"), dW.tensor(DType::f32, {2 * C, 1}, "w"));
      out = dDW.download<float>();
    }
    EXPECT_EQ(gdw_runs[0], gdw_runs[1]) << "the backward is not deterministic";
    // column sums over 3000 rows in another order
    EXPECT_LT(worst_rel(gdw_runs[0], dw, 1.0), 1e-4) << "backward, bf16=" << bf << " seed=" << seed;
  }
}

TEST(CudaTimeSeries, ForecastHeadsLossMatchesCpu) {
  LMF_REQUIRE_GPU();
  cuda_reserve_workspace(kGemmWorkspaceBytes);  // the heads' GEMMs (cuBLASLt)
  const std::vector<int64_t> horizons{1, 8, 32, 64};
  const int64_t N = 1000, C = 64, D = 105, Dp = forecast_heads_padded(D), H = 64;
  ASSERT_EQ(Dp, 112);
  for (const bool bf : {false, true}) {
    const uint64_t seed = test::fresh_seed();
    std::vector<float> x = test::randn(N * C, seed), w = test::randn(D * C, seed + 1), t = test::randn(N * H, seed + 2);
    for (float& e : w) e *= 0.2f;
    for (size_t i = 0; i < t.size(); i += 7) t[i] = NAN;                // scattered missing targets
    for (int64_t h = 0; h < H; ++h) t[5 * H + h] = NAN;                 // a row with none
    for (int64_t h = 0; h < 10; ++h) t[6 * H + h] = 3.0f * (h % 2 ? 1 : -1) + 40;  // the linear part of huber
    if (bf) {
      x = test::round_bf16(x);
      w = test::round_bf16(w);
    }
    const float scale = 1.0f / static_cast<float>(N);
    std::vector<float> losses(N), dx(N * C, 0.25f), dw(D * C, 0.5f), pred(N * Dp), dpred(N * Dp);
    forecast_heads_loss(test::tensor_of(losses, {N}, "losses"), test::tensor_of(dx, {N, C}, "dx"),
                        test::tensor_of(dw, {D, C}, "dw"), test::tensor_of(x, {N, C}, "x"), test::tensor_of(w, {D, C}, "w"),
                        test::tensor_of(t, {N, H}, "targets"), test::tensor_of(pred, {N, Dp}, "pred"),
                        test::tensor_of(dpred, {N, Dp}, "dpred"), horizons, 2.0f, scale);
    const DType adt = bf ? DType::bf16 : DType::f32;
    auto up = [&](const std::vector<float>& h) { return bf ? test::DeviceBuffer(test::to_bf16(h)) : test::DeviceBuffer(h); };
    test::DeviceBuffer gx = up(x), gw = up(w), gt(t), gl(N * 4), gdx = up(std::vector<float>(N * C, 0.25f)),
                       gdw(std::vector<float>(D * C, 0.5f)), gp(N * Dp * 4), gdp(N * Dp * (bf ? 2 : 4));
    gl.poison();
    gp.poison();
    gdp.poison();
    forecast_heads_loss(gl.tensor(DType::f32, {N}, "losses"), gdx.tensor(adt, {N, C}, "dx"),
                        gdw.tensor(DType::f32, {D, C}, "dw"), gx.tensor(adt, {N, C}, "x"), gw.tensor(adt, {D, C}, "w"),
                        gt.tensor(DType::f32, {N, H}, "targets"), gp.tensor(DType::f32, {N, Dp}, "pred"),
                        gdp.tensor(adt, {N, Dp}, "dpred"), horizons, 2.0f, scale);
    const std::vector<float> g_loss = gl.download<float>(), g_dw = gdw.download<float>();
    const std::vector<float> g_dx = bf ? test::from_bf16(gdx.download<bf16>()) : gdx.download<float>();
    const std::vector<float> g_dp = bf ? test::from_bf16(gdp.download<bf16>()) : gdp.download<float>();
    EXPECT_EQ(g_loss[5], 0.0f) << "a row without targets";
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = D; d < Dp; ++d) ASSERT_EQ(g_dp[n * Dp + d], 0.0f) << "padding column " << d << " of row " << n;
    // the GEMM sums over C = 64 in another order (bf16: the same rounded inputs, fp32 accumulation)
    EXPECT_LT(worst_rel(g_loss, losses, 1e-2), 1e-4) << "losses, bf16=" << bf << " seed=" << seed;
    EXPECT_LT(worst_rel(g_dx, dx, 1e-2), bf ? 1e-2 : 1e-4) << "dx, bf16=" << bf;
    EXPECT_LT(worst_rel(g_dw, dw, 1e-2), bf ? 1e-2 : 1e-4) << "dw, bf16=" << bf;
    // forward only, and the predictions
    std::vector<float> fwd(N * D);
    forecast_heads_forward(test::tensor_of(fwd, {N, D}, "out"), test::tensor_of(x, {N, C}, "x"),
                           test::tensor_of(w, {D, C}, "w"));
    test::DeviceBuffer gout(N * D * 4);
    gout.poison();
    forecast_heads_forward(gout.tensor(DType::f32, {N, D}, "out"), gx.tensor(adt, {N, C}, "x"),
                           gw.tensor(adt, {D, C}, "w"));
    EXPECT_LT(worst_rel(gout.download<float>(), fwd, 1e-2), 1e-4) << "forward values, bf16=" << bf;
  }
}

// tiny-ts with a head size flash attention takes (32: 2 heads of d_model 64), so the GPU's bf16 plans run
// it; on the GPU the MoE layers run in bf16 only (model/plan.cpp)
ModelConfig gpu_ts_config() {
  ModelConfig c = config_preset("tiny-ts");
  c.n_head = c.n_kv_head = 2;
  return c;
}

TrainOptions ts_opts(const std::string& dir, const char* device, const char* precision, int64_t steps) {
  TrainOptions o;
  fs::create_directories(dir + "_cfg");
  o.config_path = dir + "_cfg/config.json";
  {
    std::ofstream f(o.config_path);
    f << config_to_json(gpu_ts_config());
  }
  o.precision = precision;
  o.batch_size = 8;
  o.seq_len = 128;
  o.steps = steps;
  o.lr = 1e-3f;
  o.warmup = 5;
  o.log_every = 1000;
  o.eval_batches = 2;
  o.out_dir = dir;
  o.device = device;
  o.progress = false;
  o.save_final_checkpoint = false;
  return o;
}

// bf16 on the GPU (the only precision MoE layers run in there) against fp32 on the CPU: step 1 within
// 2e-2, the mean of the last 10 of 30 steps within 5%, and the loss falls.
TEST(CudaTimeSeries, TinyTsTrainsOnTheGpuLikeTheCpu) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_ts");
  std::ostringstream log;
  Trainer cpu(ts_opts(d + "/cpu", "cpu", "fp32", 30), log), g16(ts_opts(d + "/g16", "cuda", "bf16", 30), log);
  cpu.run();
  g16.run();
  const auto &c = cpu.losses(), &b = g16.losses();
  ASSERT_EQ(b.size(), 30u);
  double tc = 0, tb = 0;
  for (size_t i = 20; i < 30; ++i) tc += c[i] / 10, tb += b[i] / 10;
  std::printf("[ measured ] tiny-ts (2 heads) 30 steps: step 1 cpu %.5f gpu bf16 %.5f; last-10 %.5f %.5f\n", c[0],
              b[0], tc, tb);
  EXPECT_NEAR(b[0], c[0], 2e-2 * c[0]);
  EXPECT_NEAR(tb, tc, 0.05 * tc);
  EXPECT_LT(tb, b[0]);
  fs::remove_all(d);
}

TEST(CudaTimeSeries, GraphModeMatchesEagerBitwise) {
  LMF_REQUIRE_GPU();
  std::string d = test::make_temp_dir("gpu_ts_graph");
  std::ostringstream log;
  for (const char* prec : {"bf16"}) {
    TrainOptions oe = ts_opts(d + "/e" + prec, "cuda", prec, 8), og = ts_opts(d + "/g" + prec, "cuda", prec, 8);
    oe.cuda_graph = "off";
    og.cuda_graph = "on";
    Trainer eager(oe, log), graphed(og, log);
    ASSERT_TRUE(graphed.uses_cuda_graph());
    for (int s = 0; s < 8; ++s) eager.step(), graphed.step();
    EXPECT_EQ(0, std::memcmp(eager.losses().data(), graphed.losses().data(), 8 * sizeof(double))) << prec;
    Tensor a = eager.params().master().flat_f32(), bt = graphed.params().master().flat_f32();
    std::vector<float> ha(a.numel()), hb(bt.numel());
    tensor_to_host(ha.data(), a);
    tensor_to_host(hb.data(), bt);
    EXPECT_EQ(0, std::memcmp(ha.data(), hb.data(), ha.size() * 4)) << prec << ": weights after 8 steps differ";
  }
  fs::remove_all(d);
}

// The GPU forecasts in bf16 (MoE layers), the CPU in fp32: 100 values (one 64-step head, then
// autoregressive steps) within 5% of the series' scale.
TEST(CudaTimeSeries, ForecastsMatchTheCpu) {
  LMF_REQUIRE_GPU();
  const ModelConfig c = gpu_ts_config();
  ASSERT_TRUE(forecast_params_bf16(c, Device::cuda));
  Parameters pc(gpt_param_specs(c), Device::cpu, false), pg(gpt_param_specs(c), Device::cuda, true);
  const Tensor hc = pc.master().flat_f32();
  std::vector<float> w = test::randn(hc.numel(), 7);
  for (float& e : w) e *= 0.05f;
  std::memcpy(hc.f32(), w.data(), w.size() * 4);
  tensor_from_host(pg.master().flat_f32(), w.data());
  pg.sync_copy();
  std::vector<std::vector<float>> ctx(3);
  for (size_t b = 0; b < ctx.size(); ++b)
    for (int i = 0; i < 200 + 50 * static_cast<int>(b); ++i) ctx[b].push_back(std::sin(0.1f * i + b) + 0.01f * i);
  Forecaster fc(c, pc, 256), fg(c, pg, 256);
  const auto a = fc.forecast(ctx, 100), g = fg.forecast(ctx, 100);
  ASSERT_EQ(g.size(), 3u);
  for (size_t b = 0; b < 3; ++b) {
    double scale = 0, worst = 0;
    for (size_t i = 0; i < a[b].size(); ++i) scale = std::max(scale, std::fabs(static_cast<double>(a[b][i])));
    for (size_t i = 0; i < a[b].size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(g[b][i]) - a[b][i]));
    std::printf("[ measured ] forecast series %zu: worst |gpu bf16 - cpu fp32| %.3g of scale %.3g\n", b, worst, scale);
    EXPECT_LT(worst, 0.05 * scale + 1e-3) << "series " << b;
  }
}

}  // namespace
}  // namespace lmf
