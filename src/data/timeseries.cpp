#include "data/timeseries.h"

#include <openblas_config.h>  // blasint: the integer width this OpenBLAS's LAPACK takes

#include <algorithm>
#include <bit>
#include <cctype>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <unordered_map>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/rng.h"

// LAPACK (OpenBLAS): solves A X = B for symmetric positive definite A by Cholesky. Column-major; B is
// overwritten with X. The trailing length is gfortran's hidden length of `uplo`.
extern "C" void dposv_(const char* uplo, const blasint* n, const blasint* nrhs, double* a, const blasint* lda,
                       double* b, const blasint* ldb, blasint* info, size_t uplo_len);

namespace lmf {

static_assert(std::endian::native == std::endian::little, "the .npy and pack readers assume a little-endian host");

int64_t SeriesTable::missing_total() const {
  int64_t n = 0;
  for (int64_t m : missing) n += m;
  return n;
}

// ================================================================================================
// CSV
// ================================================================================================

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

bool is_missing_token(std::string_view s) {
  for (std::string_view m : {"", "nan", "na", "n/a", "null"})
    if (iequals(s, m)) return true;
  return false;
}

bool is_time_name(std::string_view s) {
  for (std::string_view m : {"date", "time", "timestamp", "datetime"})
    if (iequals(s, m)) return true;
  return false;
}

// A cell as it may appear in an error: at most 40 characters.
std::string shown(std::string_view s) {
  return s.size() <= 40 ? std::string(s) : std::string(s.substr(0, 37)) + "...";
}

enum class CellKind { number, missing, text, infinite };
struct Cell {
  CellKind kind;
  float value;
};

// One numeric cell: a float, a missing marker, text, or a value that is infinite or beyond float's range.
Cell parse_cell(std::string_view raw) {
  std::string_view s = trim(raw);
  if (is_missing_token(s)) return {CellKind::missing, NAN};
  if (s.size() > 1 && s[0] == '+' && s[1] != '-' && s[1] != '+') s.remove_prefix(1);
  float v = 0;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec == std::errc::invalid_argument || r.ptr != s.data() + s.size()) return {CellKind::text, 0};
  if (r.ec == std::errc::result_out_of_range) {  // overflow or underflow: decide through strtod
    const double d = std::strtod(std::string(s).c_str(), nullptr);
    if (!(std::fabs(d) <= FLT_MAX)) return {CellKind::infinite, 0};
    v = static_cast<float>(d);
  }
  if (std::isnan(v)) return {CellKind::missing, NAN};  // nan(...) spellings
  if (std::isinf(v)) return {CellKind::infinite, 0};
  return {CellKind::number, v};
}

// Splits one line (no line end) into cells, unquoting "..." fields ("" is a quote). Returns "" or the
// problem.
std::string split_cells(std::string_view line, std::vector<std::string>& cells) {
  cells.clear();
  size_t i = 0;
  while (true) {
    std::string cell;
    size_t j = i;
    while (j < line.size() && (line[j] == ' ' || line[j] == '\t')) ++j;
    if (j < line.size() && line[j] == '"') {
      for (++j;; ++j) {
        if (j >= line.size()) return "a quoted field is not closed";
        if (line[j] == '"') {
          if (j + 1 < line.size() && line[j + 1] == '"') {
            cell += '"';
            ++j;
          } else {
            break;
          }
        } else {
          cell += line[j];
        }
      }
      ++j;
      while (j < line.size() && (line[j] == ' ' || line[j] == '\t')) ++j;
      if (j < line.size() && line[j] != ',') return "text after the closing quote of a field";
      i = j;
    } else {
      j = std::min(line.find(',', i), line.size());
      cell.assign(line.substr(i, j - i));
      i = j;
    }
    cells.push_back(std::move(cell));
    if (i >= line.size()) return "";
    ++i;  // the comma
  }
}

