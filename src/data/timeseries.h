// timeseries.h: the data layer of time-series forecasting: readers (CSV, .npy), per-column standard
// scaling, the standard ETT split, channel-independent windows, a synthetic generator for pretraining,
// a packed corpus format read through mmap, and the baselines and metrics forecasts are judged by.
//
// Conventions:
// - A table is rows (time steps) x numeric columns (channels), each column a std::vector<float>.
//   Missing values are NaN everywhere: readers produce them, the scaler skips them, windows pass them
//   through, the linear forecaster skips windows holding one, the metrics skip NaN targets.
// - Rows are 0-based in the API; error messages name 1-based file lines ("line 17" is the 17th line
//   of the file, the header being line 1).
// - Bad input (a file's contents, a size a user chose) is one lmf::fail line naming the file and the
//   problem; a missing path is fail_not_found; a broken caller contract is LMF_CHECK.
// - Everything is deterministic: the same inputs and seed give the same bits (shuffles and the
//   synthetic generator draw from Philox, core/rng.h; sums run in a fixed order, in double).
// - Channel-independent: a window is one column's stretch of rows; every column is a separate series
//   (PatchTST, Time-MoE, TimesFM treat multivariate data this way).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lmf {

class FileBytes;  // core/fsutil.h

// ---- tables and their readers -------------------------------------------------------------------

struct SeriesTable {
  std::string source;                         // the file it was read from (errors name it); "" if none
  std::vector<std::string> names;             // numeric columns' names, one per column
  std::string time_name;                      // the time column's header ("" when there is none)
  std::vector<std::string> times;             // the time column's cells, one per row (empty when none)
  std::vector<std::vector<float>> columns;    // columns[c][row]; NaN = missing
  std::vector<int64_t> missing;               // missing[c]: NaN cells in column c
  int64_t rows() const { return columns.empty() ? 0 : static_cast<int64_t>(columns[0].size()); }
  int64_t missing_total() const;
};

// CSV with a header row. The first column is a time column (kept as strings) when its header is
// date, time, timestamp or datetime (any case) or its first data cell is not a number; every other
// column is numeric. An empty cell or NaN, nan, NA, N/A, null (any case) is missing (NaN). Simple
// double-quoted fields ("" inside is a quote; no newline inside), CRLF line ends, a UTF-8 BOM and
// empty lines at the end are accepted. Errors are one line naming the file, the 1-based line and the
// column: a ragged row, text or an infinite value in a numeric column, an empty file, no data rows, no
// numeric column, a duplicate or empty column name. A missing file is fail_not_found.
SeriesTable read_series_csv(const std::string& path);
// The same over text already in memory; `name` stands for the file in errors.
SeriesTable parse_series_csv(std::string_view text, const std::string& name);

// NumPy .npy, format versions 1.0, 2.0 and 3.0; dtype <f4, <f8, <i4 or <i8; shape (T,) or (T, C) in
// C order. Columns are named "0", "1", ...; there is no time column. Every size in the header is
// checked against the file (truncated data, trailing bytes, overflowing shapes are errors naming the
// file); fortran_order True, other dtypes and more than two dimensions are refused.
SeriesTable read_series_npy(const std::string& path);
SeriesTable parse_series_npy(std::string_view bytes, const std::string& name);

// ---- scaling ------------------------------------------------------------------------------------

// Per column: (x - mean) / scale with mean and scale fitted on rows [row_begin, row_end), NaN skipped,
// scale the population standard deviation (ddof 0, as sklearn's StandardScaler); scale = 1 where the
// deviation is 0 or the column has no valid value in the range (mean 0 then).
struct StandardScaler {
  std::vector<double> mean, scale;
  static StandardScaler fit(const SeriesTable& t, int64_t row_begin, int64_t row_end);
  void apply(SeriesTable& t) const;  // in place; NaN stays NaN
  float transform(size_t col, float v) const { return static_cast<float>((v - mean[col]) / scale[col]); }
  float inverse(size_t col, float v) const { return static_cast<float>(v * scale[col] + mean[col]); }
};

// ---- splits -------------------------------------------------------------------------------------

struct Split {
  int64_t begin = 0, end = 0;  // rows [begin, end)
  int64_t size() const { return end - begin; }
};
struct EttSplits {
  Split train, val, test;
};

constexpr int64_t kEttHourlyTrainRows = 12 * 30 * 24;  // 8,640
constexpr int64_t kEttHourlyValRows = 4 * 30 * 24;     // 2,880
constexpr int64_t kEttHourlyTestRows = 4 * 30 * 24;    // 2,880

// The Informer / Time-Series-Library split of ETTh1 and ETTh2: train [0, 8640), val [8640 - context,
// 11520), test [11520 - context, 14400). Val and test start `context` rows early so that their first
// window's future begins at the border; the scaler is fitted on train. Fails when `rows` < 14400 or
// context is outside [0, 8640].
EttSplits ett_hourly_splits(int64_t rows, int64_t context);

// ---- windows ------------------------------------------------------------------------------------

struct Window {
  size_t column = 0;
  int64_t start = 0;  // first context row; the future is rows [start + L, start + L + H)
};

