// activation.cpp: CPU reference of GELU (tanh approximation) and SwiGLU (activation.h).
//
// Both are written through the logistic sigmoid so that no tanh() call (not vectorisable without
// -ffast-math) sits in the inner loop:
//   0.5 (1 + tanh(u)) = sigmoid(2u)        so gelu(x) = x * sigmoid(2u), u = k (x + 0.044715 x^3)
//   silu(g) = g * sigmoid(g)
// sigmoid(z) = 1 / (1 + e), e = exp(-z), with exp() a branch-free Cody-Waite + polynomial expf that
// the compiler vectorises. Its argument is clamped to [-87, 87], so for |x| in the hundreds e is
// finite (no inf/NaN) and sigmoid saturates to 1 or to ~1e-38; NaN inputs still give NaN.
// The derivative uses sigmoid * (1 - sigmoid) = e * s^2, which has no cancellation.
// Elementwise: results do not depend on the thread count. Backward accumulates (+=) into dinp.
#include "ops/activation.h"

#include <bit>
#include <cstdint>
#include <initializer_list>

namespace lmf {
namespace {

constexpr int64_t kParallelMin = 1 << 14;  // elements; below this the OpenMP fork costs more than the work

// exp(x) for float x, about 1 ulp on [-87, 87]; |x| is clamped to 87 (exp(87) = 6e37, exp(-87) = 2e-38,
// both normal floats). Cephes expf coefficients. Branch-free so that loops calling it vectorise.
inline float exp_f32(float x) {
  // The clamp is integer arithmetic on the magnitude bits, with no compare or select: under the default
  // -ftrapping-math GCC will not if-convert a float compare, and a select it turns into a branch gets
  // jump-threaded (x == 87 folds the rest to a constant); either stops the calling loop vectorising.
  // Non-negative floats order like their bit patterns as int32.
  constexpr int32_t kMaxMag = std::bit_cast<int32_t>(87.0f);
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const int32_t d = static_cast<int32_t>(bits & 0x7fffffffu) - kMaxMag;          // no overflow
  const int32_t mag = kMaxMag + (d & (d >> 31));                                  // min(|x|, 87) bits
  x = std::bit_cast<float>(static_cast<uint32_t>(mag) | (bits & 0x80000000u));    // sign back
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (round to nearest even, exact for |v| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, ln2 split in two (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n is in [-126, 126], so 2^n is a normal float.
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return p * scale;
}

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// out, inp: (n) flat
void gelu_forward_cpu(float* out, const float* inp, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluA * x * x * x);
    const float e = exp_f32(-2.0f * u);
    out[i] = x / (1.0f + e);
  }
}

// dinp, dout, inp: (n) flat; dinp += dout * gelu'(inp)
void gelu_backward_cpu(float* dinp, const float* dout, const float* inp, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluA * x * x * x);
    const float du = kGeluK * (1.0f + 3.0f * kGeluA * x * x);
    const float e = exp_f32(-2.0f * u);
    const float s = 1.0f / (1.0f + e);
    // d/dx [x s(2u)] = s + x * 2 u' * s (1 - s), and s (1 - s) = e s^2
    dinp[i] += dout[i] * (s + 2.0f * x * du * (e * s * s));
  }
}

// inp: (N, 2F) rows [gate | up]; out: (N, F)
void swiglu_forward_cpu(float* out, const float* inp, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static) if (N * F >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* gate = inp + r * 2 * F;
    const float* up = gate + F;
    float* o = out + r * F;
    for (int64_t j = 0; j < F; ++j) {
      const float g = gate[j];
      o[j] = g / (1.0f + exp_f32(-g)) * up[j];
    }
  }
}

// dinp: (N, 2F) += ; dout: (N, F); inp: (N, 2F)
void swiglu_backward_cpu(float* dinp, const float* dout, const float* inp, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static) if (N * F >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
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

}  // namespace

void gelu_forward(Tensor out, Tensor inp) {
  const char* op = "gelu_forward";
  for (const Tensor* t : {&out, &inp}) check_f32(*t, op);
  check_same_device(op, {&out, &inp});
  check_same_shape(inp, out, op);
  if (out.device == Device::cpu) gelu_forward_cpu(out.f32(), inp.f32(), out.numel());
  else fail(op, ": CUDA backend not built");
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  const char* op = "gelu_backward";
  for (const Tensor* t : {&dinp, &dout, &inp}) check_f32(*t, op);
  check_same_device(op, {&dinp, &dout, &inp});
  check_same_shape(dinp, inp, op);
  check_same_shape(dout, inp, op);
  if (inp.device == Device::cpu) gelu_backward_cpu(dinp.f32(), dout.f32(), inp.f32(), inp.numel());
  else fail(op, ": CUDA backend not built");
}

void swiglu_forward(Tensor out, Tensor inp) {
  const char* op = "swiglu_forward";
  for (const Tensor* t : {&out, &inp}) check_f32(*t, op);
  check_same_device(op, {&out, &inp});
  const int64_t F = check_swiglu_shapes(out, inp, op);
  const int64_t N = F > 0 ? out.numel() / F : 0;
  if (out.device == Device::cpu) swiglu_forward_cpu(out.f32(), inp.f32(), N, F);
  else fail(op, ": CUDA backend not built");
}

void swiglu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  const char* op = "swiglu_backward";
  for (const Tensor* t : {&dinp, &dout, &inp}) check_f32(*t, op);
  check_same_device(op, {&dinp, &dout, &inp});
  check_same_shape(dinp, inp, op);
  const int64_t F = check_swiglu_shapes(dout, inp, op);
  const int64_t N = F > 0 ? dout.numel() / F : 0;
  if (inp.device == Device::cpu) swiglu_backward_cpu(dinp.f32(), dout.f32(), inp.f32(), N, F);
  else fail(op, ": CUDA backend not built");
}

}  // namespace lmf
