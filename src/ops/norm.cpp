// norm.cpp: CPU reference of LayerNorm and RMSNorm over the last dimension (norm.h).
//
// Numerics: every row statistic (mean, variance, mean square, the two backward row sums) is
// accumulated in double with 8 fixed lanes combined in a fixed order: vectorisable without
// -ffast-math, accurate for rows with a large offset (1000 + noise), and bitwise reproducible.
// LayerNorm uses two passes (mean, then the mean of squared deviations), so a large common offset
// does not cancel. mean and rstd are stored as f32 and the output is computed from those stored
// values, so backward differentiates exactly the function forward evaluated.
// Parallelism: forward and dinp run over rows (independent). dweight/dbias reduce over rows, so they
// run over fixed blocks of columns, each column summed over rows 0..N-1 in order (in double):
// bitwise identical for any thread count, no atomics.
// Backward accumulates (+=) into dinp, dweight and dbias (src/ops/README.md); dbias may be absent.
// The fused residual_*norm_forward is, on the CPU, residual_forward followed by the norm of the
// stored res (bitwise the same as calling the two ops).
// bf16 rows (mixed precision) run on the GPU only; the CPU stays the fp32 reference, and a bf16
// tensor here fails naming it (check_dtype).
#include "ops/norm.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "core/parallel.h"
#include "ops/dispatch.h"
#include "ops/residual.h"

namespace lmf {
namespace {

constexpr int64_t kParallelMin = 1 << 14;  // elements; smaller ops run on one thread (same results)
constexpr int64_t kLanes = 8;              // double accumulators per row sum
constexpr int64_t kColBlock = 32;          // columns per task in the dweight/dbias reduction

// Rows per parallel chunk of a row loop (rows are independent: any chunking gives the same bits).
inline int64_t row_grain(int64_t N, int64_t C) {
  return grain_for(N, kParallelMin / 2 / std::max<int64_t>(C, 1) + 1);
}

// Combines the lanes in a fixed order.
inline double sum_lanes(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_i x[i] in double. x: (C)
inline double row_sum(const float* x, int64_t C) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(x[i + k]);
  for (int64_t k = 0; i < C; ++i, ++k) acc[k] += static_cast<double>(x[i]);
  return sum_lanes(acc);
}

// sum_i (x[i] - m)^2 in double. x: (C)
inline double row_sum_sq_dev(const float* x, int64_t C, double m) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[i + k]) - m;
      acc[k] += d * d;
    }
  for (int64_t k = 0; i < C; ++i, ++k) {
    const double d = static_cast<double>(x[i]) - m;
    acc[k] += d * d;
  }
  return sum_lanes(acc);
}

// With dnorm = w * dy and xhat = (x - m) * r: returns sum(dnorm) and sum(dnorm * xhat) in double.
// x, dy, w: (C). For RMSNorm pass m = 0.
inline void row_backward_sums(const float* x, const float* dy, const float* w, float m, float r, int64_t C,
                              double* sum_dnorm, double* sum_dnorm_xhat) {
  double a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const float dnorm = w[i + k] * dy[i + k];
      const float xhat = (x[i + k] - m) * r;
      a[k] += static_cast<double>(dnorm);
      b[k] += static_cast<double>(dnorm) * static_cast<double>(xhat);
    }
  for (int64_t k = 0; i < C; ++i, ++k) {
    const float dnorm = w[i] * dy[i];
    const float xhat = (x[i] - m) * r;
    a[k] += static_cast<double>(dnorm);
    b[k] += static_cast<double>(dnorm) * static_cast<double>(xhat);
  }
  *sum_dnorm = sum_lanes(a);
  *sum_dnorm_xhat = sum_lanes(b);
}

// out, inp: (N, C) row-major; mean, rstd: (N); weight: (C); bias: (C) or nullptr
void layernorm_forward_cpu(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                           const float* bias, int64_t N, int64_t C, float eps) {
  parallel_for(N, row_grain(N, C), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = inp + n * C;
      float* y = out + n * C;
      const double m = row_sum(x, C) / static_cast<double>(C);
      const double var = row_sum_sq_dev(x, C, m) / static_cast<double>(C);
      const float mf = static_cast<float>(m);
      const float rf = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
      mean[n] = mf;
      rstd[n] = rf;
      if (bias) {
        for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - mf) * rf * weight[i] + bias[i];
      } else {
        for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - mf) * rf * weight[i];
      }
    }
  });
}

