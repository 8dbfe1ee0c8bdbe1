// Time-series data layer (data/timeseries.h): CSV and .npy readers and their errors, the standard
// scaler, the ETT split (checked on the real ETTh1 file when ../shared/data/ETT is there), windows,
// the synthetic generator, the packed corpus, baselines, the linear forecaster and the metrics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/rng.h"
#include "data/timeseries.h"
#include "support/cli_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using test::one_line_error;

// ETTh1 lives beside the repository (../shared/data/ETT, read-only, never copied in: its licence
// forbids altered copies); "" when it is not there and the tests that need it skip.
std::string etth1_path() {
  for (const std::string& p : {test::fixture_path("../../../shared/data/ETT/ETTh1.csv"),
                               std::string("/work/shared/data/ETT/ETTh1.csv")})
    if (fs::exists(p)) return fs::weakly_canonical(p).string();
  return "";
}

// A temporary directory removed at the end of the test.
struct TempDir {
  std::string path = test::make_temp_dir("timeseries");
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name, const std::string& bytes) const {
    std::string p = path + "/" + name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
};

bool same_bits(const std::vector<float>& a, std::span<const float> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), 4 * a.size()) == 0);
}

// ---- CSV -----------------------------------------------------------------------------------------

TEST(SeriesCsv, TimeColumnAndNumericColumns) {
  TempDir d;
  const std::string p = d.file("a.csv", "date,HUFL,OT\n2016-07-01 00:00:00,5.5,30.5\n2016-07-01 01:00:00,-1e-3,+2\n");
  SeriesTable t = read_series_csv(p);
  EXPECT_EQ(t.source, p);
  EXPECT_EQ(t.time_name, "date");
  EXPECT_EQ(t.names, (std::vector<std::string>{"HUFL", "OT"}));
  EXPECT_EQ(t.times, (std::vector<std::string>{"2016-07-01 00:00:00", "2016-07-01 01:00:00"}));
  ASSERT_EQ(t.rows(), 2);
  EXPECT_EQ(t.columns[0], (std::vector<float>{5.5f, -1e-3f}));
  EXPECT_EQ(t.columns[1], (std::vector<float>{30.5f, 2.0f}));
  EXPECT_EQ(t.missing, (std::vector<int64_t>{0, 0}));
}

TEST(SeriesCsv, TimeColumnByNameOrByContent) {
  // a time-like header in any case, even over numbers (unix seconds)
  SeriesTable a = parse_series_csv("TimeStamp,x\n1600000000,1\n1600003600,2\n", "a.csv");
  EXPECT_EQ(a.time_name, "TimeStamp");
  EXPECT_EQ(a.names, (std::vector<std::string>{"x"}));
  // another name whose first data cell is text
  SeriesTable b = parse_series_csv("when,x\nmonday,1\ntuesday,2\n", "b.csv");
  EXPECT_EQ(b.time_name, "when");
  EXPECT_EQ(b.times[1], "tuesday");
  // a numeric first column is a series like the others
  SeriesTable c = parse_series_csv("id,x\n1,10\n2,20\n", "c.csv");
  EXPECT_EQ(c.time_name, "");
  EXPECT_TRUE(c.times.empty());
  EXPECT_EQ(c.names, (std::vector<std::string>{"id", "x"}));
  EXPECT_EQ(c.columns[0], (std::vector<float>{1, 2}));
  // a missing first cell is a missing number, not text
  SeriesTable e = parse_series_csv("a,b\n,1\n2,3\n", "e.csv");
  EXPECT_EQ(e.time_name, "");
  EXPECT_TRUE(std::isnan(e.columns[0][0]));
}

TEST(SeriesCsv, MissingValuesAreNanAndCounted) {
  SeriesTable t = parse_series_csv("a,b,c\n1,,NaN\nnan,NA,N/A\nnull,\"\",3\n NULL , n/a ,4\n", "m.csv");
  ASSERT_EQ(t.rows(), 4);
  EXPECT_EQ(t.missing, (std::vector<int64_t>{3, 4, 2}));
  EXPECT_EQ(t.missing_total(), 9);
  EXPECT_EQ(t.columns[0][0], 1.0f);
  EXPECT_TRUE(std::isnan(t.columns[0][1]));
  EXPECT_TRUE(std::isnan(t.columns[1][2]));
  EXPECT_EQ(t.columns[2][3], 4.0f);
}

TEST(SeriesCsv, QuotesCrlfBomAndTrailingEmptyLines) {
  SeriesTable t = parse_series_csv(
      "\xEF\xBB\xBF\"date\",\"a,b\",\"say \"\"hi\"\"\"\r\n\"2020-01-01, 00:00\",\"1.5\", 2 \r\n"
      "2020-01-02,3,4\r\n\r\n\n",
      "q.csv");
  EXPECT_EQ(t.time_name, "date");
  EXPECT_EQ(t.names, (std::vector<std::string>{"a,b", "say \"hi\""}));
  EXPECT_EQ(t.times, (std::vector<std::string>{"2020-01-01, 00:00", "2020-01-02"}));
  EXPECT_EQ(t.columns[0], (std::vector<float>{1.5f, 3.0f}));
  EXPECT_EQ(t.columns[1], (std::vector<float>{2.0f, 4.0f}));
  // no final newline at all
  EXPECT_EQ(parse_series_csv("x\n1\n2", "n.csv").rows(), 2);
  // one column: an empty line in the middle is a missing value
  SeriesTable one = parse_series_csv("x\n1\n\n3\n", "one.csv");
  EXPECT_EQ(one.rows(), 3);
  EXPECT_EQ(one.missing[0], 1);
}

