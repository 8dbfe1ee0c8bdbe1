// plot.h: `lmforge plot`: loss and throughput curves of a run, drawn by gnuplot.
//
// Reads the metrics.jsonl a training run writes (train records: step, loss, toks_per_s; eval
// records: step, val_loss), writes the series to a data file next to the image and runs gnuplot
// (the `gnuplot` program on PATH; Debian: gnuplot-nox) on a generated script. Two panels: train and
// validation loss against the step; tokens/s against the step. The format follows the extension of
// `out`: .svg or .png.
#pragma once
#include <string>

namespace lmf {

struct PlotOptions {
  std::string metrics;  // metrics.jsonl, or a run's out-dir holding one
  std::string out;      // image path (.svg or .png); default: next to metrics.jsonl, curves.svg
  std::string title;    // default: the metrics path
};

// Writes the image and returns its path. Bad input (no file, a line that is not a JSON object, no
// train record, an unknown extension, gnuplot missing or failing) throws lmf::Error naming it.
std::string plot_metrics(const PlotOptions& o);

// Any figure: runs gnuplot on `script` (commands after set terminal / set output; "$DATA" stands for
// the data file) over `data` (gnuplot's data blocks), into `out` (.svg or .png, 900x700). The
// temporaries beside `out` are removed whatever happens; errors name what failed.
void draw_gnuplot(const std::string& out, const std::string& data, const std::string& script);
std::string gnuplot_quoted(const std::string& s);  // a single-quoted gnuplot string

}  // namespace lmf
