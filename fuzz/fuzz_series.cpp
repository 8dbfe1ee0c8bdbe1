// Fuzz target: a time-series file's bytes (data/timeseries.h), as CSV or .npy (the first byte picks),
// then what training does with an accepted table (data/series_loader.h): the 70/10/20 split, the
// scaler fitted on the training rows, and a few batches of windows. Every accepted table is
// rectangular, its missing-value counts add up, and a batch's inputs are finite (a missing value
// reads 0) while its targets are finite or NaN (masked).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/series_loader.h"
#include "data/timeseries.h"
#include "fuzz_util.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  fuzz::fuzz_run([&] {
    const std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
    SeriesTable t = data[0] % 2 == 0 ? parse_series_csv(bytes, "fuzz.csv") : parse_series_npy(bytes, "fuzz.npy");
    fuzz::fuzz_check(t.names.size() == t.columns.size() && t.missing.size() == t.columns.size(), "one name per column");
    for (size_t c = 0; c < t.columns.size(); ++c) {
      fuzz::fuzz_check(static_cast<int64_t>(t.columns[c].size()) == t.rows(), "rectangular");
      int64_t nan = 0;
      for (float v : t.columns[c]) nan += std::isnan(v) ? 1 : 0;
      fuzz::fuzz_check(nan == t.missing[c], "missing values counted");
    }
    if (t.rows() < 20 || t.columns.empty()) return;
    const int64_t L = 1 + data[0] % 4, H = 1 + (data[0] / 4) % 4;
    const EttSplits sp = table_splits(t, L);
    StandardScaler::fit(t, sp.train.begin, sp.train.end).apply(t);
    SeriesSet set;
    for (std::vector<float>& col : t.columns) {
      set.series.push_back(col);
      set.ranges.push_back(sp.train);
    }
    set.description = "fuzz";
    if (SeriesLoader::count_windows(set, L, H) == 0) return;
    SeriesLoader loader(std::move(set), 2, L, H, data[0]);
    std::vector<float> in(static_cast<size_t>(2 * L)), tg(static_cast<size_t>(2 * L * H));
    for (int k = 0; k < 3; ++k) {
      loader.next(in.data(), tg.data());
      for (float v : in) fuzz::fuzz_check(std::isfinite(v), "inputs are finite");
      for (float v : tg) fuzz::fuzz_check(std::isfinite(v) || std::isnan(v), "targets finite or masked");
    }
  });
  return 0;
}