TEST(SeriesCsv, BadInputIsOneLineNamingFileLineAndColumn) {
  TempDir d;
  struct Case {
    const char* text;
    std::vector<std::string> must;
  };
  const std::vector<Case> cases = {
      {"date,a,b\n1,2,3\n4,5\n", {"line 3 has 2 cells, the header has 3"}},
      {"a,b\n1,2,3\n", {"line 2 has 3 cells, the header has 2"}},
      {"date,a,OT\nx,1,2\ny,2,3\nz,3,abc\n", {"line 4, column 'OT': 'abc' is not a number"}},
      {"a,b\n1,2\n3,1.5.2\n", {"line 3, column 'b': '1.5.2' is not a number"}},
      {"a,b\n1,2\n3,4x\n", {"line 3, column 'b'", "not a number"}},
      {"a,b\n1,inf\n", {"line 2, column 'b': 'inf' is infinite"}},
      {"a,b\n1,-Infinity\n", {"line 2, column 'b'", "infinite"}},
      {"a,b\n1,1e39\n", {"line 2, column 'b': '1e39' is infinite or beyond the float range"}},
      {"", {"CSV file is empty"}},
      {"\n\r\n", {"CSV file is empty"}},
      {"date,a,b\n", {"header but no data rows"}},
      {"date,a,b", {"header but no data rows"}},
      {"date\n2020-01-01\n", {"no numeric column", "'date'"}},
      {"a,b,a\n1,2,3\n", {"line 1", "column name 'a' appears twice (columns 1 and 3)"}},
      {"a,,b\n1,2,3\n", {"line 1", "column 2 of the header has no name"}},
      {"a,b\n1,\"2\n", {"line 2", "quoted field is not closed"}},
      {"a,b\n1,\"2\"x\n", {"line 2", "text after the closing quote"}},
      {"a,b\n1,2\n\n3,4\n", {"line 3 is empty, the header has 2"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = d.file("bad" + std::to_string(i) + ".csv", cases[i].text);
    std::vector<std::string> must = cases[i].must;
    must.push_back(p);
    EXPECT_TRUE(one_line_error([&] { read_series_csv(p); }, must)) << "case " << i << ": " << cases[i].text;
  }
}

TEST(SeriesCsv, MissingFileIsNotFound) {
  TempDir d;
  const std::string p = d.path + "/nope.csv";
  try {
    read_series_csv(p);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind, Error::Kind::not_found);
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
  EXPECT_TRUE(one_line_error([&] { read_series_csv(d.path); }, {d.path}));  // a directory
}

// ---- .npy ----------------------------------------------------------------------------------------

// A .npy file: magic, version, header padded to 64 bytes with a final newline, then `data`.
std::string npy_bytes(const std::string& dict, const std::string& data, int major = 1) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string h = dict;
  while ((prefix + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  if (major == 1) {
    const uint16_t n = static_cast<uint16_t>(h.size());
    out.append(reinterpret_cast<const char*>(&n), 2);
  } else {
    const uint32_t n = static_cast<uint32_t>(h.size());
    out.append(reinterpret_cast<const char*>(&n), 4);
  }
  return out + h + data;
}

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), sizeof(T) * v.size());
}

std::string npy_dict(const std::string& descr, const std::string& shape, bool fortran = false) {
  return "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") + ", 'shape': " + shape + ", }";
}

TEST(SeriesNpy, DtypesShapesAndVersions) {
  TempDir d;
  // (3, 2) float32, C order: row-major
  const std::string p = d.file("a.npy", npy_bytes(npy_dict("<f4", "(3, 2)"), raw(std::vector<float>{1, 2, 3, 4, 5, NAN})));
  SeriesTable a = read_series_npy(p);
  EXPECT_EQ(a.names, (std::vector<std::string>{"0", "1"}));
  EXPECT_TRUE(a.times.empty());
  EXPECT_EQ(a.columns[0], (std::vector<float>{1, 3, 5}));
  EXPECT_EQ(a.columns[1][1], 4.0f);
  EXPECT_TRUE(std::isnan(a.columns[1][2]));
  EXPECT_EQ(a.missing, (std::vector<int64_t>{0, 1}));
  // (T,) float64 in format 2.0 and 3.0, double quotes, no trailing comma
  for (int major : {2, 3}) {
    SeriesTable b = parse_series_npy(
        npy_bytes("{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (4,)}", raw(std::vector<double>{0.5, -2, 1e30, NAN}), major),
        "b.npy");
    ASSERT_EQ(b.columns.size(), 1u);
    EXPECT_EQ(b.columns[0][2], 1e30f);
    EXPECT_EQ(b.missing[0], 1);
  }
  SeriesTable c = parse_series_npy(npy_bytes(npy_dict("<i4", "(2, 1)"), raw(std::vector<int32_t>{-7, 9})), "c.npy");
  EXPECT_EQ(c.columns[0], (std::vector<float>{-7, 9}));
  SeriesTable e = parse_series_npy(npy_bytes(npy_dict("<i8", "(1, 2)"), raw(std::vector<int64_t>{1LL << 40, 3})), "e.npy");
  EXPECT_EQ(e.columns[0][0], 1099511627776.0f);
  EXPECT_EQ(e.columns[1][0], 3.0f);
}

