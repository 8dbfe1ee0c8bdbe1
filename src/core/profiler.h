// profiler.h: time per op, on the CPU (steady clock) or the GPU (CUDA events on lmforge's stream).
//
// The model brackets each op call with a ProfileScope when a profiler is attached; with none
// attached a scope costs one branch. Events come from a pool created with the profiler, so
// profiling allocates nothing per op. collect() waits for the device once and adds each scope's
// time to its name's total; rows() lists names in first-seen order.
//
// Besides the totals, collect() keeps one Record per scope of every collected step (records(),
// for the Chrome trace of core/trace.h). Time base: microseconds since the profiler was
// constructed, on the host's steady clock. Host begin/end are when the scope opened and closed
// on the host (on the GPU: when its work was enqueued). Device begin/end (GPU only) come from the
// CUDA events, placed on the same time base through an anchor: the first scope of a step records
// one extra event and the host time next to it, and device_t = anchor_host + elapsed(anchor, ev).
// The alignment is exact when the stream is idle at the anchor (the trainer synchronises before
// a profiled step); with work still queued the device track is drawn early by the backlog.
//
// Scope names are not copied: they must outlive the profiler (the model passes string literals).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace lmf {

class OpProfiler {
 public:
  struct Row {
    std::string name;
    double ms = 0;      // total over all collected steps
    int64_t calls = 0;
    double flops = 0;   // per call, 0 when unknown
    double bytes = 0;   // per call, 0 when unknown
  };
  // One scope of one collected step. Times in microseconds on the profiler's time base.
  struct Record {
    const char* name = "";
    int64_t step = 0;        // index of the collected step (0 = the first collect())
    double flops = 0, bytes = 0;
    double host_begin_us = 0, host_end_us = 0;
    bool has_device = false;  // device times below are valid (GPU profiler)
    double dev_begin_us = 0, dev_end_us = 0;
    double host_ms() const { return (host_end_us - host_begin_us) / 1e3; }
    // The op's time: device time on the GPU, host time on the CPU.
    double ms() const { return (has_device ? dev_end_us - dev_begin_us : host_end_us - host_begin_us) / 1e3; }
  };

  // reserve_steps: records for this many collected steps of max_scopes_per_step are reserved up
  // front, so collecting them allocates nothing (more steps still work; the vector grows).
  explicit OpProfiler(Device device, size_t max_scopes_per_step = 4096, size_t reserve_steps = 0);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  void begin(const char* name, double flops = 0, double bytes = 0);
  void end();
  // Waits for the recorded work, adds the scopes' times to the totals and the scopes to the
  // records, and starts a new step.
  void collect();
  const std::vector<Row>& rows() const { return rows_; }
  // Records of every collected step, in collection order (by step, then scope begin order).
  const std::vector<Record>& records() const { return records_; }
  int64_t steps_collected() const { return steps_; }
  void reset() {
    rows_.clear();
    records_.clear();
    steps_ = 0;
  }
  Device device() const { return device_; }

 private:
  struct Scope {
    const char* name;
    double flops, bytes;
    size_t ev0, ev1;
    double t0, t1;  // host, microseconds on the profiler's time base
  };
  double now_us() const;

  Device device_;
  int64_t origin_ns_ = 0;      // steady_clock time of construction
  std::vector<void*> events_;  // cudaEvent_t pool (GPU): 2 per scope + the step's anchor (last)
  std::vector<Scope> scopes_;
  std::vector<size_t> open_;
  size_t next_event_ = 0;
  double anchor_host_us_ = 0;  // host time at the anchor event of the current step (GPU)
  std::vector<Row> rows_;
  std::vector<Record> records_;
  int64_t steps_ = 0;
};

class ProfileScope {
 public:
  ProfileScope(OpProfiler* p, const char* name, double flops = 0, double bytes = 0) : p_(p) {
    if (p_) p_->begin(name, flops, bytes);
  }
  ~ProfileScope() {
    if (p_) p_->end();
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  OpProfiler* p_;
};

}  // namespace lmf
