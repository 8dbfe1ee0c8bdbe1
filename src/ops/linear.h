// linear.h: y = x W^T + b through BLAS (PyTorch's nn.Linear layout: W is (OC, IC)).
// CPU: OpenBLAS (ops/blas.h); CUDA: cuBLASLt (ops/gemm_cuda.h, bias fused as the GEMM epilogue) and a
// deterministic two-pass column-sum kernel for the bias gradient.
#pragma once
#include <cstddef>

#include "core/tensor.h"
#include "ops/gemm_math.h"
#include "ops/grad_mode.h"

namespace lmf {

// out: (N, OC); inp: (N, IC); weight: (OC, IC); bias: (OC) or absent. Leading dims of inp/out flatten to N.
// math: the f32 GPU GEMMs' mode (ops/gemm_math.h; bf16 and the CPU ignore it).
void linear_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias, GemmMath math = GemmMath::fp32);

// dinp += dout W; dweight += dout^T inp; dbias += sum_n dout. Any of dinp/dweight/dbias may be absent.
// dinp_mode (grad_mode.h): Accumulate (+=) or Overwrite (dinp = dout W, the GEMM does not read dinp).
// dweight_mode: the same for dweight (bf16: the GEMM runs with beta 0; f32: dweight is zeroed first).
void linear_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                     GradMode dinp_mode = GradMode::Accumulate, GradMode dweight_mode = GradMode::Accumulate,
                     GemmMath math = GemmMath::fp32);

// The CUDA bias gradient sums dout in fixed chunks of kLinearBiasRowChunk rows (pass 1, one partial
// sum per chunk and column, in the CUDA workspace), then adds each column's partials in a fixed order
// (pass 2): deterministic, independent of the GPU, no atomics.
inline constexpr int64_t kLinearBiasRowChunk = 256;
// CUDA workspace bytes (cuda_reserve_workspace) linear_backward needs with a bias gradient for N rows
// of OC columns. Its GEMMs need kGemmWorkspaceBytes (ops/gemm_cuda.h) of the same workspace at other
// times, so reserve the larger of the two.
size_t linear_backward_cuda_workspace(int64_t N, int64_t OC);

// bf16 mixed precision (docs/MIXED_PRECISION.md), GPU only: linear_forward with out, inp, weight and
// bias all bf16; linear_backward with bf16 dinp (+=), dout, inp, weight and f32 dweight, dbias (+=).
//
// Fused GELU (GPT-2's MLP), cuBLASLt epilogues:
// pre = inp W^T + b; act = gelu_tanh(pre). f32: linear_forward then gelu_forward (CPU and GPU);
// bf16 (GPU): one GEMM with the GELU_AUX_BIAS epilogue. Needs a bias.
void linear_gelu_forward(Tensor act, Tensor pre, Tensor inp, Tensor weight, Tensor bias);
// The backward of the layer after a GELU, fused with the GELU's backward: dpre = (dout W) * gelu'(pre)
// (OVERWRITTEN, not accumulated: cuBLASLt's DGELU epilogue cannot accumulate), dweight += dout^T inp,
// dbias += sum_n dout (dbias may be absent). inp is gelu(pre). bf16 on the GPU only (DGELU epilogue);
// the fp32 path runs linear_backward and gelu_backward.
// dweight_mode as linear_backward's.
void linear_backward_dgelu(Tensor dpre, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight,
                           Tensor pre, GradMode dweight_mode = GradMode::Accumulate);

namespace cuda {  // launchers (linear.cu); called by the op entries after validation
// out: (N, OC) = inp (N, IC) weight (OC, IC)^T + bias (OC) (bias may be nullptr)
void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t IC,
                    int64_t OC, GemmMath math);
// dinp (N, IC) += dout weight; dweight (OC, IC) += dout^T inp; dbias (OC) += column sums of dout (N, OC).
// Any of dinp/dweight/dbias may be nullptr.
void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t IC, int64_t OC, GemmMath math, bool accumulate_dinp = true);
void linear_forward(bf16* out, const bf16* inp, const bf16* weight, const bf16* bias, int64_t N, int64_t IC,
                    int64_t OC);
void linear_gelu_forward(bf16* act, bf16* pre, const bf16* inp, const bf16* weight, const bf16* bias, int64_t N,
                         int64_t IC, int64_t OC);
void linear_backward(bf16* dinp, float* dweight, float* dbias, const bf16* dout, const bf16* inp, const bf16* weight,
                     int64_t N, int64_t IC, int64_t OC, bool accumulate_dinp = true, bool accumulate_dweight = true);
// dpre (N, IC) = (dout weight) * gelu'(pre), overwritten; pre: (N, IC) as stored by linear_gelu_forward
void linear_backward_dgelu(bf16* dpre, float* dweight, float* dbias, const bf16* dout, const bf16* inp,
                           const bf16* weight, const bf16* pre, int64_t N, int64_t IC, int64_t OC,
                           bool accumulate_dweight = true);
}  // namespace cuda

}  // namespace lmf
