// attention.cpp: CPU reference of causal multi-head / grouped-query attention, GEMMs through
// blas_sgemm (ops/blas.h).
//
// One (b, h) head per parallel_for chunk (core/parallel.h): the Q, K, V heads are strided views into
// the qkv buffer (leading dimension C3 = (NH + 2 NKV) HS, no copies) and the output head a strided
// view into out (leading dimension NH HS); inside a chunk every GEMM runs on the calling thread.
// Rows are processed in blocks of kRowBlock queries; a block only touches key columns [0, end of
// block), so the GEMMs skip most of the masked upper triangle (48-row blocks do 2/3 of the full
// square's products at T = 128, 3/5 at T = 256):
//   S = scale Q K^T; P = softmax over s <= t (max-subtracted, sum in float), 0 for s > t; O = P V
// Backward (accumulating, += into dqkv):
//   dP = dO V^T; dV += P^T dO; dS' = scale P * (dP - rowsum(dP * P)); dQ += dS' K; dK += dS'^T Q
// (the scale is folded into dS' so that the GEMMs run at alpha 1, where blas_sgemm reads P and dS'
// in place instead of packing them). The row blocks do not change the results beyond the masked
// zeros: blas_sgemm's per-element FMA chains continue across the blocks' dV / dK accumulations.
// The backward parallelises over (b, kv head): the q heads of a group add into the same dK/dV on
// one thread, in increasing head order. Each head's arithmetic is the same whatever the thread
// count or batch size: deterministic and batch-invariant.
//
// flash_attention_forward/backward (bf16, GPU only: flash_attention.cu) have no CPU path; their entries
// here only validate and dispatch (a bf16 tensor on the CPU fails in check_dtype). Tests compare them
// with attention_forward/backward above on the same bf16-rounded inputs.
#include "ops/attention.h"
#include "ops/attention_row.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/parallel.h"
#include "ops/blas.h"
#include "ops/cpu_math.h"
#include "ops/dispatch.h"
#include "ops/paged_attention.h"

namespace lmf {
namespace {

constexpr const char* kOpForward = "attention_forward";
constexpr const char* kOpBackward = "attention_backward";
constexpr const char* kOpFlashForward = "flash_attention_forward";
constexpr const char* kOpFlashBackward = "flash_attention_backward";

// Query rows per block (a multiple of blas's 12- and 6-row tiles). A fixed constant, so the order of
// every reduction depends only on T. Measured at T = 128 and 256: 48 beats 24, 36, 64 and 128.
constexpr int64_t kRowBlock = 48;


// Sizes of one attention call.
struct AttnDims {
  int64_t B, T, NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }  // qkv row length
  int64_t CO() const { return NH * HS; }              // out row length
};

// Fixed-order row reductions and the x <= 0 exp: ops/cpu_math.h.
using cpu_math::exp_nonpos;
using cpu_math::row_dot;
using cpu_math::row_max;
using cpu_math::row_sum;

// attention_scale and softmax_causal_row: ops/attention_row.h (shared with paged attention).

// One head. q, k, v: (T, HS) with leading dimension ldqkv; o: (T, HS) with leading dimension ldo;
// p: (T, T) probabilities.
void attention_head_forward(float* o, float* p, const float* q, const float* k, const float* v, int64_t T, int64_t HS,
                            int64_t ldqkv, int64_t ldo, float scale) {
  for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
    const int64_t r1 = std::min(T, r0 + kRowBlock), rb = r1 - r0;
    float* pb = p + r0 * T;  // rows [r0, r1), columns [0, r1), leading dimension T
    // p[r0:r1, 0:r1] = scale q[r0:r1] k[0:r1]^T
    blas_sgemm(false, true, rb, r1, HS, scale, q + r0 * ldqkv, ldqkv, k, ldqkv, 0.0f, pb, T);
    for (int64_t t = r0; t < r1; ++t) softmax_causal_row(p + t * T, t, T);
    // o[r0:r1] = p[r0:r1, 0:r1] v[0:r1]
    blas_sgemm(false, false, rb, HS, r1, 1.0f, pb, T, v, ldqkv, 0.0f, o + r0 * ldo, ldo);
  }
}

