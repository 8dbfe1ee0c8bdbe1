// --profile: the Chrome trace (core/trace.h) of a real CPU training run through the Trainer API,
// write_chrome_trace on synthetic records with device times, the summary, and bad options.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <vector>

#include "core/check.h"
#include "core/profiler.h"
#include "core/trace.h"
#include "support/test_util.h"
#include "core/fsutil.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

TrainOptions profiled_run(const std::string& out_dir) {
  TrainOptions o;
  o.preset = "tiny";
  o.batch_size = 2;
  o.seq_len = 16;
  o.steps = 8;
  o.log_every = 100;
  o.eval_batches = 1;
  o.out_dir = out_dir;
  o.progress = false;
  o.save_final_checkpoint = false;
  o.device = "cpu";  // the CPU fp32 path's op names, also on a machine with a GPU
  o.profile = true;
  o.profile_warmup = 2;
  o.profile_steps = 3;
  return o;
}

// Every "X" event carries the fields a trace viewer needs.
::testing::AssertionResult well_formed_slices(const json& events) {
  for (const json& e : events) {
    if (e.value("ph", "") != "X") continue;
    for (const char* key : {"name", "ts", "dur", "pid", "tid"})
      if (!e.contains(key)) return ::testing::AssertionFailure() << "X event without '" << key << "': " << e.dump();
    if (!(e["dur"].get<double>() >= 0)) return ::testing::AssertionFailure() << "negative dur: " << e.dump();
  }
  return ::testing::AssertionSuccess();
}

TEST(Trace, CpuTrainingRunWritesAChromeTrace) {
  const std::string d = test::make_temp_dir("trace");
  std::ostringstream log;
  {
    Trainer t(profiled_run(d), log);
    t.run();
    EXPECT_EQ(t.step_count(), 8);
  }
  const json doc = json::parse(read_file(d + "/trace.json", "trace"));
  ASSERT_TRUE(doc.contains("traceEvents"));
  const json& ev = doc["traceEvents"];
  ASSERT_TRUE(ev.is_array());
  EXPECT_EQ(doc.value("displayTimeUnit", ""), "ms");
  EXPECT_TRUE(well_formed_slices(ev));

  std::map<std::string, double> host_ms;  // per op name, over the profiled steps
  std::map<int64_t, std::vector<std::pair<double, double>>> ops_by_step;  // step -> [begin, end) us
  std::map<int64_t, std::pair<double, double>> step_span;                  // step -> [begin, end) us
  std::set<std::string> step_names;
  int memory_counters = 0, device_slices = 0;
  for (const json& e : ev) {
    const std::string ph = e.value("ph", "");
    if (ph == "C" && e.value("name", "") == "memory") memory_counters++;
    if (ph != "X") continue;
    const int tid = e["tid"].get<int>();
    const double ms = e["dur"].get<double>() / 1e3;
    if (tid == 1) {
      host_ms[e["name"].get<std::string>()] += ms;
      ASSERT_TRUE(e["args"].contains("flops") && e["args"].contains("bytes") && e["args"].contains("step")) << e.dump();
      const double ts = e["ts"].get<double>();
      ops_by_step[e["args"]["step"].get<int64_t>()].emplace_back(ts, ts + e["dur"].get<double>());
    } else if (tid == 2) {
      device_slices++;
    } else if (tid == 3) {
      step_names.insert(e["name"].get<std::string>());
      const double ts = e["ts"].get<double>();
      step_span[e["args"]["step"].get<int64_t>()] = {ts, ts + e["dur"].get<double>()};
    }
  }
  for (const char* op : {"linear qkv fwd", "attention fwd", "linear qkv bwd", "lm_head + cross-entropy fwd+bwd",
                         "grad norm + AdamW"})
    EXPECT_TRUE(host_ms.count(op)) << "no host slice for '" << op << "'";
  // Steps 3, 4, 5 (1-based, as in the log): 2 warm-up steps, then 3 profiled.
  EXPECT_EQ(step_names, (std::set<std::string>{"step 3", "step 4", "step 5"}));
  EXPECT_EQ(memory_counters, 3);
  EXPECT_EQ(device_slices, 0) << "a CPU run has no device track";
  // Each step slice spans exactly its first op's start to its last op's end, and the op scopes
  // run one after another inside it (no overlap, so their sum never exceeds the step). These are
  // structural facts of the trace; how much of the step the ops cover depends on machine load,
  // so it is not asserted.
  ASSERT_EQ(ops_by_step.size(), step_span.size());
  for (auto& [step, ops] : ops_by_step) {
    ASSERT_TRUE(step_span.count(step)) << "ops of step " << step << " but no step slice";
    std::sort(ops.begin(), ops.end());
    const auto [b, e] = step_span[step];
    const double tol = 1e-3 * std::max(1.0, e - b);  // ts + dur round-trips through doubles
    EXPECT_NEAR(ops.front().first, b, tol) << "step " << step;
    double last_end = ops.front().first, sum = 0;
    for (const auto& [ob, oe] : ops) {
      EXPECT_GE(ob, last_end - tol) << "overlapping op scopes in step " << step;
      EXPECT_LE(oe, e + tol) << "op ends after its step slice, step " << step;
      last_end = std::max(last_end, oe);
      sum += oe - ob;
    }
    EXPECT_NEAR(last_end, e, tol) << "step " << step;
    EXPECT_LE(sum, e - b + tol) << "step " << step;
  }

  // The summary (in the log) names the slowest op on its first table row.
  std::string top;
  double top_ms = -1;
  for (const auto& [name, ms] : host_ms)
    if (ms > top_ms) top = name, top_ms = ms;
  const std::string text = log.str();
  const size_t header = text.find("op ");
  ASSERT_NE(header, std::string::npos) << text;
  const size_t first_row = text.find('\n', header) + 1;
  EXPECT_EQ(text.compare(first_row, top.size(), top), 0) << "top op '" << top << "' not first in:\n" << text;
  EXPECT_NE(text.find("trace " + d + "/trace.json"), std::string::npos) << text;
  EXPECT_FALSE(fs::exists(d + "/trace.json.tmp"));
  fs::remove_all(d);
}

