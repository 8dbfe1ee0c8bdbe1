#include "core/trace.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/check.h"

namespace lmf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kPid = 1, kTidHost = 1, kTidDevice = 2, kTidSteps = 3;

json meta(const char* what, int tid, const json& args) {
  return {{"name", what}, {"ph", "M"}, {"pid", kPid}, {"tid", tid}, {"args", args}};
}

json slice(const std::string& name, const char* cat, double ts, double dur, int tid, json args) {
  return {{"name", name}, {"cat", cat}, {"ph", "X"}, {"ts", ts}, {"dur", std::max(0.0, dur)},
          {"pid", kPid}, {"tid", tid}, {"args", std::move(args)}};
}

struct StepSpan {
  double begin = 0, end = 0;
  bool seen = false;
};

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

}  // namespace

void write_chrome_trace(const std::string& path, const std::vector<OpProfiler::Record>& recs, const TraceInfo& info) {
  json events = json::array();
  const bool device = std::any_of(recs.begin(), recs.end(), [](const auto& r) { return r.has_device; });
  events.push_back(meta("process_name", 0, {{"name", "lmforge train (" + info.device + ", " + info.precision + ")"}}));
  events.push_back(meta("thread_name", kTidHost, {{"name", "host ops"}}));
  events.push_back(meta("thread_sort_index", kTidHost, {{"sort_index", kTidHost}}));
  if (device) {
    events.push_back(meta("thread_name", kTidDevice, {{"name", "GPU (CUDA events)"}}));
    events.push_back(meta("thread_sort_index", kTidDevice, {{"sort_index", kTidDevice}}));
  }
  events.push_back(meta("thread_name", kTidSteps, {{"name", "steps"}}));
  events.push_back(meta("thread_sort_index", kTidSteps, {{"sort_index", kTidSteps}}));

  std::map<int64_t, StepSpan> steps;
  for (const auto& r : recs) {
    json args = {{"flops", r.flops}, {"bytes", r.bytes}, {"step", info.first_step + r.step}};
    events.push_back(slice(r.name, "op", r.host_begin_us, r.host_end_us - r.host_begin_us, kTidHost, args));
    double end = r.host_end_us;
    if (r.has_device) {
      events.push_back(slice(r.name, "gpu", r.dev_begin_us, r.dev_end_us - r.dev_begin_us, kTidDevice, args));
      end = std::max(end, r.dev_end_us);
    }
    StepSpan& s = steps[r.step];
    s.begin = s.seen ? std::min(s.begin, r.host_begin_us) : r.host_begin_us;
    s.end = s.seen ? std::max(s.end, end) : end;
    s.seen = true;
  }
  for (const auto& [step, s] : steps) {
    const int64_t n = info.first_step + step;
    events.push_back(slice("step " + std::to_string(n), "step", s.begin, s.end - s.begin, kTidSteps, {{"step", n}}));
    events.push_back({{"name", "memory"}, {"ph", "C"}, {"pid", kPid}, {"ts", s.begin},
                      {"args", {{"allocated_gb", info.allocated_gb}}}});
  }

  json doc = {{"traceEvents", std::move(events)},
              {"displayTimeUnit", "ms"},
              {"otherData", {{"producer", "lmforge"}, {"device", info.device}, {"precision", info.precision},
                             {"first_step", info.first_step}, {"steps", static_cast<int64_t>(steps.size())},
                             {"step_ms", info.step_ms}, {"allocated_gb", info.allocated_gb},
                             {"gemm_tflops_ceiling", info.ceilings.gemm_tflops},
                             {"copy_gbps_ceiling", info.ceilings.copy_gbps},
                             {"time_base", "microseconds since the profiler was created (host steady clock)"}}}};

  const fs::path target(path);
  if (target.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(target.parent_path(), ec);
    if (ec) fail(path, ": cannot create the trace's directory (", ec.message(), ")");
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(tmp, ": cannot open for writing the trace");
    f << doc.dump() << "\n";
    f.flush();
    if (!f) fail(tmp, ": write failed (disk full?)");
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(path, ": cannot write the trace (rename failed)");
  }
}