// Lines of a text, line ends (LF or CRLF) removed, numbered from 1.
class LineReader {
 public:
  explicit LineReader(std::string_view text) : text_(text) {}
  bool next(std::string_view& line) {
    if (pos_ > text_.size()) return false;
    size_t e = std::min(text_.find('\n', pos_), text_.size());
    line = text_.substr(pos_, e - pos_);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    pos_ = e + 1;
    ++number_;
    return true;
  }
  int64_t number() const { return number_; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  int64_t number_ = 0;
};

struct CsvLayout {
  std::vector<std::string> header;
  bool has_time = false;
};

CsvLayout read_csv_header(LineReader& lines, const std::string& name, std::vector<std::string>& cells) {
  std::string_view line;
  lines.next(line);
  if (std::string why = split_cells(line, cells); !why.empty()) fail(name, ": line 1 (the header): ", why);
  CsvLayout layout;
  std::unordered_map<std::string, size_t> seen;
  for (size_t c = 0; c < cells.size(); ++c) {
    std::string h(trim(cells[c]));
    if (h.empty()) fail(name, ": line 1: column ", c + 1, " of the header has no name");
    auto [it, fresh] = seen.emplace(h, c);
    if (!fresh) fail(name, ": line 1: column name '", h, "' appears twice (columns ", it->second + 1, " and ", c + 1, ")");
    layout.header.push_back(std::move(h));
  }
  return layout;
}

void start_table(SeriesTable& t, const CsvLayout& layout, size_t rows_hint) {
  const size_t first = layout.has_time ? 1 : 0;
  t.time_name = layout.has_time ? layout.header[0] : "";
  t.names.assign(layout.header.begin() + static_cast<std::ptrdiff_t>(first), layout.header.end());
  t.columns.assign(t.names.size(), {});
  for (auto& col : t.columns) col.reserve(rows_hint);
  t.missing.assign(t.names.size(), 0);
  if (layout.has_time) t.times.reserve(rows_hint);
}

void add_csv_row(SeriesTable& t, const CsvLayout& layout, const std::vector<std::string>& cells, int64_t line_no,
                 const std::string& name) {
  const size_t first = layout.has_time ? 1 : 0;
  if (layout.has_time) t.times.emplace_back(trim(cells[0]));
  for (size_t c = first; c < cells.size(); ++c) {
    const size_t col = c - first;
    const Cell v = parse_cell(cells[c]);
    if (v.kind == CellKind::text)
      fail(name, ": line ", line_no, ", column '", t.names[col], "': '", shown(trim(cells[c])), "' is not a number");
    if (v.kind == CellKind::infinite)
      fail(name, ": line ", line_no, ", column '", t.names[col], "': '", shown(trim(cells[c])),
           "' is infinite or beyond the float range");
    if (v.kind == CellKind::missing) t.missing[col]++;
    t.columns[col].push_back(v.value);
  }
}

}  // namespace

SeriesTable parse_series_csv(std::string_view text, const std::string& name) {
  if (text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);  // UTF-8 BOM
  const size_t last = text.find_last_not_of("\r\n");              // empty lines at the end are not rows
  if (last == std::string_view::npos || trim(text).empty()) fail(name, ": CSV file is empty");
  text = text.substr(0, last + 1);
  LineReader lines(text);
  std::vector<std::string> cells;
  CsvLayout layout = read_csv_header(lines, name, cells);
  std::string_view line;
  if (!lines.next(line)) fail(name, ": CSV file has a header but no data rows");
  SeriesTable t;
  t.source = name;
  for (bool first_row = true;; first_row = false) {
    const int64_t ln = lines.number();
    if (std::string why = split_cells(line, cells); !why.empty()) fail(name, ": line ", ln, ": ", why);
    if (cells.size() != layout.header.size())
      fail(name, ": line ", ln, line.empty() ? " is empty" : " has " + std::to_string(cells.size()) + " cells",
           ", the header has ", layout.header.size());
    if (first_row) {
      layout.has_time = is_time_name(layout.header[0]) || parse_cell(cells[0]).kind == CellKind::text;
      if (layout.has_time && layout.header.size() == 1)
        fail(name, ": no numeric column: the only column, '", layout.header[0], "', holds times");
      start_table(t, layout, static_cast<size_t>(std::count(text.begin(), text.end(), '\n')));
    }
    add_csv_row(t, layout, cells, ln, name);
    if (!lines.next(line)) break;
  }
  return t;
}

SeriesTable read_series_csv(const std::string& path) {
  auto bytes = FileBytes::map(path, "CSV file");
  return parse_series_csv(bytes->view(), path);
}

// ================================================================================================
// .npy
// ================================================================================================

namespace {

struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// The header's Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (T, C), }
class NpyDictParser {
 public:
  NpyDictParser(std::string_view s, const std::string& name) : s_(s), name_(name) {}

  NpyHeader parse() {
    NpyHeader h;
    bool got_descr = false, got_order = false, got_shape = false;
    expect('{');
    while (true) {
      skip_ws();
      if (peek() == '}') break;
      const std::string key = string_literal("a key");
      expect(':');
      if (key == "descr") {
        h.descr = string_literal("'descr' (structured dtypes are not supported)");
        got_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        got_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        got_shape = true;
      } else {
        bad("unknown key '" + key + "'");
      }
      skip_ws();
      if (peek() == ',') ++i_;
    }
    ++i_;
    skip_ws();
    if (i_ != s_.size()) bad("text after the closing brace");
    if (!got_descr || !got_order || !got_shape) bad("it lacks one of 'descr', 'fortran_order', 'shape'");
    return h;
  }