TEST(SeriesNpy, BadInputIsOneLineNamingTheFile) {
  TempDir d;
  const std::string f4x6 = raw(std::vector<float>(6, 1.0f));
  struct Case {
    std::string bytes;
    std::vector<std::string> must;
  };
  std::string bad_magic = npy_bytes(npy_dict("<f4", "(3, 2)"), f4x6);
  bad_magic[1] = 'X';
  std::string v4 = npy_bytes(npy_dict("<f4", "(3, 2)"), f4x6);
  v4[6] = 4;
  std::string long_header = npy_bytes(npy_dict("<f4", "(3, 2)"), "");
  long_header[8] = '\xff';
  long_header[9] = '\x7f';
  const std::vector<Case> cases = {
      {"", {"not a .npy file (bad magic)"}},
      {"\x93NUMPY", {"bad magic"}},
      {bad_magic, {"bad magic"}},
      {v4, {"unsupported .npy format version 4.0"}},
      {long_header, {"truncated", "header"}},
      {npy_bytes(npy_dict("<f2", "(3, 2)"), f4x6), {"unsupported .npy dtype '<f2'"}},
      {npy_bytes(npy_dict(">f4", "(3, 2)"), f4x6), {"unsupported .npy dtype '>f4'"}},
      {npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }", f4x6), {"structured"}},
      {npy_bytes(npy_dict("<f4", "(3, 2)", true), f4x6), {"Fortran order"}},
      {npy_bytes(npy_dict("<f4", "(3, 2)"), f4x6.substr(0, 23)), {"truncated", "needs 24 data bytes, file has 23"}},
      {npy_bytes(npy_dict("<f4", "(3, 2)"), f4x6 + "x"), {"trailing bytes"}},
      {npy_bytes(npy_dict("<f4", "(1, 3, 2)"), f4x6), {"3 dimensions"}},
      {npy_bytes(npy_dict("<f4", "()"), f4x6), {"0 dimensions"}},
      {npy_bytes(npy_dict("<f4", "(0, 2)"), ""), {"no rows"}},
      {npy_bytes(npy_dict("<f4", "(2, 0)"), ""), {"no columns"}},
      {npy_bytes(npy_dict("<f4", "(4611686018427387904, 4)"), f4x6), {"overflows"}},
      {npy_bytes(npy_dict("<f4", "(99999999999999999999, 4)"), f4x6), {"bad .npy header"}},
      {npy_bytes(npy_dict("<f4", "(-3, 2)"), f4x6), {"bad .npy header"}},
      {npy_bytes("{'descr': '<f4', 'shape': (6,), }", f4x6), {"bad .npy header", "lacks"}},
      {npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x': 1}", f4x6), {"unknown key 'x'"}},
      {npy_bytes("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (6,)}", f4x6), {"neither True nor False"}},
      {npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} junk", f4x6), {"after the closing brace"}},
      {npy_bytes("['descr']", f4x6), {"bad .npy header"}},
      {npy_bytes("{'descr: '<f4'", f4x6), {"bad .npy header"}},
      {npy_bytes(npy_dict("<f8", "(2,)"), raw(std::vector<double>{1, INFINITY})), {"infinite", "flat index 1"}},
      {npy_bytes(npy_dict("<f8", "(2,)"), raw(std::vector<double>{1e300, 1})), {"beyond float"}},
      {npy_bytes(npy_dict("<f4", "(2,)"), raw(std::vector<float>{-INFINITY, 1})), {"infinite"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = d.file("bad" + std::to_string(i) + ".npy", cases[i].bytes);
    std::vector<std::string> must = cases[i].must;
    must.push_back(p);
    EXPECT_TRUE(one_line_error([&] { read_series_npy(p); }, must)) << "case " << i;
  }
  // every truncation of a good file is an error, never a crash
  const std::string good = npy_bytes(npy_dict("<f4", "(3, 2)"), f4x6);
  for (size_t n = 0; n < good.size(); ++n)
    EXPECT_THROW(parse_series_npy(std::string_view(good).substr(0, n), "cut.npy"), Error) << n;
  try {
    read_series_npy(d.path + "/none.npy");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind, Error::Kind::not_found);
  }
}

// ---- scaling -------------------------------------------------------------------------------------

TEST(StandardScaler, PopulationStdOverTheFitRangeIgnoringNan) {
  SeriesTable t;
  t.names = {"a", "const", "empty"};
  t.columns = {{1, 2, 3, 4, NAN, 100}, {5, 5, 5, 5, 5, -1}, {NAN, NAN, NAN, NAN, NAN, 7}};
  t.missing = {1, 0, 5};
  const StandardScaler s = StandardScaler::fit(t, 0, 5);  // row 5 is outside the fit
  EXPECT_DOUBLE_EQ(s.mean[0], 2.5);
  EXPECT_DOUBLE_EQ(s.scale[0], std::sqrt(1.25));  // (2.25 + 0.25 + 0.25 + 2.25) / 4
  EXPECT_DOUBLE_EQ(s.mean[1], 5.0);
  EXPECT_DOUBLE_EQ(s.scale[1], 1.0);  // zero deviation
  EXPECT_DOUBLE_EQ(s.mean[2], 0.0);   // no valid value
  EXPECT_DOUBLE_EQ(s.scale[2], 1.0);
  SeriesTable u = t;
  s.apply(u);
  EXPECT_FLOAT_EQ(u.columns[0][0], static_cast<float>(-1.5 / std::sqrt(1.25)));
  EXPECT_FLOAT_EQ(u.columns[0][5], static_cast<float>(97.5 / std::sqrt(1.25)));
  EXPECT_TRUE(std::isnan(u.columns[0][4]));
  EXPECT_EQ(u.columns[1][5], -6.0f);
  EXPECT_EQ(u.columns[2][5], 7.0f);
  for (size_t r = 0; r < 6; ++r)
    if (!std::isnan(t.columns[0][r])) EXPECT_FLOAT_EQ(s.inverse(0, u.columns[0][r]), t.columns[0][r]);
  // a single row: deviation 0 -> scale 1
  const StandardScaler one = StandardScaler::fit(t, 5, 6);
  EXPECT_DOUBLE_EQ(one.mean[0], 100.0);
  EXPECT_DOUBLE_EQ(one.scale[0], 1.0);
  EXPECT_THROW(StandardScaler::fit(t, 2, 7), Error);
  EXPECT_THROW(StandardScaler::fit(t, 3, 2), Error);
}

// ---- ETT split -----------------------------------------------------------------------------------

TEST(EttSplit, InformerBorders) {
  const EttSplits s = ett_hourly_splits(17420, 96);
  EXPECT_EQ(s.train.begin, 0);
  EXPECT_EQ(s.train.end, 8640);
  EXPECT_EQ(s.val.begin, 8640 - 96);
  EXPECT_EQ(s.val.end, 11520);
  EXPECT_EQ(s.test.begin, 11520 - 96);
  EXPECT_EQ(s.test.end, 14400);
  const EttSplits z = ett_hourly_splits(14400, 0);
  EXPECT_EQ(z.val.begin, 8640);
  EXPECT_EQ(z.test.begin, 11520);
  EXPECT_TRUE(one_line_error([] { ett_hourly_splits(14399, 96); }, {"needs 14400 rows", "14399"}));
  EXPECT_TRUE(one_line_error([] { ett_hourly_splits(17420, -1); }, {"context -1"}));
  EXPECT_TRUE(one_line_error([] { ett_hourly_splits(17420, 8641); }, {"context 8641"}));
  EXPECT_NO_THROW(ett_hourly_splits(17420, 8640));
}

// Reference numbers from an independent Python reading of ETTh1.csv (each value rounded to float32,
// then math.fsum over the first 8,640 rows).
TEST(EttSplit, Etth1FileReadsAndScalesAsTheLiterature) {
  const std::string etth1 = etth1_path();
  if (etth1.empty()) GTEST_SKIP() << "ETTh1.csv is not in ../shared/data/ETT";
  SeriesTable t = read_series_csv(etth1);
  EXPECT_EQ(t.rows(), 17420);
  EXPECT_EQ(t.time_name, "date");
  EXPECT_EQ(t.names, (std::vector<std::string>{"HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"}));
  EXPECT_EQ(t.missing_total(), 0);
  EXPECT_EQ(t.times.front(), "2016-07-01 00:00:00");
  EXPECT_EQ(t.times.back(), "2018-06-26 19:00:00");
  EXPECT_EQ(t.columns[6][0], 30.5310001373291f);
  const EttSplits s = ett_hourly_splits(t.rows(), 96);
  const StandardScaler sc = StandardScaler::fit(t, s.train.begin, s.train.end);
  const double mean[] = {7.937742245659508, 2.0210386567335163, 5.079770601157927, 0.7461858799957015,
                         2.781762386375555, 0.7884531235540096, 17.1282616982271};
  const double sd[] = {5.812749409143771, 2.0901046504076, 5.518793579036245, 1.926379274132982,
                       1.0235226594952191, 0.6302366362251923, 9.176491024944333};
  for (size_t c = 0; c < 7; ++c) {
    EXPECT_NEAR(sc.mean[c], mean[c], 1e-10 * std::fabs(mean[c])) << t.names[c];
    EXPECT_NEAR(sc.scale[c], sd[c], 1e-10 * sd[c]) << t.names[c];
  }
  // Time-Series-Library's window counts: len(data) - seq_len - pred_len + 1 per channel
  sc.apply(t);
  EXPECT_EQ(WindowIndex(t, s.train, 96, 96).per_column(), 8640 - 192 + 1);
  EXPECT_EQ(WindowIndex(t, s.val, 96, 96).per_column(), 2880 - 96 + 1);
  const WindowIndex test_w(t, s.test, 96, 96);
  EXPECT_EQ(test_w.per_column(), 2785);
  EXPECT_EQ(test_w.size(), 7 * 2785);
  // the first test window's future starts at the test border
  EXPECT_EQ(test_w.at(0).start + 96, 11520);
}

// ---- windows -------------------------------------------------------------------------------------

SeriesTable counting_table(size_t columns, int64_t rows) {
  SeriesTable t;
  for (size_t c = 0; c < columns; ++c) {
    t.names.push_back("c" + std::to_string(c));
    std::vector<float> v(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) v[static_cast<size_t>(r)] = static_cast<float>(100 * c + static_cast<size_t>(r));
    t.columns.push_back(v);
    t.missing.push_back(0);
  }
  return t;
}

TEST(WindowIndex, CountsOrderAndContents) {
  SeriesTable t = counting_table(3, 10);
  const WindowIndex w(t, {2, 10}, 3, 2, 2);  // 8 rows, span 5: starts 2, 4
  EXPECT_EQ(w.per_column(), 2);
  ASSERT_EQ(w.size(), 6);
  const int64_t expect_start[] = {2, 4, 2, 4, 2, 4};
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_EQ(w.at(i).column, static_cast<size_t>(i / 2));
    EXPECT_EQ(w.at(i).start, expect_start[i]);
  }
  std::vector<float> ctx(3), fut(2);
  w.fill(3, ctx, fut);  // column 1, start 4
  EXPECT_EQ(ctx, (std::vector<float>{104, 105, 106}));
  EXPECT_EQ(fut, (std::vector<float>{107, 108}));
  // stride 1 over the whole table: rows - L - H + 1 per column
  EXPECT_EQ(WindowIndex(t, {0, 10}, 3, 2).size(), 3 * 6);
  EXPECT_EQ(WindowIndex(t, {0, 10}, 8, 2).size(), 3);  // exactly one window per column
  // NaN passes through
  t.columns[0][1] = NAN;
  const WindowIndex all(t, {0, 10}, 3, 2);
  all.fill(0, ctx, fut);
  EXPECT_TRUE(std::isnan(ctx[1]));
  EXPECT_THROW(all.at(18), Error);
  EXPECT_THROW(all.fill(0, std::span<float>(ctx.data(), 2), fut), Error);
  t.source = "t.csv";
  EXPECT_TRUE(one_line_error([&] { WindowIndex(t, {0, 4}, 3, 2); }, {"t.csv", "rows [0, 4) hold 4 rows"}));
  EXPECT_TRUE(one_line_error([&] { WindowIndex(t, {0, 10}, 0, 2); }, {"context length 0"}));
  EXPECT_TRUE(one_line_error([&] { WindowIndex(t, {0, 10}, 3, 0); }, {"horizon 0"}));
  EXPECT_TRUE(one_line_error([&] { WindowIndex(t, {0, 10}, 3, 1, 0); }, {"stride 0"}));
  EXPECT_THROW(WindowIndex(t, {0, 11}, 3, 2), Error);
}

TEST(WindowIndex, ShuffledOrderIsADeterministicPermutation) {
  const std::vector<int64_t> a = shuffled_window_order(1000, 7), b = shuffled_window_order(1000, 7);
  EXPECT_EQ(a, b);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  int64_t fixed = 0;
  for (int64_t i = 0; i < 1000; ++i) fixed += a[static_cast<size_t>(i)] == i;
  EXPECT_LT(fixed, 10);  // a shuffle, not the identity (expected about 1 fixed point)
  EXPECT_NE(a, shuffled_window_order(1000, 8));
  EXPECT_NE(a, shuffled_window_order(1000, 7, 1));
  EXPECT_TRUE(shuffled_window_order(0, 7).empty());
  EXPECT_EQ(shuffled_window_order(1, 7), std::vector<int64_t>{0});
}

// ---- synthetic -----------------------------------------------------------------------------------

TEST(SyntheticSeries, DeterministicAndNotDegenerate) {
  for (uint64_t seed = 0; seed < 64; ++seed) {
    const std::vector<float> a = synthetic_series(2000, seed);
    ASSERT_TRUE(same_bits(a, synthetic_series(2000, seed))) << seed;
    double sum = 0, sq = 0, max_step = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_TRUE(std::isfinite(a[i])) << seed << " " << i;
      EXPECT_LT(std::fabs(a[i]), 1e4f);
      sum += a[i];
      if (i > 0) max_step = std::max(max_step, std::fabs(static_cast<double>(a[i]) - a[i - 1]));
    }
    const double mean = sum / 2000;
    for (float v : a) sq += (v - mean) * (v - mean);
    EXPECT_GT(std::sqrt(sq / 2000), 0.05) << seed;  // not flat
    EXPECT_GT(max_step, 0) << seed;
    EXPECT_FALSE(same_bits(a, synthetic_series(2000, seed + 1000))) << seed;
  }
  EXPECT_TRUE(synthetic_series(0, 3).empty());
  EXPECT_EQ(synthetic_series(1, 3).size(), 1u);
}

