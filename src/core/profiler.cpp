#include "core/profiler.h"

#include <chrono>

#include "core/device.h"

namespace lmf {

namespace {
double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

OpProfiler::OpProfiler(Device device, size_t max_scopes) : device_(device) {
  scopes_.reserve(max_scopes);
  open_.reserve(64);
  if (device_ == Device::cuda) events_ = cuda_event_pool_create(2 * max_scopes);
}

OpProfiler::~OpProfiler() {
  if (!events_.empty()) cuda_event_pool_destroy(events_);
}

void OpProfiler::begin(const char* name, double flops, double bytes) {
  LMF_CHECK(scopes_.size() < scopes_.capacity(), "profiler: more than ", scopes_.capacity(), " scopes in one step");
  Scope s{name, flops, bytes, 0, 0, 0, 0};
  if (device_ == Device::cuda) {
    s.ev0 = next_event_++;
    cuda_event_record(events_[s.ev0]);
  } else {
    s.t0 = now_ms();
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
  } else {
    s.t1 = now_ms();
  }
}

void OpProfiler::collect() {
  LMF_CHECK(open_.empty(), "profiler: collect() inside an open scope");
  if (device_ == Device::cuda) device_synchronize();
  for (const Scope& s : scopes_) {
    double ms = device_ == Device::cuda ? cuda_event_elapsed_ms(events_[s.ev0], events_[s.ev1]) : s.t1 - s.t0;
    Row* row = nullptr;
    for (Row& r : rows_)
      if (r.name == s.name) row = &r;
    if (!row) {
      rows_.push_back({s.name, 0, 0, s.flops, s.bytes});
      row = &rows_.back();
    }
    row->ms += ms;
    row->calls++;
  }
  scopes_.clear();
  next_event_ = 0;
}

}  // namespace lmf
