// token_ends.h: the language model's ends (docs/MODEL.md): token embedding plus learned positions
// (PositionKind::learned) in; LM head (tied to the embedding, or its own) fused with softmax
// cross-entropy out. Inputs and targets are (B, T) i32 token ids. Under tensor parallelism both tables
// are vocabulary-parallel (each rank holds rows of the vocabulary; the embedding's shares are summed
// over the ranks, the cross-entropy combines row statistics and never gathers the logits).
#pragma once
#include "model/ends.h"
#include "ops/cross_entropy.h"

namespace lmf {

class TokenEnds final : public ModelEnds {
 public:
  explicit TokenEnds(const ModelConfig& c) : c_(c) {}
  const char* name() const override { return "tokens"; }
  std::vector<TensorSpec> input_param_specs() const override;
  std::vector<TensorSpec> output_param_specs() const override;
  std::vector<std::string> lazy_grads(const BlockKernels& k) const override;
  std::vector<TensorSpec> workspace_specs(const ModelPlan& p) const override;
  size_t cuda_workspace(const ModelPlan& p) const override;
  void bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) override;
  TensorSpec input_spec(const ModelPlan& p) const override { return {"inputs", {p.B, p.T}, DType::i32}; }
  TensorSpec target_spec(const ModelPlan& p) const override { return {"targets", {p.B, p.T}, DType::i32}; }
  void input_forward(Tensor x, Tensor inputs, Tensor positions, OpProfiler* prof) override;
  void input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) override;
  void output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale, GradMode weights_mode,
                   OpProfiler* prof) override;
  void output_values(Tensor out, Tensor x) override;
  int64_t output_width() const override { return c_.vocab_size; }

 private:
  const char* head_name() const { return c_.tied_embeddings ? "tok_emb.weight" : "lm_head.weight"; }
  // Tensor parallelism: the token tables hold a shard of the vocabulary (ModelConfig::vocab_shards)
  bool sharded() const { return c_.vocab_shards > 1; }
  VocabShard shard() const;
  ModelConfig c_;
  Communicator* comm_ = nullptr;  // the tensor-parallel group (sharded tables)
  GemmMath math_ = GemmMath::fp32;  // the plan's f32 GEMM mode (BlockKernels::gemm_math)
  Tensor tok_emb_, pos_emb_, head_, head_gemm_, d_tok_emb_, d_pos_emb_, d_head_, logits_scratch_;
};

}  // namespace lmf
