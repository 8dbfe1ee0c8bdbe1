#include "model/train_state.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "core/check.h"
#include "core/device.h"
#include "ops/optim.h"

namespace lmf {

namespace {
void zero_bytes(Device d, unsigned char* p, size_t n) {
  if (d == Device::cpu) std::memset(p, 0, n);
  else device_memset0(p, n);
}
}  // namespace

namespace {
// The moments' layout: the parameters' (whole), or one flat tensor of a ZeRO-1 slice.
std::vector<TensorSpec> moment_specs(const Parameters& params, const char* name, int64_t begin, int64_t end) {
  if (begin < 0) return params.master().specs();
  return {{name, {end - begin}}};
}
}  // namespace

TrainingState::TrainingState(const Parameters& params, const std::vector<std::string>& lazy, int64_t moments_begin,
                             int64_t moments_end)
    : device_(params.device()),
      grads_("grads", params.master().specs(), params.device()),
      m_("adam_m", moment_specs(params, "adam_m.slice", moments_begin, moments_end), params.device()),
      v_("adam_v", moment_specs(params, "adam_v.slice", moments_begin, moments_end), params.device()) {
  const int64_t n = params.master().flat_f32().numel();
  moments_end_ = n;
  if (moments_begin >= 0) {
    LMF_CHECK(moments_begin < moments_end && moments_end <= n, "training state: moments [", moments_begin, ", ",
              moments_end, ") outside the ", n, " parameter elements");
    moments_begin_ = moments_begin;
    moments_end_ = moments_end;
  }
  decay_ranges_host_ = adamw_decay_ranges(params.master());
  if (moments_begin >= 0) {  // the slice's ranges, from its start
    std::vector<int32_t> sliced;
    for (size_t i = 0; i + 1 < decay_ranges_host_.size(); i += 2) {
      const int64_t b = std::max<int64_t>(decay_ranges_host_[i], moments_begin);
      const int64_t e = std::min<int64_t>(decay_ranges_host_[i + 1], moments_end);
      if (b >= e) continue;
      sliced.push_back(static_cast<int32_t>(b - moments_begin));
      sliced.push_back(static_cast<int32_t>(e - moments_begin));
    }
    decay_ranges_host_ = std::move(sliced);
  }
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
