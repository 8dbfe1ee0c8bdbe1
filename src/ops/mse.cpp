#include "ops/mse.h"

namespace lmf {

void mse_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, float grad_scale) {
  const char* op = "mse_loss";
  check_f32(y, op);
  check_f32(targets, op);
  check_f32(losses, op);
  LMF_CHECK(y.ndim == 2, op, ": y '", y.name, "' ", y.shape_str(), " must be (N, D)");
  const int64_t N = y.dim(0), D = y.dim(1);
  check_shape(targets, {N, D}, op);
  check_shape(losses, {N}, op);
  if (dy.defined()) {
    check_f32(dy, op);
    check_shape(dy, {N, D}, op);
  }
  check_same_device(op, {&losses, &dy, &y, &targets});
  LMF_CHECK(y.device == Device::cpu, op, ": CPU only in this version ('", y.name, "' is on ", device_name(y.device), ")");
  const float *py = y.f32(), *pt = targets.f32();
  float* pl = losses.f32();
  float* pd = dy.defined() ? dy.f32() : nullptr;
  const float g = grad_scale * 2.0f / static_cast<float>(D);
  for (int64_t n = 0; n < N; ++n) {
    double s = 0;  // fixed order, double accumulation
    for (int64_t d = 0; d < D; ++d) {
      const float e = py[n * D + d] - pt[n * D + d];
      s += static_cast<double>(e) * e;
      if (pd) pd[n * D + d] = g * e;
    }
    pl[n] = static_cast<float>(s / static_cast<double>(D));
  }
}

}  // namespace lmf
