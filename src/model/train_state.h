// train_state.h: the owner of a model's training state: gradients and AdamW's moments, each an arena
// with the parameters' layout (DESIGN.md section 2), and the weight-decay ranges over it.
//
// Gradients accumulate across micro-batches; zero_grad() starts a new accumulation. Lazy zeroing
// (GPU plans): gradients that the next backward writes whole (beta-0 weight-gradient GEMMs, the LM
// head's first chunk, the routed experts') are not cleared by zero_grad(); the backward overwrites
// them while grads_zero() holds, and grads() clears them first if someone reads the gradients before
// a backward ran ("settling"). Which tensors are lazy is the model's knowledge (Model::lazy_grads).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "model/params.h"

namespace lmf {

class TrainingState {
 public:
  // lazy: names of the gradients that every backward writes whole when grads_zero() (may be empty).
  // moments [begin, end) of the parameters' flat arena (ZeRO-1, docs/DISTRIBUTED.md): AdamW's m and v
  // are kept for those elements only, as one flat tensor each, and decay_ranges() is that slice's
  // (from 0); begin < 0: the whole layout.
  TrainingState(const Parameters& params, const std::vector<std::string>& lazy, int64_t moments_begin = -1,
                int64_t moments_end = -1);
  TrainingState(const TrainingState&) = delete;
  TrainingState& operator=(const TrainingState&) = delete;

  // The gradients, settled: reading or writing them through this is always safe.
  Arena& grads();
  // The gradient arena as the backward sees it (unsettled: lazy ranges may be stale while
  // grads_zero()); only the backward's own writes go through this.
  const Arena& grads_for_backward() const { return grads_; }
  Arena& adam_m() { return m_; }
  Arena& adam_v() { return v_; }
  // Weight-decay ranges of the parameter arena (2-D and stacked 3-D expert tensors), planned once for
  // adamw_update_flat: (S, 2) i32 host tensor of [begin, end) element ranges.
  Tensor decay_ranges() const { return decay_ranges_; }
  size_t bytes() const { return grads_.bytes() + m_.bytes() + v_.bytes(); }
  // ZeRO-1: the slice of the flat parameter arena whose moments this state keeps (whole: 0, numel)
  bool moments_sharded() const { return moments_begin_ >= 0; }
  int64_t moments_begin() const { return moments_sharded() ? moments_begin_ : 0; }
  int64_t moments_end() const { return moments_end_; }

  void zero_grad();
  // True from zero_grad() until a backward finishes: the gradients hold zeros (lazy ones logically).
  bool grads_zero() const { return grads_zero_; }
  // A backward calls begin_backward() first (settles stale lazy ranges unless grads_zero()) and
  // end_backward() when it finishes or throws: the gradients then hold a backward's sums.
  void begin_backward();
  void end_backward() { grads_zero_ = lazy_stale_ = false; }

 private:
  void settle();
  Device device_;
  Arena grads_, m_, v_;
  std::vector<int32_t> decay_ranges_host_;
  Tensor decay_ranges_;
  int64_t moments_begin_ = -1, moments_end_ = 0;
  // zero_grad's lazily zeroed byte ranges of grads_ and the rest; lazy_stale_: the lazy ranges hold
  // old values
  std::vector<std::pair<size_t, size_t>> lazy_ranges_, eager_ranges_;
  bool grads_zero_ = false, lazy_stale_ = false;
};

}  // namespace lmf
