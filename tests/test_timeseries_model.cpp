// The time-series family (docs/TIMESERIES.md): the multi-horizon Huber loss against a float64
// reference and finite differences, the family's ends through the trunk against finite differences,
// the config's rules, the series loader's windows, and `lmforge train` on a time-series config
// (the loss falls, two runs give the same bits, resume continues bitwise).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "core/rng.h"
#include "data/series_loader.h"
#include "model/gpt.h"
#include "model/score.h"
#include "model/timeseries_ends.h"
#include "ops/activation.h"
#include "ops/linear.h"
#include "ops/mse.h"
#include "ops/timeseries.h"
#include "serve/engine.h"
#include "support/cli_util.h"
#include "support/fixture_tensor.h"
#include "train/safetensors.h"
#include "support/test_util.h"

namespace fs = std::filesystem;

namespace lmf {
namespace {

double huber(double r, double d) { return std::fabs(r) <= d ? 0.5 * r * r : d * (std::fabs(r) - 0.5 * d); }

// losses[n] in float64, the rule of ops/mse.h huber_horizons_loss.
std::vector<double> huber_ref(const std::vector<double>& y, const std::vector<float>& t, int64_t N,
                              const std::vector<int64_t>& hs, double delta) {
  const int64_t H = hs.back();
  int64_t D = 0;
  for (int64_t h : hs) D += h;
  std::vector<double> out(static_cast<size_t>(N), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t col = 0;
    for (int64_t hj : hs) {
      double s = 0;
      int64_t valid = 0;
      for (int64_t h = 0; h < hj; ++h) {
        const float tv = t[static_cast<size_t>(n * H + h)];
        if (std::isnan(tv)) continue;
        ++valid;
        s += huber(y[static_cast<size_t>(n * D + col + h)] - tv, delta);
      }
      if (valid > 0) out[static_cast<size_t>(n)] += s / valid / static_cast<double>(hs.size());
      col += hj;
    }
  }
  return out;
}

TEST(HuberHorizonsLoss, MatchesFloat64AndFiniteDifferencesWithMaskedTargets) {
  const std::vector<int64_t> hs = {1, 3, 4};
  const int64_t N = 5, H = 4, D = 8;
  std::vector<float> y = test::randn(static_cast<size_t>(N * D), 1, 2.0f);  // some |r| beyond delta
  std::vector<float> t = test::randn(static_cast<size_t>(N * H), 2);
  t[1] = NAN;                                  // row 0, h 1: heads 3 and 4 lose one target
  for (int64_t h = 0; h < H; ++h) t[static_cast<size_t>(2 * H + h)] = NAN;  // row 2: nothing to learn
  std::vector<float> losses(static_cast<size_t>(N)), dy(static_cast<size_t>(N * D), 9.0f);
  const float delta = 1.5f, scale = 0.7f;
  huber_horizons_loss(test::tensor_of(losses, {N}, "losses"), test::tensor_of(dy, {N, D}, "dy"),
                      test::tensor_of(y, {N, D}, "y"), test::tensor_of(t, {N, H}, "t"), hs, delta, scale);
  const std::vector<double> ref = huber_ref(test::to_double(y), t, N, hs, delta);
  EXPECT_TRUE(test::all_close("losses", losses, ref, 1e-6, 1e-6));
  EXPECT_EQ(losses[2], 0.0f);
  for (int64_t d = 0; d < D; ++d) EXPECT_EQ(dy[static_cast<size_t>(2 * D + d)], 0.0f) << "masked row's gradient";
  // d(scale * sum_n losses)/dy by finite differences of the float64 reference
  const std::vector<double> fd = test::finite_diff(
      [&](const std::vector<double>& yy) {
        double s = 0;
        for (double v : huber_ref(yy, t, N, hs, delta)) s += v;
        return scale * s;
      },
      test::to_double(y), 1e-5);
  EXPECT_TRUE(test::all_close("dy", dy, fd, 2e-5, 1e-4));
  // forward only leaves no gradient; bad shapes are errors
  std::vector<float> l2(static_cast<size_t>(N));
  huber_horizons_loss(test::tensor_of(l2, {N}, "l2"), Tensor(), test::tensor_of(y, {N, D}, "y"),
                      test::tensor_of(t, {N, H}, "t"), hs, delta, 0.0f);
  EXPECT_EQ(l2, losses);
  std::vector<float> tw(static_cast<size_t>(N * 3));
  EXPECT_THROW(huber_horizons_loss(test::tensor_of(l2, {N}, "l2"), Tensor(), test::tensor_of(y, {N, D}, "y"),
                                   test::tensor_of(tw, {N, 3}, "t"), hs, delta, 0.0f),
               Error);
}

// The fused ops of the ends (ops/timeseries.h) against the compositions they replace: the point
// embedding is linear (K = 1) + SwiGLU, the heads' loss is a GEMM into a padded scratch + the Huber
// loss + two GEMMs; padding columns of dpred are 0 and never read.
TEST(TimeSeriesOps, FusedOpsEqualTheirCompositions) {
  const int64_t N = 37, C = 12, D = 8, Dp = forecast_heads_padded(D), H = 4;
  const std::vector<int64_t> hs = {1, 3, 4};
  ASSERT_EQ(Dp, 8);
  ASSERT_EQ(forecast_heads_padded(105), 112);
  std::vector<float> v = test::randn(N, 11), w = test::randn(2 * C, 12), x(N * C), pre(N * 2 * C), ref(N * C);
  point_embedding_forward(test::tensor_of(x, {N, C}, "x"), test::tensor_of(v, {N}, "v"), test::tensor_of(w, {2 * C, 1}, "w"));
  linear_forward(test::tensor_of(pre, {N, 2 * C}, "pre"), test::tensor_of(v, {N, 1}, "v"), test::tensor_of(w, {2 * C, 1}, "w"),
                 Tensor());
  swiglu_forward(test::tensor_of(ref, {N, C}, "ref"), test::tensor_of(pre, {N, 2 * C}, "pre"));
  EXPECT_EQ(x, ref);
  // backward: dw += sum over rows, against dpre = swiglu_backward then dW = dpre^T v in float64
  std::vector<float> dx = test::randn(N * C, 13), dw(2 * C, 1.0f), dpre(N * 2 * C, 0.0f);
  point_embedding_backward(test::tensor_of(dw, {2 * C, 1}, "dw"), test::tensor_of(dx, {N, C}, "dx"),
                           test::tensor_of(v, {N}, "v"), test::tensor_of(w, {2 * C, 1}, "w"));
  swiglu_backward(test::tensor_of(dpre, {N, 2 * C}, "dpre"), test::tensor_of(dx, {N, C}, "dx"),
                  test::tensor_of(pre, {N, 2 * C}, "pre"));
  std::vector<double> dw_ref(2 * C, 1.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < 2 * C; ++j) dw_ref[j] += static_cast<double>(dpre[n * 2 * C + j]) * v[n];
  EXPECT_TRUE(test::all_close("dw", dw, dw_ref, 1e-5, 1e-5));
  // heads: padded scratch (Dp = 8 here, so use a 12-wide one by hand through huber_horizons_loss)
  std::vector<float> hx = test::randn(N * C, 14), hw = test::randn(D * C, 15, 0.3f), t = test::randn(N * H, 16);
  t[5] = NAN;
  std::vector<float> losses(N), hdx(N * C, 0.5f), hdw(D * C, 0.25f), pred(N * Dp, 7.0f), dpred(N * Dp, 7.0f);
  forecast_heads_loss(test::tensor_of(losses, {N}, "losses"), test::tensor_of(hdx, {N, C}, "dx"),
                      test::tensor_of(hdw, {D, C}, "dw"), test::tensor_of(hx, {N, C}, "x"), test::tensor_of(hw, {D, C}, "w"),
                      test::tensor_of(t, {N, H}, "t"), test::tensor_of(pred, {N, Dp}, "pred"),
                      test::tensor_of(dpred, {N, Dp}, "dpred"), hs, 2.0f, 0.5f);
  std::vector<float> y(N * D), l2(N), dy(N * D), dx2(N * C, 0.5f), dw2(D * C, 0.25f);
  linear_forward(test::tensor_of(y, {N, D}, "y"), test::tensor_of(hx, {N, C}, "x"), test::tensor_of(hw, {D, C}, "w"), Tensor());
  huber_horizons_loss(test::tensor_of(l2, {N}, "l2"), test::tensor_of(dy, {N, D}, "dy"), test::tensor_of(y, {N, D}, "y"),
                      test::tensor_of(t, {N, H}, "t"), hs, 2.0f, 0.5f);
  linear_backward(test::tensor_of(dx2, {N, C}, "dx"), test::tensor_of(dw2, {D, C}, "dw"), Tensor(),
                  test::tensor_of(dy, {N, D}, "dy"), test::tensor_of(hx, {N, C}, "x"), test::tensor_of(hw, {D, C}, "w"));
  EXPECT_EQ(losses, l2);
  EXPECT_EQ(hdx, dx2);
  EXPECT_EQ(hdw, dw2);
  // a wider prediction row (padding past D) leaves the loss unchanged and its gradient 0
  std::vector<float> yp(N * 12, 5.0f), dyp(N * 12, 5.0f), l3(N);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) yp[n * 12 + d] = y[n * D + d];
  huber_horizons_loss(test::tensor_of(l3, {N}, "l3"), test::tensor_of(dyp, {N, 12}, "dy"), test::tensor_of(yp, {N, 12}, "y"),
                      test::tensor_of(t, {N, H}, "t"), hs, 2.0f, 0.5f);
  EXPECT_EQ(l3, l2);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < 12; ++d) EXPECT_EQ(dyp[n * 12 + d], d < D ? dy[n * D + d] : 0.0f) << n << "," << d;
  // and the forward-only heads give the predictions
  std::vector<float> out(N * D);
  forecast_heads_forward(test::tensor_of(out, {N, D}, "out"), test::tensor_of(hx, {N, C}, "x"), test::tensor_of(hw, {D, C}, "w"));
  EXPECT_EQ(out, y);
  // errors name the tensors
  std::vector<float> narrow(N * 4);
  EXPECT_TRUE(test::one_line_error(
      [&] {
        forecast_heads_loss(test::tensor_of(losses, {N}, "losses"), Tensor(), Tensor(), test::tensor_of(hx, {N, C}, "x"),
                            test::tensor_of(hw, {D, C}, "w"), test::tensor_of(t, {N, H}, "t"),
                            test::tensor_of(narrow, {N, 4}, "pred"), Tensor(), hs, 2.0f, 0.0f);
      },
      {"forecast_heads_loss", "pred"}));
  EXPECT_TRUE(test::one_line_error(
      [&] {
        point_embedding_forward(test::tensor_of(x, {N, C}, "x"), test::tensor_of(v, {N}, "v"),
                                test::tensor_of(hw, {D, C}, "w"));
      },
      {"point_embedding_forward", "'w'"}));
}

