// attention.h: causal multi-head attention with grouped-query attention (NKV divides NH;
// q head h reads kv head h / (NH/NKV)). Scale 1/sqrt(HS). Both backends keep the softmax
// probabilities (B, NH, T, T) for backward (both backends compute them with GEMMs per head and
// row kernels; a flash kernel that does not keep them may replace them).
#pragma once
#include <string>

#include "core/tensor.h"
#include "ops/gemm_math.h"
#include "ops/grad_mode.h"

namespace lmf {

// qkv: (B, T, (NH + 2*NKV) * HS), rows [q heads | k heads | v heads] (RoPE already applied)
// out: (B, T, NH * HS); probs: (B, NH, T, T), probs[b,h,t,s] = 0 for s > t
// math: the GPU GEMMs' mode (ops/gemm_math.h; the CPU computes in fp32)
void attention_forward(Tensor out, Tensor probs, Tensor qkv, int n_head, int n_kv_head,
                       GemmMath math = GemmMath::fp32);

// dqkv += gradient w.r.t. qkv; dprobs: (B, NH, T, T) scratch (overwritten)
void attention_backward(Tensor dqkv, Tensor dprobs, Tensor dout, Tensor qkv, Tensor probs, int n_head,
                        int n_kv_head, GemmMath math = GemmMath::fp32);

namespace cuda {  // launchers (attention.cu); called by the op entries after validation
// out: (B, T, NH*HS); probs, dprobs: (B, NH, T, T); qkv, dqkv: (B, T, (NH + 2*NKV) * HS); dout: (B, T, NH*HS).
// scale = 1/sqrt(HS) as the op entry computes it. Backward accumulates into dqkv; dprobs is overwritten.
void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HS, float scale, GemmMath math);
void attention_backward(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs, int64_t B,
                        int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale, GemmMath math);
}  // namespace cuda

// Fused causal flash attention in bf16 (docs/MIXED_PRECISION.md; GPU only): no (T, T) probabilities in
// memory, the backward recomputes them from lse. Same qkv layout, GQA rule and scale as above; any
// T >= 1; head sizes per kernel set (flash_head_size_supported). Deterministic (no atomics). Two kernel sets behind one contract:
//   FlashKernels::lmforge  lmforge's own kernels (flash_attention.cu, sm_90a): batch-invariant by
//                          construction (every sum's order depends only on T, HS and NH / NKV);
//   FlashKernels::cudnn    cuDNN's fused SDPA through the cuDNN frontend graph API
//                          (flash_attention_cudnn.cpp), backward in cuDNN's deterministic mode; needs
//                          a build with cuDNN and the library at run time (cudnn_attention_available()).
// lmforge's are the batch-invariant set (--batch-invariant, model/plan.h): serving's batch-invariant paged
// attention (paged_attention.h, paged_attention_forward_invariant) runs their forward's own per-row step
// (ops/flash_tile.cuh), so a row's output is bitwise what serving computes for that position.
// All store lse as the natural log, so any set can run the backward of another's forward.
enum class FlashKernels { lmforge, cudnn };
const char* flash_kernels_name(FlashKernels k);
bool cudnn_attention_available();  // built with cuDNN, a GPU present, cuDNN >= 9 loaded
// The head sizes each kernel set runs, the one rule every check asks: lmforge 32, 64, 80, 96, 112, 128
// (template instances in flash_attention.cu); cudnn any multiple of 8 up to 256 (cuDNN's SDPA limits
// on Hopper; cudnn_attention_problem has the last word for a whole shape). flash_head_sizes_text names
// them for errors.
bool flash_head_size_supported(FlashKernels k, int64_t HS);
const char* flash_head_sizes_text(FlashKernels k);
// The loaded cuDNN library's version, e.g. "9.19.0" (the one that runs, which may differ from the
// headers lmforge was built with), or "none" in a build without cuDNN.
std::string cudnn_version_text();
// "" when cuDNN runs this shape (its plans build; e.g. cuDNN 9 refuses T = 1), else cuDNN's reason.
// Builds the plans (set-up time). Needs cudnn_attention_available().
std::string cudnn_attention_problem(int64_t B, int64_t T, int n_head, int n_kv_head, int64_t HS);