// One q head, accumulating into dq, dk, dv (leading dimension ldqkv). dO: (T, HS), leading
// dimension ldo; p: (T, T) from the forward; dp: (T, T) scratch.
void attention_head_backward(float* dq, float* dk, float* dv, float* dp, const float* dO, const float* q,
                             const float* k, const float* v, const float* p, int64_t T, int64_t HS, int64_t ldqkv,
                             int64_t ldo, float scale) {
  for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
    const int64_t r1 = std::min(T, r0 + kRowBlock), rb = r1 - r0;
    const float* pb = p + r0 * T;  // (rb, r1), leading dimension T
    float* dpb = dp + r0 * T;      // (rb, r1), leading dimension T
    const float* dOb = dO + r0 * ldo;
    // dp[r0:r1, 0:r1] = dO[r0:r1] v[0:r1]^T
    blas_sgemm(false, true, rb, r1, HS, 1.0f, dOb, ldo, v, ldqkv, 0.0f, dpb, T);
    // dv[0:r1] += p[r0:r1, 0:r1]^T dO[r0:r1]
    blas_sgemm(true, false, r1, HS, rb, 1.0f, pb, T, dOb, ldo, 1.0f, dv, ldqkv);
    // scale ds = scale p * (dp - sum_s dp p), in place over dp; zero for t < s < r1 (the scale here
    // keeps the GEMMs below at alpha 1, where blas reads dS in place)
    for (int64_t t = r0; t < r1; ++t) {
      const float* pr = p + t * T;
      float* dr = dp + t * T;
      const float dot = row_dot(dr, pr, t + 1);
      for (int64_t s = 0; s <= t; ++s) dr[s] = scale * (pr[s] * (dr[s] - dot));
      for (int64_t s = t + 1; s < r1; ++s) dr[s] = 0.0f;
    }
    // dq[r0:r1] += (scale ds[r0:r1, 0:r1]) k[0:r1]
    blas_sgemm(false, false, rb, HS, r1, 1.0f, dpb, T, k, ldqkv, 1.0f, dq + r0 * ldqkv, ldqkv);
    // dk[0:r1] += (scale ds[r0:r1, 0:r1])^T q[r0:r1]
    blas_sgemm(true, false, r1, HS, rb, 1.0f, dpb, T, q + r0 * ldqkv, ldqkv, 1.0f, dk, ldqkv);
  }
}

// out: (B, T, NH*HS); probs: (B, NH, T, T); qkv: (B, T, (NH + 2 NKV) * HS). All row-major.
void attention_forward_cpu(float* out, float* probs, const float* qkv, AttnDims d) {
  const int64_t T = d.T, HS = d.HS, C3 = d.C3(), CO = d.CO(), group = d.NH / d.NKV;
  const float scale = attention_scale(HS);
  parallel_for(d.B * d.NH, 1, [&](int64_t bh, int64_t) {  // one head per chunk
    const int64_t b = bh / d.NH, h = bh % d.NH, kvh = h / group;
    const float* base = qkv + b * T * C3;
    attention_head_forward(out + b * T * CO + h * HS, probs + bh * T * T, base + h * HS, base + (d.NH + kvh) * HS,
                           base + (d.NH + d.NKV + kvh) * HS, T, HS, C3, CO, scale);
  });
}

// dqkv: (B, T, C3) accumulated; dprobs: (B, NH, T, T) scratch; dout: (B, T, NH*HS);
// qkv: (B, T, C3); probs: (B, NH, T, T) from the forward.
void attention_backward_cpu(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs,
                            AttnDims d) {
  const int64_t T = d.T, HS = d.HS, C3 = d.C3(), CO = d.CO(), group = d.NH / d.NKV;
  const float scale = attention_scale(HS);
  parallel_for(d.B * d.NKV, 1, [&](int64_t bg, int64_t) {  // one kv head (its q heads in order) per chunk
    const int64_t b = bg / d.NKV, kvh = bg % d.NKV;
    const float* base = qkv + b * T * C3;
    float* dbase = dqkv + b * T * C3;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
      const int64_t bh = b * d.NH + h;
      attention_head_backward(dbase + h * HS, dbase + (d.NH + kvh) * HS, dbase + (d.NH + d.NKV + kvh) * HS,
                              dprobs + bh * T * T, dout + b * T * CO + h * HS, base + h * HS, base + (d.NH + kvh) * HS,
                              base + (d.NH + d.NKV + kvh) * HS, probs + bh * T * T, T, HS, C3, CO, scale);
    }
  });
}

