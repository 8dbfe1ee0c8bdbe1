// forecast.h: a time-series model's forecasts (docs/TIMESERIES.md). The model reads a context and
// its heads predict the next horizons[j] values from the last position; a horizon longer than the
// longest head runs autoregressively: the largest head that fits the remaining horizon (else the
// shortest, cut) predicts, its predictions join the context, and the window slides on.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"

namespace lmf {

// A window's instance normalization: the mean and (population) standard deviation of its context's
// values, NaN ignored; scale 1 for a flat or empty context. The model sees every window in these units,
// in training (data/series_loader.h SeriesLoader: inputs and targets) and in forecasting (below, which
// maps its predictions back).
struct WindowStats {
  double mean = 0, scale = 1;
};
WindowStats window_stats(const float* values, int64_t n);

// Whether a forecaster's weights on device d need a bf16 copy: on the GPU, models with MoE layers run
// in bf16 mixed precision only (model/plan.cpp), so their forecasts do too.
bool forecast_params_bf16(const ModelConfig& c, Device d);

class Forecaster {
 public:
  // params: the weights of a family=timeseries config (on the CPU or the GPU: the model runs there, in
  // fp32, or in bf16 when params has a bf16 copy: see forecast_params_bf16). context: the inputs the model reads
  // (at most context_length; the last `context` values of each series).
  Forecaster(const ModelConfig& c, Parameters& params, int64_t context);
  ~Forecaster();

  // contexts: series (scaled as in training) of at least one value each; a missing value (NaN) reads
  // as 0. Returns horizon predictions per series. Batched: every series of a call runs together.
  std::vector<std::vector<float>> forecast(const std::vector<std::vector<float>>& contexts, int64_t horizon);

  // The head a step of `remaining` values uses: the largest horizon <= remaining, else the smallest.
  size_t head_for(int64_t remaining) const;
  int64_t context() const { return L_; }

 private:
  Model& planned(int64_t B);

  ModelConfig cfg_;
  Parameters& params_;
  int64_t L_;
  std::map<int64_t, std::unique_ptr<Model>> models_;  // by batch size
  std::map<int64_t, Arena> buffers_;                  // by batch size: inputs (B, L, 1), values (B, L, D)
};

}  // namespace lmf
