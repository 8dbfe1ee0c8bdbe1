// packed.cuh: storage types and 128-bit packed access for the CUDA op kernels (mixed precision,
// docs/MIXED_PRECISION.md).
//
// Kernels are templates on the storage type T of their activations (float or __nv_bfloat16) and do
// their math in fp32: to_f32() widens exactly, from_f32<T>() rounds to nearest even (as lmf::bf16,
// core/bf16.h, so a GPU-rounded value equals the CPU's bf16(x) bitwise; NaN stays NaN).
// Packed access (llm.c's Packed128): load_f32<W>/store_f32<W> move W consecutive elements; when
// W * sizeof(T) is a multiple of 16 bytes they use 128-bit accesses, which need a 16-byte aligned
// pointer (arena tensors are 256-byte aligned; launchers check with aligned16() and fall back to
// W = 1, the scalar path, for odd sizes or offsets). Works on global and shared memory.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "core/bf16.h"

namespace lmf::cuda {

static_assert(sizeof(__nv_bfloat16) == sizeof(bf16), "lmf::bf16 must be bit-compatible with __nv_bfloat16");

// Launchers take lmf::bf16 (host-compilable headers); kernels take __nv_bfloat16.
inline __nv_bfloat16* as_nv(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
inline const __nv_bfloat16* as_nv(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A packed pair of bf16 in a 32-bit word (the lower column in the low half): exact widening of either
// half, and two floats rounded to nearest even into one word.
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16) | __bfloat16_as_ushort(v.x);
}

// Elements of T in one 128-bit access: 4 for float, 8 for bf16.
template <class T>
inline constexpr int kPack = 16 / static_cast<int>(sizeof(T));

// True when every pointer is 16-byte aligned (nullptr counts as aligned: absent optional tensors).
template <class... P>
inline bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

// v[0..W) = p[0..W) (raw storage values).
template <int W, class T>
__device__ __forceinline__ void load_raw(T (&v)[W], const T* p) {
  if constexpr (W * sizeof(T) % 16 == 0) {
#pragma unroll
    for (int c = 0; c < static_cast<int>(W * sizeof(T) / 16); ++c) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[c];
      memcpy(&v[c * kPack<T>], &u, 16);
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = p[k];
  }
}

// p[0..W) = v[0..W) (raw storage values).
template <int W, class T>
__device__ __forceinline__ void store_raw(T* p, const T (&v)[W]) {
  if constexpr (W * sizeof(T) % 16 == 0) {
#pragma unroll
    for (int c = 0; c < static_cast<int>(W * sizeof(T) / 16); ++c) {
      uint4 u;
      memcpy(&u, &v[c * kPack<T>], 16);
      reinterpret_cast<uint4*>(p)[c] = u;
    }
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = v[k];
  }
}

// f[0..W) = widened p[0..W).
template <int W, class T>
__device__ __forceinline__ void load_f32(float (&f)[W], const T* p) {
  T v[W];
  load_raw<W>(v, p);
#pragma unroll
  for (int k = 0; k < W; ++k) f[k] = to_f32(v[k]);
}

// p[0..W) = f[0..W) rounded to T.
template <int W, class T>
__device__ __forceinline__ void store_f32(T* p, const float (&f)[W]) {
  T v[W];
#pragma unroll
  for (int k = 0; k < W; ++k) v[k] = from_f32<T>(f[k]);
  store_raw<W>(p, v);
}

}  // namespace lmf::cuda
