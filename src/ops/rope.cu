// rope.cu: CUDA launcher of rotary position embedding, "rotate half" convention (rope.h), on f32 or
// bf16 qkv (mixed precision: bf16 storage, fp32 math with the f32 table, each result rounded once).
//
// One thread per (row n, head h < n_rot, pair i < half) for f32, grid-stride through
// elementwise.cuh: each thread reads x[i] and x[i + half] of its head and writes both back, so pairs
// are independent and the in-place update has no races. bf16: one thread per pack of W pairs
// i..i+W-1, W = 8 (128-bit accesses) when half % 8 == 0 and the pointers are 16-byte aligned, else 1
// (packed.cuh). The f32 kernel is the pre-bf16 one, unchanged, so f32 keeps its bits: running f32
// through the packed template gave 1-ulp differences (presumably another FMA contraction of
// x1 c - x2 s).
// Same expressions as the CPU reference (rope.cpp); the table is the CPU-built (cos, sin) table
// copied to the device, so both backends read the same angles. sign = -1 applies the transpose
// (backward), which transforms in place rather than accumulating.
#include "ops/elementwise.cuh"
#include "ops/packed.cuh"
#include "ops/rope.h"

namespace lmf::cuda {
namespace {

template <int W, class T>
void rotate_packs(T* qkv, const float* freqs, int64_t B, int64_t T_, int64_t row, int64_t n_rot, int64_t half,
                  const int32_t* positions, int64_t pos_offset, float sign) {
  const int64_t HS = 2 * half, packs = half / W;
  launch_elementwise(sign > 0 ? "rope_forward" : "rope_backward", B * T_ * n_rot * packs, [=] __device__(int64_t idx) {
    const int64_t i = (idx % packs) * W, nh = idx / packs;  // pairs [i, i + W) of head h of row n
    const int64_t h = nh % n_rot, n = nh / n_rot;
    float cs[2 * W], x1[W], x2[W];
    const int64_t p = positions ? positions[n] : pos_offset + n % T_;
    load_f32<2 * W>(cs, freqs + (p * half + i) * 2);  // (cos, sin) of each pair
    T* x = qkv + n * row + h * HS;
    load_f32<W>(x1, x + i);
    load_f32<W>(x2, x + i + half);
    float y1[W], y2[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float c = cs[2 * k], s = sign * cs[2 * k + 1];
      y1[k] = x1[k] * c - x2[k] * s;
      y2[k] = x2[k] * c + x1[k] * s;
    }
    store_f32<W>(x + i, y1);
    store_f32<W>(x + i + half, y2);
  });
}

// bf16 qkv
template <class T>
void rotate_impl(T* qkv, const float* freqs, int64_t B, int64_t T_, int64_t row, int64_t n_rot, int64_t half,
                 const int32_t* positions, int64_t pos_offset, float sign) {
  // half % W == 0 makes every head offset (h HS, n row) and table offset a multiple of W elements.
  if (half % kPack<T> == 0 && aligned16(qkv, freqs))
    rotate_packs<kPack<T>>(qkv, freqs, B, T_, row, n_rot, half, positions, pos_offset, sign);
  else
    rotate_packs<1>(qkv, freqs, B, T_, row, n_rot, half, positions, pos_offset, sign);
}

}  // namespace

void rope_rotate(float* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot, int64_t half,
                 const int32_t* positions, int64_t pos_offset, float sign) {
  const int64_t HS = 2 * half;
  launch_elementwise(sign > 0 ? "rope_forward" : "rope_backward", B * T * n_rot * half, [=] __device__(int64_t idx) {
    const int64_t i = idx % half, nh = idx / half;  // pair i of head h of row n
    const int64_t h = nh % n_rot, n = nh / n_rot;
    const int64_t p = positions ? positions[n] : pos_offset + n % T;
    const float* cs = freqs + (p * half + i) * 2;
    const float c = cs[0], s = sign * cs[1];
    float* x = qkv + n * row + h * HS;
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;
    x[i + half] = x2 * c + x1 * s;
  });
}

void rope_rotate(bf16* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot, int64_t half,
                 const int32_t* positions, int64_t pos_offset, float sign) {
  rotate_impl(as_nv(qkv), freqs, B, T, row, n_rot, half, positions, pos_offset, sign);
}

}  // namespace lmf::cuda