// Checks the head counts against the qkv row length C3 and returns HS.
int64_t head_size(const char* op, const Tensor& qkv, int n_head, int n_kv_head) {
  LMF_CHECK(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0, op, ": n_head=", n_head,
            " must be a positive multiple of n_kv_head=", n_kv_head);
  LMF_CHECK(qkv.ndim == 3, op, ": qkv '", qkv.name, "' must be (B, T, (NH + 2 NKV) HS), got ", qkv.shape_str());
  const int64_t C3 = qkv.shape[2], heads = n_head + 2 * int64_t{n_kv_head};
  LMF_CHECK(C3 >= heads && C3 % heads == 0, op, ": qkv '", qkv.name, "' ", qkv.shape_str(), " last dim ", C3,
            " is not a multiple of NH + 2 NKV = ", heads, " (n_head=", n_head, ", n_kv_head=", n_kv_head, ")");
  LMF_CHECK(qkv.shape[0] <= INT_MAX && qkv.shape[1] <= INT_MAX && C3 <= INT_MAX, op, ": qkv '", qkv.name, "' ",
            qkv.shape_str(), " exceeds the BLAS int range");
  return C3 / heads;
}

void check_flash_head_size(const char* op, int64_t HS, FlashKernels k) {
  LMF_CHECK(flash_head_size_supported(k, HS), op, ": head size HS=", HS, " is not supported by the ",
            flash_kernels_name(k), " flash attention kernels (", flash_head_sizes_text(k), ")");
}

// cp.async and the 16-byte stores of the flash kernels need 16-byte aligned bf16 tensors (arena
// tensors are 256-byte aligned).
void check_aligned16(const char* op, const Tensor& t) {
  LMF_CHECK(reinterpret_cast<uintptr_t>(t.data) % 16 == 0, op, ": tensor '", t.name,
            "' must be 16-byte aligned for the flash attention kernels");
}

}  // namespace

void attention_forward(Tensor out, Tensor probs, Tensor qkv, int n_head, int n_kv_head, GemmMath math) {
  check_f32(out, kOpForward);
  check_f32(probs, kOpForward);
  check_f32(qkv, kOpForward);
  check_same_device(kOpForward, {&out, &probs, &qkv});
  const int64_t HS = head_size(kOpForward, qkv, n_head, n_kv_head);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(out, {B, T, n_head * HS}, kOpForward);
  check_shape(probs, {B, n_head, T, T}, kOpForward);
  if (B == 0 || T == 0) return;
  const AttnDims d{B, T, n_head, n_kv_head, HS};
  if (qkv.device == Device::cpu)
    attention_forward_cpu(out.f32(), probs.f32(), qkv.f32(), d);
  else
    LMF_CUDA_DISPATCH(kOpForward, cuda::attention_forward(out.f32(), probs.f32(), qkv.f32(), B, T, n_head, n_kv_head,
                                                          HS, attention_scale(HS), math));
}

void attention_backward(Tensor dqkv, Tensor dprobs, Tensor dout, Tensor qkv, Tensor probs, int n_head, int n_kv_head,
                        GemmMath math) {
  check_f32(dqkv, kOpBackward);
  check_f32(dprobs, kOpBackward);
  check_f32(dout, kOpBackward);
  check_f32(qkv, kOpBackward);
  check_f32(probs, kOpBackward);
  check_same_device(kOpBackward, {&dqkv, &dprobs, &dout, &qkv, &probs});
  const int64_t HS = head_size(kOpBackward, qkv, n_head, n_kv_head);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(dqkv, {B, T, qkv.shape[2]}, kOpBackward);
  check_shape(dprobs, {B, n_head, T, T}, kOpBackward);
  check_shape(dout, {B, T, n_head * HS}, kOpBackward);
  check_shape(probs, {B, n_head, T, T}, kOpBackward);
  if (B == 0 || T == 0) return;
  const AttnDims d{B, T, n_head, n_kv_head, HS};
  if (qkv.device == Device::cpu)
    attention_backward_cpu(dqkv.f32(), dprobs.f32(), dout.f32(), qkv.f32(), probs.f32(), d);
  else
    LMF_CUDA_DISPATCH(kOpBackward, cuda::attention_backward(dqkv.f32(), dprobs.f32(), dout.f32(), qkv.f32(),
                                                            probs.f32(), B, T, n_head, n_kv_head, HS,
                                                            attention_scale(HS), math));
}