ModelConfig small_ts(bool moe) {
  ModelConfig c = config_preset("tiny-ts");
  c.context_length = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_kv_head = 2;
  c.d_model = 16;
  c.d_ff = 32;
  c.ts.horizons = {1, 2, 4};
  if (!moe) c.moe = MoeModelConfig{};
  else c.moe.d_expert = 16;
  c.validate("small_ts");
  return c;
}

// Loss of one forward (float64 mean of the rows) of the model at its current weights.
double model_loss(Model& m, Tensor in, Tensor tg) { return m.forward_loss(in, tg); }

TEST(TimeSeriesEnds, GradientsMatchFiniteDifferencesThroughTheTrunk) {
  for (const bool moe : {false, true}) {
    const ModelConfig c = small_ts(moe);
    const int64_t B = 2, T = 8, H = c.ts.max_horizon();
    const ModelPlan plan{B, T, true};
    TimeSeriesEnds spec(c);
    Parameters params(model_param_specs(c, spec), Device::cpu, false);
    TrainingState state(params, Model::lazy_grads(c, plan, spec));
    Model model(c, plan, params, &state, std::make_unique<TimeSeriesEnds>(c));
    params.init_gpt2(11, c.n_layer, 0);
    std::vector<float> in = test::randn(static_cast<size_t>(B * T), 3), tg = test::randn(static_cast<size_t>(B * T * H), 4);
    tg[5] = NAN;  // a masked target
    const Tensor tin = test::tensor_of(in, {B, T, 1}, "inputs"), ttg = test::tensor_of(tg, {B, T, H}, "targets");
    state.zero_grad();
    model.forward_backward(tin, ttg);
    for (const char* name : {"ts_embed.weight", "ts_heads.weight"}) {
      Tensor w = params.master().get(name), g = state.grads().get(name);
      for (int64_t i : {int64_t{0}, w.numel() / 2, w.numel() - 1}) {
        float& x = w.f32()[i];
        const float x0 = x, h = 1e-2f * std::max(1.0f, std::fabs(x0));
        x = x0 + h;
        const double lp = model_loss(model, tin, ttg);
        x = x0 - h;
        const double lm = model_loss(model, tin, ttg);
        x = x0;
        const double fd = (lp - lm) / (2.0 * h), got = g.f32()[i];
        EXPECT_NEAR(got, fd, 2e-3 + 2e-2 * std::fabs(fd)) << name << "[" << i << "] moe=" << moe;
      }
    }
  }
}