TEST(Trace, ProfileOutAndProfilingOffWriteWhereAsked) {
  const std::string d = test::make_temp_dir("trace_out");
  std::ostringstream log;
  TrainOptions o = profiled_run(d);
  o.profile_out = d + "/sub/my_trace.json";
  o.profile_steps = 10;  // more than the run has left: clipped to steps 3..8
  Trainer(o, log).run();
  const json doc = json::parse(read_file(o.profile_out, "trace"));
  int steps = 0;
  for (const json& e : doc["traceEvents"]) steps += e.value("tid", 0) == 3 && e.value("ph", "") == "X";
  EXPECT_EQ(steps, 6);
  EXPECT_FALSE(fs::exists(d + "/trace.json"));

  o = profiled_run(d + "/off");
  o.profile = false;
  Trainer(o, log).run();
  EXPECT_FALSE(fs::exists(d + "/off/trace.json"));
  fs::remove_all(d);
}

TEST(Trace, BadProfileOptionsNameTheFlag) {
  const std::string d = test::make_temp_dir("trace_bad");
  std::ostringstream log;
  auto message = [&](TrainOptions o) -> std::string {
    try {
      Trainer t(o, log);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  TrainOptions o = profiled_run(d);
  o.profile_steps = 0;
  EXPECT_NE(message(o).find("--profile-steps=0"), std::string::npos) << message(o);
  o = profiled_run(d);
  o.profile_warmup = -1;
  EXPECT_NE(message(o).find("--profile-warmup=-1"), std::string::npos) << message(o);
  o = profiled_run(d);
  o.steps = 2;  // nothing left after the 2 warm-up steps
  EXPECT_NE(message(o).find("--profile"), std::string::npos) << message(o);
  fs::remove_all(d);
}

// Two steps of three ops with device times, as a GPU profiler would collect them.
std::vector<OpProfiler::Record> synthetic_records() {
  std::vector<OpProfiler::Record> recs;
  for (int64_t s = 0; s < 2; ++s) {
    const double t = 1000.0 * static_cast<double>(s);
    recs.push_back({"gemm", s, 2e9, 0, t + 0, t + 10, true, t + 20, t + 420});
    recs.push_back({"copy", s, 0, 4e8, t + 10, t + 15, true, t + 420, t + 620});
    recs.push_back({"grad norm + AdamW", s, 0, 0, t + 15, t + 18, true, t + 620, t + 720});
  }
  return recs;
}

TEST(Trace, SyntheticDeviceRecordsGetADeviceTrack) {
  const std::string d = test::make_temp_dir("trace_syn");
  TraceInfo info;
  info.device = "NVIDIA H200";
  info.precision = "bf16";
  info.first_step = 11;
  info.allocated_gb = 1.5;
  info.ceilings = {500.0, 4000.0};
  const std::string path = d + "/t.json";
  write_chrome_trace(path, synthetic_records(), info);
  const json doc = json::parse(read_file(path, "trace"));
  EXPECT_TRUE(well_formed_slices(doc["traceEvents"]));
  bool named_device_track = false;
  int host = 0, device = 0;
  std::vector<json> steps;
  for (const json& e : doc["traceEvents"]) {
    if (e["ph"] == "M" && e["name"] == "thread_name" && e["tid"] == 2)
      named_device_track = e["args"]["name"] == "GPU (CUDA events)";
    if (e["ph"] != "X") continue;
    if (e["tid"] == 1) host++;
    if (e["tid"] == 2) {
      device++;
      if (e["name"] == "gemm" && e["args"]["step"] == 11) {
        EXPECT_DOUBLE_EQ(e["ts"].get<double>(), 20);
        EXPECT_DOUBLE_EQ(e["dur"].get<double>(), 400);
        EXPECT_DOUBLE_EQ(e["args"]["flops"].get<double>(), 2e9);
      }
    }
    if (e["tid"] == 3) steps.push_back(e);
  }
  EXPECT_TRUE(named_device_track);
  EXPECT_EQ(host, 6);
  EXPECT_EQ(device, 6);
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0]["name"], "step 11");
  EXPECT_EQ(steps[1]["name"], "step 12");
  // A step spans its first host begin to its last device end.
  EXPECT_DOUBLE_EQ(steps[0]["ts"].get<double>(), 0);
  EXPECT_DOUBLE_EQ(steps[0]["dur"].get<double>(), 720);
  EXPECT_EQ(doc["otherData"]["device"], "NVIDIA H200");

  // Summary: device times; gemm 2 GFLOP in 0.4 ms = 5 TFLOP/s = 1% of 500; copy 0.4 GB in 0.2 ms
  // = 2000 GB/s = 50% of 4000.
  const std::string sum = profile_summary(synthetic_records(), 2, 0.8, info.ceilings);
  EXPECT_NE(sum.find("gemm"), std::string::npos) << sum;
  EXPECT_NE(sum.find("5.000"), std::string::npos) << sum;
  EXPECT_NE(sum.find("1.0%"), std::string::npos) << sum;
  EXPECT_NE(sum.find("2000.0"), std::string::npos) << sum;
  EXPECT_NE(sum.find("50.0%"), std::string::npos) << sum;
  EXPECT_LT(sum.find("\ngemm "), sum.find("\ncopy ")) << "slowest first:\n" << sum;
  EXPECT_NE(sum.find("\ncopy "), std::string::npos) << sum;
  const std::string unknown = profile_summary(synthetic_records(), 2, 0, Ceilings{});
  EXPECT_NE(unknown.find("n/a"), std::string::npos) << unknown;
  EXPECT_EQ(unknown.find("50.0%"), std::string::npos) << unknown;
  fs::remove_all(d);
}

