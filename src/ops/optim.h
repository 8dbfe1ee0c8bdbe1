// optim.h: global gradient norm and AdamW.
// CUDA: the norm is a deterministic two-pass reduction (fixed blocks of kNormBlock elements, each
// block's sum of squares in double into the workspace, then one block adds the partials in a fixed
// order and takes the square root into norm[0]); AdamW is element-wise and reads norm[0] on the
// device, so neither syncs with the host. adamw_update_flat is the same update over a whole arena in
// one call (one kernel launch on the GPU), weight decay only inside a table of element ranges.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace lmf {

class Arena;

// norm: (1) f32 = sqrt(sum g^2) over every element of grads (any shape), accumulated in double in a
// fixed order. Kept in a tensor so the GPU path never has to sync to the host for it.
void grad_global_norm(Tensor norm, Tensor grads);

// Elements per block of the norm's first pass (CPU and CUDA use the same partition).
inline constexpr int64_t kNormBlock = 1 << 14;
// CUDA workspace bytes (cuda_reserve_workspace) grad_global_norm needs for n elements: one double
// per block.
size_t grad_global_norm_cuda_workspace(int64_t n);

// AdamW (Loshchilov & Hutter), decoupled weight decay, bias correction; `step` counts from 1.
// The gradient is first multiplied by clip = max_norm > 0 ? min(1, max_norm / (norm + 1e-6)) : 1
// (torch.nn.utils.clip_grad_norm_'s factor)
// where norm is the (1) tensor from grad_global_norm.
//   g = clip * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   param -= lr * ( (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) + weight_decay * param )
// param, m, v, grad: same numel, f32.
void adamw_update(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor norm, float max_norm, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step);

// adamw_update over whole arenas at once: param, m, v, grad are 1-D f32 views of the same numel
// (Arena::flat_f32() of the parameter, moment and gradient arenas), updated in place. Element i gets
// weight_decay when it lies in one of the ranges of decay_ranges, 0 otherwise; every element's
// arithmetic (clip factor, bias corrections, float expressions and their order) is adamw_update's,
// so the result is bitwise the result of adamw_update called per tensor with that tensor's decay
// (padding between arena tensors is all zero and stays exactly zero).
// decay_ranges: (S, 2) i32 [begin, end) element ranges, non-empty, sorted, non-overlapping, inside
// [0, numel), S <= kAdamWMaxDecayRanges; S = 0 means no decay (its data may then be null). i32
// because Tensor has no 64-bit integer dtype: ranges address the first 2^31 - 1 elements (8 GiB of
// f32 per arena). It is a HOST (cpu) tensor whatever the device of param: validated on every call
// and handed to the kernel as a launch argument, so the GPU path needs no device copy of it and
// never syncs (capturable in a CUDA graph; like adamw_update's lr and bias corrections, the table
// is then frozen in the graph). Build it once with adamw_decay_ranges():
//   std::vector<int32_t> r = adamw_decay_ranges(params);            // once, at set-up
//   Tensor ranges(r.data(), DType::i32, {static_cast<int64_t>(r.size() / 2), 2}, "decay_ranges");
//   adamw_update_flat(params.flat_f32(), m.flat_f32(), v.flat_f32(), grads.flat_f32(), ranges, norm, ...);
// param_bf16 (optional, GPU only): a bf16 copy of param (same numel), written with the rounded new
// value of every element in the same launch (mixed precision: the weights the GEMMs read).
// schedule (optional, GPU only): a device f32 (3) tensor {lr, 1 - beta1^step, 1 - beta2^step} read
// by the kernel instead of the lr and step arguments, so that a CUDA graph captured once serves every
// step (the host refreshes it with an asynchronous copy before each replay). adamw_schedule() gives
// the values the arguments would have produced, so both forms are bitwise identical.
void adamw_update_flat(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor decay_ranges, Tensor norm, float max_norm,
                       float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                       Tensor param_bf16 = Tensor(), Tensor schedule = Tensor());
// {lr, 1 - beta1^step, 1 - beta2^step} as adamw_update_flat computes them from its arguments.
void adamw_schedule(float out[3], float lr, float beta1, float beta2, int64_t step);

// dst (bf16, GPU) = src (f32, same numel) rounded to nearest even: the bf16 weight copy after init or
// a checkpoint load.
void cast_to_bf16(Tensor dst, Tensor src);

// The non-finite guard of a training step (inside its CUDA graph; nothing syncs): guard is a (2) i32
// tensor {steps checked, first bad step (0: none)} on the model's device. Each call counts one step
// (guard[0] += 1) and, when no step was bad before, records guard[0] in guard[1] if loss[0] or norm[0]
// (the step's mean loss and pre-clip gradient norm, (1) f32 each; a non-finite auxiliary loss reaches
// the gradient norm) is NaN or infinite. The host reads guard with the loss, at log intervals and
// before every checkpoint.
void nonfinite_guard(Tensor guard, Tensor loss, Tensor norm);
// Most ranges adamw_update_flat accepts (the CUDA launch argument holds at most this many).
inline constexpr int64_t kAdamWMaxDecayRanges = 2048;

// The decay table of an all-f32 arena, flattened (begin0, end0, begin1, end1, ...): the element
// ranges (Arena::offset_elems) of the tensors whose spec shape has 2 dims (embeddings and linear
// weights; biases and norm gains have 1), empty tensors skipped. Decayed tensors with nothing but
// padding between them share one range (padding is zero and stays zero with or without decay), so
// the table is short. Throws if the arena's flat view has more than INT32_MAX elements or the table
// more than kAdamWMaxDecayRanges ranges.
std::vector<int32_t> adamw_decay_ranges(const Arena& params);

namespace cuda {  // launchers (optim.cu); called by the op entries after validation
// norm: (1) = sqrt(sum grads[i]^2), grads: (n) flat
void grad_global_norm(float* norm, const float* grads, int64_t n);
// param, m, v, grad: (n) flat; norm: (1) on the device, or nullptr when clipping is off (max_norm <= 0).
// bias_corr1/2 = 1 - beta1^step, 1 - beta2^step (computed by the op entry).
void adamw_update(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                  float bias_corr2);
// adamw_update over (n) flat arrays in one launch; ranges: HOST array of s (begin, end) pairs, already
// validated (sorted, non-overlapping, non-empty, in [0, n), s <= kAdamWMaxDecayRanges); it is copied
// into the launch arguments.
void adamw_update_flat(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n,
                       const int32_t* ranges, int64_t s, float max_norm, float lr, float beta1, float beta2, float eps,
                       float weight_decay, float bias_corr1, float bias_corr2, bf16* param_bf16 = nullptr,
                       const float* schedule = nullptr);
void cast_to_bf16(bf16* dst, const float* src, int64_t n);
void nonfinite_guard(int32_t* guard, const float* loss, const float* norm);
}  // namespace cuda

}  // namespace lmf