// Seasonality: the first differences (no trend, walk or level left) of many series correlate strongly
// with themselves one period back, and the periods vary with the seed. Long periods under strong noise
// are not detected this way, so only a share of the seeds is required.
TEST(SyntheticSeries, MixHasVariedSeasonalStructure) {
  int seasonal = 0;
  std::vector<int> lags;
  for (uint64_t seed = 0; seed < 32; ++seed) {
    const std::vector<float> a = synthetic_series(2000, seed);
    std::vector<double> d(a.size() - 1);
    double mean = 0, var = 0;
    for (size_t t = 1; t < a.size(); ++t) mean += (d[t - 1] = static_cast<double>(a[t]) - a[t - 1]) / static_cast<double>(d.size());
    for (double x : d) var += (x - mean) * (x - mean);
    double best = -1;
    int best_lag = 0;
    for (int lag = 3; lag <= 400; ++lag) {
      double c = 0;
      for (size_t t = static_cast<size_t>(lag); t < d.size(); ++t) c += (d[t] - mean) * (d[t - static_cast<size_t>(lag)] - mean);
      if (c / var > best) best = c / var, best_lag = lag;
    }
    if (best > 0.3) {
      ++seasonal;
      if (std::find(lags.begin(), lags.end(), best_lag) == lags.end()) lags.push_back(best_lag);
    }
  }
  EXPECT_GE(seasonal, 12);
  EXPECT_GE(lags.size(), 5u);
}

