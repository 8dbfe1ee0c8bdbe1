// gelu.cuh: GELU (tanh approximation) and its derivative in fp32, the device math shared by the
// element-wise kernels (activation.cu) and the fused GEMM epilogues (grouped_gemm.cu), so that every
// GPU path evaluates the same expression (activation.cu's file comment has the formulas and the
// error bounds of the kFast approximations).
#pragma once
#include <type_traits>

namespace lmf::cuda {

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

// The same GELU through tanh.approx (gelu = 0.5 x (1 + tanh u): one MUFU op and five FMA-pipe ops),
// for the fused GEMM epilogues (grouped_gemm.cu), where three warps evaluate a whole 128 x 256 tile
// while the tensor cores run the next one. tanh.approx.f32's relative error is about 2^-11, under
// bf16's 2^-9 storage rounding; saturates cleanly (|u| large: t = +-1, no NaN for finite x).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float gelu_tanh_approx(float x) {
  const float u = x * fmaf(kGeluK * kGeluA, x * x, kGeluK);
  const float hx = 0.5f * x;
  return fmaf(hx, tanh_approx(u), hx);
}
// d/dx [0.5 x (1 + t)] = 0.5 (1 + t) + 0.5 x (1 - t^2) u',  u' = K (1 + 3 A x^2)
__device__ __forceinline__ float gelu_grad_tanh_approx(float x) {
  const float x2 = x * x;
  const float t = tanh_approx(x * fmaf(kGeluK * kGeluA, x2, kGeluK));
  const float du = fmaf(3.0f * kGeluK * kGeluA, x2, kGeluK);
  return fmaf(0.5f * x * du, fmaf(-t, t, 1.0f), 0.5f + 0.5f * t);
}

}  // namespace lmf::cuda
