// linear.cpp: CPU reference of y = x W^T + b (PyTorch nn.Linear layout), GEMMs through blas_sgemm
// (ops/blas.h: lmforge's CPU GEMM over the worker threads, core/parallel.h); the forward adds the bias
// in the GEMM's epilogue, on each tile of y while it is in cache (the same bits as a separate pass).
//
// Every GEMM reads the caller's row-major buffers in place (transposes and leading dimensions, no
// copies). Backward accumulates (+=, sgemm beta = 1) into every gradient it is given.
// Determinism: the GEMMs are deterministic for a fixed thread count; the bias-gradient reduction
// sums each column over rows in increasing row order, whatever the number of threads.
#include "ops/linear.h"

#include <algorithm>
#include <climits>

#include "core/parallel.h"
#include "ops/activation.h"
#include "ops/blas.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr const char* kOpForward = "linear_forward";
constexpr const char* kOpBackward = "linear_backward";

// Columns per parallel chunk in the bias reduction: wide enough to vectorise the row loop.
constexpr int64_t kBiasCols = 64;

// out: (N, OC); inp: (N, IC); weight: (OC, IC); bias: (OC) or nullptr. All row-major.
void linear_forward_cpu(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t IC,
                        int64_t OC) {
  // out = inp weight^T, then out += bias on each tile of out while it is in cache
  struct Bias {
    float* out;
    const float* bias;
    int64_t OC;
  } ctx{out, bias, OC};
  const BlasEpilogue add_bias{[](void* p, int64_t n0, int64_t n1, int64_t c0, int64_t c1) {
                                const Bias& b = *static_cast<const Bias*>(p);
                                for (int64_t n = n0; n < n1; ++n) {
                                  float* o = b.out + n * b.OC;
                                  for (int64_t c = c0; c < c1; ++c) o[c] += b.bias[c];
                                }
                              },
                              &ctx};
  blas_sgemm(false, true, N, OC, IC, 1.0f, inp, IC, weight, IC, 0.0f, out, OC, bias ? &add_bias : nullptr);
}

// dinp: (N, IC) or nullptr; dweight: (OC, IC) or nullptr; dbias: (OC) or nullptr;
// dout: (N, OC); inp: (N, IC); weight: (OC, IC). Accumulated, except dinp / dweight when
// accumulate_dinp / accumulate_dweight is false (GEMM beta 0: the same bits as zeroing and adding).
void linear_backward_cpu(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                         const float* weight, int64_t N, int64_t IC, int64_t OC, bool accumulate_dinp,
                         bool accumulate_dweight) {
  // dinp (N, IC) += dout (N, OC) weight (OC, IC)
  if (dinp) blas_sgemm(false, false, N, IC, OC, 1.0f, dout, OC, weight, IC, accumulate_dinp ? 1.0f : 0.0f, dinp, IC);
  // dweight (OC, IC) += dout^T (OC, N) inp (N, IC)
  if (dweight)
    blas_sgemm(true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, accumulate_dweight ? 1.0f : 0.0f, dweight, IC);
  // dbias[c] += sum_n dout[n, c]: parallel over blocks of columns, rows summed in order.
  if (dbias) {
    const int64_t grain = N * OC >= (1 << 16) ? kBiasCols : OC;  // small: one chunk, no threads
    parallel_for(OC, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0; c0 < b1; c0 += kBiasCols) {
        const int64_t w = std::min(kBiasCols, b1 - c0);
        float acc[kBiasCols] = {};
        for (int64_t r = 0; r < N; ++r) {
          const float* row = dout + r * OC + c0;
          for (int64_t c = 0; c < w; ++c) acc[c] += row[c];
        }
        for (int64_t c = 0; c < w; ++c) dbias[c0 + c] += acc[c];
      }
    });
  }
}

// Rows of a tensor whose last dimension is `cols` (leading dimensions flatten).
int64_t flat_rows(const Tensor& t, int64_t cols) { return cols ? t.numel() / cols : 0; }

