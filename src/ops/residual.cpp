// residual.cpp: CPU reference of the residual add (residual.h).
//
// Elementwise, so every element is independent: results do not depend on the thread count.
// Backward accumulates (+=) into da and db (src/ops/README.md); either may be absent.
#include "ops/residual.h"

#include "ops/dispatch.h"

#include <initializer_list>

namespace lmf {
namespace {

// Below this many elements the OpenMP fork costs more than the work (results are identical).
constexpr int64_t kParallelMin = 1 << 15;

// out, a, b: (n) flat; out may alias a or b
void residual_forward_cpu(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// dx, dout: (n) flat; dx += dout
void residual_accumulate_cpu(float* dx, const float* dout, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) dx[i] += dout[i];
}

// Throws unless t has exactly the shape of ref.
void check_same_shape(const Tensor& t, const Tensor& ref, const char* op) {
  bool ok = t.ndim == ref.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == ref.shape[i];
  LMF_CHECK(ok, op, ": tensor '", t.name, "' has shape ", t.shape_str(), ", expected ", ref.shape_str(),
            " (the shape of '", ref.name, "')");
}

}  // namespace

void residual_forward(Tensor out, Tensor a, Tensor b) {
  const char* op = "residual_forward";
  for (const Tensor* t : {&out, &a, &b}) check_f32(*t, op);
  check_same_device(op, {&out, &a, &b});
  check_same_shape(a, out, op);
  check_same_shape(b, out, op);
  if (out.device == Device::cpu) residual_forward_cpu(out.f32(), a.f32(), b.f32(), out.numel());
  else LMF_CUDA_DISPATCH(op, cuda::residual_forward(out.f32(), a.f32(), b.f32(), out.numel()));
}

void residual_backward(Tensor da, Tensor db, Tensor dout) {
  const char* op = "residual_backward";
  check_f32(dout, op);
  for (const Tensor* t : {&da, &db}) {
    if (!t->defined()) continue;
    check_f32(*t, op);
    check_same_shape(*t, dout, op);
  }
  check_same_device(op, {&da, &db, &dout});
  if (dout.device == Device::cpu) {
    if (da.defined()) residual_accumulate_cpu(da.f32(), dout.f32(), dout.numel());
    if (db.defined()) residual_accumulate_cpu(db.f32(), dout.f32(), dout.numel());
  } else {
    if (da.defined()) LMF_CUDA_DISPATCH(op, cuda::residual_accumulate(da.f32(), dout.f32(), dout.numel()));
    if (db.defined()) LMF_CUDA_DISPATCH(op, cuda::residual_accumulate(db.f32(), dout.f32(), dout.numel()));
  }
}

}  // namespace lmf