// ---- packed corpus -------------------------------------------------------------------------------

TEST(SeriesPack, RoundTrip) {
  TempDir d;
  const std::vector<std::vector<float>> series = {synthetic_series(100, 1), {}, {1.5f, NAN, -3.0f},
                                                  synthetic_series(7, 2)};
  const std::string p = d.path + "/c.tspk";
  write_series_pack(p, series);
  EXPECT_EQ(fs::file_size(p), 24u + 8u * 5 + 4u * 110);
  SeriesPack pack(p);
  ASSERT_EQ(pack.count(), 4u);
  EXPECT_EQ(pack.total_values(), 110);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(pack.length(i), static_cast<int64_t>(series[i].size()));
    EXPECT_TRUE(same_bits(series[i], pack.series(i))) << i;
  }
  EXPECT_THROW(pack.series(4), Error);
  write_series_pack(p, {});
  EXPECT_EQ(SeriesPack(p).count(), 0u);
  // an infinite value is refused and leaves the existing file as it was
  const std::string before = read_file(p);
  EXPECT_TRUE(one_line_error([&] { write_series_pack(p, {{1, 2}, {3, INFINITY}}); }, {p, "series 1", "index 1"}));
  EXPECT_EQ(read_file(p), before);
}

TEST(SeriesPack, TruncatedOrCorruptedFilesAreOneError) {
  TempDir d;
  const std::string good_path = d.path + "/good.tspk";
  write_series_pack(good_path, {{1, 2, 3}, {4, 5}});
  const std::string good = read_file(good_path);  // 24 + 3 * 8 + 5 * 4 = 68 bytes
  ASSERT_EQ(good.size(), 68u);
  auto write_u64 = [](std::string s, size_t at, uint64_t v) {
    std::memcpy(s.data() + at, &v, 8);
    return s;
  };
  auto write_u32 = [](std::string s, size_t at, uint32_t v) {
    std::memcpy(s.data() + at, &v, 4);
    return s;
  };
  struct Case {
    std::string bytes;
    std::vector<std::string> must;
  };
  std::string magic = good;
  magic[3] = 'x';
  const std::vector<Case> cases = {
      {"", {"truncated", "smaller than the 24-byte header"}},
      {magic, {"not a series pack"}},
      {write_u32(good, 8, 2), {"unsupported series pack version 2"}},
      {write_u32(good, 12, 1), {"corrupted", "reserved"}},
      {write_u64(good, 16, 3), {"series pack"}},  // the data read as offsets
      {write_u64(good, 16, 1ull << 63), {"truncated", "cannot hold their offsets table"}},
      {write_u64(good, 16, ~0ull), {"truncated"}},
      {write_u64(good, 24, 1), {"corrupted", "offset 0 is 1"}},
      {write_u64(good, 32, 6), {"corrupted", "offset 2 (5) is below offset 1 (6)"}},
      {write_u64(good, 40, 6), {"truncated", "offsets say 72 bytes, file has 68"}},
      {write_u64(good, 40, 4), {"trailing bytes"}},
      {write_u64(write_u64(good, 32, 1ull << 62), 40, 1ull << 62), {"overflows"}},
      {good + "z", {"trailing bytes"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = d.file("bad" + std::to_string(i) + ".tspk", cases[i].bytes);
    std::vector<std::string> must = cases[i].must;
    must.push_back(p);
    EXPECT_TRUE(one_line_error([&] { SeriesPack pack(p); }, must)) << "case " << i;
  }
  for (size_t n = 0; n < good.size(); ++n) {
    const std::string p = d.file("cut.tspk", good.substr(0, n));
    EXPECT_TRUE(one_line_error([&] { SeriesPack pack(p); }, {p})) << n;
  }
  try {
    SeriesPack pack(d.path + "/none.tspk");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind, Error::Kind::not_found);
  }
}

// ---- baselines and metrics ------------------------------------------------------------------------

TEST(Baselines, SeasonalNaiveIsExactOnPeriodicSeries) {
  const std::vector<float> pattern = test::randn(24, 5);
  std::vector<float> x(24 * 20);
  for (size_t t = 0; t < x.size(); ++t) x[t] = pattern[t % 24];
  for (int64_t L : {24, 50, 96}) {
    const std::span<const float> ctx(x.data() + 7, static_cast<size_t>(L));
    const std::vector<float> pred = seasonal_naive(ctx, 100, 24);
    for (size_t h = 0; h < 100; ++h) ASSERT_EQ(pred[h], x[7 + static_cast<size_t>(L) + h]) << L << " " << h;
  }
  EXPECT_EQ(seasonal_naive(std::vector<float>{1, 2, 3}, 4, 1), (std::vector<float>{3, 3, 3, 3}));
  EXPECT_EQ(seasonal_naive(std::vector<float>{1, 2, 3}, 4, 3), (std::vector<float>{1, 2, 3, 1}));
  EXPECT_THROW(seasonal_naive(std::vector<float>{1, 2, 3}, 4, 4), Error);
  EXPECT_EQ(repeat_last(std::vector<float>{1, 2, 3}, 2), (std::vector<float>{3, 3}));
  EXPECT_EQ(repeat_last(std::vector<float>{1, 2, NAN}, 2), (std::vector<float>{2, 2}));
  EXPECT_TRUE(std::isnan(repeat_last(std::vector<float>{NAN}, 1)[0]));
}

TEST(Metrics, MseMaeSkipNanTargets) {
  ForecastAccumulator a;
  a.add(std::vector<float>{1, 2, 3, 4}, std::vector<float>{1, 4, NAN, 3});  // errors 0, -2, skip, 1
  ForecastMetrics m = a.metrics();
  EXPECT_EQ(m.count, 3);
  EXPECT_DOUBLE_EQ(m.mse, 5.0 / 3);
  EXPECT_DOUBLE_EQ(m.mae, 1.0);
  ForecastAccumulator b;
  b.add(std::vector<float>{0}, std::vector<float>{3});
  a.merge(b);
  m = a.metrics();
  EXPECT_EQ(m.count, 4);
  EXPECT_DOUBLE_EQ(m.mse, 14.0 / 4);
  EXPECT_DOUBLE_EQ(m.mae, 6.0 / 4);
  EXPECT_TRUE(std::isnan(ForecastAccumulator().metrics().mse));
  ForecastAccumulator c;
  c.add(std::vector<float>{NAN}, std::vector<float>{1});  // a broken forecast is loud
  EXPECT_TRUE(std::isnan(c.metrics().mse));
  EXPECT_THROW(c.add(std::vector<float>{1}, std::vector<float>{1, 2}), Error);
}

TEST(LinearForecaster, RecoversAKnownLinearMap) {
  constexpr int64_t L = 8, H = 3, N = 300;
  const std::vector<float> W = test::randn(H * L, 11, 0.5f), b = test::randn(H, 12);
  std::vector<std::vector<float>> xs, ys;
  for (int64_t i = 0; i < N; ++i) {
    std::vector<float> x = test::randn(L, 100 + static_cast<uint64_t>(i));
    std::vector<float> y(H);
    for (int64_t h = 0; h < H; ++h) {
      double s = b[static_cast<size_t>(h)];
      for (int64_t j = 0; j < L; ++j) s += static_cast<double>(W[static_cast<size_t>(h * L + j)]) * x[static_cast<size_t>(j)];
      y[static_cast<size_t>(h)] = static_cast<float>(s);
    }
    xs.push_back(x);
    ys.push_back(y);
  }
  xs[5][2] = NAN;  // skipped windows
  ys[9][0] = NAN;
  const LinearForecaster f = LinearForecaster::fit(xs, ys, 0.0);
  EXPECT_EQ(f.windows_used(), N - 2);
  EXPECT_EQ(f.context(), L);
  EXPECT_EQ(f.horizon(), H);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < L; ++j) EXPECT_NEAR(f.weights()[static_cast<size_t>(h * (L + 1) + j)], W[static_cast<size_t>(h * L + j)], 1e-5);
    EXPECT_NEAR(f.weights()[static_cast<size_t>(h * (L + 1) + L)], b[static_cast<size_t>(h)], 1e-5);
  }
  const std::vector<float> p = f.predict(xs[0]);
  for (int64_t h = 0; h < H; ++h) EXPECT_NEAR(p[static_cast<size_t>(h)], ys[0][static_cast<size_t>(h)], 1e-4);
  // a ridge shrinks the weights; the same data gives the same bits
  const LinearForecaster r = LinearForecaster::fit(xs, ys, 1000.0);
  double nw = 0, nr = 0;
  for (int64_t k = 0; k < H * (L + 1); ++k)
    if (k % (L + 1) != L) nw += std::pow(f.weights()[static_cast<size_t>(k)], 2), nr += std::pow(r.weights()[static_cast<size_t>(k)], 2);
  EXPECT_LT(nr, 0.8 * nw);
  EXPECT_EQ(LinearForecaster::fit(xs, ys, 0.0).weights(), f.weights());
  EXPECT_TRUE(std::isnan(f.predict(xs[5])[0]));
  EXPECT_THROW(f.predict(std::vector<float>(L - 1)), Error);
}

