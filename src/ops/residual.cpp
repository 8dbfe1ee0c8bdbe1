// residual.cpp: CPU reference of the residual add (residual.h).
//
// Elementwise, so every element is independent: results do not depend on the thread count.
// Backward accumulates (+=) into da and db (src/ops/README.md); either may be absent.
// bf16 tensors (mixed precision) run on the GPU only; the CPU stays the fp32 reference.
#include "ops/residual.h"

#include "core/parallel.h"
#include "ops/dispatch.h"

#include <initializer_list>

namespace lmf {
namespace {

// Elements per parallel chunk (smaller ops run on one thread; results are identical).
constexpr int64_t kMinGrain = 1 << 14;

// out, a, b: (n) flat; out may alias a or b
void residual_forward_cpu(float* out, const float* a, const float* b, int64_t n) {
  parallel_for(n, grain_for(n, kMinGrain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = a[i] + b[i];
  });
}

// dx, dout: (n) flat; dx += dout
void residual_accumulate_cpu(float* dx, const float* dout, int64_t n) {
  parallel_for(n, grain_for(n, kMinGrain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dx[i] += dout[i];
  });
}

// out, in: (n) flat; out = s * in
void scale_forward_cpu(float* out, const float* in, float s, int64_t n) {
  parallel_for(n, grain_for(n, kMinGrain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = s * in[i];
  });
}

// Throws unless t has exactly the shape of ref.
void check_same_shape(const Tensor& t, const Tensor& ref, const char* op) {
  bool ok = t.ndim == ref.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == ref.shape[i];
  LMF_CHECK(ok, op, ": tensor '", t.name, "' has shape ", t.shape_str(), ", expected ", ref.shape_str(),
            " (the shape of '", ref.name, "')");
}

// The dtype of an op's activations, from its lead tensor: bf16 or else f32 (check_dtype then
// rejects anything else, and a bf16 tensor on the CPU, naming the tensor).
DType act_dtype(const Tensor& t) { return t.defined() && t.dtype == DType::bf16 ? DType::bf16 : DType::f32; }

}  // namespace

void residual_forward(Tensor out, Tensor a, Tensor b) {
  const char* op = "residual_forward";
  const DType dt = act_dtype(out);
  for (const Tensor* t : {&out, &a, &b}) check_dtype(*t, dt, op);
  check_same_device(op, {&out, &a, &b});
  check_same_shape(a, out, op);
  check_same_shape(b, out, op);
  if (dt == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::residual_forward(out.ptr<bf16>(), a.ptr<bf16>(), b.ptr<bf16>(), out.numel()));
  else if (out.device == Device::cpu) residual_forward_cpu(out.f32(), a.f32(), b.f32(), out.numel());
  else LMF_CUDA_DISPATCH(op, cuda::residual_forward(out.f32(), a.f32(), b.f32(), out.numel()));
}

void residual_backward(Tensor da, Tensor db, Tensor dout) {
  const char* op = "residual_backward";
  const DType dt = act_dtype(dout);
  check_dtype(dout, dt, op);
  for (const Tensor* t : {&da, &db}) {
    if (!t->defined()) continue;
    check_dtype(*t, dt, op);
    check_same_shape(*t, dout, op);
  }
  check_same_device(op, {&da, &db, &dout});
  for (const Tensor* t : {&da, &db}) {
    if (!t->defined()) continue;
    if (dt == DType::bf16)
      LMF_CUDA_DISPATCH(op, cuda::residual_accumulate(t->ptr<bf16>(), dout.ptr<bf16>(), dout.numel()));
    else if (dout.device == Device::cpu) residual_accumulate_cpu(t->f32(), dout.f32(), dout.numel());
    else LMF_CUDA_DISPATCH(op, cuda::residual_accumulate(t->f32(), dout.f32(), dout.numel()));
  }
}

void scale_forward(Tensor out, Tensor in, float s) {
  const char* op = "scale_forward";
  for (const Tensor* t : {&out, &in}) check_dtype(*t, DType::f32, op);
  check_same_device(op, {&out, &in});
  check_same_shape(in, out, op);
  if (out.device == Device::cpu) scale_forward_cpu(out.f32(), in.f32(), s, out.numel());
  else LMF_CUDA_DISPATCH(op, cuda::scale_forward(out.f32(), in.f32(), s, out.numel()));
}

}  // namespace lmf