std::string profile_summary(const std::vector<OpProfiler::Record>& recs, int64_t steps, double step_ms,
                            const Ceilings& c, size_t top) {
  struct Agg {
    std::string name;
    double ms = 0, flops = 0, bytes = 0;
    int64_t calls = 0;
  };
  std::vector<Agg> ops;  // first-seen order, then sorted by time
  double total = 0;
  for (const auto& r : recs) {
    auto it = std::find_if(ops.begin(), ops.end(), [&](const Agg& a) { return a.name == r.name; });
    if (it == ops.end()) it = ops.insert(ops.end(), Agg{r.name});
    it->ms += r.ms();
    it->flops += r.flops;
    it->bytes += r.bytes;
    it->calls++;
    total += r.ms();
  }
  std::stable_sort(ops.begin(), ops.end(), [](const Agg& a, const Agg& b) { return a.ms > b.ms; });
  const double n = static_cast<double>(std::max<int64_t>(1, steps));

  std::string out = "profile: " + std::to_string(steps) + " steps, ops sum " + fmt("%.3f", total / n) + " ms/step";
  if (step_ms > 0) out += ", step " + fmt("%.3f", step_ms) + " ms (ops cover " + fmt("%.1f", 100 * total / n / step_ms) + "%)";
  out += "\nceilings: GEMM " + (c.gemm_tflops > 0 ? fmt("%.1f", c.gemm_tflops) + " TFLOP/s" : std::string("n/a")) +
         ", copy " + (c.copy_gbps > 0 ? fmt("%.0f", c.copy_gbps) + " GB/s" : std::string("n/a")) + "\n";
  char line[256];
  std::snprintf(line, sizeof(line), "%-34s %10s %7s %7s %9s %9s %8s %8s\n", "op", "ms/step", "share", "calls",
                "TFLOP/s", "GB/s", "%gemm", "%copy");
  out += line;
  auto rate_cols = [&](double ms, double flops, double bytes, std::string cols[4]) {
    const double s = ms / 1e3;
    const double tf = flops > 0 && s > 0 ? flops / s / 1e12 : 0, gb = bytes > 0 && s > 0 ? bytes / s / 1e9 : 0;
    cols[0] = tf > 0 ? fmt("%.3f", tf) : "-";
    cols[1] = gb > 0 ? fmt("%.1f", gb) : "-";
    cols[2] = tf > 0 && c.gemm_tflops > 0 ? fmt("%.1f%%", 100 * tf / c.gemm_tflops) : "n/a";
    cols[3] = gb > 0 && c.copy_gbps > 0 ? fmt("%.1f%%", 100 * gb / c.copy_gbps) : "n/a";
  };
  Agg rest{"(other ops)"};
  for (size_t i = 0; i < ops.size(); ++i) {
    if (i >= top) {
      rest.ms += ops[i].ms;
      rest.calls += ops[i].calls;
      continue;
    }
    const Agg& a = ops[i];
    std::string cols[4];
    rate_cols(a.ms, a.flops, a.bytes, cols);
    std::snprintf(line, sizeof(line), "%-34s %10.3f %6.1f%% %7.0f %9s %9s %8s %8s\n", a.name.c_str(), a.ms / n,
                  total > 0 ? 100 * a.ms / total : 0.0, static_cast<double>(a.calls) / n, cols[0].c_str(),
                  cols[1].c_str(), cols[2].c_str(), cols[3].c_str());
    out += line;
  }
  if (rest.calls > 0) {
    std::snprintf(line, sizeof(line), "%-34s %10.3f %6.1f%% %7.0f %9s %9s %8s %8s\n", rest.name.c_str(), rest.ms / n,
                  total > 0 ? 100 * rest.ms / total : 0.0, static_cast<double>(rest.calls) / n, "-", "-", "n/a", "n/a");
    out += line;
  }
  return out;
}

}  // namespace lmf
