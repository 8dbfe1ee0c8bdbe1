#include "model/train_state.h"

#include <cstring>
#include <set>

#include "core/device.h"
#include "ops/optim.h"

namespace lmf {

namespace {
void zero_bytes(Device d, unsigned char* p, size_t n) {
  if (d == Device::cpu) std::memset(p, 0, n);
  else device_memset0(p, n);
}
}  // namespace

TrainingState::TrainingState(const Parameters& params, const std::vector<std::string>& lazy)
    : device_(params.device()),
      grads_("grads", params.master().specs(), params.device()),
      m_("adam_m", params.master().specs(), params.device()),
      v_("adam_v", params.master().specs(), params.device()) {
  decay_ranges_host_ = adamw_decay_ranges(params.master());
  decay_ranges_ = Tensor(decay_ranges_host_.data(), DType::i32,
                         {static_cast<int64_t>(decay_ranges_host_.size() / 2), 2}, "decay_ranges");
  // The lazy ranges are the tensors' own bytes (the padding between them stays eager).
  const std::set<std::string> names(lazy.begin(), lazy.end());
  size_t at = 0;
  for (size_t i = 0; i < grads_.size(); ++i) {
    if (!names.count(grads_.spec(i).name)) continue;
    const size_t b = grads_.offset_bytes(i), e = b + grads_.spec(i).nbytes();
    if (b > at) eager_ranges_.push_back({at, b - at});
    lazy_ranges_.push_back({b, e - b});
    at = e;
  }
  if (!lazy_ranges_.empty() && at < grads_.bytes()) eager_ranges_.push_back({at, grads_.bytes() - at});
}

Arena& TrainingState::grads() {
  settle();
  grads_zero_ = false;  // the caller may write them
  return grads_;
}

void TrainingState::zero_grad() {
  grads_zero_ = true;
  if (lazy_ranges_.empty()) {
    grads_.zero();
    return;
  }
  auto* base = static_cast<unsigned char*>(grads_.base());
  for (const auto& [at, n] : eager_ranges_) zero_bytes(device_, base + at, n);
  lazy_stale_ = true;
}

void TrainingState::begin_backward() {
  // Stale lazy gradients are written whole by the backward only when the gradients hold zeros
  // otherwise; any other state was settled by grads() already.
  if (!grads_zero_) settle();
}

void TrainingState::settle() {
  if (!lazy_stale_) return;
  auto* base = static_cast<unsigned char*>(grads_.base());
  for (const auto& [at, n] : lazy_ranges_) zero_bytes(device_, base + at, n);
  lazy_stale_ = false;
}

}  // namespace lmf