 private:
  [[noreturn]] void bad(const std::string& what) const { fail(name_, ": bad .npy header: ", what); }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    skip_ws();
    if (peek() != c) bad(std::string("expected '") + c + "' at offset " + std::to_string(i_));
    ++i_;
  }
  std::string string_literal(const std::string& what) {
    skip_ws();
    const char q = peek();
    if (q != '\'' && q != '"') bad(what + " is not a string");
    const size_t e = s_.find(q, i_ + 1);
    if (e == std::string_view::npos) bad("a string is not closed");
    std::string out(s_.substr(i_ + 1, e - i_ - 1));
    i_ = e + 1;
    return out;
  }
  bool boolean() {
    skip_ws();
    if (s_.substr(i_).starts_with("True")) return i_ += 4, true;
    if (s_.substr(i_).starts_with("False")) return i_ += 5, false;
    bad("'fortran_order' is neither True nor False");
  }
  std::vector<int64_t> tuple() {
    expect('(');
    std::vector<int64_t> dims;
    while (true) {
      skip_ws();
      if (peek() == ')') break;
      int64_t d = 0;
      auto r = std::from_chars(s_.data() + i_, s_.data() + s_.size(), d);
      if (r.ec != std::errc() || d < 0) bad("'shape' holds something other than non-negative integers");
      i_ = static_cast<size_t>(r.ptr - s_.data());
      dims.push_back(d);
      skip_ws();
      if (peek() == ',') {
        ++i_;
      } else if (peek() != ')') {
        bad("'shape' is not a tuple of integers");
      }
    }
    ++i_;
    return dims;
  }

  std::string_view s_;
  const std::string& name_;
  size_t i_ = 0;
};

enum class NpyType { f4, f8, i4, i8 };

NpyType npy_type(const std::string& descr, const std::string& name) {
  if (descr == "<f4") return NpyType::f4;
  if (descr == "<f8") return NpyType::f8;
  if (descr == "<i4") return NpyType::i4;
  if (descr == "<i8") return NpyType::i8;
  fail(name, ": unsupported .npy dtype '", descr, "' (expected <f4, <f8, <i4 or <i8)");
}

// The header's bytes (after the magic and version) and where the data starts.
std::string_view npy_header_text(std::string_view b, const std::string& name, size_t* data_offset) {
  if (b.size() < 10 || b.substr(0, 6) != std::string_view("\x93NUMPY", 6))
    fail(name, ": not a .npy file (bad magic)");
  const unsigned major = static_cast<unsigned char>(b[6]), minor = static_cast<unsigned char>(b[7]);
  if ((major != 1 && major != 2 && major != 3) || minor != 0)
    fail(name, ": unsupported .npy format version ", major, ".", minor, " (expected 1.0, 2.0 or 3.0)");
  size_t len = 0, start = 10;
  if (major == 1) {
    uint16_t l;
    std::memcpy(&l, b.data() + 8, 2);
    len = l;
  } else {
    if (b.size() < 12) fail(name, ": .npy file is truncated in its header");
    uint32_t l;
    std::memcpy(&l, b.data() + 8, 4);
    len = l;
    start = 12;
  }
  if (len > b.size() - start)
    fail(name, ": .npy file is truncated: header says ", len, " header bytes, file has ", b.size() - start, " left");
  *data_offset = start + len;
  return b.substr(start, len);
}

float npy_value(const char* p, NpyType type, const std::string& name, int64_t index) {
  double d = 0;
  switch (type) {
    case NpyType::f4: {
      float f;
      std::memcpy(&f, p, 4);
      d = f;
      break;
    }
    case NpyType::f8: std::memcpy(&d, p, 8); break;
    case NpyType::i4: {
      int32_t v;
      std::memcpy(&v, p, 4);
      return static_cast<float>(v);
    }
    case NpyType::i8: {
      int64_t v;
      std::memcpy(&v, p, 8);
      return static_cast<float>(v);
    }
  }
  if (std::isnan(d)) return NAN;
  if (!(std::fabs(d) <= FLT_MAX)) fail(name, ": value ", d, " at flat index ", index, " is infinite or beyond float");
  return static_cast<float>(d);
}

}  // namespace