// The whole model against PyTorch in float64 (tools/make_timeseries_fixture.py): the head outputs, the
// loss with masked targets and every parameter's gradient. The loss is lmforge's training objective:
// the Huber term forward_backward returns plus, with an MoE trunk, the layers' aux terms (moe_summary;
// the trainer's `loss = pred + aux`), whose gradients the backward includes.
void expect_matches_fixture(const char* fixture, const char* what) {
  SafetensorsFile f(test::fixture_path(fixture));
  const ModelConfig c = config_from_json(f.metadata().at("config"), "fixture config");
  const int64_t B = f.find("inputs")->shape[0], T = f.find("inputs")->shape[1], H = c.ts.max_horizon(),
                D = c.ts.head_outputs();
  const ModelPlan plan{B, T, true};
  TimeSeriesEnds spec(c);
  Parameters params(model_param_specs(c, spec), Device::cpu, false);
  TrainingState state(params, Model::lazy_grads(c, plan, spec));
  Model model(c, plan, params, &state, std::make_unique<TimeSeriesEnds>(c));
  for (size_t i = 0; i < params.master().size(); ++i) {
    const std::string name = params.master().spec(i).name;
    std::vector<float> w = test::fixture_tensor<float>(f, "param." + name, "F32");
    ASSERT_EQ(static_cast<int64_t>(w.size()), params.master()[i].numel()) << name;
    tensor_from_host(params.master()[i], w.data());
  }
  std::vector<float> in = test::fixture_tensor<float>(f, "inputs", "F32"), tg = test::fixture_tensor<float>(f, "targets", "F32");
  const Tensor tin = test::tensor_of(in, {B, T, 1}, "inputs"), ttg = test::tensor_of(tg, {B, T, H}, "targets");
  // head outputs: a forward-only plan over the same weights
  {
    Model fwd(c, ModelPlan{B, T, false}, params, nullptr, std::make_unique<TimeSeriesEnds>(c));
    std::vector<float> values(static_cast<size_t>(B * T * D));
    fwd.forward_values(test::tensor_of(values, {B, T, D}, "values"), tin);
    const std::vector<double> want = test::fixture_tensor<double>(f, "ref.values", "F64");
    EXPECT_TRUE(test::all_close("head outputs", values, want, 1e-5, 1e-4));
  }
  state.zero_grad();
  const double pred = model.forward_backward(tin, ttg);
  const double aux = c.moe.experts > 0 ? model.moe_summary().aux : 0.0, loss = pred + aux;
  const double want_loss = test::fixture_tensor<double>(f, "ref.loss", "F64")[0];
  EXPECT_NEAR(loss, want_loss, 1e-5 * std::fabs(want_loss));
  if (c.moe.experts > 0) {
    const double want_aux = test::fixture_tensor<double>(f, "ref.aux", "F64")[0];
    EXPECT_GT(want_aux, 0.0);
    EXPECT_NEAR(aux, want_aux, 1e-5 * std::fabs(want_aux));
  }
  double worst = 0;
  for (size_t i = 0; i < state.grads().size(); ++i) {
    const std::string name = state.grads().spec(i).name;
    const std::vector<double> want = test::fixture_tensor<double>(f, "grad." + name, "F64");
    double w = 0;
    EXPECT_TRUE(test::close_to_tensor_scale("grad " + name, state.grads()[i].f32(), want.data(), want.size(), 1e-4,
                                            1e-9, &w));
    worst = std::max(worst, w);
  }
  std::printf("[ measured ] %s vs PyTorch (float64): loss %.9f vs %.9f (aux %.9f), worst gradient error %.2e of "
              "its tensor's scale\n", what, loss, want_loss, aux, worst);
}

