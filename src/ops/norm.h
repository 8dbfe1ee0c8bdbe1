// norm.h: LayerNorm and RMSNorm over the last dimension, and the fused residual add + norm.
// Statistics are kept for backward. inp/out may have any leading dims; N = numel / C rows.
// dtypes (docs/MIXED_PRECISION.md): all f32 (CPU and GPU), or bf16 rows (out, inp, dinp, dout, res,
// a, b) on the GPU only, with weight, bias, mean, rstd, dweight, dbias always f32.
// On the GPU the dweight/dbias reductions over rows are two-pass and deterministic (norm.cu); they
// need norm_backward_cuda_workspace(N, C) bytes of CUDA workspace, reserved at set-up.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace lmf {

// out: (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd: (N); weight: (C); bias: (C) or absent
void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias, float eps);
// dinp += ..., dweight += ..., dbias += ... (dbias may be absent).
// dinp_sum (C), optional: += the column sums of dinp after the update, as stored. In a residual
// network dinp is d(residual stream), so these are the bias gradient of the linear layer that wrote
// into that stream (GPT-2's attention and MLP output projections), computed in the same pass.
void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                        Tensor mean, Tensor rstd, Tensor dinp_sum = Tensor());

// out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps); rstd: (N)
void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps);
void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight, Tensor rstd,
                      Tensor dinp_sum = Tensor());

// Fused residual add + norm: res = a + b (res may alias a or b; out must not alias res), then
// out = norm(res) exactly as layernorm_forward / rmsnorm_forward of the stored res (for bf16 the
// norm reads the rounded res values, the ones backward will read). The CPU computes
// residual_forward then the norm (bitwise equal); the GPU does it in one pass over a and b.
// res, out, a, b: (N, C); mean, rstd: (N); weight: (C); bias: (C) or absent
void residual_layernorm_forward(Tensor res, Tensor out, Tensor mean, Tensor rstd, Tensor a, Tensor b, Tensor weight,
                                Tensor bias, float eps);
void residual_rmsnorm_forward(Tensor res, Tensor out, Tensor rstd, Tensor a, Tensor b, Tensor weight, float eps);

// Bytes of CUDA workspace (lmf::cuda_reserve_workspace) that layernorm_backward / rmsnorm_backward need
// on the GPU for N rows of C channels; 0 in a build without CUDA.
size_t norm_backward_cuda_workspace(int64_t N, int64_t C);

namespace cuda {  // launchers (norm.cu); called by the op entries after validation
// Each comes in f32 and bf16 rows (out, inp, dinp, dout, res, a, b); the rest is always f32.
// out, inp: (N, C); mean, rstd: (N); weight: (C); bias: (C) or nullptr
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps);
void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps);
// dinp, dout, inp: (N, C) (dinp +=); dweight: (C) +=; dbias, dinp_sum: (C) += or nullptr. Uses
// norm_backward_workspace(N, C) bytes of workspace.
void layernorm_backward(float* dinp, float* dweight, float* dbias, float* dinp_sum, const float* dout,
                        const float* inp, const float* weight, const float* mean, const float* rstd, int64_t N,
                        int64_t C);
void layernorm_backward(bf16* dinp, float* dweight, float* dbias, float* dinp_sum, const bf16* dout, const bf16* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps);
void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const float* weight, int64_t N, int64_t C, float eps);
void rmsnorm_backward(float* dinp, float* dweight, float* dinp_sum, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C);
void rmsnorm_backward(bf16* dinp, float* dweight, float* dinp_sum, const bf16* dout, const bf16* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C);
// res = a + b (res may alias a or b), out = norm(res): res, out, a, b: (N, C); one pass over a and b.
void residual_layernorm_forward(float* res, float* out, float* mean, float* rstd, const float* a, const float* b,
                                const float* weight, const float* bias, int64_t N, int64_t C, float eps);
void residual_layernorm_forward(bf16* res, bf16* out, float* mean, float* rstd, const bf16* a, const bf16* b,
                                const float* weight, const float* bias, int64_t N, int64_t C, float eps);
void residual_rmsnorm_forward(float* res, float* out, float* rstd, const float* a, const float* b,
                              const float* weight, int64_t N, int64_t C, float eps);
void residual_rmsnorm_forward(bf16* res, bf16* out, float* rstd, const bf16* a, const bf16* b, const float* weight,
                              int64_t N, int64_t C, float eps);
size_t norm_backward_workspace(int64_t N, int64_t C);
}  // namespace cuda

}  // namespace lmf
