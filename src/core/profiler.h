// profiler.h: time per op, on the CPU (steady clock) or the GPU (CUDA events on lmforge's stream).
//
// The model brackets each op call with a ProfileScope when a profiler is attached; with none
// attached a scope costs one branch. Events come from a pool created with the profiler, so
// profiling allocates nothing per op. collect() waits for the device once and adds each scope's
// time to its name's total; rows() lists names in first-seen order.
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

  explicit OpProfiler(Device device, size_t max_scopes_per_step = 4096);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  void begin(const char* name, double flops = 0, double bytes = 0);
  void end();
  // Waits for the recorded work, adds the scopes' times to the totals, and starts a new step.
  void collect();
  const std::vector<Row>& rows() const { return rows_; }
  void reset() { rows_.clear(); }

 private:
  struct Scope {
    const char* name;
    double flops, bytes;
    size_t ev0, ev1;
    double t0, t1;
  };
  Device device_;
  std::vector<void*> events_;  // cudaEvent_t pool (GPU)
  std::vector<Scope> scopes_;
  std::vector<size_t> open_;
  size_t next_event_ = 0;
  std::vector<Row> rows_;
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