TEST(TimeSeriesModel, MatchesThePyTorchReference) {
  expect_matches_fixture("timeseries_tiny.safetensors", "time-series model");
}

// The MoE trunk in tiny-ts's shape (4 experts, top-2, a shared expert with its sigmoid gate, aux loss):
// routing, combine weights, the shared gate and the aux term's gradient through the router.
TEST(TimeSeriesModel, MoeTrunkMatchesThePyTorchReference) {
  SafetensorsFile f(test::fixture_path("timeseries_moe.safetensors"));
  const ModelConfig c = config_from_json(f.metadata().at("config"), "fixture config");
  ASSERT_EQ(c.moe.experts, 4);
  ASSERT_TRUE(c.moe.shared == 1 && c.moe.shared_gate && c.moe.aux_coef > 0);
  ASSERT_NE(f.find("grad.layers.1.moe.shared.gate"), nullptr);
  expect_matches_fixture("timeseries_moe.safetensors", "time-series MoE model");
}

TEST(TimeSeriesConfig, JsonRoundTripAndRules) {
  const ModelConfig c = config_preset("tiny-ts");
  EXPECT_EQ(c.family, ModelFamily::timeseries);
  const ModelConfig back = config_from_json(config_to_json(c), "round trip");
  EXPECT_EQ(config_to_json(back), config_to_json(c));
  EXPECT_EQ(back.ts.horizons, (std::vector<int64_t>{1, 8, 32, 64}));
  // a text config's JSON has no family field: configs written before it read as before
  EXPECT_EQ(config_to_json(config_preset("tiny")).find("family"), std::string::npos);
  auto bad = [&](const char* key, const nlohmann::json& v, const char* says) {
    nlohmann::json j = nlohmann::json::parse(config_to_json(c));
    j[key] = v;
    EXPECT_TRUE(test::one_line_error([&] { config_from_json(j.dump(), "cfg.json"); }, {"cfg.json", says})) << key;
  };
  bad("horizons", {8, 4}, "increase strictly");
  bad("horizons", nlohmann::json::array(), "1 to 16");
  bad("horizons", {0}, "horizons");
  bad("horizons", {1.5}, "integers");
  bad("huber_delta", -1, "huber_delta");
  bad("positions", "learned", "rope");
  std::string text = config_to_json(config_preset("tiny"));
  text.insert(1, "\"horizons\": [1],");
  EXPECT_TRUE(test::one_line_error([&] { config_from_json(text, "t.json"); }, {"belong to family=timeseries"}));
}