SeriesTable parse_series_npy(std::string_view b, const std::string& name) {
  size_t off = 0;
  const NpyHeader h = NpyDictParser(npy_header_text(b, name, &off), name).parse();
  const NpyType type = npy_type(h.descr, name);
  if (h.fortran_order) fail(name, ": .npy array is in Fortran order; save it in C order (np.ascontiguousarray)");
  if (h.shape.empty() || h.shape.size() > 2)
    fail(name, ": .npy array has ", h.shape.size(), " dimensions, expected shape (T,) or (T, C)");
  const int64_t T = h.shape[0], C = h.shape.size() == 2 ? h.shape[1] : 1;
  if (T == 0) fail(name, ": .npy array has no rows");
  if (C == 0) fail(name, ": .npy array has no columns");
  const int64_t item = (type == NpyType::f4 || type == NpyType::i4) ? 4 : 8;
  const int64_t n = checked_mul(T, C, name, ": .npy shape");
  const uint64_t need = static_cast<uint64_t>(checked_mul(n, item, name, ": .npy data size"));
  const uint64_t have = b.size() - off;
  if (have != need)
    fail(name, have < need ? ": .npy file is truncated: " : ": .npy file has trailing bytes: ", "shape (", T, ", ", C,
         ") of ", h.descr, " needs ", need, " data bytes, file has ", have);
  SeriesTable t;
  t.source = name;
  t.columns.assign(static_cast<size_t>(C), std::vector<float>(static_cast<size_t>(T)));
  t.missing.assign(static_cast<size_t>(C), 0);
  for (int64_t c = 0; c < C; ++c) t.names.push_back(std::to_string(c));
  const char* data = b.data() + off;
  for (int64_t r = 0; r < T; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float v = npy_value(data + (r * C + c) * item, type, name, r * C + c);
      if (std::isnan(v)) t.missing[static_cast<size_t>(c)]++;
      t.columns[static_cast<size_t>(c)][static_cast<size_t>(r)] = v;
    }
  return t;
}

SeriesTable read_series_npy(const std::string& path) {
  auto bytes = FileBytes::map(path, ".npy file");
  return parse_series_npy(bytes->view(), path);
}

// ================================================================================================
// scaling and splits
// ================================================================================================

StandardScaler StandardScaler::fit(const SeriesTable& t, int64_t row_begin, int64_t row_end) {
  LMF_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= t.rows(), "rows [", row_begin, ", ", row_end,
            ") of a table of ", t.rows());
  StandardScaler s;
  for (const std::vector<float>& col : t.columns) {
    double sum = 0;
    int64_t n = 0;
    for (int64_t r = row_begin; r < row_end; ++r)
      if (const float v = col[static_cast<size_t>(r)]; !std::isnan(v)) sum += v, ++n;
    const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
    double sq = 0;  // two passes: no cancellation for large means
    for (int64_t r = row_begin; r < row_end; ++r)
      if (const float v = col[static_cast<size_t>(r)]; !std::isnan(v)) sq += (v - mean) * (v - mean);
    const double sd = n > 0 ? std::sqrt(sq / static_cast<double>(n)) : 0.0;
    s.mean.push_back(mean);
    s.scale.push_back(sd > 0 ? sd : 1.0);
  }
  return s;
}

void StandardScaler::apply(SeriesTable& t) const {
  LMF_CHECK(t.columns.size() == mean.size(), "scaler fitted on ", mean.size(), " columns, table has ",
            t.columns.size());
  for (size_t c = 0; c < t.columns.size(); ++c)
    for (float& v : t.columns[c]) v = transform(c, v);  // NaN - mean is NaN
}

EttSplits ett_hourly_splits(int64_t rows, int64_t context) {
  const int64_t b1 = kEttHourlyTrainRows, b2 = b1 + kEttHourlyValRows, b3 = b2 + kEttHourlyTestRows;
  if (rows < b3) fail("the ETT hourly split needs ", b3, " rows (12 + 4 + 4 months), the table has ", rows);
  if (context < 0 || context > b1) fail("context ", context, " is outside [0, ", b1, "] for the ETT hourly split");
  return {{0, b1}, {b1 - context, b2}, {b2 - context, b3}};
}

// ================================================================================================
// windows
// ================================================================================================

WindowIndex::WindowIndex(const SeriesTable& table, Split split, int64_t context, int64_t horizon, int64_t stride)
    : table_(&table), split_(split), L_(context), H_(horizon), S_(stride), columns_(table.columns.size()) {
  const std::string src = table.source.empty() ? "" : table.source + ": ";
  if (context < 1) fail(src, "context length ", context, " must be at least 1");
  if (horizon < 1) fail(src, "horizon ", horizon, " must be at least 1");
  if (stride < 1) fail(src, "window stride ", stride, " must be at least 1");
  LMF_CHECK(columns_ > 0, "a table without numeric columns");
  LMF_CHECK(0 <= split.begin && split.begin <= split.end && split.end <= table.rows(), "split [", split.begin, ", ",
            split.end, ") of a table of ", table.rows(), " rows");
  const int64_t span = checked_add(context, horizon, "context + horizon");
  if (split.size() < span)
    fail(src, "rows [", split.begin, ", ", split.end, ") hold ", split.size(), " rows, fewer than context + horizon = ",
         context, " + ", horizon);
  per_column_ = (split.size() - span) / stride + 1;
}

