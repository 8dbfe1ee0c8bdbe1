// trace.h: a profiled run as a Chrome trace (chrome://tracing, ui.perfetto.dev; the "Trace Event
// Format" JSON) and as a text summary.
//
// Trace layout, all in process 1, timestamps in microseconds on the profiler's time base:
//   tid 1 "host ops"           one complete ("X") slice per op scope, host begin..end;
//                              args {flops, bytes, step}
//   tid 2 "GPU (CUDA events)"  the same ops on the device clock (only when the records have
//                              device times)
//   tid 3 "steps"              one "X" slice "step N" per collected step: from its first op's
//                              begin to its last op's end (device end when later than the host's)
//   counter "memory"           one "C" event per step: allocated GB (TraceInfo::allocated_gb)
// Records come from OpProfiler::records(); nothing here touches a device.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/profiler.h"

namespace lmf {

// Measured or known ceilings for the summary's "% of ceiling" columns; 0 = unknown (n/a).
struct Ceilings {
  double gemm_tflops = 0;  // dense GEMM TFLOP/s at the run's precision
  double copy_gbps = 0;    // device memory bandwidth, bytes read + written per second / 1e9
};

struct TraceInfo {
  std::string device = "cpu";  // "cpu" or the GPU's name
  std::string precision = "fp32";
  int64_t first_step = 0;      // training step number of the records' step 0 (names "step N")
  double allocated_gb = 0;     // memory the run holds (the model's arenas; on a GPU the peak allocated)
  double step_ms = 0;          // measured wall time per profiled step (0 = not measured)
  Ceilings ceilings;
};

// Writes the trace JSON to `path` atomically (a temporary file beside it, then a rename).
// Throws lmf::Error naming the path when it cannot be written.
void write_chrome_trace(const std::string& path, const std::vector<OpProfiler::Record>& recs, const TraceInfo& info);

// Per-op table, slowest first (at most `top` rows, the rest summed as one line): ms/step, share
// of the ops' total, calls/step, achieved TFLOP/s and GB/s (from the records' flops and bytes),
// and each as a percentage of the ceiling (n/a when the ceiling is 0 or the op's count unknown).
// An op's time is its device time when the records have one, else its host time. `steps` is the
// number of collected steps, `step_ms` the measured time per step (0 = not shown).
std::string profile_summary(const std::vector<OpProfiler::Record>& recs, int64_t steps, double step_ms,
                            const Ceilings& ceilings, size_t top = 15);

}  // namespace lmf