TEST(LinearForecaster, RefusesWhatItCannotFit) {
  // every context 0: the weights' columns of the normal equations are 0, a zero pivot without a ridge
  std::vector<std::vector<float>> xs(10, std::vector<float>{0, 0}), ys(10, std::vector<float>{2});
  EXPECT_TRUE(one_line_error([&] { LinearForecaster::fit(xs, ys, 0.0); }, {"singular", "ridge"}));
  EXPECT_NO_THROW(LinearForecaster::fit(xs, ys, 0.1));
  EXPECT_TRUE(one_line_error([&] { LinearForecaster::fit(xs, ys, -1.0); }, {"ridge -1"}));
  std::vector<std::vector<float>> nan_xs(3, std::vector<float>{NAN, 1});
  EXPECT_TRUE(one_line_error([&] { LinearForecaster::fit(nan_xs, std::vector<std::vector<float>>(3, {1}), 1.0); },
                             {"no training window without missing values"}));
}

// AR(2) with noise: x_t = 0.5 x_{t-1} - 0.4 x_{t-2} + e_t. The best linear forecast beats repeat-last
// by a wide margin; the fitted one, trained on the first 4,000 steps, gets close on the last 1,000.
TEST(LinearForecaster, BeatsRepeatLastOnANoisyArSeries) {
  constexpr int64_t T = 5000, L = 16, H = 4;
  SeriesTable t;
  t.names = {"x"};
  t.missing = {0};
  std::vector<float> x(T);
  double a = 0, b = 0;
  for (int64_t i = 0; i < T; ++i) {
    const double v = 0.5 * a - 0.4 * b + rng_normal(42, 0, static_cast<uint64_t>(i));
    x[static_cast<size_t>(i)] = static_cast<float>(v);
    b = a;
    a = v;
  }
  t.columns = {x};
  const LinearForecaster f = LinearForecaster::fit(WindowIndex(t, {0, 4000}, L, H), 1e-3);
  const WindowIndex test_w(t, {4000 - L, T}, L, H);
  ForecastAccumulator lin, last;
  std::vector<float> ctx(L), fut(H);
  for (int64_t i = 0; i < test_w.size(); ++i) {
    test_w.fill(i, ctx, fut);
    lin.add(f.predict(ctx), fut);
    last.add(repeat_last(ctx, H), fut);
  }
  const ForecastMetrics ml = lin.metrics(), mr = last.metrics();
  EXPECT_EQ(ml.count, (1000 - H + 1) * H);
  // horizon-averaged optimal MSE of this AR(2) is about 1.22 (noise variance 1); repeat-last is far worse
  EXPECT_LT(ml.mse, 1.35);
  EXPECT_LT(ml.mse, 0.7 * mr.mse) << "linear " << ml.mse << " repeat-last " << mr.mse;
  // the first-step coefficients approach the AR coefficients (context order is oldest first)
  EXPECT_NEAR(f.weights()[L - 1], 0.5, 0.06);
  EXPECT_NEAR(f.weights()[L - 2], -0.4, 0.06);
}