Window WindowIndex::at(int64_t i) const {
  LMF_CHECK(0 <= i && i < size(), "window ", i, " of ", size());
  return {static_cast<size_t>(i / per_column_), split_.begin + (i % per_column_) * S_};
}

void WindowIndex::fill(int64_t i, std::span<float> context, std::span<float> future) const {
  LMF_CHECK(static_cast<int64_t>(context.size()) == L_ && static_cast<int64_t>(future.size()) == H_,
            "buffers of ", context.size(), " and ", future.size(), " for L=", L_, " H=", H_);
  const Window w = at(i);
  const float* col = table_->columns[w.column].data() + w.start;
  std::copy(col, col + L_, context.begin());
  std::copy(col + L_, col + L_ + H_, future.begin());
}

std::vector<int64_t> shuffled_window_order(int64_t n, uint64_t seed, uint64_t epoch) {
  LMF_CHECK(n >= 0, "n=", n);
  constexpr uint64_t kShuffleStream = 0x75e5'0000'0000'0000ull;
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t j = rng_u64(seed, kShuffleStream + epoch, static_cast<uint64_t>(i)) % static_cast<uint64_t>(i + 1);
    std::swap(order[static_cast<size_t>(i)], order[j]);
  }
  return order;
}

// ================================================================================================
// synthetic series
// ================================================================================================

namespace {

constexpr uint64_t kSynthParamStream = 0x5e75'0001ull;  // the mix's parameters, drawn in sequence
constexpr uint64_t kSynthNoiseStream = 0x5e75'0002ull;  // one normal per time step
constexpr uint64_t kSynthWalkStream = 0x5e75'0003ull;   // the random walk's steps
constexpr double kTwoPi = 6.283185307179586;

// Parameters drawn one after another from one Philox stream.
struct Draws {
  uint64_t seed;
  uint64_t next = 0;
  double uniform() { return rng_uniform(seed, kSynthParamStream, next++); }
  double normal() { return rng_normal(seed, kSynthParamStream, next++); }
  int64_t below(int64_t n) { return static_cast<int64_t>(rng_u64(seed, kSynthParamStream, next++) % static_cast<uint64_t>(n)); }
};

struct Season {
  double period, amp, phase, amp2, phase2;  // a sine and its second harmonic
};
struct Change {
  int64_t at;
  double level, amp_factor;
};
struct SynthSpec {
  double offset, gain, noise_sigma, walk_sigma;
  std::vector<int64_t> knots;   // trend segments start here (knots[0] = 0)
  std::vector<double> slopes;   // per segment, per step
  std::vector<Season> seasons;
  std::vector<Change> changes;  // sorted by `at`
};

std::vector<int64_t> sorted_points(Draws& d, int64_t count, int64_t length) {
  std::vector<int64_t> p;
  for (int64_t k = 0; k < count; ++k) p.push_back(length / 10 + d.below(std::max<int64_t>(1, length * 8 / 10)));
  std::sort(p.begin(), p.end());
  return p;
}

void draw_trend(Draws& d, SynthSpec& s, int64_t length) {
  const double per_step = 1.0 / static_cast<double>(std::max<int64_t>(length, 1));
  const int64_t kind = d.below(3);  // 0: none, 1: linear, 2: piecewise linear
  s.knots = {0};
  if (kind == 2)
    for (int64_t k : sorted_points(d, 1 + d.below(3), length)) s.knots.push_back(k);
  for (size_t k = 0; k < s.knots.size(); ++k) s.slopes.push_back(kind == 0 ? 0.0 : 3.0 * d.normal() * per_step);
}

void draw_seasons(Draws& d, SynthSpec& s) {
  static constexpr double kPeriods[] = {4, 7, 12, 24, 24, 48, 96, 168, 168, 336, 720};
  const int64_t n = 1 + d.below(3);
  for (int64_t k = 0; k < n; ++k) {
    Season z;
    z.period = d.uniform() < 0.25 ? 3.0 + static_cast<double>(d.below(400)) : kPeriods[d.below(std::size(kPeriods))];
    z.amp = 0.2 + 1.8 * d.uniform();
    z.phase = kTwoPi * d.uniform();
    z.amp2 = z.amp * 0.5 * d.uniform();
    z.phase2 = kTwoPi * d.uniform();
    s.seasons.push_back(z);
  }
}

SynthSpec draw_synth_spec(uint64_t seed, int64_t length) {
  Draws d{seed};
  SynthSpec s;
  s.offset = 3.0 * d.normal();
  s.gain = std::exp(0.7 * d.normal());
  const double u = d.uniform();
  s.noise_sigma = 0.02 + 0.5 * u * u;
  s.walk_sigma = d.uniform() < 0.35 ? 0.01 + 0.1 * d.uniform() : 0.0;
  draw_trend(d, s, length);
  draw_seasons(d, s);
  if (d.uniform() < 0.5)
    for (int64_t at : sorted_points(d, 1 + d.below(3), length))
      s.changes.push_back({at, d.normal(), 0.5 + 1.5 * d.uniform()});
  return s;
}

}  // namespace

