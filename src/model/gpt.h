// gpt.h: a model of docs/MODEL.md = its family's ends (model/ends.h make_ends: TokenEnds for language
// models, TimeSeriesEnds for forecasters) around the trunk (model/model.h),
// its parameter counts and FLOPs, and Gpt: the three owners a training or evaluation run of it needs,
// side by side (Parameters, TrainingState, Model). KV-cache decoding: model/decoder.h.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/model.h"
#include "model/token_ends.h"

namespace lmf {

// Parameter specs in the canonical order of docs/MODEL.md (also the safetensors order).
std::vector<TensorSpec> gpt_param_specs(const ModelConfig& c);
// Parameters counted for FLOPs (everything but pos_emb) and in total.
int64_t gpt_param_count(const ModelConfig& c, bool include_position_embedding = true);
// Parameters one token uses: routed experts count top_k / experts of their total (MoE models).
int64_t gpt_active_param_count(const ModelConfig& c, bool include_position_embedding = true);
// 6 N + 12 L C T FLOPs per token for a training step, N the active parameters (docs/MODEL.md).
double gpt_train_flops_per_token(const ModelConfig& c, int64_t T);

// Bytes of every arena a Gpt of this plan allocates: weights (and their bf16 copy), gradients and
// AdamW moments (training), activations and workspace. Overflow-checked; allocates nothing.
size_t gpt_plan_bytes(const ModelConfig& c, const ModelPlan& p);

// A GPT planned for one ModelPlan: the weights, the training state (training plans) and the model
// that runs steps over them. Each member owns its own kind of state; users that need only one take
// that one (checkpoints: params and state; the optimizer: params and state; steps: model).
struct Gpt {
  // Validates the plan and checks that gpt_plan_bytes() fits the device's available memory before
  // allocating anything (one line saying how much it needs and how much there is).
  // tp: the tensor-parallel group when c is a rank's share (dist/tensor_parallel.h), else none.
  // moments_begin / _end: ZeRO-1's slice of AdamW's moments (TrainingState; -1: all of them).
  // sequence_parallel: with tp, the residual stream split over its ranks (BlockKernels).
  Gpt(const ModelConfig& c, const ModelPlan& p, Communicator* tp = nullptr, int64_t moments_begin = -1,
      int64_t moments_end = -1, bool sequence_parallel = false);
  BlockKernels kernels;  // the block table the model runs (block_kernels(c, p), with tp's communicator)
  Parameters params;
  std::unique_ptr<TrainingState> state;  // null unless p.training
  Model model;
};

}  // namespace lmf
