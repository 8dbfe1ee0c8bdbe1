// linear.h: y = x W^T + b through BLAS (PyTorch's nn.Linear layout: W is (OC, IC)).
// CPU: OpenBLAS (ops/blas.h); CUDA: cuBLASLt (ops/gemm_cuda.h, bias fused as the GEMM epilogue) and a
// deterministic two-pass column-sum kernel for the bias gradient.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace lmf {

// out: (N, OC); inp: (N, IC); weight: (OC, IC); bias: (OC) or absent. Leading dims of inp/out flatten to N.
void linear_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias);

// dinp += dout W; dweight += dout^T inp; dbias += sum_n dout. Any of dinp/dweight/dbias may be absent.
void linear_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp, Tensor weight);

// The CUDA bias gradient sums dout in fixed chunks of kLinearBiasRowChunk rows (pass 1, one partial
// sum per chunk and column, in the CUDA workspace), then adds each column's partials in chunk order
// (pass 2): deterministic, independent of the GPU, no atomics.
inline constexpr int64_t kLinearBiasRowChunk = 256;
// CUDA workspace bytes (cuda_reserve_workspace) linear_backward needs with a bias gradient for N rows
// of OC columns. Its GEMMs need kGemmWorkspaceBytes (ops/gemm_cuda.h) of the same workspace at other
// times, so reserve the larger of the two.
size_t linear_backward_cuda_workspace(int64_t N, int64_t OC);

namespace cuda {  // launchers (linear.cu); called by the op entries after validation
// out: (N, OC) = inp (N, IC) weight (OC, IC)^T + bias (OC) (bias may be nullptr)
void linear_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t IC,
                    int64_t OC);
// dinp (N, IC) += dout weight; dweight (OC, IC) += dout^T inp; dbias (OC) += column sums of dout (N, OC).
// Any of dinp/dweight/dbias may be nullptr.
void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t IC, int64_t OC);
}  // namespace cuda

}  // namespace lmf