// The ridge-fitted linear map on ETTh1 (scaled, channel-independent, L=336, H=96) lands where DLinear
// does in the literature (test MSE about 0.37 to 0.39) and far below repeat-last.
TEST(LinearForecaster, Etth1TestMseNearDLinear) {
  const std::string etth1 = etth1_path();
  if (etth1.empty()) GTEST_SKIP() << "ETTh1.csv is not in ../shared/data/ETT";
  constexpr int64_t L = 336, H = 96;
  SeriesTable t = read_series_csv(etth1);
  const EttSplits s = ett_hourly_splits(t.rows(), L);
  StandardScaler::fit(t, s.train.begin, s.train.end).apply(t);
  const LinearForecaster f = LinearForecaster::fit(WindowIndex(t, s.train, L, H), 1.0);
  const WindowIndex test_w(t, s.test, L, H);
  ForecastAccumulator lin, last;
  std::vector<float> ctx(L), fut(H);
  for (int64_t i = 0; i < test_w.size(); ++i) {
    test_w.fill(i, ctx, fut);
    lin.add(f.predict(ctx), fut);
    last.add(repeat_last(ctx, H), fut);
  }
  const ForecastMetrics ml = lin.metrics(), mr = last.metrics();
  RecordProperty("linear_mse", std::to_string(ml.mse));
  std::printf("ETTh1 L=%lld H=%lld test: linear mse %.4f mae %.4f, repeat-last mse %.4f mae %.4f\n",
              static_cast<long long>(L), static_cast<long long>(H), ml.mse, ml.mae, mr.mse, mr.mae);
  EXPECT_EQ(ml.count, 7 * (2880 - H + 1) * H);
  EXPECT_LT(ml.mse, 0.42);
  EXPECT_LT(ml.mse, 0.5 * mr.mse);
}

}  // namespace
}  // namespace lmf
