// activation.cpp: CPU reference of GELU (tanh approximation) and SwiGLU (activation.h).
//
// Both are written through the logistic sigmoid so that no tanh() call (not vectorisable without
// -ffast-math) sits in the inner loop:
//   0.5 (1 + tanh(u)) = sigmoid(2u)        so gelu(x) = x * sigmoid(2u), u = k (x + 0.044715 x^3)
//   silu(g) = g * sigmoid(g)
// sigmoid(z) = 1 / (1 + e), e = exp(-z), with exp() a branch-free Cody-Waite + polynomial expf that
// the compiler vectorises (exp_f32, ops/cpu_math.h). Its argument is clamped to [-87, 87], so for
// |x| in the hundreds e is finite (no inf/NaN) and sigmoid saturates to 1 or to ~1e-38; NaN inputs
// still give NaN.
// The derivative uses sigmoid * (1 - sigmoid) = e * s^2, which has no cancellation.
// Elementwise: results do not depend on the thread count. Backward accumulates (+=) into dinp.
// bf16 tensors (mixed precision) run on the GPU only; the CPU stays the fp32 reference.
#include "ops/activation.h"

#include <cstdint>
#include <initializer_list>

#include "core/parallel.h"
#include "ops/cpu_math.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr int64_t kMinGrain = 1 << 13;  // elements per parallel chunk (smaller ops run on one thread)

// exp(x) for any float x, |x| clamped to 87: ops/cpu_math.h.
using cpu_math::exp_f32;

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// out, inp: (n) flat
void gelu_forward_cpu(float* out, const float* inp, int64_t n) {
  parallel_for(n, grain_for(n, kMinGrain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float x = inp[i];
      const float u = kGeluK * (x + kGeluA * x * x * x);
      const float e = exp_f32(-2.0f * u);
      out[i] = x / (1.0f + e);
    }
  });
}

// dinp, dout, inp: (n) flat; dinp += dout * gelu'(inp)
void gelu_backward_cpu(float* dinp, const float* dout, const float* inp, int64_t n) {
  parallel_for(n, grain_for(n, kMinGrain), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float x = inp[i];
      const float u = kGeluK * (x + kGeluA * x * x * x);
      const float du = kGeluK * (1.0f + 3.0f * kGeluA * x * x);
      const float e = exp_f32(-2.0f * u);
      const float s = 1.0f / (1.0f + e);
      // d/dx [x s(2u)] = s + x * 2 u' * s (1 - s), and s (1 - s) = e s^2
      dinp[i] += dout[i] * (s + 2.0f * x * du * (e * s * s));
    }
  });
}

// inp: (N, 2F) rows [gate | up]; out: (N, F)
void swiglu_forward_cpu(float* out, const float* inp, int64_t N, int64_t F) {
  parallel_for(N, grain_for(N, kMinGrain / F + 1), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = inp + r * 2 * F;
      const float* up = gate + F;
      float* o = out + r * F;
      for (int64_t j = 0; j < F; ++j) {
        const float g = gate[j];
        o[j] = g / (1.0f + exp_f32(-g)) * up[j];
      }
    }
  });
}

// dinp: (N, 2F) += ; dout: (N, F); inp: (N, 2F)
void swiglu_backward_cpu(float* dinp, const float* dout, const float* inp, int64_t N, int64_t F) {
  parallel_for(N, grain_for(N, kMinGrain / F + 1), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = inp + r * 2 * F;
      const float* up = gate + F;
      const float* dy = dout + r * F;
      float* dgate = dinp + r * 2 * F;
      float* dup = dgate + F;
      for (int64_t j = 0; j < F; ++j) {
        const float g = gate[j];
        const float e = exp_f32(-g);
        const float s = 1.0f / (1.0f + e);
        // silu'(g) = s + g s (1 - s) = s + g e s^2
        dgate[j] += dy[j] * up[j] * (s + g * (e * s * s));
        dup[j] += dy[j] * (g * s);
      }
    }
  });
}

// Throws unless t has exactly the shape of ref.
void check_same_shape(const Tensor& t, const Tensor& ref, const char* op) {
  bool ok = t.ndim == ref.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == ref.shape[i];
  LMF_CHECK(ok, op, ": tensor '", t.name, "' has shape ", t.shape_str(), ", expected ", ref.shape_str(),
            " (the shape of '", ref.name, "')");
}

