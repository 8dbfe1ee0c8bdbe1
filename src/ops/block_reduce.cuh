// block_reduce.cuh: deterministic warp and block reductions for the CUDA op kernels.
//
// Invariants (DESIGN.md section 5):
// - The order of every reduction depends only on blockDim (a compile-time or fixed launcher choice,
//   never on the grid size or on scheduling): each thread first reduces its own elements in index
//   order, then the warp combines its 32 lanes by an xor butterfly (offsets 16, 8, 4, 2, 1), then
//   warp 0 combines the per-warp results the same way. No atomics.
// - The xor butterfly leaves the same bitwise value in every lane (a + b == b + a in IEEE
//   arithmetic), so warp_sum/warp_max need no broadcast.
// - block_sum/block_max return the result to every thread of the block; they contain
//   __syncthreads() and must be reached by all threads of the block. `scratch` is 32 elements of
//   shared memory, reusable right after the call returns (the call ends with a barrier).
#pragma once
#include <cuda_runtime.h>

namespace lmf::cuda {

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// blockDim.x must be a multiple of 32 (every launcher uses a fixed multiple of 32).
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  r = warp_sum(r);  // every warp computes the same total in the same order
  __syncthreads();  // scratch may be reused by the caller
  return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : -INFINITY;
  r = warp_max(r);
  __syncthreads();
  return r;
}

}  // namespace lmf::cuda
