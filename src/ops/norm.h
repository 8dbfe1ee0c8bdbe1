// norm.h: LayerNorm and RMSNorm over the last dimension. Statistics are kept for backward.
// inp/out may have any leading dims; N = numel / C rows.
// On the GPU the dweight/dbias reductions over rows are two-pass and deterministic (norm.cu); they
// need norm_backward_cuda_workspace(N, C) bytes of CUDA workspace, reserved at set-up.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace lmf {

// out: (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd: (N); weight: (C); bias: (C) or absent
void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias, float eps);
// dinp += ..., dweight += ..., dbias += ... (dbias may be absent)
void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                        Tensor mean, Tensor rstd);

// out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps); rstd: (N)
void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps);
void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight, Tensor rstd);

// Bytes of CUDA workspace (lmf::cuda_reserve_workspace) that layernorm_backward / rmsnorm_backward need
// on the GPU for N rows of C channels; 0 in a build without CUDA.
size_t norm_backward_cuda_workspace(int64_t N, int64_t C);

namespace cuda {  // launchers (norm.cu); called by the op entries after validation
// out, inp: (N, C); mean, rstd: (N); weight: (C); bias: (C) or nullptr
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps);
// dinp, dout, inp: (N, C) (dinp +=); dweight: (C) +=; dbias: (C) += or nullptr. Uses
// norm_backward_workspace(N, C) bytes of workspace.
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C);
size_t norm_backward_workspace(int64_t N, int64_t C);
}  // namespace cuda

}  // namespace lmf