TEST(TimeSeriesConfig, ServingAndScoringRefuseAForecaster) {
  const ModelConfig c = small_ts(false);
  Parameters params(gpt_param_specs(c), Device::cpu, false);
  EXPECT_TRUE(test::one_line_error([&] { Engine(c, params, EngineOptions{}); }, {"timeseries", "forecast"}));
  EXPECT_TRUE(test::one_line_error([&] { SequenceScorer(c, params); }, {"timeseries"}));
}

TEST(SeriesLoader, WindowsHoldTheSeriesAndTheirFutures) {
  SeriesSet set;
  std::vector<float> a(40), b(30);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = 1000.0f + static_cast<float>(i);
  b[12] = NAN;
  set.series = {a, b};
  set.ranges = {{5, 40}, {0, 30}};
  set.description = "test series";
  const int64_t B = 3, T = 6, H = 4;
  SeriesLoader l(set, B, T, H, 7);
  EXPECT_EQ(l.windows(), (35 - 10 + 1) + (30 - 10 + 1));
  std::vector<float> in(static_cast<size_t>(B * T)), tg(static_cast<size_t>(B * T * H));
  // both series rise by 1 a step: in a window's units (window_stats of its inputs) every input is the
  // one before plus 1/scale, and target h of input t is input t + (h + 1)/scale
  bool saw_masked_input = false;
  int64_t rows_checked = 0;
  for (int rep = 0; rep < 40; ++rep) {
    l.next(in.data(), tg.data());
    for (int64_t r = 0; r < B; ++r) {
      const float* x = in.data() + r * T;
      bool masked = false;
      double mean = 0;
      for (int64_t t = 0; t < T; ++t) {
        masked = masked || x[t] == 0.0f;  // b's missing value reads 0 (no regular input is 0: T is even)
        mean += x[t] / static_cast<double>(T);
      }
      saw_masked_input = saw_masked_input || masked;
      if (masked) continue;
      ++rows_checked;
      EXPECT_NEAR(mean, 0.0, 1e-5) << "inputs in the window's units";
      const double step = x[1] - x[0];
      EXPECT_NEAR(step, 1.0 / std::sqrt((T * T - 1) / 12.0), 1e-5);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const float next = tg[static_cast<size_t>((r * T + t) * H + h)];
          if (std::isnan(next)) continue;  // b's missing value as a target: masked
          EXPECT_NEAR(next, x[t] + (h + 1) * step, 1e-4) << "row " << r << " t " << t << " h " << h;
        }
    }
  }
  EXPECT_TRUE(saw_masked_input) << "40 batches never held b's missing value";
  EXPECT_GT(rows_checked, 60);
  // the same position gives the same batch (resume)
  std::vector<float> in2(in.size()), tg2(tg.size());
  SeriesLoader l2(set, B, T, H, 7);
  l2.set_position(l.position() - static_cast<uint64_t>(B));
  l2.next(in2.data(), tg2.data());
  EXPECT_EQ(std::memcmp(in.data(), in2.data(), in.size() * 4), 0);
  EXPECT_EQ(std::memcmp(tg.data(), tg2.data(), tg.size() * 4), 0);
  // a window that fits nowhere is an error naming the data
  SeriesSet tiny = set;
  tiny.ranges = {{0, 5}, {0, 5}};
  EXPECT_TRUE(test::one_line_error([&] { SeriesLoader(tiny, B, T, H, 1); }, {"test series", "no window"}));
}

