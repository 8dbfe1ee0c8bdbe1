// grad_buckets.h: data parallelism's gradient all-reduce in buckets, overlapped with the backward
// (docs/DISTRIBUTED.md, "Gradient buckets").
//
// The backward runs from the last layer to the first, and the model says after each layer from which
// parameter on the gradients are final (Model::set_grads_final_hook). Once the final but not yet sent
// part reaches the bucket size, it is handed to a communication thread that all-reduces it while the
// backward goes on below; finish() sends the rest (the lowest layers and the input end) and waits.
// Buckets end only at layer boundaries, so they are the same on every rank and every step: the ranks
// issue the same collectives in the same order, and a run's bits do not depend on timing.
//
// The thread is this object's: one communicator, used by that thread only between begin() and
// finish() (nothing else may use that communicator meanwhile). CPU (Gloo); on GPUs the step reduces
// the gradients in one all-reduce inside its CUDA graph (train/trainer.h train_step_device).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "core/comm.h"
#include "core/tensor.h"

namespace lmf {

class GradBuckets {
 public:
  // grads: the flat gradient arena (f32, contiguous, on the CPU); bucket_elems: the least number of
  // elements a bucket gathers before it is sent (0: one all-reduce of everything at finish()).
  GradBuckets(Tensor grads, Communicator& comm, int64_t bucket_elems);
  ~GradBuckets();  // waits for the thread (after a finished step it is idle)
  GradBuckets(const GradBuckets&) = delete;
  GradBuckets& operator=(const GradBuckets&) = delete;

  // A step's last backward starts: nothing is final yet.
  void begin();
  // Every gradient element at flat offset >= from is final for this step (from only decreases).
  void final_from(int64_t from);
  // Sends what is left ([0, the lowest offset sent)), waits until every bucket of the step is summed
  // and rethrows the first failure of the thread (one line naming the collective and the rank).
  void finish();

  // The buckets of the last finished step, in the order they were sent: [begin, end) element offsets.
  const std::vector<std::pair<int64_t, int64_t>>& buckets() const { return sent_; }
  int64_t bucket_elems() const { return bucket_elems_; }

 private:
  void send(int64_t lo, int64_t hi);
  void work();

  Tensor grads_;
  Communicator& comm_;
  int64_t bucket_elems_;
  int64_t unsent_hi_ = 0;  // [from, unsent_hi_) is final and not yet sent
  bool open_ = false;
  std::vector<std::pair<int64_t, int64_t>> sent_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, int64_t>> queue_;
  int64_t in_flight_ = 0;  // queued or being reduced
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace lmf
