// forecast.cpp: see forecast.h.
#include "model/forecast.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "model/plan.h"
#include "model/timeseries_ends.h"

namespace lmf {

WindowStats window_stats(const float* v, int64_t n) {
  double s = 0, c = 0;
  for (int64_t t = 0; t < n; ++t)
    if (!std::isnan(v[t])) s += v[t], c += 1;
  WindowStats w;
  if (c == 0) return w;
  w.mean = s / c;
  double ss = 0;
  for (int64_t t = 0; t < n; ++t)
    if (!std::isnan(v[t])) ss += (v[t] - w.mean) * (v[t] - w.mean);
  const double sd = std::sqrt(ss / c);
  w.scale = sd > 1e-5 ? sd : 1.0;
  return w;
}

Forecaster::Forecaster(const ModelConfig& c, Parameters& params, int64_t context)
    : cfg_(c), params_(params), L_(context) {
  if (c.family != ModelFamily::timeseries) fail("forecast: the model is a language model, not family=timeseries");
  if (context < 1 || context > c.context_length)
    fail("--context=", context, " must be in [1, context_length=", c.context_length, "]");
}

Forecaster::~Forecaster() = default;

bool forecast_params_bf16(const ModelConfig& c, Device d) {
  if (d != Device::cuda) return false;
  for (int l = 0; l < c.n_layer; ++l)
    if (c.is_moe_layer(l)) return true;
  return false;
}

size_t Forecaster::head_for(int64_t remaining) const {
  const std::vector<int64_t>& hs = cfg_.ts.horizons;
  size_t best = 0;
  for (size_t j = 0; j < hs.size(); ++j)
    if (hs[j] <= remaining) best = j;
  return best;
}

Model& Forecaster::planned(int64_t B) {
  auto it = models_.find(B);
  if (it != models_.end()) return *it->second;
  // fp32, except where the GPU runs the model's layers in bf16 only (MoE): weights with a bf16 copy
  // (forecast_params_bf16) plan bf16
  PlanFlags f;
  f.device = device_name(params_.device());
  f.precision = params_.has_copy() ? "bf16" : "fp32";
  const ModelPlan p = plan_from_flags(cfg_, f, B, L_, false);
  auto m = std::make_unique<Model>(cfg_, p, params_, nullptr, std::make_unique<TimeSeriesEnds>(cfg_));
  buffers_.emplace(B, Arena("forecast batch", {{"inputs", {B, L_, 1}}, {"values", {B, L_, cfg_.ts.head_outputs()}}},
                            params_.device()));
  return *models_.emplace(B, std::move(m)).first->second;
}

std::vector<std::vector<float>> Forecaster::forecast(const std::vector<std::vector<float>>& contexts, int64_t horizon) {
  if (contexts.empty()) return {};
  if (horizon < 1) fail("--horizon=", horizon, " must be >= 1");
  for (size_t i = 0; i < contexts.size(); ++i)
    if (contexts[i].empty()) fail("forecast: series ", i, " has no values");
  const int64_t B = static_cast<int64_t>(contexts.size()), D = cfg_.ts.head_outputs();
  Model& m = planned(B);
  Arena& buf = buffers_.at(B);
  const Tensor in = buf.get("inputs"), out = buf.get("values");
  // host staging: the arena lives on the parameters' device
  std::vector<float> x_host(static_cast<size_t>(in.numel())), out_host(static_cast<size_t>(out.numel()));
  // each series' history so far: the context, then the predictions
  std::vector<std::vector<float>> hist = contexts, pred(contexts.size());
  // each series in the units of its last L values (data/series_loader.h window_stats), as in training;
  // the same units for every autoregressive round
  std::vector<WindowStats> st(hist.size());
  for (size_t b = 0; b < hist.size(); ++b) {
    const int64_t n = static_cast<int64_t>(hist[b].size()), from = std::max<int64_t>(0, n - L_);
    st[b] = window_stats(hist[b].data() + from, n - from);
    for (float& v : hist[b])
      if (!std::isnan(v)) v = static_cast<float>((v - st[b].mean) / st[b].scale);
  }
  int64_t done = 0;
  while (done < horizon) {
    const size_t j = head_for(horizon - done);
    const int64_t hj = cfg_.ts.horizons[j];
    int64_t offset = 0;
    for (size_t k = 0; k < j; ++k) offset += cfg_.ts.horizons[k];
    // inputs: the last L values, left-padded with the first one when a history is shorter
    float* x = x_host.data();
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<float>& h = hist[static_cast<size_t>(b)];
      const int64_t n = static_cast<int64_t>(h.size());
      for (int64_t t = 0; t < L_; ++t) {
        const int64_t src = std::max<int64_t>(0, n - L_ + t);
        const float v = h[static_cast<size_t>(std::min(src, n - 1))];
        x[b * L_ + t] = std::isnan(v) ? 0.0f : v;
      }
    }
    tensor_from_host(in, x_host.data());
    m.forward_values(out, in);
    tensor_to_host(out_host.data(), out);
    const int64_t take = std::min(hj, horizon - done);
    for (int64_t b = 0; b < B; ++b) {
      const float* last = out_host.data() + (b * L_ + L_ - 1) * D + offset;
      for (int64_t h = 0; h < take; ++h) {
        const WindowStats& w = st[static_cast<size_t>(b)];
        pred[static_cast<size_t>(b)].push_back(static_cast<float>(last[h] * w.scale + w.mean));
        hist[static_cast<size_t>(b)].push_back(last[h]);
      }
    }
    done += take;
  }
  return pred;
}

}  // namespace lmf
