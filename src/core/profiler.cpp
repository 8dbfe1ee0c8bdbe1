#include "core/profiler.h"

#include <chrono>

#include "core/device.h"

namespace lmf {

namespace {
int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

OpProfiler::OpProfiler(Device device, size_t max_scopes, size_t reserve_steps)
    : device_(device), origin_ns_(steady_ns()) {
  scopes_.reserve(max_scopes);
  open_.reserve(64);
  records_.reserve(max_scopes * reserve_steps);
  if (device_ == Device::cuda) events_ = cuda_event_pool_create(2 * max_scopes + 1);
}

OpProfiler::~OpProfiler() {
  if (!events_.empty()) cuda_event_pool_destroy(events_);
}

double OpProfiler::now_us() const { return static_cast<double>(steady_ns() - origin_ns_) / 1e3; }

void OpProfiler::begin(const char* name, double flops, double bytes) {
  LMF_CHECK(scopes_.size() < scopes_.capacity(), "profiler: more than ", scopes_.capacity(), " scopes in one step");
  Scope s{name, flops, bytes, 0, 0, 0, 0};
  if (device_ == Device::cuda) {
    if (scopes_.empty()) {  // the step's anchor: one event and the host time beside it
      cuda_event_record(events_.back());
      anchor_host_us_ = now_us();
    }
    s.t0 = now_us();
    s.ev0 = next_event_++;
    cuda_event_record(events_[s.ev0]);
  } else {
    s.t0 = now_us();
  }
  open_.push_back(scopes_.size());
  scopes_.push_back(s);
}

void OpProfiler::end() {
  LMF_CHECK(!open_.empty(), "profiler: end() without begin()");
  Scope& s = scopes_[open_.back()];
  open_.pop_back();
  if (device_ == Device::cuda) {
    s.ev1 = next_event_++;
    cuda_event_record(events_[s.ev1]);
  }
  s.t1 = now_us();
}

void OpProfiler::collect() {
  LMF_CHECK(open_.empty(), "profiler: collect() inside an open scope");
  if (device_ == Device::cuda) device_synchronize();
  for (const Scope& s : scopes_) {
    Record rec{s.name, steps_, s.flops, s.bytes, s.t0, s.t1, false, 0, 0};
    if (device_ == Device::cuda) {
      rec.has_device = true;
      rec.dev_begin_us = anchor_host_us_ + 1e3 * cuda_event_elapsed_ms(events_.back(), events_[s.ev0]);
      rec.dev_end_us = anchor_host_us_ + 1e3 * cuda_event_elapsed_ms(events_.back(), events_[s.ev1]);
    }
    records_.push_back(rec);
    Row* row = nullptr;
    for (Row& r : rows_)
      if (r.name == s.name) row = &r;
    if (!row) {
      rows_.push_back({s.name, 0, 0, s.flops, s.bytes});
      row = &rows_.back();
    }
    row->ms += rec.ms();
    row->calls++;
  }
  scopes_.clear();
  next_event_ = 0;
  steps_++;
}

}  // namespace lmf
