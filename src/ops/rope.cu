// rope.cu: CUDA launcher of rotary position embedding, "rotate half" convention (rope.h).
//
// One thread per (row n, head h < n_rot, pair i < half), grid-stride through elementwise.cuh: each
// thread reads x[i] and x[i + half] of its head and writes both back, so pairs are independent and
// the in-place update has no races. Same expressions as the CPU reference (rope.cpp); the table is
// the CPU-built (cos, sin) table copied to the device, so both backends read the same angles.
// sign = -1 applies the transpose (backward), which transforms in place rather than accumulating.
#include "ops/elementwise.cuh"
#include "ops/rope.h"

namespace lmf::cuda {

void rope_rotate(float* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot, int64_t half,
                 int64_t pos_offset, float sign) {
  const int64_t HS = 2 * half;
  launch_elementwise(sign > 0 ? "rope_forward" : "rope_backward", B * T * n_rot * half, [=] __device__(int64_t idx) {
    const int64_t i = idx % half, nh = idx / half;  // pair i of head h of row n
    const int64_t h = nh % n_rot, n = nh / n_rot;
    const float* cs = freqs + ((pos_offset + n % T) * half + i) * 2;
    const float c = cs[0], s = sign * cs[1];
    float* x = qkv + n * row + h * HS;
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;
    x[i + half] = x2 * c + x1 * s;
  });
}

}  // namespace lmf::cuda