// dinp, dout, inp: (N, C) row-major; weight: (C); mean, rstd: (N). dinp +=
// dinp = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = weight * dout; for RMSNorm
// mean == nullptr (no centring, no mean(dnorm) term).
void norm_backward_dinp_cpu(float* dinp, const float* dout, const float* inp, const float* weight,
                            const float* mean, const float* rstd, int64_t N, int64_t C) {
  parallel_for(N, row_grain(N, C), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = inp + n * C;
      const float* dy = dout + n * C;
      float* dx = dinp + n * C;
      const float m = mean ? mean[n] : 0.0f;
      const float r = rstd[n];
      double sum_dnorm, sum_dnorm_xhat;
      row_backward_sums(x, dy, weight, m, r, C, &sum_dnorm, &sum_dnorm_xhat);
      const float a = mean ? static_cast<float>(sum_dnorm / static_cast<double>(C)) : 0.0f;
      const float b = static_cast<float>(sum_dnorm_xhat / static_cast<double>(C));
      for (int64_t i = 0; i < C; ++i) {
        const float xhat = (x[i] - m) * r;
        dx[i] += r * (weight[i] * dy[i] - a - xhat * b);
      }
    }
  });
}

// dweight += sum_n dout * xhat; dbias += sum_n dout (dbias may be nullptr; mean nullptr for RMSNorm).
// dout, inp: (N, C) row-major; mean, rstd: (N); dweight, dbias: (C)
void norm_backward_params_cpu(float* dweight, float* dbias, const float* dout, const float* inp,
                              const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t nblocks = (C + kColBlock - 1) / kColBlock;
  parallel_for(nblocks, N * C >= kParallelMin ? 1 : nblocks, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kColBlock;
      const int64_t nc = std::min(kColBlock, C - c0);
      double dw[kColBlock] = {}, db[kColBlock] = {};
      for (int64_t n = 0; n < N; ++n) {
        const float* x = inp + n * C + c0;
        const float* dy = dout + n * C + c0;
        const float m = mean ? mean[n] : 0.0f;
        const float r = rstd[n];
        for (int64_t j = 0; j < nc; ++j) {
          const float xhat = (x[j] - m) * r;
          dw[j] += static_cast<double>(dy[j]) * static_cast<double>(xhat);
          db[j] += static_cast<double>(dy[j]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) dweight[c0 + j] += static_cast<float>(dw[j]);
      if (dbias)
        for (int64_t j = 0; j < nc; ++j) dbias[c0 + j] += static_cast<float>(db[j]);
    }
  });
}

// dsum[c] += sum_n dinp[n, c], rows in increasing order, in double. dinp: (N, C) row-major; dsum: (C)
void column_sums_cpu(float* dsum, const float* dinp, int64_t N, int64_t C) {
  const int64_t nblocks = (C + kColBlock - 1) / kColBlock;
  parallel_for(nblocks, N * C >= kParallelMin ? 1 : nblocks, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kColBlock;
      const int64_t nc = std::min(kColBlock, C - c0);
      double s[kColBlock] = {};
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < nc; ++j) s[j] += static_cast<double>(dinp[n * C + c0 + j]);
      for (int64_t j = 0; j < nc; ++j) dsum[c0 + j] += static_cast<float>(s[j]);
    }
  });
}

// out, inp: (N, C) row-major; rstd: (N); weight: (C)
void rmsnorm_forward_cpu(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                         float eps) {
  parallel_for(N, row_grain(N, C), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = inp + n * C;
      float* y = out + n * C;
      const double ms = row_sum_sq_dev(x, C, 0.0) / static_cast<double>(C);
      const float rf = static_cast<float>(1.0 / std::sqrt(ms + static_cast<double>(eps)));
      rstd[n] = rf;
      for (int64_t i = 0; i < C; ++i) y[i] = x[i] * rf * weight[i];
    }
  });
}

// --- validation ---------------------------------------------------------------------------------

