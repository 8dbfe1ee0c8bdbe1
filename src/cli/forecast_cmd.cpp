// forecast_cmd.cpp: see forecast_cmd.h.
#include "cli/forecast_cmd.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "convert/import.h"
#include "core/check.h"
#include "core/device.h"
#include "core/fsutil.h"
#include "data/series_loader.h"
#include "data/timeseries.h"
#include "model/forecast.h"
#include "model/gpt.h"
#include "model/plan.h"
#include "train/plot.h"

namespace fs = std::filesystem;

namespace lmf {

namespace {

struct LoadedForecaster {
  ModelConfig cfg;
  std::unique_ptr<Parameters> params;
  std::string what;
};

LoadedForecaster load_forecaster(const std::string& path, bool allow_nonfinite, const std::string& device) {
  const Device d = parse_device(device);  // a bad --device fails before any loading
  ModelSource src = load_model_source(path, allow_nonfinite);
  if (src.config.family != ModelFamily::timeseries)
    fail(src.what, " is a language model; forecast needs a family=timeseries model (lmforge train --preset tiny-ts)");
  LoadedForecaster f;
  f.cfg = src.config;
  f.what = src.what;
  if (d == Device::cuda) cuda_set_device(0);
  f.params = std::make_unique<Parameters>(gpt_param_specs(f.cfg), d, forecast_params_bf16(f.cfg, d));
  src.load_weights(*f.params);
  f.params->sync_copy();
  return f;
}

int64_t context_for(const ModelConfig& c, int64_t flag) {
  return flag > 0 ? flag : std::min<int64_t>(c.context_length, 512);
}

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

int run_forecast(const ForecastCommand& o) {
  if (o.horizon < 1 || o.horizon > 100000) fail("--horizon=", o.horizon, " must be in [1, 100000]");
  if (std::error_code ec; fs::exists(o.out, ec) && !o.overwrite)
    fail("--out: ", o.out, " exists; pass --overwrite to replace it");
  LoadedForecaster lf = load_forecaster(o.checkpoint, o.allow_nonfinite, o.device);
  SeriesTable t = read_series_table(o.input);
  Forecaster fc(lf.cfg, *lf.params, context_for(lf.cfg, o.context));
  // each series scaled by its own history (the model was trained on standard-scaled series)
  const StandardScaler sc = StandardScaler::fit(t, 0, t.rows());
  sc.apply(t);
  const std::vector<std::vector<float>> pred = fc.forecast(t.columns, o.horizon);
  std::ostringstream csv;
  csv << "step";
  for (const std::string& n : t.names) csv << "," << n;
  csv << "\n";
  for (int64_t h = 0; h < o.horizon; ++h) {
    csv << h + 1;
    for (size_t c = 0; c < t.columns.size(); ++c) csv << "," << fmt(sc.inverse(c, pred[c][static_cast<size_t>(h)]));
    csv << "\n";
  }
  write_file_atomic(o.out, csv.str());
  std::cout << "wrote " << o.out << ": " << o.horizon << " steps of " << t.columns.size() << " series from "
            << t.rows() << " rows of " << o.input << " (" << lf.what << ", context " << fc.context() << ")";
  if (t.missing_total() > 0) std::cout << "; " << t.missing_total() << " missing values read as the series mean";
  std::cout << "\n";
  if (!o.plot.empty()) {  // history (the last 3 horizons' worth) and forecast, one panel per series (at most 4)
    const SeriesTable raw = read_series_table(o.input);
    const size_t panels = std::min<size_t>(4, raw.columns.size());
    const int64_t n = raw.rows(), shown = std::min<int64_t>(n, 3 * o.horizon);
    std::ostringstream data, g;
    for (size_t c = 0; c < panels; ++c) {
      for (int64_t i = n - shown; i < n; ++i) data << i - n + 1 << " " << raw.columns[c][static_cast<size_t>(i)] << "\n";
      data << "\n\n";
      data << "0 " << raw.columns[c][static_cast<size_t>(n - 1)] << "\n";
      for (int64_t h = 0; h < o.horizon; ++h) data << h + 1 << " " << sc.inverse(c, pred[c][static_cast<size_t>(h)]) << "\n";
      data << "\n\n";
    }
    g << "set multiplot layout " << panels << ",1 title " << gnuplot_quoted(o.input + ": history and forecast") << "\n"
      << "set grid\nset key top left\n";
    for (size_t c = 0; c < panels; ++c)
      g << "set ylabel " << gnuplot_quoted(raw.names[c]) << "\nplot $DATA index " << 2 * c
        << " with lines lw 2 title 'history', $DATA index " << 2 * c + 1 << " with lines lw 2 title 'forecast'\n";
    g << "unset multiplot\n";
    draw_gnuplot(o.plot, data.str(), g.str());
    std::cout << "wrote " << o.plot << "\n";
  }
  return 0;
}

std::vector<int64_t> parse_horizons(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string one; std::getline(ss, one, ',');) {
    char* end = nullptr;
    const long long v = std::strtoll(one.c_str(), &end, 10);
    if (one.empty() || *end != '\0' || v < 1 || v > 100000)
      fail("--horizons: '", one, "' is not a horizon in [1, 100000] (expected e.g. 96,192,336,720)");
    out.push_back(v);
  }
  if (out.empty()) fail("--horizons: no horizon given");
  return out;
}

struct Row {
  ForecastAccumulator model, last, seasonal, linear;
  int64_t windows = 0;
};

// One horizon of the test protocol: every stride-th test window of every series; the model, repeat-last,
// seasonal-naive and the linear baseline fitted on the training windows, all on the scaled values.
Row evaluate_horizon(const ForecastCommand& o, const SeriesTable& t, const EttSplits& sp, Forecaster& fc, int64_t H) {
  const int64_t L = fc.context();
  Row r;
  const LinearForecaster lin = LinearForecaster::fit(WindowIndex(t, sp.train, L, H, 1), 1e-3);
  const WindowIndex test(t, sp.test, L, H, o.stride);
  std::vector<float> ctx(static_cast<size_t>(L)), fut(static_cast<size_t>(H));
  std::vector<std::vector<float>> batch_ctx, batch_fut;
  auto flush = [&] {
    if (batch_ctx.empty()) return;
    const std::vector<std::vector<float>> pred = fc.forecast(batch_ctx, H);
    for (size_t i = 0; i < pred.size(); ++i) r.model.add(pred[i], batch_fut[i]);
    batch_ctx.clear();
    batch_fut.clear();
  };
  for (int64_t i = 0; i < test.size(); ++i) {
    test.fill(i, ctx, fut);
    r.last.add(repeat_last(ctx, H), fut);
    r.seasonal.add(seasonal_naive(ctx, H, o.season), fut);
    r.linear.add(lin.predict(ctx), fut);
    batch_ctx.push_back(ctx);
    batch_fut.push_back(fut);
    if (static_cast<int64_t>(batch_ctx.size()) == o.batch) flush();
    ++r.windows;
  }
  flush();
  return r;
}

int run_eval_forecast(const ForecastCommand& o) {
  if (o.stride < 1) fail("--stride=", o.stride, " must be >= 1");
  if (o.batch < 1 || o.batch > 4096) fail("--batch=", o.batch, " must be in [1, 4096]");
  if (o.season < 1) fail("--season=", o.season, " must be >= 1");
  const std::vector<int64_t> horizons = parse_horizons(o.horizons);
  LoadedForecaster lf = load_forecaster(o.checkpoint, o.allow_nonfinite, o.device);
  Forecaster fc(lf.cfg, *lf.params, context_for(lf.cfg, o.context));
  SeriesTable t = read_series_table(o.data);
  const EttSplits sp = table_splits(t, fc.context());
  StandardScaler::fit(t, sp.train.begin, sp.train.end).apply(t);
  std::cout << "eval-forecast " << o.data << ": " << t.columns.size() << " series, test rows [" << sp.test.begin + fc.context()
            << ", " << sp.test.end << "), context " << fc.context() << ", every " << o.stride
            << (o.stride == 1 ? " window (the standard protocol)" : " windows") << ", scaled on the train rows; " << lf.what
            << "\n";
  std::cout << "| horizon | windows | lmforge MSE | lmforge MAE | repeat-last MSE | MAE | seasonal-naive (" << o.season
            << ") MSE | MAE | linear (DLinear-style) MSE | MAE |\n|---|---|---|---|---|---|---|---|---|---|\n";
  for (const int64_t H : horizons) {
    const auto t0 = std::chrono::steady_clock::now();
    Row r = evaluate_horizon(o, t, sp, fc, H);
    const ForecastMetrics m = r.model.metrics(), a = r.last.metrics(), s = r.seasonal.metrics(), l = r.linear.metrics();
    std::cout << "| " << H << " | " << r.windows << " | " << fmt(m.mse) << " | " << fmt(m.mae) << " | " << fmt(a.mse)
              << " | " << fmt(a.mae) << " | " << fmt(s.mse) << " | " << fmt(s.mae) << " | " << fmt(l.mse) << " | "
              << fmt(l.mae) << " |" << std::flush;
    std::cerr << "  [" << H << ": " << fmt(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count())
              << " s]";
    std::cout << "\n";
  }
  return 0;
}

}  // namespace