// The --attention flag: "lmforge", "cudnn", or "auto" (batch-invariant plans: lmforge; else cudnn for
// bf16 plans on the GPU when cuDNN is available and runs the plan's shape, else lmforge). Anything else,
// or cudnn in a batch-invariant plan: an error naming `what`.
struct FlashShape {
  int64_t B, T;
  int n_head, n_kv_head;
  int64_t HS;
};
FlashKernels flash_kernels_from_flag(const std::string& flag, bool bf16_on_gpu, const FlashShape& shape,
                                     const char* what, bool batch_invariant = false);

// Bytes of lmf::cuda_workspace the kernels need at this shape (0 for lmforge's); for cudnn this builds
// the forward and backward plans of the shape (set-up time: never inside a CUDA-graph capture).
size_t flash_attention_cuda_workspace(FlashKernels k, int64_t B, int64_t T, int n_head, int n_kv_head, int64_t HS);

// Tuning of cuDNN's attention plans (the twin of cuda::gemm_autotune for the GEMMs): after
// cudnn_attention_tune_begin(), each cuDNN plan remembers its latest call; cudnn_attention_autotune()
// (between steps, never inside a capture: it builds plans and synchronises) runs every engine config
// that cuDNN's heuristics list for each called plan on that call's buffers, and keeps the fastest that is
// >= 2% faster and whose outputs have the same bits as the current choice's: tuning never changes a
// result. Engine configs needing more workspace than was reserved are skipped. No-ops without cuDNN.
struct AttentionTuneResult {
  int plans = 0;          // plans tuned (called in the window)
  int candidates = 0;     // engine configs tried (the current one included)
  int equal = 0;          // of which gave the same bits
  int too_big = 0;        // engine configs skipped for their workspace
  int changed = 0;        // plans that took a faster engine config
  double saved_ms = 0;    // sum over changed plans of (calls in the window) x (time saved per call)
};
void cudnn_attention_tune_begin();
AttentionTuneResult cudnn_attention_autotune();

// qkv: (B, T, (NH + 2*NKV) * HS) bf16; out: (B, T, NH * HS) bf16;
// lse: (B, NH, T) f32, lse[b,h,t] = ln sum_{s<=t} exp(scale q_t . k_s) (natural log)
void flash_attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head, int n_kv_head,
                             FlashKernels kernels = FlashKernels::lmforge);

// dqkv (B, T, (NH + 2*NKV) * HS) bf16 gets the gradient w.r.t. qkv: mode Accumulate adds it (each
// element: fp32 add, one rounding), Overwrite writes it (every element; the cudnn kernels support only
// Overwrite). delta: (B, NH, T) f32 scratch (the lmforge kernels write rowsum(dout * out) into it);
// dout, out: (B, T, NH * HS) bf16; qkv, lse as from flash_attention_forward.
void flash_attention_backward(Tensor dqkv, Tensor delta, Tensor dout, Tensor qkv, Tensor out, Tensor lse, int n_head,
                              int n_kv_head, GradMode mode = GradMode::Accumulate,
                              FlashKernels kernels = FlashKernels::lmforge);

namespace cuda {  // launchers (flash_attention.cu); shapes as the op entries above, scale = 1/sqrt(HS)
void flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV,
                             int64_t HS, float scale);
void flash_attention_backward(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out,
                              const float* lse, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                              float scale, bool accumulate);
// cuDNN (flash_attention_cudnn.cpp): the backward overwrites dqkv; delta is not used.
size_t cudnn_flash_attention_workspace(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale);
std::string cudnn_flash_attention_problem(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale);
void cudnn_flash_attention_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t T, int64_t NH,
                                   int64_t NKV, int64_t HS, float scale);
void cudnn_flash_attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                                    int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS, float scale);
}  // namespace cuda

}  // namespace lmf