// Checks the SwiGLU pair: inp (..., 2F) and out (..., F) with the same leading dims. Returns F.
int64_t check_swiglu_shapes(const Tensor& out, const Tensor& inp, const char* op) {
  bool ok = out.ndim == inp.ndim && inp.dim(-1) == 2 * out.dim(-1);
  for (int i = 0; ok && i + 1 < inp.ndim; ++i) ok = out.shape[i] == inp.shape[i];
  LMF_CHECK(ok, op, ": tensor '", inp.name, "' ", inp.shape_str(), " must be (..., 2F) with the leading dims of '",
            out.name, "' ", out.shape_str(), " = (..., F)");
  return out.dim(-1);
}

// The dtype of an op's activations, from its lead tensor: bf16 or else f32 (check_dtype then
// rejects anything else, and a bf16 tensor on the CPU, naming the tensor).
DType act_dtype(const Tensor& t) { return t.defined() && t.dtype == DType::bf16 ? DType::bf16 : DType::f32; }

}  // namespace

void gelu_forward(Tensor out, Tensor inp) {
  const char* op = "gelu_forward";
  const DType dt = act_dtype(inp);
  for (const Tensor* t : {&inp, &out}) check_dtype(*t, dt, op);
  check_same_device(op, {&out, &inp});
  check_same_shape(inp, out, op);
  if (dt == DType::bf16) LMF_CUDA_DISPATCH(op, cuda::gelu_forward(out.ptr<bf16>(), inp.ptr<bf16>(), out.numel()));
  else if (out.device == Device::cpu) gelu_forward_cpu(out.f32(), inp.f32(), out.numel());
  else LMF_CUDA_DISPATCH(op, cuda::gelu_forward(out.f32(), inp.f32(), out.numel()));
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  const char* op = "gelu_backward";
  const DType dt = act_dtype(inp);
  for (const Tensor* t : {&inp, &dinp, &dout}) check_dtype(*t, dt, op);
  check_same_device(op, {&dinp, &dout, &inp});
  check_same_shape(dinp, inp, op);
  check_same_shape(dout, inp, op);
  if (dt == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::gelu_backward(dinp.ptr<bf16>(), dout.ptr<bf16>(), inp.ptr<bf16>(), inp.numel()));
  else if (inp.device == Device::cpu) gelu_backward_cpu(dinp.f32(), dout.f32(), inp.f32(), inp.numel());
  else LMF_CUDA_DISPATCH(op, cuda::gelu_backward(dinp.f32(), dout.f32(), inp.f32(), inp.numel()));
}

void swiglu_forward(Tensor out, Tensor inp) {
  const char* op = "swiglu_forward";
  const DType dt = act_dtype(inp);
  for (const Tensor* t : {&inp, &out}) check_dtype(*t, dt, op);
  check_same_device(op, {&out, &inp});
  const int64_t F = check_swiglu_shapes(out, inp, op);
  const int64_t N = F > 0 ? out.numel() / F : 0;
  if (dt == DType::bf16) LMF_CUDA_DISPATCH(op, cuda::swiglu_forward(out.ptr<bf16>(), inp.ptr<bf16>(), N, F));
  else if (out.device == Device::cpu) swiglu_forward_cpu(out.f32(), inp.f32(), N, F);
  else LMF_CUDA_DISPATCH(op, cuda::swiglu_forward(out.f32(), inp.f32(), N, F));
}

void swiglu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  const char* op = "swiglu_backward";
  const DType dt = act_dtype(inp);
  for (const Tensor* t : {&inp, &dinp, &dout}) check_dtype(*t, dt, op);
  check_same_device(op, {&dinp, &dout, &inp});
  check_same_shape(dinp, inp, op);
  const int64_t F = check_swiglu_shapes(dout, inp, op);
  const int64_t N = F > 0 ? dout.numel() / F : 0;
  if (dt == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::swiglu_backward(dinp.ptr<bf16>(), dout.ptr<bf16>(), inp.ptr<bf16>(), N, F));
  else if (inp.device == Device::cpu) swiglu_backward_cpu(dinp.f32(), dout.f32(), inp.f32(), N, F);
  else LMF_CUDA_DISPATCH(op, cuda::swiglu_backward(dinp.f32(), dout.f32(), inp.f32(), N, F));
}

}  // namespace lmf