// Every (column, start) with start = split.begin + k * stride and [start, start + L + H) inside the
// split, column-major: window i is column i / per_column(), k = i % per_column(). The table must
// outlive the index (a temporary table is refused at compile time). Fails when no window fits.
class WindowIndex {
 public:
  WindowIndex(const SeriesTable& table, Split split, int64_t context, int64_t horizon, int64_t stride = 1);
  WindowIndex(const SeriesTable&& table, Split split, int64_t context, int64_t horizon, int64_t stride = 1) = delete;

  int64_t size() const { return per_column_ * static_cast<int64_t>(columns_); }
  int64_t per_column() const { return per_column_; }
  int64_t context() const { return L_; }
  int64_t horizon() const { return H_; }
  Window at(int64_t i) const;
  // context: (L,) the window's first L rows; future: (H,) the next H. NaN passed through.
  void fill(int64_t i, std::span<float> context, std::span<float> future) const;

 private:
  const SeriesTable* table_;
  Split split_;
  int64_t L_, H_, S_;
  size_t columns_;
  int64_t per_column_;
};

// A permutation of [0, n) that is a pure function of (n, seed, epoch) (Fisher-Yates over Philox).
std::vector<int64_t> shuffled_window_order(int64_t n, uint64_t seed, uint64_t epoch = 0);

// ---- synthetic series (pretraining) ----------------------------------------------------------------

// A series of `length` finite values, a deterministic mix chosen by the seed: a linear or piecewise
// linear trend, 1 to 3 seasonalities (periods such as 12, 24, 168; random phases, amplitudes and a
// second harmonic), Gaussian noise, regime changes (level and amplitude shifts at random points) and
// sometimes a random walk. The same seed gives the same bits.
std::vector<float> synthetic_series(int64_t length, uint64_t seed);

// ---- packed corpus ------------------------------------------------------------------------------
//
// Layout (little-endian):
//   bytes 0..8    "LMFTSPK1"
//   uint32        version (1)
//   uint32        reserved (0)
//   uint64        count: number of series
//   uint64[count + 1]  offsets in floats into the data: series i is data[offsets[i], offsets[i+1]);
//                      offsets[0] = 0, non-decreasing
//   float32[offsets[count]]  data; the file ends exactly there
// The data starts at a multiple of 8 bytes, so a mapped file's floats are aligned. NaN (missing) is
// allowed in the data; infinities are refused at write time.

constexpr char kSeriesPackMagic[9] = "LMFTSPK1";
constexpr uint32_t kSeriesPackVersion = 1;

// Writes atomically (temporary file, fsync, rename).
void write_series_pack(const std::string& path, const std::vector<std::vector<float>>& series);

// A pack read through mmap: opening validates the header and every offset against the file size
// (a truncated or corrupted file is one error naming it); series are then spans into the mapping.
class SeriesPack {
 public:
  explicit SeriesPack(const std::string& path);
  size_t count() const { return count_; }
  int64_t length(size_t i) const;
  std::span<const float> series(size_t i) const;
  int64_t total_values() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::shared_ptr<const FileBytes> bytes_;
  size_t count_ = 0;
  const unsigned char* offsets_ = nullptr;  // (count + 1) x uint64, unaligned-safe reads
  const float* data_ = nullptr;
};

// ---- baselines and metrics -----------------------------------------------------------------------

// H copies of the context's last non-NaN value (NaN when every value is NaN).
std::vector<float> repeat_last(std::span<const float> context, int64_t horizon);
// out[h] = context[L - period + h % period]: the last full period repeated. 1 <= period <= L.
std::vector<float> seasonal_naive(std::span<const float> context, int64_t horizon, int64_t period);

// One linear map from a context of L values (+ bias) to H future values, fitted by ridge least squares:
// minimise sum over windows ||y - W x - b||^2 + ridge ||W||^2 (the bias is not penalised). DLinear
// (moving-average trend, kernel 25, edge-padded, + remainder, each through a linear layer) is linear
// in the context overall, so this map is DLinear's optimum and more. Normal equations are accumulated
// in double in window order and solved with LAPACK's dposv (OpenBLAS). Windows holding a NaN are skipped.
class LinearForecaster {
 public:
  static LinearForecaster fit(const WindowIndex& windows, double ridge);
  // contexts[i]: (L,), targets[i]: (H,); every context the same L, every target the same H.
  static LinearForecaster fit(const std::vector<std::vector<float>>& contexts,
                              const std::vector<std::vector<float>>& targets, double ridge);
  // context: (L,) -> (H,); a NaN in the context gives NaN.
  std::vector<float> predict(std::span<const float> context) const;

  int64_t context() const { return L_; }
  int64_t horizon() const { return H_; }
  int64_t windows_used() const { return used_; }
  // weights: (H, L + 1) row-major, column L the bias.
  const std::vector<double>& weights() const { return w_; }

 private:
  friend class LinearFitAccumulator;
  int64_t L_ = 0, H_ = 0, used_ = 0;
  std::vector<double> w_;
};

struct ForecastMetrics {
  double mse = 0, mae = 0;  // NaN when nothing was counted
  int64_t count = 0;  // target values counted
};

// Sums of squared and absolute errors in double, in the order added. NaN targets are skipped; a NaN
// prediction against a valid target is counted and makes the metrics NaN (a broken forecast is loud).
class ForecastAccumulator {
 public:
  void add(std::span<const float> prediction, std::span<const float> target);
  void merge(const ForecastAccumulator& o);
  ForecastMetrics metrics() const;

 private:
  double sum_sq_ = 0, sum_abs_ = 0;
  int64_t count_ = 0;
};

}  // namespace lmf