// t: any leading dims, last dim C, N rows.
void check_rows(const Tensor& t, int64_t N, int64_t C, const char* op) {
  LMF_CHECK(t.dim(-1) == C && t.numel() == N * C, op, ": tensor '", t.name, "' has shape ", t.shape_str(),
            ", expected (..., ", C, ") with N=", N, " rows");
}

// Per-row statistic: N elements (any shape, e.g. (N) or (B, T)).
void check_stat(const Tensor& t, int64_t N, const char* op) {
  LMF_CHECK(t.numel() == N, op, ": tensor '", t.name, "' has shape ", t.shape_str(), ", expected N=", N,
            " elements (one per row)");
}

// The dtype of the rows (out, inp, dinp, dout, res, a, b), from the lead tensor: bf16 or else f32.
// check_dtype then rejects anything else, a mix, and a bf16 tensor on the CPU, naming the tensor.
DType row_dtype(const Tensor& t) { return t.defined() && t.dtype == DType::bf16 ? DType::bf16 : DType::f32; }

// Throws unless t has exactly the shape of ref.
void check_same_shape(const Tensor& t, const Tensor& ref, const char* op) {
  bool ok = t.ndim == ref.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == ref.shape[i];
  LMF_CHECK(ok, op, ": tensor '", t.name, "' has shape ", t.shape_str(), ", expected ", ref.shape_str(),
            " (the shape of '", ref.name, "')");
}

// C and N of inp (leading dims flatten).
void rows_of(const Tensor& inp, const char* op, int64_t* N, int64_t* C) {
  *C = inp.dim(-1);
  LMF_CHECK(*C > 0, op, ": tensor '", inp.name, "' ", inp.shape_str(), " has an empty last dimension");
  *N = inp.numel() / *C;
}