TEST(SeriesLoader, TablesSplitScaleAndSayWhatWasMissing) {
  const std::string dir = test::make_temp_dir("series_csv");
  const std::string path = dir + "/s.csv";
  {
    std::ofstream f(path);
    f << "date,a,b\n";
    for (int i = 0; i < 200; ++i) f << "2020-01-01 " << i << "," << (i % 7) << "," << (i == 50 ? "" : std::to_string(2 * i)) << "\n";
  }
  const SeriesRunData d = load_series_run_data({path}, 16, 4, 1);
  ASSERT_EQ(d.train.series.size(), 2u);
  EXPECT_EQ(d.train.ranges[0].begin, 0);
  EXPECT_EQ(d.train.ranges[0].end, 140);   // 70%
  EXPECT_EQ(d.val.ranges[0].begin, 140 - 16);
  EXPECT_EQ(d.val.ranges[0].end, 160);     // 80%
  EXPECT_NE(d.note.find("1 missing values masked"), std::string::npos) << d.note;
  EXPECT_NE(d.note.find("2 series x 200 rows"), std::string::npos) << d.note;
  double mean = 0;  // scaled on the training rows: mean 0 there
  for (int64_t i = 0; i < 140; ++i) mean += d.train.series[0][static_cast<size_t>(i)];
  EXPECT_NEAR(mean / 140, 0.0, 1e-5);
  EXPECT_TRUE(test::one_line_error([&] { load_series_run_data({dir + "/none.csv"}, 16, 4, 1); }, {"none.csv"}));
  fs::remove_all(dir);
}

