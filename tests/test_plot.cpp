// lmforge plot: the curves of a real CPU run come out as a valid SVG (XML with an <svg> root and
// drawn paths) and a PNG (its signature and size), and bad input gives one clear error.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/check.h"
#include "support/test_util.h"
#include "train/plot.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t i = s.find(what); i != std::string::npos; i = s.find(what, i + 1)) ++n;
  return n;
}

class Plot : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("plot");
    TrainOptions o;
    o.preset = "tiny";
    o.batch_size = 2;
    o.seq_len = 16;
    o.steps = 12;
    o.log_every = 2;
    o.eval_every = 6;
    o.eval_batches = 1;
    o.device = "cpu";
    o.progress = false;
    o.save_final_checkpoint = false;
    o.out_dir = dir_ + "/run";
    std::ostringstream log;
    Trainer t(o, log);
    t.run();
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(Plot, SvgOfARunIsValid) {
  const std::string out = plot_metrics({dir_ + "/run", "", "tiny run"});
  EXPECT_EQ(out, dir_ + "/run/curves.svg");
  const std::string svg = slurp(out);
  ASSERT_GT(svg.size(), 1000u);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u) << svg.substr(0, 100);
  EXPECT_NE(svg.find("<svg"), std::string::npos);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_EQ(count(svg, "<g"), count(svg, "</g>"));  // balanced groups
  EXPECT_GE(count(svg, "<path"), 3u);                // axes and curves
  EXPECT_NE(svg.find("tiny run"), std::string::npos);
  EXPECT_NE(svg.find("val loss"), std::string::npos);
}

TEST_F(Plot, PngOfARunIsValid) {
  const std::string out = plot_metrics({dir_ + "/run/metrics.jsonl", dir_ + "/curves.png", ""});
  const std::string png = slurp(out);
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
}

TEST_F(Plot, BadInputIsAClearError) {
  auto message = [&](const PlotOptions& o) {
    try {
      plot_metrics(o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({dir_ + "/nowhere", "", ""}).find("not found"), std::string::npos);
  EXPECT_NE(message({dir_ + "/run", dir_ + "/x.jpg", ""}).find(".svg or .png"), std::string::npos);
  {
    std::ofstream f(dir_ + "/bad.jsonl");
    f << "{\"step\": 1, \"loss\": 2.0}\nnot json\n";
  }
  EXPECT_NE(message({dir_ + "/bad.jsonl", "", ""}).find("bad.jsonl:2: not a JSON object"), std::string::npos);
  {
    std::ofstream f(dir_ + "/empty.jsonl");
    f << "{\"step\": 0, \"val_loss\": 5.5}\n";
  }
  EXPECT_NE(message({dir_ + "/empty.jsonl", "", ""}).find("no training records"), std::string::npos);
}

}  // namespace
}  // namespace lmf
