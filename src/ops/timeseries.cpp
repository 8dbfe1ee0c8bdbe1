// timeseries.cpp: CPU reference of the point embedding and the op entries of the forecast heads
// (timeseries.h); the heads' GEMMs are blas_sgemm on the CPU, cuda::gemm on the GPU, their loss
// ops/mse.h huber_horizons_loss on both.
#include "ops/timeseries.h"

#include "core/parallel.h"
#include "ops/blas.h"
#include "ops/cpu_math.h"
#include "ops/dispatch.h"
#include "ops/mse.h"

#ifdef LMF_WITH_CUDA
#include "ops/gemm_cuda.h"
#endif

namespace lmf {
namespace {

constexpr int64_t kMinGrain = 1 << 14;  // elements per parallel chunk

// x (N, C) = SiLU(v w_g) * (v w_e): swiglu_forward's expression on the (gate, up) pair v w_g, v w_e.
void point_forward_cpu(float* x, const float* v, const float* w, int64_t N, int64_t C) {
  parallel_for(N, grain_for(N, kMinGrain / C + 1), [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const float g = v[n] * w[c], u = v[n] * w[C + c];
        x[n * C + c] = g / (1.0f + cpu_math::exp_f32(-g)) * u;
      }
  });
}

// dw (2C) += column sums over the rows, in row order (each column one chain: independent of threads).
void point_backward_cpu(float* dw, const float* dx, const float* v, const float* w, int64_t N, int64_t C) {
  parallel_for(C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float dg = 0, du = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float g = v[n] * w[c], u = v[n] * w[C + c];
        const float e = cpu_math::exp_f32(-g), s = 1.0f / (1.0f + e);
        const float d = dx[n * C + c];
        dg += d * u * (s + g * (e * s * s)) * v[n];  // silu'(g) = s + g e s^2; dg/dw_g = v
        du += d * (g * s) * v[n];
      }
      dw[c] += dg;
      dw[C + c] += du;
    }
  });
}

// The point embedding's tensors: values (N) or (B, T, 1) f32, w (2C, 1) f32, x/dx (N, C) of f32 or bf16.
// Returns {N, C}.
std::pair<int64_t, int64_t> check_point(const char* op, const Tensor& x, const Tensor& values, const Tensor& w) {
  check_f32(values, op);
  check_f32(w, op);
  LMF_CHECK(w.ndim == 2 && w.dim(1) == 1 && w.dim(0) % 2 == 0, op, ": weight '", w.name, "' ", w.shape_str(),
            " must be (2C, 1)");
  const int64_t C = w.dim(0) / 2, N = values.numel();
  LMF_CHECK(x.numel() == N * C && x.dim(-1) == C, op, ": tensor '", x.name, "' ", x.shape_str(), " must hold (",
            N, ", ", C, ") (one row of C per value of '", values.name, "')");
  LMF_CHECK(x.dtype == DType::f32 || (x.dtype == DType::bf16 && x.device == Device::cuda), op, ": tensor '", x.name,
            "' is ", dtype_name(x.dtype), " on ", device_name(x.device), " (f32, or bf16 on the GPU)");
  check_same_device(op, {&x, &values, &w});
  return {N, C};
}

// The heads' tensors: x (N, C) and w (D, C) of one dtype. Returns {N, C, D}.
struct HeadDims {
  int64_t N, C, D;
};
HeadDims check_heads(const char* op, const Tensor& x, const Tensor& w) {
  LMF_CHECK(x.ndim == 2 && w.ndim == 2 && x.dim(1) == w.dim(1), op, ": x '", x.name, "' ", x.shape_str(),
            " and weight '", w.name, "' ", w.shape_str(), " must be (N, C) and (D, C)");
  LMF_CHECK(x.dtype == w.dtype && (x.dtype == DType::f32 || (x.dtype == DType::bf16 && x.device == Device::cuda)),
            op, ": x '", x.name, "' (", dtype_name(x.dtype), ") and weight '", w.name, "' (", dtype_name(w.dtype),
            ") must both be f32, or both bf16 on the GPU");
  return {x.dim(0), x.dim(1), w.dim(0)};
}

// out (N, D) f32 with row stride ldo = x w^T.
void heads_gemm(const char* op, float* out, int64_t ldo, const Tensor& x, const Tensor& w, const HeadDims& d,
                GemmMath math) {
  if (x.device == Device::cpu) {
    blas_sgemm(false, true, d.N, d.D, d.C, 1.0f, x.f32(), d.C, w.f32(), d.C, 0.0f, out, ldo);
  } else if (x.dtype == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, false, true, d.N, d.D, d.C, 1.0f, x.ptr<bf16>(), d.C, w.ptr<bf16>(), d.C,
                                     0.0f, out, ldo));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, math, false, true, d.N, d.D, d.C, 1.0f, x.f32(), d.C, w.f32(), d.C, 0.0f,
                                     out, ldo));
  }
  (void)math;
}

}  // namespace

