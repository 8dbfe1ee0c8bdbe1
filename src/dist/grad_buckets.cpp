#include "dist/grad_buckets.h"

#include <algorithm>

#include "core/check.h"
#include "core/device.h"

namespace lmf {

GradBuckets::GradBuckets(Tensor grads, Communicator& comm, int64_t bucket_elems, int64_t max_buckets)
    : grads_(grads),
      comm_(comm),
      gpu_(grads.device == Device::cuda),
      bucket_elems_(bucket_elems),
      max_buckets_(static_cast<size_t>(std::max<int64_t>(max_buckets, 1))) {
  LMF_CHECK(grads.dtype == DType::f32 && grads.ndim == 1, "GradBuckets: the gradients must be one flat f32 tensor ('",
            grads.name, "')");
  LMF_CHECK(bucket_elems >= 0 && max_buckets >= 1, "GradBuckets: bucket size ", bucket_elems, ", at most ",
            max_buckets, " buckets");
  sent_.reserve(max_buckets_);  // a step allocates nothing
  if (gpu_) {
    side_ = cuda_side_stream_create();
    events_ = cuda_event_pool_create(max_buckets_ + 1);  // a fork a bucket, and the join
  } else {
    queue_.reserve(max_buckets_);
    thread_ = std::thread([this] { work(); });
  }
}

GradBuckets::~GradBuckets() {
  if (gpu_) {
    cuda_event_pool_destroy(events_);
    cuda_side_stream_destroy(side_);
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void GradBuckets::begin() {
  LMF_CHECK(!open_, "GradBuckets: begin() twice without finish()");
  open_ = true;
  unsent_hi_ = grads_.numel();
  sent_.clear();
  if (!gpu_) {
    std::lock_guard<std::mutex> g(mu_);
    queue_.clear();  // (the last step's, all taken)
    taken_ = 0;
  }
}

void GradBuckets::final_from(int64_t from) {
  if (!open_) return;  // a backward before the step's last (gradient accumulation): nothing is final
  LMF_CHECK(from >= 0 && from <= unsent_hi_, "GradBuckets: final_from(", from, ") outside the step's [0, ",
            unsent_hi_, "]");
  if (bucket_elems_ > 0 && unsent_hi_ - from >= bucket_elems_) send(from, unsent_hi_);
}

void GradBuckets::finish() {
  LMF_CHECK(open_, "GradBuckets: finish() without begin()");
  open_ = false;
  if (unsent_hi_ > 0) send(0, unsent_hi_);
  if (gpu_) {  // lmforge's stream waits for the side stream's all-reduces
    cuda_stream_join(side_, events_.back());
    return;
  }
  std::unique_lock<std::mutex> g(mu_);
  cv_.wait(g, [&] { return in_flight_ == 0; });
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void GradBuckets::send(int64_t lo, int64_t hi) {
  LMF_CHECK(sent_.size() < max_buckets_, "GradBuckets: more than ", max_buckets_, " buckets in a step");
  sent_.emplace_back(lo, hi);
  unsent_hi_ = lo;
  if (gpu_) {  // after the backward's work so far, on the side stream
    cuda_stream_fork(side_, events_[sent_.size() - 1]);
    const SideStreamScope on_side(side_);
    comm_.all_reduce_sum(Tensor(grads_.f32() + lo, DType::f32, {hi - lo}, "gradient bucket", Device::cuda));
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.emplace_back(lo, hi);
    ++in_flight_;
  }
  cv_.notify_all();
}

void GradBuckets::work() {
  std::unique_lock<std::mutex> g(mu_);
  while (true) {
    cv_.wait(g, [&] { return stop_ || taken_ < queue_.size(); });
    if (taken_ == queue_.size()) return;  // stop_
    const auto [lo, hi] = queue_[taken_++];
    const bool skip = error_ != nullptr;  // after a failure the rest of the step is not sent
    g.unlock();
    if (!skip) {
      try {
        comm_.all_reduce_sum(Tensor(grads_.f32() + lo, DType::f32, {hi - lo}, "gradient bucket"));
      } catch (...) {
        g.lock();
        error_ = std::current_exception();
        g.unlock();
      }
    }
    g.lock();
    --in_flight_;
    cv_.notify_all();
  }
}

}  // namespace lmf
