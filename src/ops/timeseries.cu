// timeseries.cu: CUDA launchers of the point embedding (timeseries.h).
//
// Forward: element-wise over (N, C), the CPU's expression in fp32 (precise expf, exp argument clamped
// to [-87, 87] as exp_f32), the result rounded once to the storage type.
// Backward, deterministic without atomics: dw_g[c] and dw_e[c] are column sums over N rows. Pass 1:
// blocks of 32 columns x kRowsPerChunk rows; thread (tx, ty) sums rows ty, ty + 8, ... of its chunk in
// order, then the 8 row-threads are added in ty order through shared memory: one partial per
// (chunk, column) in the workspace. Pass 2: one thread per column adds the chunks' partials in chunk
// order to dw. The chunking depends only on N, so the bits never depend on the GPU or the launch.
#include <cuda_bf16.h>

#include "core/cuda_launch.cuh"
#include "core/device.h"
#include "ops/elementwise.cuh"
#include "ops/packed.cuh"
#include "ops/timeseries.h"

namespace lmf::cuda {
namespace {

constexpr const char* kOpBackward = "point_embedding_backward";
constexpr int64_t kRowsPerChunk = 512;
constexpr int kColsPerBlock = 32;
constexpr int kRowThreads = 8;

__device__ __forceinline__ float exp_clamped(float x) { return expf(fminf(fmaxf(x, -87.0f), 87.0f)); }

int64_t chunks_of(int64_t N) { return ceil_div(N, kRowsPerChunk); }

template <class Act>
void forward_impl(Act* x, const float* v, const float* w, int64_t N, int64_t C) {
  launch_elementwise("point_embedding_forward", N * C, [=] __device__(int64_t i) {
    const int64_t n = i / C, c = i - n * C;
    const float g = v[n] * w[c], u = v[n] * w[C + c];
    x[i] = from_f32<Act>(g / (1.0f + exp_clamped(-g)) * u);
  });
}

// partial (chunks, 2C): rows [chunk * kRowsPerChunk, +kRowsPerChunk) of each column's two sums.
template <class Act>
__global__ void point_backward_partial_kernel(float* partial, const Act* dx, const float* v, const float* w, int64_t N,
                                              int64_t C) {
  __shared__ float sg[kRowThreads][kColsPerBlock], su[kRowThreads][kColsPerBlock];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + tx;
  const int64_t chunk = blockIdx.y, r0 = chunk * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < N ? r0 + kRowsPerChunk : N;
  float dg = 0, du = 0;
  if (c < C) {
    const float wg = w[c], we = w[C + c];
    for (int64_t n = r0 + ty; n < r1; n += kRowThreads) {
      const float vn = v[n], g = vn * wg, u = vn * we;
      const float e = exp_clamped(-g), s = 1.0f / (1.0f + e);
      const float d = to_f32(dx[n * C + c]);
      dg += d * u * (s + g * (e * s * s)) * vn;
      du += d * (g * s) * vn;
    }
  }
  sg[ty][tx] = dg;
  su[ty][tx] = du;
  __syncthreads();
  if (ty == 0 && c < C) {
    float a = sg[0][tx], b = su[0][tx];
    for (int k = 1; k < kRowThreads; ++k) {
      a += sg[k][tx];
      b += su[k][tx];
    }
    partial[chunk * 2 * C + c] = a;
    partial[chunk * 2 * C + C + c] = b;
  }
}

template <class Act>
void backward_impl(float* dw, const Act* dx, const float* v, const float* w, int64_t N, int64_t C) {
  if (N == 0 || C == 0) return;
  const int64_t chunks = chunks_of(N);
  float* partial = static_cast<float*>(cuda_workspace(point_embedding_backward_workspace(N, C), kOpBackward));
  launch({kOpBackward, shape_text("N=", N, " C=", C), {ceil_div(C, kColsPerBlock), chunks, 1},
          {kColsPerBlock, kRowThreads, 1}, 0},
         point_backward_partial_kernel<Act>, partial, dx, v, w, N, C);
  launch_elementwise(kOpBackward, 2 * C, [=] __device__(int64_t j) {
    float acc = 0;
    for (int64_t k = 0; k < chunks; ++k) acc += partial[k * 2 * C + j];
    dw[j] += acc;
  });
}

}  // namespace

void point_embedding_forward(float* x, const float* values, const float* w, int64_t N, int64_t C) {
  forward_impl(x, values, w, N, C);
}

void point_embedding_forward(bf16* x, const float* values, const float* w, int64_t N, int64_t C) {
  forward_impl(as_nv(x), values, w, N, C);
}

void point_embedding_backward(float* dw, const float* dx, const float* values, const float* w, int64_t N, int64_t C) {
  backward_impl(dw, dx, values, w, N, C);
}

void point_embedding_backward(float* dw, const bf16* dx, const float* values, const float* w, int64_t N, int64_t C) {
  backward_impl(dw, as_nv(dx), values, w, N, C);
}

size_t point_embedding_backward_workspace(int64_t N, int64_t C) {
  return static_cast<size_t>(chunks_of(N) * 2 * C) * sizeof(float);
}

}  // namespace lmf::cuda
