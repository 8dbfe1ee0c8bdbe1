// residual.cu: CUDA launchers of the residual add (residual.h), f32 and bf16 (mixed precision).
//
// Element-wise through elementwise.cuh; each thread takes a pack of W elements: 128-bit accesses
// (W = 4 for f32, 8 for bf16) when n % W == 0 and the pointers are 16-byte aligned (always, for arena
// tensors), else W = 1. The sum is one fp32 add of the widened operands, rounded once to the storage
// type: bf16 results equal the CPU's bf16(float(a) + float(b)) bitwise; f32 results are unchanged.
// out may alias a or b (each element is read before it is written, by the same thread).
#include "ops/elementwise.cuh"
#include "ops/packed.cuh"
#include "ops/residual.h"

namespace lmf::cuda {
namespace {

template <int W, class T>
void forward_packs(T* out, const T* a, const T* b, int64_t n) {
  launch_elementwise("residual_forward", n / W, [=] __device__(int64_t p) {
    float x[W], y[W];
    load_f32<W>(x, a + p * W);
    load_f32<W>(y, b + p * W);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] += y[k];
    store_f32<W>(out + p * W, x);
  });
}

template <int W, class T>
void accumulate_packs(T* dx, const T* dout, int64_t n) {
  launch_elementwise("residual_backward", n / W, [=] __device__(int64_t p) {
    float x[W], g[W];
    load_f32<W>(x, dx + p * W);
    load_f32<W>(g, dout + p * W);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] += g[k];
    store_f32<W>(dx + p * W, x);
  });
}

template <class T>
void forward_impl(T* out, const T* a, const T* b, int64_t n) {
  if (n % kPack<T> == 0 && aligned16(out, a, b)) forward_packs<kPack<T>>(out, a, b, n);
  else forward_packs<1>(out, a, b, n);
}

template <class T>
void accumulate_impl(T* dx, const T* dout, int64_t n) {
  if (n % kPack<T> == 0 && aligned16(dx, dout)) accumulate_packs<kPack<T>>(dx, dout, n);
  else accumulate_packs<1>(dx, dout, n);
}

}  // namespace

void residual_forward(float* out, const float* a, const float* b, int64_t n) { forward_impl(out, a, b, n); }
void residual_forward(bf16* out, const bf16* a, const bf16* b, int64_t n) {
  forward_impl(as_nv(out), as_nv(a), as_nv(b), n);
}

void residual_accumulate(float* dx, const float* dout, int64_t n) { accumulate_impl(dx, dout, n); }
void residual_accumulate(bf16* dx, const bf16* dout, int64_t n) { accumulate_impl(as_nv(dx), as_nv(dout), n); }

void scale_forward(float* out, const float* in, float s, int64_t n) {
  launch_elementwise("scale_forward", n, [=] __device__(int64_t i) { out[i] = s * in[i]; });
}

}  // namespace lmf::cuda
