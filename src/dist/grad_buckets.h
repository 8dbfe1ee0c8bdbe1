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
// CPU (Gloo): a communication thread of this object's runs the buckets' all-reduces; the communicator
// is that thread's between begin() and finish() (nothing else may use it meanwhile). GPU (NCCL): a
// side stream of this object's; each bucket forks it from lmforge's stream (an event after the
// layers' backward) and its all-reduce runs there while the backward's kernels go on, finish() joins
// it back. All of it is stream-ordered host code, so it is captured inside the step's CUDA graph.
#pragma once
#include <condition_variable>
#include <cstdint>
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
  // grads: the flat gradient arena (f32, contiguous, on the CPU or the GPU); bucket_elems: the least
  // number of elements a bucket gathers before it is sent (0: one all-reduce of everything at
  // finish()); max_buckets: the most buckets a step may send (the GPU's events; final_from calls + 1).
  GradBuckets(Tensor grads, Communicator& comm, int64_t bucket_elems, int64_t max_buckets);
  ~GradBuckets();  // waits for the thread (after a finished step it is idle)
  GradBuckets(const GradBuckets&) = delete;
  GradBuckets& operator=(const GradBuckets&) = delete;

  // A step's last backward starts: nothing is final yet.
  void begin();
  // Every gradient element at flat offset >= from is final for this step (from only decreases).
  // Outside begin() .. finish() (the backwards of the micro-batches before a step's last): ignored.
  void final_from(int64_t from);
  // Sends what is left ([0, the lowest offset sent)), waits until every bucket of the step is summed
  // and rethrows the first failure of the thread (one line naming the collective and the rank).
  void finish();

  // The buckets of the last finished step, in the order they were sent: [begin, end) element offsets.
  const std::vector<std::pair<int64_t, int64_t>>& buckets() const { return sent_; }

 private:
  void send(int64_t lo, int64_t hi);
  void work();

  Tensor grads_;
  Communicator& comm_;
  bool gpu_ = false;
  void* side_ = nullptr;        // GPU: the buckets' stream
  std::vector<void*> events_;  // GPU: one fork a bucket, then the join
  int64_t bucket_elems_;
  size_t max_buckets_;      // a step's buckets, at most
  int64_t unsent_hi_ = 0;  // [from, unsent_hi_) is final and not yet sent
  bool open_ = false;
  std::vector<std::pair<int64_t, int64_t>> sent_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<int64_t, int64_t>> queue_;  // the step's buckets (reserved once); the thread takes
  size_t taken_ = 0;                                 // queue_[taken_] next
  int64_t in_flight_ = 0;  // queued or being reduced
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // CPU
};

}  // namespace lmf
