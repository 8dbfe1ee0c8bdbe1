#include "ops/mse.h"

#include "ops/dispatch.h"

#include <algorithm>
#include <cmath>

namespace lmf {

namespace {
// What both losses require: f32 tensors, y (N, Dy), targets (N, Dt), losses (N), dy absent or (N, Dy)
// (bf16 allowed on the GPU), all on one device, the CPU unless `gpu` (the op has a GPU path). y must
// already be known to be 2-D.
void check_loss_args(const char* op, const Tensor& losses, const Tensor& dy, const Tensor& y, const Tensor& targets,
                     int64_t Dy, int64_t Dt, bool gpu) {
  for (const Tensor* t : {&y, &targets, &losses}) check_f32(*t, op);
  const int64_t N = y.dim(0);
  check_shape(y, {N, Dy}, op);
  check_shape(targets, {N, Dt}, op);
  check_shape(losses, {N}, op);
  if (dy.defined()) {
    if (!(gpu && dy.dtype == DType::bf16 && dy.device == Device::cuda)) check_f32(dy, op);
    check_shape(dy, {N, Dy}, op);
  }
  check_same_device(op, {&losses, &dy, &y, &targets});
  LMF_CHECK(gpu || y.device == Device::cpu, op, ": CPU only in this version ('", y.name, "' is on ",
            device_name(y.device), ")");
}
}  // namespace

void mse_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, float grad_scale) {
  const char* op = "mse_loss";
  LMF_CHECK(y.ndim == 2, op, ": y '", y.name, "' ", y.shape_str(), " must be (N, D)");
  const int64_t N = y.dim(0), D = y.dim(1);
  check_loss_args(op, losses, dy, y, targets, D, D, false);
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

void huber_horizons_loss(Tensor losses, Tensor dy, Tensor y, Tensor targets, const std::vector<int64_t>& horizons,
                         float delta, float grad_scale) {
  const char* op = "huber_horizons_loss";
  LMF_CHECK(!horizons.empty() && horizons.size() <= static_cast<size_t>(cuda::kMaxHorizons), op, ": ",
            horizons.size(), " horizons (1 to ", cuda::kMaxHorizons, ")");
  int64_t D = 0;
  for (size_t j = 0; j < horizons.size(); ++j) {
    LMF_CHECK(horizons[j] >= 1 && (j == 0 || horizons[j] > horizons[j - 1]), op, ": horizons must increase");
    D += horizons[j];
  }
  LMF_CHECK(y.ndim == 2 && y.dim(1) >= D, op, ": y '", y.name, "' ", y.shape_str(), " must be (N, Dy >= ", D,
            ") for horizons summing to ", D);
  const int64_t N = y.dim(0), Dy = y.dim(1), H = horizons.back();
  check_loss_args(op, losses, dy, y, targets, Dy, H, true);
  LMF_CHECK(delta > 0, op, ": delta=", delta, " must be > 0");
  if (y.device != Device::cpu) {
    const int heads = static_cast<int>(horizons.size());
    (void)heads;  // unused without the CUDA backend
    if (dy.defined() && dy.dtype == DType::bf16)
      LMF_CUDA_DISPATCH(op, cuda::huber_horizons_loss(losses.f32(), dy.ptr<bf16>(), y.f32(), targets.f32(), N, Dy, H,
                                                      horizons.data(), heads, delta, grad_scale));
    else
      LMF_CUDA_DISPATCH(op, cuda::huber_horizons_loss(losses.f32(), dy.defined() ? dy.f32() : nullptr, y.f32(),
                                                      targets.f32(), N, Dy, H, horizons.data(), heads, delta,
                                                      grad_scale));
    return;
  }
  const float *py = y.f32(), *pt = targets.f32();
  float* pl = losses.f32();
  float* pd = dy.defined() ? dy.f32() : nullptr;
  const double heads = static_cast<double>(horizons.size());
  for (int64_t n = 0; n < N; ++n) {
    double total = 0;  // fixed order, double accumulation
    int64_t col = 0;
    for (const int64_t h_j : horizons) {
      int64_t valid = 0;
      for (int64_t h = 0; h < h_j; ++h) valid += std::isnan(pt[n * H + h]) ? 0 : 1;
      double s = 0;
      const double w = valid > 0 ? 1.0 / (heads * static_cast<double>(valid)) : 0.0;
      for (int64_t h = 0; h < h_j; ++h) {
        const float t = pt[n * H + h];
        const float r = py[n * Dy + col + h] - t;
        const bool keep = !std::isnan(t);
        const float a = std::fabs(r);
        if (keep) s += a <= delta ? 0.5 * static_cast<double>(r) * r : static_cast<double>(delta) * (a - 0.5 * delta);
        if (pd) {
          const float g = a <= delta ? r : (r > 0 ? delta : -delta);
          pd[n * Dy + col + h] = keep ? static_cast<float>(grad_scale * w * g) : 0.0f;
        }
      }
      total += s * w;  // s / (heads * valid)
      col += h_j;
    }
    if (pd) std::fill(pd + n * Dy + D, pd + (n + 1) * Dy, 0.0f);
    pl[n] = static_cast<float>(total);
  }
}

}  // namespace lmf