// `lmforge train` on a time-series config: the loss falls on the synthetic series, two runs and a
// resumed run give the same bits.
TEST(TimeSeriesTraining, TrainsDeterministicallyAndResumesBitwise) {
  const std::string dir = test::make_temp_dir("ts_train");
  const std::string cfg = dir + "/cfg.json";
  {
    ModelConfig c = config_preset("tiny-ts");
    c.n_layer = 2;
    c.d_model = 32;
    c.d_ff = 64;
    c.moe.d_expert = 32;
    c.ts.horizons = {1, 4, 8};
    std::ofstream(cfg) << config_to_json(c);
  }
  const std::string common = "train --config " + cfg + " -B 8 -T 64 --lr 3e-3 --log-every 1 --eval-every 40 --device cpu";
  const test::RunResult a = test::run_cli(common + " --steps 40 --out-dir " + dir + "/a", dir);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const test::RunResult b = test::run_cli(common + " --steps 40 --out-dir " + dir + "/b", dir);
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const test::RunResult part = test::run_cli(common + " --steps 40 --checkpoint-every 20 --out-dir " + dir + "/p", dir);
  ASSERT_EQ(part.exit_code, 0) << part.err;
  const test::RunResult res =
      test::run_cli("train --resume " + dir + "/p/checkpoints/step_000020 --out-dir " + dir + "/r", dir);
  ASSERT_EQ(res.exit_code, 0) << res.err;
  auto losses = [](const std::string& out, int from) {
    std::vector<std::string> v;
    std::istringstream s(out);
    for (std::string line; std::getline(s, line);)
      if (line.rfind("step=", 0) == 0 && line.find(" loss=") != std::string::npos &&
          std::stoi(line.substr(5)) > from)
        v.push_back(line.substr(0, line.find(" lr=")));
    return v;
  };
  EXPECT_EQ(losses(a.out, 0), losses(b.out, 0));
  EXPECT_EQ(losses(a.out, 20), losses(res.out, 20));
  EXPECT_NE(a.out.find("points/s="), std::string::npos);
  EXPECT_NE(a.out.find(" pred="), std::string::npos);  // loss = pred + aux (MoE)
  const std::vector<std::string> l = losses(a.out, 0);
  ASSERT_EQ(l.size(), 40u);
  auto val = [](const std::string& out) {
    std::vector<double> v;
    std::istringstream s(out);
    for (std::string line; std::getline(s, line);)
      if (line.find(" val_loss=") != std::string::npos) v.push_back(std::stod(line.substr(line.find("val_loss=") + 9)));
    return v;
  };
  const std::vector<double> vl = val(a.out);
  ASSERT_EQ(vl.size(), 2u);
  std::printf("[ measured ] tiny time-series model, synthetic series: val loss %.4f -> %.4f in 40 steps\n", vl[0], vl[1]);
  EXPECT_LT(vl[1], 0.8 * vl[0]) << "the forecaster did not learn";
  fs::remove_all(dir);
}

