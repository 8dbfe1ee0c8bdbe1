// forecast_cmd.h: `lmforge forecast` and `lmforge eval-forecast` (docs/TIMESERIES.md).
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace lmf {

struct ForecastCommand {
  CLI::App* forecast = nullptr;
  CLI::App* eval = nullptr;
  std::string checkpoint, input, out = "forecast.csv", plot, data, horizons = "96,192,336,720",
              device = "auto";
  int64_t horizon = 96, context = 0, stride = 1, batch = 64, season = 24;
  bool allow_nonfinite = false, overwrite = false;
};

void add_forecast_commands(CLI::App& app, ForecastCommand& cmd);
// Runs the parsed subcommand (forecast or eval-forecast); returns the exit code.
int run_forecast_command(const ForecastCommand& cmd);

}  // namespace lmf