namespace {
void check_kernels_available(FlashKernels k, const char* op) {
  LMF_CHECK(k != FlashKernels::cudnn || cudnn_attention_available(), op,
            ": the cuDNN attention kernels are not available (lmforge built without cuDNN, no GPU, or cuDNN < 9 "
            "loaded); use the lmforge kernels");
}
}  // namespace

bool flash_head_size_supported(FlashKernels k, int64_t HS) {
  if (k == FlashKernels::cudnn) return HS >= 8 && HS <= 256 && HS % 8 == 0;
  return HS == 32 || HS == 64 || HS == 80 || HS == 96 || HS == 112 || HS == 128;
}

const char* flash_head_sizes_text(FlashKernels k) {
  return k == FlashKernels::cudnn ? "multiples of 8 up to 256" : "32, 64, 80, 96, 112 or 128";
}

const char* flash_kernels_name(FlashKernels k) {
  switch (k) {
    case FlashKernels::cudnn: return "cudnn";
    case FlashKernels::lmforge: break;
  }
  return "lmforge";
}

FlashKernels flash_kernels_from_flag(const std::string& flag, bool bf16_on_gpu, const FlashShape& shape,
                                     const char* what, bool batch_invariant) {
  if (flag != "auto" && flag != "lmforge" && flag != "cudnn")
    fail(what, ": unknown attention kernels '", flag, "' (expected auto, lmforge or cudnn)");
  if (batch_invariant && flag == "cudnn")
    fail(what, "=cudnn: --batch-invariant runs attention with lmforge's flash kernels (their forward is the step "
         "serving runs); use --attention lmforge or auto");
  if (flag == "lmforge" || batch_invariant) return FlashKernels::lmforge;
  if (flag == "cudnn") return FlashKernels::cudnn;
  const bool cudnn = bf16_on_gpu && cudnn_attention_available() &&
                     flash_head_size_supported(FlashKernels::cudnn, shape.HS) &&
                     cudnn_attention_problem(shape.B, shape.T, shape.n_head, shape.n_kv_head, shape.HS).empty();
  return cudnn ? FlashKernels::cudnn : FlashKernels::lmforge;
}

std::string cudnn_attention_problem(int64_t B, int64_t T, int n_head, int n_kv_head, int64_t HS) {
  const char* op = "cudnn_attention_problem";
  check_kernels_available(FlashKernels::cudnn, op);
  check_flash_head_size(op, HS, FlashKernels::cudnn);
  std::string why;
  LMF_CUDA_DISPATCH(op, why = cuda::cudnn_flash_attention_problem(B, T, n_head, n_kv_head, HS, attention_scale(HS)));
  return why;
}

size_t flash_attention_cuda_workspace(FlashKernels k, int64_t B, int64_t T, int n_head, int n_kv_head, int64_t HS) {
  const char* op = "flash_attention_cuda_workspace";
  if (k == FlashKernels::lmforge) return 0;
  check_kernels_available(k, op);
  check_flash_head_size(op, HS, k);
  LMF_CHECK(B >= 1 && T >= 1 && n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0, op, ": bad sizes B=", B,
            " T=", T, " n_head=", n_head, " n_kv_head=", n_kv_head);
  size_t bytes = 0;
  LMF_CUDA_DISPATCH(op, bytes = cuda::cudnn_flash_attention_workspace(B, T, n_head, n_kv_head, HS, attention_scale(HS)));
  return bytes;
}