// The shapes forward and backward share: weight (OC, IC), inp (.., IC) and y (.., OC) (out or
// dout) with the same number of rows N; all f32. Returns {N, IC, OC}.
struct LinearDims {
  int64_t N, IC, OC;
};
// dt: f32, or bf16 (GPU only) for mixed precision.
LinearDims check_linear(const char* op, const Tensor& y, const Tensor& inp, const Tensor& weight, DType dt) {
  check_dtype(y, dt, op);
  check_dtype(inp, dt, op);
  check_dtype(weight, dt, op);
  LMF_CHECK(weight.ndim == 2, op, ": weight '", weight.name, "' must be 2-D (OC, IC), got ", weight.shape_str());
  const int64_t OC = weight.shape[0], IC = weight.shape[1];
  LMF_CHECK(OC >= 1 && IC >= 1, op, ": weight '", weight.name, "' has shape ", weight.shape_str());
  LMF_CHECK(inp.dim(-1) == IC, op, ": inp '", inp.name, "' ", inp.shape_str(), " last dim must be IC=", IC,
            " of weight '", weight.name, "' ", weight.shape_str());
  LMF_CHECK(y.dim(-1) == OC, op, ": '", y.name, "' ", y.shape_str(), " last dim must be OC=", OC, " of weight '",
            weight.name, "' ", weight.shape_str());
  const int64_t N = flat_rows(inp, IC);
  LMF_CHECK(flat_rows(y, OC) == N, op, ": '", y.name, "' ", y.shape_str(), " has ", flat_rows(y, OC),
            " rows but inp '", inp.name, "' ", inp.shape_str(), " has N=", N);
  return {N, IC, OC};
}

}  // namespace

size_t linear_backward_cuda_workspace(int64_t N, int64_t OC) {
  const int64_t chunks = (N + kLinearBiasRowChunk - 1) / kLinearBiasRowChunk;
  return static_cast<size_t>(chunks * OC) * sizeof(float);
}

void linear_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias, GemmMath math) {
  check_same_device(kOpForward, {&out, &inp, &weight, &bias});
  const DType dt = out.dtype == DType::bf16 ? DType::bf16 : DType::f32;
  const auto [N, IC, OC] = check_linear(kOpForward, out, inp, weight, dt);
  if (bias.defined()) {
    check_dtype(bias, dt, kOpForward);
    check_shape(bias, {OC}, kOpForward);
  }
  LMF_CHECK(N <= INT_MAX && IC <= INT_MAX && OC <= INT_MAX, kOpForward, ": sizes N=", N, " IC=", IC, " OC=", OC,
            " exceed the BLAS int range");
  if (N == 0) return;
  if (dt == DType::bf16) {
    const bf16* b = bias.defined() ? bias.ptr<bf16>() : nullptr;
    LMF_CUDA_DISPATCH(kOpForward, cuda::linear_forward(out.ptr<bf16>(), inp.ptr<bf16>(), weight.ptr<bf16>(), b, N, IC, OC));
    return;
  }
  const float* b = bias.defined() ? bias.f32() : nullptr;
  if (out.device == Device::cpu) linear_forward_cpu(out.f32(), inp.f32(), weight.f32(), b, N, IC, OC);
  else LMF_CUDA_DISPATCH(kOpForward, cuda::linear_forward(out.f32(), inp.f32(), weight.f32(), b, N, IC, OC, math));
}