std::vector<float> synthetic_series(int64_t length, uint64_t seed) {
  LMF_CHECK(length >= 0, "length=", length);
  const SynthSpec s = draw_synth_spec(seed, length);
  std::vector<float> out(static_cast<size_t>(length));
  double trend = 0, walk = 0, level = 0, amp = 1;
  size_t seg = 0, change = 0;
  for (int64_t t = 0; t < length; ++t) {
    while (seg + 1 < s.knots.size() && t >= s.knots[seg + 1]) ++seg;
    while (change < s.changes.size() && t >= s.changes[change].at) {
      level += s.changes[change].level;
      amp *= s.changes[change].amp_factor;
      ++change;
    }
    double season = 0;
    const double x = static_cast<double>(t);
    for (const Season& z : s.seasons)
      season += z.amp * std::sin(kTwoPi * x / z.period + z.phase) + z.amp2 * std::sin(2 * kTwoPi * x / z.period + z.phase2);
    if (s.walk_sigma > 0) walk += s.walk_sigma * rng_normal(seed, kSynthWalkStream, static_cast<uint64_t>(t));
    const double noise = s.noise_sigma * rng_normal(seed, kSynthNoiseStream, static_cast<uint64_t>(t));
    out[static_cast<size_t>(t)] = static_cast<float>(s.offset + s.gain * (trend + level + amp * season + walk + noise));
    trend += s.slopes[seg];
  }
  return out;
}

// ================================================================================================
// packed corpus
// ================================================================================================

namespace {
constexpr size_t kPackHeaderBytes = 24;  // magic, version, reserved, count

uint64_t load_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
}  // namespace

void write_series_pack(const std::string& path, const std::vector<std::vector<float>>& series) {
  std::vector<uint64_t> offsets{0};
  for (size_t i = 0; i < series.size(); ++i) {
    for (size_t j = 0; j < series[i].size(); ++j)
      if (std::isinf(series[i][j])) fail(path, ": series ", i, " has an infinite value at index ", j);
    offsets.push_back(checked_add<uint64_t>(offsets.back(), series[i].size(), path, ": series pack size"));
  }
  const uint64_t table = checked_mul<uint64_t>(offsets.size(), 8, path, ": series pack offsets");
  const uint64_t data = checked_mul<uint64_t>(offsets.back(), 4, path, ": series pack data");
  std::string out(checked_add(checked_add<uint64_t>(kPackHeaderBytes, table, path), data, path), '\0');
  const uint32_t version = kSeriesPackVersion, reserved = 0;
  const uint64_t count = series.size();
  std::memcpy(out.data(), kSeriesPackMagic, 8);
  std::memcpy(out.data() + 8, &version, 4);
  std::memcpy(out.data() + 12, &reserved, 4);
  std::memcpy(out.data() + 16, &count, 8);
  std::memcpy(out.data() + kPackHeaderBytes, offsets.data(), table);
  char* p = out.data() + kPackHeaderBytes + table;
  for (size_t i = 0; i < series.size(); ++i)
    if (!series[i].empty()) std::memcpy(p + 4 * offsets[i], series[i].data(), 4 * series[i].size());
  write_file_atomic(path, out);
}