// bf16 (GPU only, check_dtype): out, qkv; f32: lse.
void flash_attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head, int n_kv_head, FlashKernels kernels) {
  check_dtype(out, DType::bf16, kOpFlashForward);
  check_dtype(qkv, DType::bf16, kOpFlashForward);
  check_dtype(lse, DType::f32, kOpFlashForward);
  check_same_device(kOpFlashForward, {&out, &lse, &qkv});
  const int64_t HS = head_size(kOpFlashForward, qkv, n_head, n_kv_head);
  check_flash_head_size(kOpFlashForward, HS, kernels);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(out, {B, T, n_head * HS}, kOpFlashForward);
  check_shape(lse, {B, n_head, T}, kOpFlashForward);
  for (const Tensor* t : {&out, &qkv}) check_aligned16(kOpFlashForward, *t);
  check_kernels_available(kernels, kOpFlashForward);
  if (B == 0 || T == 0) return;
  if (kernels == FlashKernels::cudnn)
    LMF_CUDA_DISPATCH(kOpFlashForward, cuda::cudnn_flash_attention_forward(out.ptr<bf16>(), lse.f32(), qkv.ptr<bf16>(),
                                                                           B, T, n_head, n_kv_head, HS,
                                                                           attention_scale(HS)));
  else
    LMF_CUDA_DISPATCH(kOpFlashForward, cuda::flash_attention_forward(out.ptr<bf16>(), lse.f32(), qkv.ptr<bf16>(), B,
                                                                     T, n_head, n_kv_head, HS, attention_scale(HS)));
}

// bf16 (GPU only, check_dtype): dqkv, dout, qkv, out; f32: delta, lse.
void flash_attention_backward(Tensor dqkv, Tensor delta, Tensor dout, Tensor qkv, Tensor out, Tensor lse, int n_head,
                              int n_kv_head, GradMode mode, FlashKernels kernels) {
  for (const Tensor* t : {&dqkv, &dout, &qkv, &out}) check_dtype(*t, DType::bf16, kOpFlashBackward);
  check_dtype(delta, DType::f32, kOpFlashBackward);
  check_dtype(lse, DType::f32, kOpFlashBackward);
  check_same_device(kOpFlashBackward, {&dqkv, &delta, &dout, &qkv, &out, &lse});
  const int64_t HS = head_size(kOpFlashBackward, qkv, n_head, n_kv_head);
  check_flash_head_size(kOpFlashBackward, HS, kernels);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(dqkv, {B, T, qkv.shape[2]}, kOpFlashBackward);
  check_shape(delta, {B, n_head, T}, kOpFlashBackward);
  check_shape(dout, {B, T, n_head * HS}, kOpFlashBackward);
  check_shape(out, {B, T, n_head * HS}, kOpFlashBackward);
  check_shape(lse, {B, n_head, T}, kOpFlashBackward);
  for (const Tensor* t : {&dqkv, &dout, &qkv, &out}) check_aligned16(kOpFlashBackward, *t);
  check_kernels_available(kernels, kOpFlashBackward);
  LMF_CHECK(kernels != FlashKernels::cudnn || mode == GradMode::Overwrite, kOpFlashBackward,
            ": the cuDNN kernels write dqkv '", dqkv.name, "' (GradMode::Overwrite); they cannot add to it");
  if (B == 0 || T == 0) return;
  if (kernels == FlashKernels::cudnn)
    LMF_CUDA_DISPATCH(kOpFlashBackward,
                      cuda::cudnn_flash_attention_backward(dqkv.ptr<bf16>(), dout.ptr<bf16>(), qkv.ptr<bf16>(),
                                                           out.ptr<bf16>(), lse.f32(), B, T, n_head, n_kv_head, HS,
                                                           attention_scale(HS)));
  else
    LMF_CUDA_DISPATCH(kOpFlashBackward,
                      cuda::flash_attention_backward(dqkv.ptr<bf16>(), delta.f32(), dout.ptr<bf16>(), qkv.ptr<bf16>(),
                                                     out.ptr<bf16>(), lse.f32(), B, T, n_head, n_kv_head, HS,
                                                     attention_scale(HS), mode == GradMode::Accumulate));
}

}  // namespace lmf
