// activation.cu: CUDA launchers of GELU (tanh approximation) and SwiGLU (activation.h), f32 and
// bf16 (mixed precision: bf16 storage, fp32 math, each result rounded once).
//
// Element-wise through elementwise.cuh, with the same formulas as the CPU reference
// (activation.cpp), written through the logistic sigmoid:
//   gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3);   silu(g) = g * sigmoid(g)
//   sigmoid(z) = 1 / (1 + e), e = exp(-z), derivative e * s^2 (no cancellation)
// f32: exp is the precise expf (the build does not use --use_fast_math; <= 2 ulp); bf16: __expf and
// __fdividef (kFast below). The exp argument is clamped to [-87, 87] like the CPU's exp_f32, so |x| in
// the hundreds gives finite e and a saturated sigmoid instead of inf * 0 = NaN in the derivative. NaN
// inputs still give NaN (through x or g itself). The f32 path differs from the CPU only by exp's
// last-ulp rounding (CPU: Cephes polynomial).
// Each thread takes a pack of W elements (packed.cuh): 128-bit accesses when the sizes and pointers
// allow (arena tensors: always, for n or F a multiple of 8), else W = 1. The per-element expressions
// do not depend on W. Each element is independent: deterministic for any launch shape. Backward
// accumulates (+=): bf16 dinp is widened, the fp32 gradient added, and the sum rounded once.
#include <type_traits>

#include "ops/activation.h"
#include "ops/elementwise.cuh"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// Math of the f32 path (precise) and of the bf16 path (kFast: the hardware approximations __expf and
// __fdividef, a few instructions instead of ~20 each: the precise versions made the bf16 passes
// issue-bound, ~0.75 of the copy ceiling on an H200. __expf's error is 2 + 1.16 |x| ulp, under 1e-5
// relative for |x| <= 87, and __fdividef's 2 ulp: both far under bf16's 2^-9 storage rounding.)
template <class T>
constexpr bool kFast = !std::is_same_v<T, float>;

// exp(x) with x clamped to [-87, 87] (finite, positive, normal).
template <bool kF>
__device__ __forceinline__ float exp_clamped(float x) {
  x = fminf(fmaxf(x, -87.0f), 87.0f);
  return kF ? __expf(x) : expf(x);
}
template <bool kF>
__device__ __forceinline__ float divide(float a, float b) {  // b in [1, 1 + e^87]: __fdividef's range
  return kF ? __fdividef(a, b) : a / b;
}

template <bool kF>
__device__ __forceinline__ float gelu(float x) {
  const float u = kGeluK * (x + kGeluA * x * x * x);
  return divide<kF>(x, 1.0f + exp_clamped<kF>(-2.0f * u));
}

// d gelu / dx
template <bool kF>
__device__ __forceinline__ float gelu_grad(float x) {
  const float u = kGeluK * (x + kGeluA * x * x * x);
  const float du = kGeluK * (1.0f + 3.0f * kGeluA * x * x);
  const float e = exp_clamped<kF>(-2.0f * u);
  const float s = divide<kF>(1.0f, 1.0f + e);
  // d/dx [x s(2u)] = s + x * 2 u' * s (1 - s), and s (1 - s) = e s^2
  return s + 2.0f * x * du * (e * s * s);
}

// out, inp: (n) flat; n % W == 0
template <int W, class T>
void gelu_forward_packs(T* out, const T* inp, int64_t n) {
  launch_elementwise("gelu_forward", n / W, [=] __device__(int64_t p) {
    float x[W];
    load_f32<W>(x, inp + p * W);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] = gelu<kFast<T>>(x[k]);
    store_f32<W>(out + p * W, x);
  });
}

// dinp, dout, inp: (n) flat; dinp += dout * gelu'(inp) (dinp = ... when !acc: not read)
template <int W, class T>
void gelu_backward_packs(T* dinp, const T* dout, const T* inp, int64_t n, bool acc) {
  launch_elementwise("gelu_backward", n / W, [=] __device__(int64_t p) {
    float x[W], dy[W], dx[W] = {};
    load_f32<W>(x, inp + p * W);
    load_f32<W>(dy, dout + p * W);
    if (acc) load_f32<W>(dx, dinp + p * W);
#pragma unroll
    for (int k = 0; k < W; ++k) dx[k] += dy[k] * gelu_grad<kFast<T>>(x[k]);
    store_f32<W>(dinp + p * W, dx);
  });
}