void add_forecast_commands(CLI::App& app, ForecastCommand& cmd) {
  cmd.forecast = app.add_subcommand("forecast", "forecast the series of a CSV/.npy file with a time-series model");
  CLI::App* f = cmd.forecast;
  f->add_option("--checkpoint", cmd.checkpoint, "a time-series checkpoint or training out-dir")->required();
  f->add_option("--input", cmd.input, "CSV (a time column and numeric columns) or .npy: the history")->required();
  f->add_option("--horizon", cmd.horizon, "steps to forecast")->capture_default_str();
  f->add_option("--context", cmd.context, "history the model reads (default: min(context_length, 512))");
  f->add_option("--out", cmd.out, "the forecast, as CSV")->capture_default_str();
  f->add_option("--plot", cmd.plot, "also draw history and forecast (.png or .svg)");
  f->add_flag("--overwrite", cmd.overwrite, "replace an existing --out");
  f->add_flag("--allow-nonfinite", cmd.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  f->add_option("--device", cmd.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
  cmd.eval = app.add_subcommand("eval-forecast", "the standard forecasting table: the model against baselines on a test split");
  CLI::App* e = cmd.eval;
  e->add_option("--checkpoint", cmd.checkpoint, "a time-series checkpoint or training out-dir")->required();
  e->add_option("--data", cmd.data, "CSV or .npy (ETTh*: the 12/4/4-month split; else 70/10/20)")->required();
  e->add_option("--horizons", cmd.horizons, "comma-separated horizons")->capture_default_str();
  e->add_option("--context", cmd.context, "history the model reads (default: min(context_length, 512))");
  e->add_option("--stride", cmd.stride, "every n-th test window (1: all, the standard protocol)")->capture_default_str();
  e->add_option("--batch", cmd.batch, "windows per model call")->capture_default_str();
  e->add_option("--season", cmd.season, "period of the seasonal-naive baseline")->capture_default_str();
  e->add_flag("--allow-nonfinite", cmd.allow_nonfinite, "load a checkpoint holding NaN/Inf weights");
  e->add_option("--device", cmd.device, "auto (cuda when a GPU is visible), cpu or cuda")->capture_default_str();
}

int run_forecast_command(const ForecastCommand& cmd) {
  if (cmd.forecast && *cmd.forecast) return run_forecast(cmd);
  return run_eval_forecast(cmd);
}

}  // namespace lmf