void point_embedding_forward(Tensor x, Tensor values, Tensor w) {
  const char* op = "point_embedding_forward";
  const auto [N, C] = check_point(op, x, values, w);
  if (x.device == Device::cpu) point_forward_cpu(x.f32(), values.f32(), w.f32(), N, C);
  else if (x.dtype == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::point_embedding_forward(x.ptr<bf16>(), values.f32(), w.f32(), N, C));
  else LMF_CUDA_DISPATCH(op, cuda::point_embedding_forward(x.f32(), values.f32(), w.f32(), N, C));
}

void point_embedding_backward(Tensor dw, Tensor dx, Tensor values, Tensor w) {
  const char* op = "point_embedding_backward";
  const auto [N, C] = check_point(op, dx, values, w);
  check_f32(dw, op);
  check_shape(dw, {2 * C, 1}, op);
  check_same_device(op, {&dw, &w});
  if (dx.device == Device::cpu) point_backward_cpu(dw.f32(), dx.f32(), values.f32(), w.f32(), N, C);
  else if (dx.dtype == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::point_embedding_backward(dw.f32(), dx.ptr<bf16>(), values.f32(), w.f32(), N, C));
  else LMF_CUDA_DISPATCH(op, cuda::point_embedding_backward(dw.f32(), dx.f32(), values.f32(), w.f32(), N, C));
}

size_t point_embedding_backward_cuda_workspace(int64_t N, int64_t C) {
#ifdef LMF_WITH_CUDA
  return cuda::point_embedding_backward_workspace(N, C);
#else
  (void)N, (void)C;
  return 0;
#endif
}

int64_t forecast_heads_padded(int64_t D) { return (D + 7) / 8 * 8; }

void forecast_heads_loss(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets, Tensor pred,
                         Tensor dpred, const std::vector<int64_t>& horizons, float delta, float grad_scale,
                         GemmMath math) {
  const char* op = "forecast_heads_loss";
  const HeadDims d = check_heads(op, x, w);
  const int64_t Dp = forecast_heads_padded(d.D);
  check_f32(pred, op);
  LMF_CHECK(pred.ndim == 2 && pred.dim(0) >= d.N && pred.dim(1) == Dp, op, ": scratch '", pred.name, "' ",
            pred.shape_str(), " must be (>= ", d.N, ", ", Dp, ")");
  const Tensor p = pred.rows(0, d.N);
  check_same_device(op, {&losses, &dx, &dw, &x, &w, &targets, &pred, &dpred});
  heads_gemm(op, p.f32(), Dp, x, w, d, math);
  if (!dx.defined()) {
    huber_horizons_loss(losses, Tensor(), p, targets, horizons, delta, 0.0f);
    return;
  }
  check_shape(dx, {d.N, d.C}, op);
  check_shape(dw, {d.D, d.C}, op);
  check_f32(dw, op);
  LMF_CHECK(dx.dtype == x.dtype && dpred.dtype == x.dtype && dpred.ndim == 2 && dpred.dim(0) >= d.N &&
                dpred.dim(1) == Dp,
            op, ": dx '", dx.name, "' ", dx.shape_str(), " and scratch '", dpred.name, "' ", dpred.shape_str(),
            " must be x's dtype, (", d.N, ", ", d.C, ") and (>= ", d.N, ", ", Dp, ")");
  const Tensor dp = dpred.rows(0, d.N);
  huber_horizons_loss(losses, dp, p, targets, horizons, delta, grad_scale);
  // dx += dpred[:, :D] w; dw += dpred[:, :D]^T x
  if (x.device == Device::cpu) {
    blas_sgemm(false, false, d.N, d.C, d.D, 1.0f, dp.f32(), Dp, w.f32(), d.C, 1.0f, dx.f32(), d.C);
    blas_sgemm(true, false, d.D, d.C, d.N, 1.0f, dp.f32(), Dp, x.f32(), d.C, 1.0f, dw.f32(), d.C);
  } else if (x.dtype == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, false, false, d.N, d.C, d.D, 1.0f, dp.ptr<bf16>(), Dp, w.ptr<bf16>(), d.C,
                                     1.0f, dx.ptr<bf16>(), d.C));
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, true, false, d.D, d.C, d.N, 1.0f, dp.ptr<bf16>(), Dp, x.ptr<bf16>(), d.C,
                                     1.0f, dw.f32(), d.C));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, math, false, false, d.N, d.C, d.D, 1.0f, dp.f32(), Dp, w.f32(), d.C, 1.0f,
                                     dx.f32(), d.C));
    LMF_CUDA_DISPATCH(op, cuda::gemm(op, math, true, false, d.D, d.C, d.N, 1.0f, dp.f32(), Dp, x.f32(), d.C, 1.0f,
                                     dw.f32(), d.C));
  }
}

void forecast_heads_forward(Tensor out, Tensor x, Tensor w, GemmMath math) {
  const char* op = "forecast_heads_forward";
  const HeadDims d = check_heads(op, x, w);
  check_f32(out, op);
  check_shape(out, {d.N, d.D}, op);
  check_same_device(op, {&out, &x, &w});
  heads_gemm(op, out.f32(), d.D, x, w, d, math);
}

}  // namespace lmf