// inp: (N, 2F) rows [gate | up]; out: (N, F); F % W == 0 (a pack never crosses a row)
template <int W, class T>
void swiglu_forward_packs(T* out, const T* inp, int64_t N, int64_t F) {
  launch_elementwise("swiglu_forward", N * F / W, [=] __device__(int64_t p) {
    const int64_t i = p * W, r = i / F, j = i - r * F;
    float g[W], up[W];
    load_f32<W>(g, inp + r * 2 * F + j);
    load_f32<W>(up, inp + r * 2 * F + F + j);
#pragma unroll
    for (int k = 0; k < W; ++k) g[k] = divide<kFast<T>>(g[k], 1.0f + exp_clamped<kFast<T>>(-g[k])) * up[k];
    store_f32<W>(out + i, g);
  });
}

// dinp: (N, 2F) += (= when !acc: not read); dout: (N, F); inp: (N, 2F); F % W == 0
template <int W, class T>
void swiglu_backward_packs(T* dinp, const T* dout, const T* inp, int64_t N, int64_t F, bool acc) {
  launch_elementwise("swiglu_backward", N * F / W, [=] __device__(int64_t p) {
    const int64_t i = p * W, r = i / F, j = i - r * F;
    const int64_t ig = r * 2 * F + j, iu = ig + F;
    float g[W], up[W], dy[W], dg[W] = {}, du[W] = {};
    load_f32<W>(g, inp + ig);
    load_f32<W>(up, inp + iu);
    load_f32<W>(dy, dout + i);
    if (acc) {
      load_f32<W>(dg, dinp + ig);
      load_f32<W>(du, dinp + iu);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float e = exp_clamped<kFast<T>>(-g[k]);
      const float s = divide<kFast<T>>(1.0f, 1.0f + e);
      // silu'(g) = s + g s (1 - s) = s + g e s^2
      dg[k] += dy[k] * up[k] * (s + g[k] * (e * s * s));
      du[k] += dy[k] * (g[k] * s);
    }
    store_f32<W>(dinp + ig, dg);
    store_f32<W>(dinp + iu, du);
  });
}

template <class T>
void gelu_forward_impl(T* out, const T* inp, int64_t n) {
  if (n % kPack<T> == 0 && aligned16(out, inp)) gelu_forward_packs<kPack<T>>(out, inp, n);
  else gelu_forward_packs<1>(out, inp, n);
}

template <class T>
void gelu_backward_impl(T* dinp, const T* dout, const T* inp, int64_t n, bool acc) {
  if (n % kPack<T> == 0 && aligned16(dinp, dout, inp)) gelu_backward_packs<kPack<T>>(dinp, dout, inp, n, acc);
  else gelu_backward_packs<1>(dinp, dout, inp, n, acc);
}

template <class T>
void swiglu_forward_impl(T* out, const T* inp, int64_t N, int64_t F) {
  if (F % kPack<T> == 0 && aligned16(out, inp)) swiglu_forward_packs<kPack<T>>(out, inp, N, F);
  else swiglu_forward_packs<1>(out, inp, N, F);
}

template <class T>
void swiglu_backward_impl(T* dinp, const T* dout, const T* inp, int64_t N, int64_t F, bool acc) {
  if (F % kPack<T> == 0 && aligned16(dinp, dout, inp)) swiglu_backward_packs<kPack<T>>(dinp, dout, inp, N, F, acc);
  else swiglu_backward_packs<1>(dinp, dout, inp, N, F, acc);
}

}  // namespace

void gelu_forward(float* out, const float* inp, int64_t n) { gelu_forward_impl(out, inp, n); }
void gelu_forward(bf16* out, const bf16* inp, int64_t n) { gelu_forward_impl(as_nv(out), as_nv(inp), n); }

void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n, bool accumulate) {
  gelu_backward_impl(dinp, dout, inp, n, accumulate);
}
void gelu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int64_t n, bool accumulate) {
  gelu_backward_impl(as_nv(dinp), as_nv(dout), as_nv(inp), n, accumulate);
}

void swiglu_forward(float* out, const float* inp, int64_t N, int64_t F) { swiglu_forward_impl(out, inp, N, F); }
void swiglu_forward(bf16* out, const bf16* inp, int64_t N, int64_t F) {
  swiglu_forward_impl(as_nv(out), as_nv(inp), N, F);
}

void swiglu_backward(float* dinp, const float* dout, const float* inp, int64_t N, int64_t F, bool accumulate) {
  swiglu_backward_impl(dinp, dout, inp, N, F, accumulate);
}
void swiglu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int64_t F, bool accumulate) {
  swiglu_backward_impl(as_nv(dinp), as_nv(dout), as_nv(inp), N, F, accumulate);
}

}  // namespace lmf::cuda
