// series_loader.h: time-series training data (docs/TIMESERIES.md). A run's series come from --data
// files -- CSV or .npy (each numeric column one series, channel-independent) or series packs
// (data/timeseries.h SeriesPack; each series one) -- or, without files, from the synthetic generator.
// Each series is standard-scaled (tables: fitted on the training split; packs and synthetic series:
// each on itself). Windows of T inputs and the H values after each of them are drawn in a seeded
// order; a missing input reads as 0 (the scaled mean) and a missing target is masked out of the loss.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/timeseries.h"
#include "model/forecast.h"  // window_stats

namespace lmf {

// Rows of a table for training, validation and testing: the ETT hourly protocol (12/4/4 months) for a
// file named ETTh*, else 70% / 10% / 20% in time order; val and test start `context` rows early so
// their first window has a full context (as data/timeseries.h ett_hourly_splits).
EttSplits table_splits(const SeriesTable& t, int64_t context);

struct SeriesSet {
  std::vector<std::vector<float>> series;  // scaled values, NaN where missing
  std::vector<Split> ranges;               // per series: the rows this set's windows lie in
  std::string description;
};

class SeriesLoader final : public BatchSource {
 public:
  // Windows of T + H values inside each series' range, every `stride` rows.
  SeriesLoader(SeriesSet set, int64_t B, int64_t T, int64_t H, uint64_t seed, int64_t stride = 1);
  // inputs: (B, T, 1) f32 (a missing value reads 0); targets: (B, T, H) f32, [b, t, h] the value h + 1
  // steps after input t (NaN where missing); both in the window's units (window_stats of its inputs).
  void next(void* inputs, void* targets) override;
  uint64_t position() const override { return position_; }
  void set_position(uint64_t p) override { position_ = p; }
  void set_slice(int64_t rank, int64_t ranks) override;
  int64_t total_points() const override { return points_; }
  const std::string& description() const override { return set_.description; }
  int64_t windows() const { return total_; }
  // Windows of T + H values that fit in a set's ranges (0: a loader over it would be refused).
  static int64_t count_windows(const SeriesSet& set, int64_t T, int64_t H, int64_t stride = 1);

 private:
  SeriesSet set_;
  int64_t B_, T_, H_, stride_;
  uint64_t seed_, position_ = 0;  // windows read (by every slice together)
  int64_t slice_rank_ = 0, slice_ranks_ = 1;
  std::vector<int64_t> first_;  // cumulative window counts per series
  int64_t total_ = 0, points_ = 0;
  std::vector<int64_t> order_;  // this epoch's window order
  int64_t order_epoch_ = -1;
};

// The training and validation sets of a run over `paths` (empty: synthetic series from `seed`); note:
// what was found worth saying (missing values masked, the split used).
struct SeriesRunData {
  SeriesSet train, val;
  std::string note;
};
SeriesRunData load_series_run_data(const std::vector<std::string>& paths, int64_t context, int64_t horizon,
                                   uint64_t seed);

// A table file (CSV or .npy, by extension) as read_series_csv / read_series_npy read it.
SeriesTable read_series_table(const std::string& path);

}  // namespace lmf