SeriesPack::SeriesPack(const std::string& path) : path_(path), bytes_(FileBytes::map(path, "series pack")) {
  const std::string_view b = bytes_->view();
  if (b.size() < kPackHeaderBytes)
    fail(path, ": series pack is truncated: ", b.size(), " bytes, smaller than the ", kPackHeaderBytes, "-byte header");
  if (b.substr(0, 8) != std::string_view(kSeriesPackMagic, 8)) fail(path, ": not a series pack (bad magic)");
  uint32_t version, reserved;
  std::memcpy(&version, b.data() + 8, 4);
  std::memcpy(&reserved, b.data() + 12, 4);
  if (version != kSeriesPackVersion)
    fail(path, ": unsupported series pack version ", version, ", expected ", kSeriesPackVersion);
  if (reserved != 0) fail(path, ": series pack is corrupted: reserved header field is ", reserved, ", expected 0");
  const auto* u = reinterpret_cast<const unsigned char*>(b.data());
  const uint64_t count = load_u64(u + 16);
  const uint64_t avail = (b.size() - kPackHeaderBytes) / 8;  // offsets that could fit at all
  if (count >= avail)
    fail(path, ": series pack is truncated: header says ", count, " series, the file (", b.size(),
         " bytes) cannot hold their offsets table");
  offsets_ = u + kPackHeaderBytes;
  const uint64_t data_start = kPackHeaderBytes + 8 * (count + 1);  // < file size: no overflow
  if (load_u64(offsets_) != 0) fail(path, ": series pack is corrupted: offset 0 is ", load_u64(offsets_), ", not 0");
  for (uint64_t i = 1; i <= count; ++i)
    if (load_u64(offsets_ + 8 * i) < load_u64(offsets_ + 8 * (i - 1)))
      fail(path, ": series pack is corrupted: offset ", i, " (", load_u64(offsets_ + 8 * i), ") is below offset ",
           i - 1, " (", load_u64(offsets_ + 8 * (i - 1)), ")");
  const uint64_t need = checked_add(data_start, checked_mul<uint64_t>(load_u64(offsets_ + 8 * count), 4, path,
                                                                       ": series pack data size"), path, ": series pack size");
  if (need != b.size())
    fail(path, need > b.size() ? ": series pack is truncated: " : ": series pack has trailing bytes: ", "offsets say ",
         need, " bytes, file has ", b.size());
  count_ = static_cast<size_t>(count);
  data_ = reinterpret_cast<const float*>(b.data() + data_start);
  LMF_CHECK(reinterpret_cast<uintptr_t>(data_) % alignof(float) == 0, "pack data misaligned");
}

int64_t SeriesPack::length(size_t i) const {
  LMF_CHECK(i < count_, "series ", i, " of ", count_);
  return static_cast<int64_t>(load_u64(offsets_ + 8 * (i + 1)) - load_u64(offsets_ + 8 * i));
}

std::span<const float> SeriesPack::series(size_t i) const {
  const int64_t n = length(i);
  return {data_ + load_u64(offsets_ + 8 * i), static_cast<size_t>(n)};
}

int64_t SeriesPack::total_values() const { return static_cast<int64_t>(load_u64(offsets_ + 8 * count_)); }

// ================================================================================================
// baselines and metrics
// ================================================================================================

std::vector<float> repeat_last(std::span<const float> context, int64_t horizon) {
  LMF_CHECK(horizon >= 0, "horizon=", horizon);
  float last = NAN;
  for (size_t i = context.size(); i-- > 0;)
    if (!std::isnan(context[i])) {
      last = context[i];
      break;
    }
  return std::vector<float>(static_cast<size_t>(horizon), last);
}

std::vector<float> seasonal_naive(std::span<const float> context, int64_t horizon, int64_t period) {
  const int64_t L = static_cast<int64_t>(context.size());
  LMF_CHECK(horizon >= 0 && period >= 1 && period <= L, "horizon=", horizon, " period=", period, " L=", L);
  std::vector<float> out(static_cast<size_t>(horizon));
  for (int64_t h = 0; h < horizon; ++h) out[static_cast<size_t>(h)] = context[static_cast<size_t>(L - period + h % period)];
  return out;
}

// The normal equations of the ridge fit, accumulated window by window in double:
// xtx: (n, n) lower triangle of sum x x^T with x = [context, 1]; ytx: (H, n) sum y x^T, which is the
// column-major (n, H) right-hand side dposv takes.
class LinearFitAccumulator {
 public:
  LinearFitAccumulator(int64_t L, int64_t H)
      : L_(L), H_(H), n_(L + 1), xtx_(static_cast<size_t>(n_ * n_)), ytx_(static_cast<size_t>(H * n_)),
        x_(static_cast<size_t>(n_)) {
    LMF_CHECK(L >= 1 && H >= 1, "L=", L, " H=", H);
  }

  void add(std::span<const float> context, std::span<const float> target) {
    LMF_CHECK(static_cast<int64_t>(context.size()) == L_ && static_cast<int64_t>(target.size()) == H_, "window of ",
              context.size(), " + ", target.size(), " for L=", L_, " H=", H_);
    for (float v : context)
      if (std::isnan(v)) return;
    for (float v : target)
      if (std::isnan(v)) return;
    for (int64_t i = 0; i < L_; ++i) x_[static_cast<size_t>(i)] = context[static_cast<size_t>(i)];
    x_[static_cast<size_t>(L_)] = 1.0;
    for (int64_t i = 0; i < n_; ++i) {
      double* row = xtx_.data() + i * n_;
      const double xi = x_[static_cast<size_t>(i)];
      for (int64_t j = 0; j <= i; ++j) row[j] += xi * x_[static_cast<size_t>(j)];
    }
    for (int64_t h = 0; h < H_; ++h) {
      double* row = ytx_.data() + h * n_;
      const double y = target[static_cast<size_t>(h)];
      for (int64_t j = 0; j < n_; ++j) row[j] += y * x_[static_cast<size_t>(j)];
    }
    ++used_;
  }