// Bad series files and flags through the CLI: one line naming the file (and row / column) or the
// flag, a non-zero exit, nothing written.
TEST(TimeSeriesCli, BadInputIsOneLineAndWritesNothing) {
  const std::string dir = test::make_temp_dir("ts_cli");
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  std::string good = "date,a,b\n";
  for (int i = 0; i < 300; ++i) good += "t" + std::to_string(i) + "," + std::to_string(i % 5) + "," + std::to_string(i % 3) + "\n";
  const std::string ok_csv = write("ok.csv", good);
  const std::string ragged = write("ragged.csv", "date,a,b\nt0,1,2\nt1,3\n");
  const std::string text = write("text.csv", "date,a,b\nt0,1,2\nt1,x,4\n");
  const std::string empty = write("empty.csv", "");
  const std::string common = " -B 2 -T 32 --steps 1 --device cpu --preset tiny-ts --out-dir " + dir + "/run";
  EXPECT_TRUE(test::one_line_error(test::run_cli("train --data " + ragged + common, dir), {"ragged.csv", "line 3"}));
  EXPECT_TRUE(test::one_line_error(test::run_cli("train --data " + text + common, dir), {"text.csv", "'x'", "a"}));
  EXPECT_TRUE(test::one_line_error(test::run_cli("train --data " + empty + common, dir), {"empty.csv"}));
  EXPECT_TRUE(test::one_line_error(test::run_cli("train --data " + dir + "/none.csv" + common, dir), {"none.csv"}));
  EXPECT_FALSE(fs::exists(dir + "/run")) << "a refused run created its out-dir";
  // a trained model, then forecast's and eval-forecast's refusals
  ASSERT_EQ(test::run_cli("train --data " + ok_csv + " -B 2 -T 32 --steps 2 --device cpu --preset tiny-ts --out-dir " +
                              dir + "/m",
                          dir)
                .exit_code,
            0);
  const std::string m = " --checkpoint " + dir + "/m";
  EXPECT_TRUE(test::one_line_error(test::run_cli("forecast" + m + " --input " + ragged + " --out " + dir + "/f.csv", dir),
                                   {"ragged.csv"}));
  EXPECT_TRUE(test::one_line_error(
      test::run_cli("forecast" + m + " --input " + ok_csv + " --horizon 0 --out " + dir + "/f.csv", dir), {"--horizon"}));
  EXPECT_TRUE(test::one_line_error(
      test::run_cli("forecast" + m + " --input " + ok_csv + " --context 100000 --out " + dir + "/f.csv", dir), {"--context"}));
  EXPECT_FALSE(fs::exists(dir + "/f.csv"));
  EXPECT_TRUE(test::one_line_error(test::run_cli("eval-forecast" + m + " --data " + ok_csv + " --horizons 96,x", dir),
                                   {"--horizons", "'x'"}));
  // a horizon longer than the test rows: no window fits
  EXPECT_TRUE(test::one_line_error(test::run_cli("eval-forecast" + m + " --data " + ok_csv + " --horizons 500 --context 32", dir),
                                   {"ok.csv"}));
  // a language model is not a forecaster
  ASSERT_EQ(test::run_cli("train --preset tiny --steps 1 -B 2 -T 8 --device cpu --out-dir " + dir + "/lm", dir).exit_code, 0);
  EXPECT_TRUE(test::one_line_error(
      test::run_cli("forecast --checkpoint " + dir + "/lm --input " + ok_csv + " --out " + dir + "/f.csv", dir),
      {"language model"}));
  // and the good path writes the forecast
  const test::RunResult good_run =
      test::run_cli("forecast" + m + " --input " + ok_csv + " --horizon 10 --out " + dir + "/f.csv", dir);
  ASSERT_EQ(good_run.exit_code, 0) << good_run.err;
  const std::string csv = read_file(dir + "/f.csv", "forecast");
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "step,a,b");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 11);
  EXPECT_TRUE(test::one_line_error(
      test::run_cli("forecast" + m + " --input " + ok_csv + " --horizon 10 --out " + dir + "/f.csv", dir), {"--overwrite"}));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lmf