// Validates the fused residual + norm operands and returns their dtype, N and C. centre: LayerNorm
// (mean required); else RMSNorm (mean and bias absent). res, b: the exact shape of a; out: (..., C)
// with N rows; out must not alias res (res is kept for backward).
DType check_residual_norm(const char* op, bool centre, const Tensor& res, const Tensor& out, const Tensor& mean,
                          const Tensor& rstd, const Tensor& a, const Tensor& b, const Tensor& weight,
                          const Tensor& bias, float eps, int64_t* N, int64_t* C) {
  const DType dt = row_dtype(a);
  for (const Tensor* t : {&a, &b, &res, &out}) check_dtype(*t, dt, op);
  for (const Tensor* t : {&rstd, &weight}) check_f32(*t, op);
  if (centre) check_f32(mean, op);
  if (bias.defined()) check_f32(bias, op);
  check_same_device(op, {&res, &out, &mean, &rstd, &a, &b, &weight, &bias});
  rows_of(a, op, N, C);
  check_same_shape(b, a, op);
  check_same_shape(res, a, op);
  check_rows(out, *N, *C, op);
  LMF_CHECK(out.data != res.data, op, ": tensor '", out.name, "' aliases '", res.name,
            "' (res is an output kept for backward)");
  if (centre) check_stat(mean, *N, op);
  check_stat(rstd, *N, op);
  check_shape(weight, {*C}, op);
  if (bias.defined()) check_shape(bias, {*C}, op);
  LMF_CHECK(eps >= 0.0f, op, ": eps=", eps, " must be >= 0");
  return dt;
}

}  // namespace

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias, float eps) {
  const char* op = "layernorm_forward";
  const DType dt = row_dtype(inp);
  for (const Tensor* t : {&inp, &out}) check_dtype(*t, dt, op);
  for (const Tensor* t : {&mean, &rstd, &weight}) check_f32(*t, op);
  if (bias.defined()) check_f32(bias, op);
  check_same_device(op, {&out, &mean, &rstd, &inp, &weight, &bias});
  int64_t N, C;
  rows_of(inp, op, &N, &C);
  check_rows(out, N, C, op);
  check_stat(mean, N, op);
  check_stat(rstd, N, op);
  check_shape(weight, {C}, op);
  if (bias.defined()) check_shape(bias, {C}, op);
  LMF_CHECK(eps >= 0.0f, op, ": eps=", eps, " must be >= 0");
  const float* bias_p = bias.defined() ? bias.f32() : nullptr;
  if (dt == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::layernorm_forward(out.ptr<bf16>(), mean.f32(), rstd.f32(), inp.ptr<bf16>(),
                                                  weight.f32(), bias_p, N, C, eps));
  else if (inp.device == Device::cpu)
    layernorm_forward_cpu(out.f32(), mean.f32(), rstd.f32(), inp.f32(), weight.f32(), bias_p, N, C, eps);
  else
    LMF_CUDA_DISPATCH(op, cuda::layernorm_forward(out.f32(), mean.f32(), rstd.f32(), inp.f32(), weight.f32(), bias_p,
                                                  N, C, eps));
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                        Tensor mean, Tensor rstd, Tensor dinp_sum) {
  const char* op = "layernorm_backward";
  const DType dt = row_dtype(inp);
  for (const Tensor* t : {&inp, &dinp, &dout}) check_dtype(*t, dt, op);
  for (const Tensor* t : {&dweight, &weight, &mean, &rstd}) check_f32(*t, op);
  for (const Tensor* t : {&dbias, &dinp_sum})
    if (t->defined()) check_f32(*t, op);
  check_same_device(op, {&dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd, &dinp_sum});
  int64_t N, C;
  rows_of(inp, op, &N, &C);
  check_rows(dinp, N, C, op);
  check_rows(dout, N, C, op);
  check_stat(mean, N, op);
  check_stat(rstd, N, op);
  check_shape(weight, {C}, op);
  check_shape(dweight, {C}, op);
  for (const Tensor* t : {&dbias, &dinp_sum})
    if (t->defined()) check_shape(*t, {C}, op);
  float* dbias_p = dbias.defined() ? dbias.f32() : nullptr;
  float* dsum_p = dinp_sum.defined() ? dinp_sum.f32() : nullptr;
  if (dt == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::layernorm_backward(dinp.ptr<bf16>(), dweight.f32(), dbias_p, dsum_p, dout.ptr<bf16>(),
                                                   inp.ptr<bf16>(), weight.f32(), mean.f32(), rstd.f32(), N, C));
  } else if (inp.device == Device::cpu) {
    norm_backward_dinp_cpu(dinp.f32(), dout.f32(), inp.f32(), weight.f32(), mean.f32(), rstd.f32(), N, C);
    norm_backward_params_cpu(dweight.f32(), dbias_p, dout.f32(), inp.f32(), mean.f32(), rstd.f32(), N, C);
    if (dsum_p) column_sums_cpu(dsum_p, dinp.f32(), N, C);
  } else {
    LMF_CUDA_DISPATCH(op, cuda::layernorm_backward(dinp.f32(), dweight.f32(), dbias_p, dsum_p, dout.f32(), inp.f32(),
                                                   weight.f32(), mean.f32(), rstd.f32(), N, C));
  }
}

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps) {
  const char* op = "rmsnorm_forward";
  const DType dt = row_dtype(inp);
  for (const Tensor* t : {&inp, &out}) check_dtype(*t, dt, op);
  for (const Tensor* t : {&rstd, &weight}) check_f32(*t, op);
  check_same_device(op, {&out, &rstd, &inp, &weight});
  int64_t N, C;
  rows_of(inp, op, &N, &C);
  check_rows(out, N, C, op);
  check_stat(rstd, N, op);
  check_shape(weight, {C}, op);
  LMF_CHECK(eps >= 0.0f, op, ": eps=", eps, " must be >= 0");
  if (dt == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::rmsnorm_forward(out.ptr<bf16>(), rstd.f32(), inp.ptr<bf16>(), weight.f32(), N, C, eps));
  else if (inp.device == Device::cpu) rmsnorm_forward_cpu(out.f32(), rstd.f32(), inp.f32(), weight.f32(), N, C, eps);
  else LMF_CUDA_DISPATCH(op, cuda::rmsnorm_forward(out.f32(), rstd.f32(), inp.f32(), weight.f32(), N, C, eps));
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight, Tensor rstd,
                      Tensor dinp_sum) {
  const char* op = "rmsnorm_backward";
  const DType dt = row_dtype(inp);
  for (const Tensor* t : {&inp, &dinp, &dout}) check_dtype(*t, dt, op);
  for (const Tensor* t : {&dweight, &weight, &rstd}) check_f32(*t, op);
  if (dinp_sum.defined()) check_f32(dinp_sum, op);
  check_same_device(op, {&dinp, &dweight, &dout, &inp, &weight, &rstd, &dinp_sum});
  int64_t N, C;
  rows_of(inp, op, &N, &C);
  check_rows(dinp, N, C, op);
  check_rows(dout, N, C, op);
  check_stat(rstd, N, op);
  check_shape(weight, {C}, op);
  check_shape(dweight, {C}, op);
  if (dinp_sum.defined()) check_shape(dinp_sum, {C}, op);
  float* dsum_p = dinp_sum.defined() ? dinp_sum.f32() : nullptr;
  if (dt == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::rmsnorm_backward(dinp.ptr<bf16>(), dweight.f32(), dsum_p, dout.ptr<bf16>(),
                                                 inp.ptr<bf16>(), weight.f32(), rstd.f32(), N, C));
  } else if (inp.device == Device::cpu) {
    norm_backward_dinp_cpu(dinp.f32(), dout.f32(), inp.f32(), weight.f32(), nullptr, rstd.f32(), N, C);
    norm_backward_params_cpu(dweight.f32(), nullptr, dout.f32(), inp.f32(), nullptr, rstd.f32(), N, C);
    if (dsum_p) column_sums_cpu(dsum_p, dinp.f32(), N, C);
  } else {
    LMF_CUDA_DISPATCH(op, cuda::rmsnorm_backward(dinp.f32(), dweight.f32(), dsum_p, dout.f32(), inp.f32(),
                                                 weight.f32(), rstd.f32(), N, C));
  }
}

