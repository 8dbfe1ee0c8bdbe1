// activation.cu: CUDA launchers of GELU (tanh approximation) and SwiGLU (activation.h).
//
// Element-wise through elementwise.cuh, with the same formulas as the CPU reference
// (activation.cpp), written through the logistic sigmoid:
//   gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3);   silu(g) = g * sigmoid(g)
//   sigmoid(z) = 1 / (1 + e), e = exp(-z), derivative e * s^2 (no cancellation)
// exp is the precise expf (the build does not use --use_fast_math; <= 2 ulp), its argument clamped
// to [-87, 87] like the CPU's exp_f32, so |x| in the hundreds gives finite e and a saturated sigmoid
// instead of inf * 0 = NaN in the derivative. NaN inputs still give NaN (through x or g itself).
// The only difference from the CPU is the exp's last-ulp rounding (CPU: Cephes polynomial).
// Each element is independent: deterministic for any launch shape. Backward accumulates (+=).
#include "ops/activation.h"
#include "ops/elementwise.cuh"

namespace lmf::cuda {
namespace {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// exp(x) with x clamped to [-87, 87] (finite, positive, normal).
__device__ __forceinline__ float exp_clamped(float x) { return expf(fminf(fmaxf(x, -87.0f), 87.0f)); }

}  // namespace

void gelu_forward(float* out, const float* inp, int64_t n) {
  launch_elementwise("gelu_forward", n, [=] __device__(int64_t i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluA * x * x * x);
    out[i] = x / (1.0f + exp_clamped(-2.0f * u));
  });
}

void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  launch_elementwise("gelu_backward", n, [=] __device__(int64_t i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluA * x * x * x);
    const float du = kGeluK * (1.0f + 3.0f * kGeluA * x * x);
    const float e = exp_clamped(-2.0f * u);
    const float s = 1.0f / (1.0f + e);
    // d/dx [x s(2u)] = s + x * 2 u' * s (1 - s), and s (1 - s) = e s^2
    dinp[i] += dout[i] * (s + 2.0f * x * du * (e * s * s));
  });
}

void swiglu_forward(float* out, const float* inp, int64_t N, int64_t F) {
  launch_elementwise("swiglu_forward", N * F, [=] __device__(int64_t i) {
    const int64_t r = i / F, j = i - r * F;
    const float g = inp[r * 2 * F + j], up = inp[r * 2 * F + F + j];
    out[i] = g / (1.0f + exp_clamped(-g)) * up;
  });
}

void swiglu_backward(float* dinp, const float* dout, const float* inp, int64_t N, int64_t F) {
  launch_elementwise("swiglu_backward", N * F, [=] __device__(int64_t i) {
    const int64_t r = i / F, j = i - r * F;
    const int64_t ig = r * 2 * F + j, iu = ig + F;
    const float g = inp[ig], up = inp[iu], dy = dout[i];
    const float e = exp_clamped(-g);
    const float s = 1.0f / (1.0f + e);
    // silu'(g) = s + g s (1 - s) = s + g e s^2
    dinp[ig] += dy * up * (s + g * (e * s * s));
    dinp[iu] += dy * (g * s);
  });
}

}  // namespace lmf::cuda
