#include "train/plot.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "core/check.h"
#include "core/json_util.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct Series {
  std::vector<double> train_step, train_loss, tok_step, toks, val_step, val_loss;
};

Series read_metrics(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail(file.string(), ": cannot open the metrics file");
  Series s;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    json j;
    try {
      j = json_parse(line, file.string() + ":" + std::to_string(n));
    } catch (const Error&) {
      j = nullptr;  // reported below, as any line that is not an object
    }
    if (!j.is_object()) fail(file.string(), ":", n, ": not a JSON object");
    if (!j.contains("step") || !j["step"].is_number()) continue;  // e.g. the run's header record
    const double step = j["step"].get<double>();
    if (j.contains("loss") && j["loss"].is_number()) {
      s.train_step.push_back(step);
      s.train_loss.push_back(j["loss"].get<double>());
      if (j.contains("toks_per_s") && j["toks_per_s"].is_number()) {
        s.tok_step.push_back(step);
        s.toks.push_back(j["toks_per_s"].get<double>());
      }
    }
    if (j.contains("val_loss") && j["val_loss"].is_number()) {
      s.val_step.push_back(step);
      s.val_loss.push_back(j["val_loss"].get<double>());
    }
  }
  if (s.train_step.empty()) fail(file.string(), ": no training records (step, loss) to plot");
  return s;
}

void write_block(std::ostream& f, const std::vector<double>& x, const std::vector<double>& y) {
  for (size_t i = 0; i < x.size(); ++i) f << x[i] << " " << y[i] << "\n";
  if (x.empty()) f << "NaN NaN\n";  // gnuplot needs a point per block; NaN is skipped
  f << "\n\n";
}

// Single-quoted gnuplot string.
std::string quoted(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("''") : std::string(1, c);
  return r + "'";
}

}  // namespace

void draw_gnuplot(const std::string& out_path, const std::string& data_text, const std::string& script_body) {
  const fs::path out = out_path;
  const std::string ext = out.extension().string();
  std::string terminal;
  if (ext == ".svg") terminal = "svg size 900,700 dynamic noenhanced background rgb 'white'";
  else if (ext == ".png") terminal = "png size 900,700 noenhanced";
  else fail(out.string(), ": the image must end in .svg or .png");
  fs::path data = out;
  data.replace_extension(".dat");
  fs::path script = out;
  script.replace_extension(".gp");
  struct Cleanup {  // gnuplot's inputs are temporaries: gone whatever happens
    fs::path a, b;
    ~Cleanup() {
      std::error_code ec;
      fs::remove(a, ec);
      fs::remove(b, ec);
    }
  } cleanup{data, script};
  {
    std::ofstream f(data);
    if (!f) fail(data.string(), ": cannot write the plot data");
    f << data_text;
    f.flush();
    if (!f) fail(data.string(), ": write failed (disk full?)");
  }
  {
    std::string body = script_body;
    for (size_t at; (at = body.find("$DATA")) != std::string::npos;) body.replace(at, 5, quoted(data.string()));
    std::ofstream g(script);
    if (!g) fail(script.string(), ": cannot write the gnuplot script");
    g << "set terminal " << terminal << "\n"
      << "set output " << quoted(out.string()) << "\n" << body;
    g.flush();
    if (!g) fail(script.string(), ": write failed (disk full?)");
  }
  const std::string cmd = "gnuplot " + quoted(script.string()) + " 2>&1";
  std::FILE* p = popen(cmd.c_str(), "r");
  if (!p) fail("plot: cannot start gnuplot");
  std::string said;
  char buf[256];
  while (std::fgets(buf, sizeof buf, p)) said += buf;
  const int rc = pclose(p);
  if (rc != 0) {
    if (said.find("not found") != std::string::npos || WEXITSTATUS(rc) == 127)
      fail("plot: gnuplot is not installed (Debian: apt-get install gnuplot-nox)");
    for (char& c : said) if (c == '\n') c = ' ';
    fail("plot: gnuplot failed: ", said);
  }
  if (!fs::exists(out) || fs::file_size(out) == 0) fail("plot: gnuplot wrote no image to ", out.string());
}

std::string gnuplot_quoted(const std::string& s) { return quoted(s); }

std::string plot_metrics(const PlotOptions& o) {
  fs::path metrics = o.metrics;
  if (fs::is_directory(metrics)) metrics /= "metrics.jsonl";
  if (!fs::exists(metrics)) fail_not_found("--metrics: ", metrics.string(), " not found");
  fs::path out = o.out.empty() ? metrics.parent_path() / "curves.svg" : fs::path(o.out);
  const std::string ext = out.extension().string();
  if (ext != ".svg" && ext != ".png") fail("--out: ", out.string(), " must end in .svg or .png");
  const Series s = read_metrics(metrics);
  std::ostringstream data;
  write_block(data, s.train_step, s.train_loss);  // index 0
  write_block(data, s.val_step, s.val_loss);      // index 1
  write_block(data, s.tok_step, s.toks);          // index 2
  std::ostringstream g;
  g << "set multiplot layout 2,1 title " << quoted(o.title.empty() ? metrics.string() : o.title) << "\n"
    << "set grid\nset xlabel 'step'\nset ylabel 'loss'\nset key top right\n"
    << "plot $DATA index 0 with lines lw 2 title 'train loss', $DATA index 1 with linespoints lw 2 pt 7 title 'val loss'\n"
    << "set ylabel 'tokens/s'\nunset key\n"
    << "plot $DATA index 2 with lines lw 2 title 'tokens/s'\n"
    << "unset multiplot\n";
  draw_gnuplot(out.string(), data.str(), g.str());
  return out.string();
}

}  // namespace lmf
