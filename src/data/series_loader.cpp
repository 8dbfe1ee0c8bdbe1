// series_loader.cpp: see series_loader.h.
#include "data/series_loader.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/check.h"
#include "core/fsutil.h"

namespace fs = std::filesystem;

namespace lmf {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Mean and (population) standard deviation of the finite values of v; scale 1 when it is 0.
void scale_in_place(std::vector<float>& v) {
  double s = 0, n = 0;
  for (float x : v)
    if (!std::isnan(x)) s += x, n += 1;
  if (n == 0) return;
  const double mean = s / n;
  double ss = 0;
  for (float x : v)
    if (!std::isnan(x)) ss += (x - mean) * (x - mean);
  double sd = std::sqrt(ss / n);
  if (!(sd > 0)) sd = 1;
  for (float& x : v)
    if (!std::isnan(x)) x = static_cast<float>((x - mean) / sd);
}

}  // namespace

SeriesTable read_series_table(const std::string& path) {
  if (ends_with(path, ".npy")) return read_series_npy(path);
  return read_series_csv(path);
}

EttSplits table_splits(const SeriesTable& t, int64_t context) {
  const std::string base = fs::path(t.source).filename().string();
  const int64_t n = t.rows();
  if (base.rfind("ETTh", 0) == 0) return ett_hourly_splits(n, context);
  const int64_t a = n * 7 / 10, b = n * 8 / 10;
  if (a < 1 || b - a < 1 || n - b < 1)
    fail(t.source, ": ", n, " rows are too few to split 70/10/20 into training, validation and test rows");
  auto from = [&](int64_t row) { return std::max<int64_t>(0, row - context); };
  return {{0, a}, {from(a), b}, {from(b), n}};
}

int64_t SeriesLoader::count_windows(const SeriesSet& set, int64_t T, int64_t H, int64_t stride) {
  int64_t n = 0;
  for (const Split& r : set.ranges) {
    const int64_t span = r.size() - (T + H);
    n = checked_add(n, span >= 0 ? span / stride + 1 : 0, "time-series windows");
  }
  return n;
}

SeriesLoader::SeriesLoader(SeriesSet set, int64_t B, int64_t T, int64_t H, uint64_t seed, int64_t stride)
    : set_(std::move(set)), B_(B), T_(T), H_(H), stride_(stride), seed_(seed) {
  LMF_CHECK(B >= 1 && T >= 1 && H >= 1 && stride >= 1 && set_.series.size() == set_.ranges.size(),
            "SeriesLoader: bad sizes");
  first_.push_back(0);
  for (size_t i = 0; i < set_.series.size(); ++i) {
    const Split r = set_.ranges[i];
    LMF_CHECK(r.begin >= 0 && r.end <= static_cast<int64_t>(set_.series[i].size()), "SeriesLoader: range");
    const int64_t span = r.size() - (T + H);
    total_ = checked_add(total_, span >= 0 ? span / stride + 1 : 0, "time-series windows");
    points_ = checked_add(points_, r.size(), "time-series values");
    first_.push_back(total_);
  }
  if (total_ == 0)
    fail(set_.description, ": no window of ", T, " inputs + ", H, " future values fits in any series (lower -T, or "
         "give longer series)");
}

void SeriesLoader::set_slice(int64_t rank, int64_t ranks) {
  LMF_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "data slice: rank ", rank, " of ", ranks);
  slice_rank_ = rank;
  slice_ranks_ = ranks;
}