TEST(Trace, UnwritablePathIsAnErrorNamingIt) {
  const std::string d = test::make_temp_dir("trace_bad_path");
  write_file_atomic(d + "/file", "x");
  try {
    write_chrome_trace(d + "/file/t.json", synthetic_records(), TraceInfo{});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(d + "/file"), std::string::npos) << e.what();
  }
  fs::remove_all(d);
}

// The profiler on the CPU: one record per scope per collected step, nested scopes included,
// host times increasing, rows() still the aggregate.
TEST(Trace, CpuProfilerKeepsRecordsPerStep) {
  OpProfiler p(Device::cpu, 16, 2);
  for (int s = 0; s < 2; ++s) {
    {
      ProfileScope outer(&p, "outer", 10);
      ProfileScope inner(&p, "inner", 0, 20);
    }
    p.collect();
  }
  ASSERT_EQ(p.records().size(), 4u);
  EXPECT_EQ(p.steps_collected(), 2);
  EXPECT_STREQ(p.records()[0].name, "outer");
  EXPECT_EQ(p.records()[2].step, 1);
  for (const auto& r : p.records()) {
    EXPECT_FALSE(r.has_device);
    EXPECT_GE(r.host_end_us, r.host_begin_us);
  }
  EXPECT_LE(p.records()[0].host_begin_us, p.records()[1].host_begin_us);
  EXPECT_GE(p.records()[0].host_end_us, p.records()[1].host_end_us);
  EXPECT_GE(p.records()[2].host_begin_us, p.records()[1].host_end_us);
  ASSERT_EQ(p.rows().size(), 2u);
  EXPECT_EQ(p.rows()[0].calls, 2);
  EXPECT_EQ(p.rows()[1].bytes, 20);
}

}  // namespace
}  // namespace lmf
