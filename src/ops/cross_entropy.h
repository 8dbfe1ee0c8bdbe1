// cross_entropy.h: LM head fused with softmax cross-entropy.
//
// logits = x W^T over the first V rows of W (padded rows never enter the softmax), computed in
// chunks of rows into `logits_scratch`, turned into per-row losses, and (when gradients are asked
// for) into dlogits in place in the same buffer before the chunk's dx and dW GEMMs. No second
// full-vocabulary buffer exists. Rows are processed in a fixed order: deterministic.
// CPU: OpenBLAS GEMMs; CUDA: cuBLASLt GEMMs (ops/gemm_cuda.h) and one block per row for the softmax.
// Targets are range-checked on the CPU path; on the GPU path the data loader validates them (no host
// sync here), and an out-of-range target gives a NaN loss instead of an out-of-bounds read.
//
// Mixed precision (docs/MIXED_PRECISION.md), GPU only: x, w (the bf16 weight copy), logits_scratch
// and dx are bf16; losses and dw stay f32. The logits chunk is a bf16 GEMM output (as PyTorch
// autocast's linear); max, sum of exp and the loss are computed in fp32 from it, dlogits are written
// back as bf16 in place; dx += dlogits W is a bf16 GEMM with bf16 C, dw += dlogits^T x one with
// fp32 C. A bf16 tensor on the CPU is an error.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "ops/gemm_math.h"
#include "ops/grad_mode.h"

namespace lmf {

// losses: (N) per-row -log softmax(logits)[target]
// x: (N, C); w: (Vp, C) (tied token embedding or separate head); targets: (N) i32 in [0, V)
// logits_scratch: (R, Vp) with R >= 1 rows; N is processed R rows at a time
// dx: (N, C) and dw: (Vp, C), both accumulated (+=) with dloss_row = grad_scale, or both absent;
// dw_mode Overwrite: dw = this call's gradient (its old values are not read; the bf16 path's first
// weight-gradient GEMM runs with beta 0, the others zero dw first)
// dtypes: all f32, or (GPU) x, w, logits_scratch, dx bf16 with losses, dw f32
// math: the f32 GPU GEMMs' mode (ops/gemm_math.h; bf16 and the CPU ignore it)
void lm_head_cross_entropy(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets,
                           Tensor logits_scratch, int64_t vocab_size, float grad_scale,
                           GradMode dw_mode = GradMode::Accumulate, GemmMath math = GemmMath::fp32);

// Tensor parallelism's vocabulary-parallel head (dist/tensor_parallel.h): w holds rows [start, start +
// w rows) of the full (padded) head, the first `real` of them real tokens; the logits are never
// gathered: each chunk's row max, sum of exp and target logit are combined over comm's ranks, so
// every rank gets every row's whole loss. dx += this rank's share of the input gradient (the caller
// sums the shares over the ranks), dw += (or =, Overwrite) its rows' gradient. Targets: ids of the
// full vocabulary, in [0, vocab_size). f32, CPU only in this version.
class Communicator;
struct VocabShard {
  int64_t start = 0, real = 0, vocab_size = 0;
  Communicator* comm = nullptr;
};
void lm_head_cross_entropy_sharded(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets,
                                   Tensor logits_scratch, const VocabShard& shard, float grad_scale,
                                   GradMode dw_mode = GradMode::Accumulate);

// dst: (1) f32 = (accumulate ? dst : 0) + scale * mean(losses), the mean summed in double in a fixed
// order on the device that holds the tensors (no host read: the training step keeps its loss on
// the GPU until a log interval). losses: (N) f32.
void loss_mean(Tensor dst, Tensor losses, float scale, bool accumulate);

// logprobs (M) f32 = log softmax(logits[m, :V])[tokens[m]]: exactly minus the loss the training forward
// computes for that row and target (the same row kernels), so a sampler reporting these agrees bitwise
// with a trainer scoring the same logits (batch-invariant serving, docs/BATCH_INVARIANCE.md).
// logits (M, W), W >= V: f32 on the CPU, bf16 on the GPU; tokens (M) i32 in [0, V) (checked on the CPU;
// on the GPU an out-of-range token gives NaN).
void token_logprobs(Tensor logprobs, Tensor logits, Tensor tokens, int64_t vocab_size);

namespace cuda {  // launchers (cross_entropy.cu); called by the op entry after validation
void loss_mean(float* dst, const float* losses, int64_t n, float scale, bool accumulate);
// losses: (N); dx: (N, C) and dw: (Vp, C), both or neither (nullptr); x: (N, C); w: (Vp, C);
// targets: (N) in [0, V); logits: (R, Vp) scratch, R <= N rows per chunk.
void lm_head_cross_entropy(float* losses, float* dx, float* dw, const float* x, const float* w,
                           const int32_t* targets, float* logits, int64_t N, int64_t C, int64_t V, int64_t Vp,
                           int64_t R, float grad_scale, GemmMath math);
// bf16 activations, same shapes: losses and dw f32; dx, x, w, logits bf16.
void lm_head_cross_entropy(float* losses, bf16* dx, float* dw, const bf16* x, const bf16* w,
                           const int32_t* targets, bf16* logits, int64_t N, int64_t C, int64_t V, int64_t Vp,
                           int64_t R, float grad_scale, bool accumulate_dw = true);
void token_logprobs(float* logprobs, const bf16* logits, const int32_t* tokens, int64_t M, int64_t V, int64_t W);
}  // namespace cuda

}  // namespace lmf