void SeriesLoader::next(void* inputs, void* targets) {
  float* in = static_cast<float*>(inputs);
  float* tg = static_cast<float*>(targets);
  // rows [slice_rank_ B, +B) of the global batch of slice_ranks_ x B windows
  const uint64_t first = position_ + static_cast<uint64_t>(slice_rank_ * B_);
  position_ += static_cast<uint64_t>(B_ * slice_ranks_);
  for (int64_t b = 0; b < B_; ++b) {
    const uint64_t idx = first + static_cast<uint64_t>(b);
    const int64_t epoch = static_cast<int64_t>(idx / static_cast<uint64_t>(total_));
    if (epoch != order_epoch_) {
      order_ = shuffled_window_order(total_, seed_, static_cast<uint64_t>(epoch));
      order_epoch_ = epoch;
    }
    const int64_t w = order_[static_cast<size_t>(idx % static_cast<uint64_t>(total_))];
    const size_t s = static_cast<size_t>(std::upper_bound(first_.begin(), first_.end(), w) - first_.begin() - 1);
    const int64_t start = set_.ranges[s].begin + (w - first_[s]) * stride_;
    const float* v = set_.series[s].data() + start;
    const WindowStats st = window_stats(v, T_);  // the window is seen in units of its own context
    const double mu = st.mean, sd = st.scale;
    for (int64_t t = 0; t < T_; ++t) {
      in[b * T_ + t] = std::isnan(v[t]) ? 0.0f : static_cast<float>((v[t] - mu) / sd);
      float* row = tg + (b * T_ + t) * H_;
      for (int64_t h = 0; h < H_; ++h) row[h] = static_cast<float>((v[t + 1 + h] - mu) / sd);
    }
  }
}

namespace {

void add_table(SeriesRunData& d, const std::string& path, int64_t context) {
  SeriesTable t = read_series_table(path);
  const EttSplits sp = table_splits(t, context);
  StandardScaler::fit(t, sp.train.begin, sp.train.end).apply(t);
  const int64_t rows = t.rows(), missing = t.missing_total();
  const size_t series = t.columns.size();
  for (std::vector<float>& col : t.columns) {
    d.train.series.push_back(col);
    d.train.ranges.push_back(sp.train);
    d.val.series.push_back(std::move(col));
    d.val.ranges.push_back(sp.val);
  }
  d.note += path + ": " + std::to_string(series) + " series x " + std::to_string(rows) + " rows, train rows [" +
            std::to_string(sp.train.begin) + ", " + std::to_string(sp.train.end) + "), val rows [" +
            std::to_string(sp.val.begin) + ", " + std::to_string(sp.val.end) + "), scaled on the train rows" +
            (missing > 0 ? ", " + std::to_string(missing) + " missing values masked" : std::string()) + "; ";
}

void add_pack(SeriesRunData& d, const std::string& path) {
  const SeriesPack pack(path);
  for (size_t i = 0; i < pack.count(); ++i) {
    std::vector<float> v(pack.series(i).begin(), pack.series(i).end());
    scale_in_place(v);
    d.train.ranges.push_back({0, static_cast<int64_t>(v.size())});
    d.train.series.push_back(std::move(v));
  }
  d.note += path + ": " + std::to_string(pack.count()) + " series (a pack: all for training, each scaled on itself); ";
}

bool is_pack(const std::string& path) {
  const std::string_view head = FileBytes::map(path, "series file")->view().substr(0, 8);
  return head == std::string_view(kSeriesPackMagic, 8);
}

}  // namespace

SeriesRunData load_series_run_data(const std::vector<std::string>& paths, int64_t context, int64_t horizon,
                                   uint64_t seed) {
  SeriesRunData d;
  if (paths.empty()) {  // synthetic pretraining data: 64 training series, 8 validation series
    const int64_t len = std::max<int64_t>(4096, 4 * (context + horizon));
    for (uint64_t i = 0; i < 72; ++i) {
      std::vector<float> v = synthetic_series(len, seed * 1000003 + i);
      scale_in_place(v);
      SeriesSet& s = i < 64 ? d.train : d.val;
      s.ranges.push_back({0, len});
      s.series.push_back(std::move(v));
    }
    d.train.description = "synthetic series (64 x " + std::to_string(len) + ")";
    d.val.description = "synthetic series (8 x " + std::to_string(len) + ")";
    d.note = "no --data: synthetic series (trends, seasonalities, noise, regime changes, random walks)";
    return d;
  }
  for (const std::string& pattern : paths)
    for (const std::string& path : expand_data_paths(pattern)) {
      if (ends_with(path, ".csv") || ends_with(path, ".npy")) add_table(d, path, context);
      else if (is_pack(path)) add_pack(d, path);
      else fail(path, ": not a time-series file (expected .csv, .npy or a series pack starting with ", kSeriesPackMagic, ")");
    }
  std::string names;
  for (const std::string& p : paths) names += (names.empty() ? "" : ",") + p;
  d.train.description = names + " (train)";
  d.val.description = names + " (val)";
  if (!d.note.empty()) d.note.resize(d.note.size() - 2);
  return d;
}

}  // namespace lmf