void residual_layernorm_forward(Tensor res, Tensor out, Tensor mean, Tensor rstd, Tensor a, Tensor b, Tensor weight,
                                Tensor bias, float eps) {
  const char* op = "residual_layernorm_forward";
  int64_t N, C;
  const DType dt = check_residual_norm(op, true, res, out, mean, rstd, a, b, weight, bias, eps, &N, &C);
  const float* bias_p = bias.defined() ? bias.f32() : nullptr;
  if (dt == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::residual_layernorm_forward(res.ptr<bf16>(), out.ptr<bf16>(), mean.f32(), rstd.f32(),
                                                           a.ptr<bf16>(), b.ptr<bf16>(), weight.f32(), bias_p, N, C,
                                                           eps));
  } else if (a.device == Device::cpu) {
    residual_forward(res, a, b);
    layernorm_forward_cpu(out.f32(), mean.f32(), rstd.f32(), res.f32(), weight.f32(), bias_p, N, C, eps);
  } else {
    LMF_CUDA_DISPATCH(op, cuda::residual_layernorm_forward(res.f32(), out.f32(), mean.f32(), rstd.f32(), a.f32(),
                                                           b.f32(), weight.f32(), bias_p, N, C, eps));
  }
}

void residual_rmsnorm_forward(Tensor res, Tensor out, Tensor rstd, Tensor a, Tensor b, Tensor weight, float eps) {
  const char* op = "residual_rmsnorm_forward";
  int64_t N, C;
  const DType dt = check_residual_norm(op, false, res, out, Tensor(), rstd, a, b, weight, Tensor(), eps, &N, &C);
  if (dt == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::residual_rmsnorm_forward(res.ptr<bf16>(), out.ptr<bf16>(), rstd.f32(), a.ptr<bf16>(),
                                                         b.ptr<bf16>(), weight.f32(), N, C, eps));
  } else if (a.device == Device::cpu) {
    residual_forward(res, a, b);
    rmsnorm_forward_cpu(out.f32(), rstd.f32(), res.f32(), weight.f32(), N, C, eps);
  } else {
    LMF_CUDA_DISPATCH(op, cuda::residual_rmsnorm_forward(res.f32(), out.f32(), rstd.f32(), a.f32(), b.f32(),
                                                         weight.f32(), N, C, eps));
  }
}

size_t norm_backward_cuda_workspace(int64_t N, int64_t C) {
#ifdef LMF_WITH_CUDA
  return cuda::norm_backward_workspace(N, C);
#else
  return 0;
#endif
}

}  // namespace lmf