void linear_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                     GradMode dinp_mode, GradMode dweight_mode, GemmMath math) {
  check_same_device(kOpBackward, {&dinp, &dweight, &dbias, &dout, &inp, &weight});
  const DType dt = dout.dtype == DType::bf16 ? DType::bf16 : DType::f32;
  const auto [N, IC, OC] = check_linear(kOpBackward, dout, inp, weight, dt);
  if (dinp.defined()) {
    check_dtype(dinp, dt, kOpBackward);
    LMF_CHECK(dinp.dim(-1) == IC && flat_rows(dinp, IC) == N, kOpBackward, ": dinp '", dinp.name, "' ",
              dinp.shape_str(), " must hold N=", N, " rows of IC=", IC, " like inp '", inp.name, "' ", inp.shape_str());
  }
  if (dweight.defined()) {
    check_f32(dweight, kOpBackward);
    check_shape(dweight, {OC, IC}, kOpBackward);
  }
  if (dbias.defined()) {
    check_f32(dbias, kOpBackward);
    check_shape(dbias, {OC}, kOpBackward);
  }
  LMF_CHECK(N <= INT_MAX && IC <= INT_MAX && OC <= INT_MAX, kOpBackward, ": sizes N=", N, " IC=", IC, " OC=", OC,
            " exceed the BLAS int range");
  if (N == 0) return;
  auto opt = [](const Tensor& t) { return t.defined() ? t.f32() : nullptr; };
  const bool acc = dinp_mode == GradMode::Accumulate;
  if (dt == DType::bf16) {
    bf16* di = dinp.defined() ? dinp.ptr<bf16>() : nullptr;
    LMF_CUDA_DISPATCH(kOpBackward, cuda::linear_backward(di, opt(dweight), opt(dbias), dout.ptr<bf16>(),
                                                         inp.ptr<bf16>(), weight.ptr<bf16>(), N, IC, OC, acc,
                                                         dweight_mode == GradMode::Accumulate));
    return;
  }
  const bool acc_w = dweight_mode == GradMode::Accumulate;
  if (dout.device == Device::cpu) {
    linear_backward_cpu(opt(dinp), opt(dweight), opt(dbias), dout.f32(), inp.f32(), weight.f32(), N, IC, OC, acc, acc_w);
    return;
  }
  if (dweight.defined() && !acc_w) tensor_zero(dweight);  // then accumulated
  LMF_CUDA_DISPATCH(kOpBackward, cuda::linear_backward(opt(dinp), opt(dweight), opt(dbias), dout.f32(), inp.f32(),
                                                         weight.f32(), N, IC, OC, math, acc));
}

void linear_gelu_forward(Tensor act, Tensor pre, Tensor inp, Tensor weight, Tensor bias) {
  const char* op = "linear_gelu_forward";
  check_same_device(op, {&act, &pre, &inp, &weight, &bias});
  const DType dt = act.dtype == DType::bf16 ? DType::bf16 : DType::f32;
  const auto [N, IC, OC] = check_linear(op, act, inp, weight, dt);
  check_dtype(pre, dt, op);
  LMF_CHECK(pre.numel() == act.numel() && pre.dim(-1) == OC, op, ": pre '", pre.name, "' ", pre.shape_str(),
            " must have the shape of act '", act.name, "' ", act.shape_str());
  LMF_CHECK(bias.defined(), op, ": needs a bias (the GELU_AUX_BIAS epilogue)");
  check_dtype(bias, dt, op);
  check_shape(bias, {OC}, op);
  if (N == 0) return;
  if (dt == DType::f32) {  // the reference composition, on either device
    linear_forward(pre, inp, weight, bias);
    gelu_forward(act, pre);
    return;
  }
  LMF_CUDA_DISPATCH(op, cuda::linear_gelu_forward(act.ptr<bf16>(), pre.ptr<bf16>(), inp.ptr<bf16>(),
                                                  weight.ptr<bf16>(), bias.ptr<bf16>(), N, IC, OC));
}

void linear_backward_dgelu(Tensor dpre, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                           Tensor pre, GradMode dweight_mode) {
  const char* op = "linear_backward_dgelu";
  check_same_device(op, {&dpre, &dweight, &dbias, &dout, &inp, &weight, &pre});
  const auto [N, IC, OC] = check_linear(op, dout, inp, weight, DType::bf16);
  check_dtype(dpre, DType::bf16, op);
  check_dtype(pre, DType::bf16, op);
  for (const Tensor* t : {&dpre, &pre})
    LMF_CHECK(t->numel() == inp.numel() && t->dim(-1) == IC, op, ": '", t->name, "' ", t->shape_str(),
              " must have the shape of inp '", inp.name, "' ", inp.shape_str());
  if (dweight.defined()) {
    check_f32(dweight, op);
    check_shape(dweight, {OC, IC}, op);
  }
  if (dbias.defined()) {
    check_f32(dbias, op);
    check_shape(dbias, {OC}, op);
  }
  if (N == 0) return;
  auto opt = [](const Tensor& t) { return t.defined() ? t.f32() : nullptr; };
  LMF_CUDA_DISPATCH(op, cuda::linear_backward_dgelu(dpre.ptr<bf16>(), opt(dweight), opt(dbias), dout.ptr<bf16>(),
                                                    inp.ptr<bf16>(), weight.ptr<bf16>(), pre.ptr<bf16>(), N, IC, OC,
                                                    dweight_mode == GradMode::Accumulate));
}

}  // namespace lmf