  LinearForecaster solve(double ridge) {
    if (!(ridge >= 0)) fail("linear forecaster: ridge ", ridge, " must be >= 0");
    if (used_ == 0) fail("linear forecaster: no training window without missing values");
    for (int64_t i = 0; i < n_; ++i)  // mirror the lower triangle; ridge on the weights, not the bias
      for (int64_t j = i + 1; j < n_; ++j) xtx_[static_cast<size_t>(i * n_ + j)] = xtx_[static_cast<size_t>(j * n_ + i)];
    for (int64_t i = 0; i < L_; ++i) xtx_[static_cast<size_t>(i * n_ + i)] += ridge;
    const blasint n = static_cast<blasint>(n_), nrhs = static_cast<blasint>(H_);
    blasint info = 0;
    dposv_("L", &n, &nrhs, xtx_.data(), &n, ytx_.data(), &n, &info, 1);
    LMF_CHECK(info >= 0, "dposv argument ", -info, " is invalid");
    if (info > 0)
      fail("linear forecaster: the normal equations are singular (", used_, " windows for ", n_,
           " unknowns per output); use a ridge > 0 or more data");
    LinearForecaster f;
    f.L_ = L_;
    f.H_ = H_;
    f.used_ = used_;
    f.w_ = std::move(ytx_);  // column-major (n, H) = row-major (H, n)
    return f;
  }

 private:
  int64_t L_, H_, n_, used_ = 0;
  std::vector<double> xtx_, ytx_, x_;
};

LinearForecaster LinearForecaster::fit(const WindowIndex& windows, double ridge) {
  LinearFitAccumulator acc(windows.context(), windows.horizon());
  std::vector<float> ctx(static_cast<size_t>(windows.context())), fut(static_cast<size_t>(windows.horizon()));
  for (int64_t i = 0; i < windows.size(); ++i) {
    windows.fill(i, ctx, fut);
    acc.add(ctx, fut);
  }
  return acc.solve(ridge);
}

LinearForecaster LinearForecaster::fit(const std::vector<std::vector<float>>& contexts,
                                       const std::vector<std::vector<float>>& targets, double ridge) {
  LMF_CHECK(contexts.size() == targets.size() && !contexts.empty(), contexts.size(), " contexts, ", targets.size(),
            " targets");
  LinearFitAccumulator acc(static_cast<int64_t>(contexts[0].size()), static_cast<int64_t>(targets[0].size()));
  for (size_t i = 0; i < contexts.size(); ++i) acc.add(contexts[i], targets[i]);
  return acc.solve(ridge);
}

std::vector<float> LinearForecaster::predict(std::span<const float> context) const {
  LMF_CHECK(static_cast<int64_t>(context.size()) == L_, "context of ", context.size(), ", L=", L_);
  std::vector<float> out(static_cast<size_t>(H_));
  for (int64_t h = 0; h < H_; ++h) {
    const double* w = w_.data() + h * (L_ + 1);
    double y = w[L_];
    for (int64_t j = 0; j < L_; ++j) y += w[j] * context[static_cast<size_t>(j)];
    out[static_cast<size_t>(h)] = static_cast<float>(y);
  }
  return out;
}

void ForecastAccumulator::add(std::span<const float> prediction, std::span<const float> target) {
  LMF_CHECK(prediction.size() == target.size(), "prediction of ", prediction.size(), ", target of ", target.size());
  for (size_t i = 0; i < target.size(); ++i) {
    if (std::isnan(target[i])) continue;
    const double e = static_cast<double>(prediction[i]) - target[i];
    sum_sq_ += e * e;
    sum_abs_ += std::fabs(e);
    ++count_;
  }
}

void ForecastAccumulator::merge(const ForecastAccumulator& o) {
  sum_sq_ += o.sum_sq_;
  sum_abs_ += o.sum_abs_;
  count_ += o.count_;
}

ForecastMetrics ForecastAccumulator::metrics() const {
  if (count_ == 0) return {NAN, NAN, 0};
  return {sum_sq_ / static_cast<double>(count_), sum_abs_ / static_cast<double>(count_), count_};
}

}  // namespace lmf
