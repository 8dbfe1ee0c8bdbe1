#include "model/token_ends.h"

#include <algorithm>

#include "core/comm.h"
#include "core/profiler.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/linear.h"

namespace lmf {

namespace {

// Upper bound on the fused LM-head scratch: the head runs over chunks of rows so no full
// (B*T, Vp) logits buffer exists. CPU: 32M floats (128 MiB: 667 rows of GPT-2's vocabulary; every
// chunk streams the whole head weight through three GEMMs and its gradient through one, so GPT-2 at
// B*T = 256 in one chunk instead of 166 + 90 rows reads and writes 0.6 GB less per step; the
// result does not depend on the chunking, ops/blas.h). GPU: 128M floats
// (512 MiB): the weight-gradient GEMM of each chunk reduces over the chunk's rows, and chunks of a
// few thousand rows keep it near the GEMM ceiling (166-row chunks ran at 4 TFLOP/s on an H200).
constexpr int64_t kLogitsScratchElemsCpu = int64_t{32} << 20;
constexpr int64_t kLogitsScratchElemsGpu = int64_t{128} << 20;
// bf16 plans: the logits chunk is bf16, at most 416M elements (832 MiB; 8,671 rows of GPT-2's padded
// vocabulary), and the rows are split into equal chunks (16384 rows: 2 chunks of 8,192). Large
// chunks keep the dx GEMM (rows x C outputs, K = Vp) several waves deep and read-modify-write the
// fp32 dW (Vp x C) fewer times.
constexpr int64_t kLogitsScratchElemsBf16 = int64_t{416} << 20;

}  // namespace

std::vector<TensorSpec> TokenEnds::input_param_specs() const {
  std::vector<TensorSpec> s{{"tok_emb.weight", {c_.vocab_rows(), c_.d_model}}};
  if (c_.positions == PositionKind::learned) s.push_back({"pos_emb.weight", {c_.context_length, c_.d_model}});
  return s;
}

std::vector<TensorSpec> TokenEnds::output_param_specs() const {
  if (c_.tied_embeddings) return {};
  return {{"lm_head.weight", {c_.vocab_rows(), c_.d_model}}};
}

std::vector<std::string> TokenEnds::lazy_grads(const BlockKernels& k) const {
  // The LM head's first chunk writes its whole gradient (tied: before the embedding backward adds).
  if (!k.lazy_weight_grads) return {};
  return {head_name()};
}

std::vector<TensorSpec> TokenEnds::workspace_specs(const ModelPlan& p) const {
  const int64_t N = p.B * p.T, Vp = c_.vocab_rows();
  const int64_t scratch_elems = p.bf16() ? kLogitsScratchElemsBf16
                                : p.device == Device::cuda ? kLogitsScratchElemsGpu : kLogitsScratchElemsCpu;
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, scratch_elems / Vp));
  if (p.bf16()) {  // equal chunks: no short last chunk running the LM-head GEMMs at low occupancy
    const int64_t chunks = (N + R - 1) / R;
    R = (N + chunks - 1) / chunks;
  }
  return {{"logits_scratch", {R, Vp}, p.bf16() ? DType::bf16 : DType::f32}};
}

size_t TokenEnds::cuda_workspace(const ModelPlan& p) const {
  return p.training ? embedding_backward_cuda_workspace(p.B * p.T, c_.vocab_rows()) : 0;
}

VocabShard TokenEnds::shard() const {
  const int64_t rows = c_.vocab_rows(), start = c_.vocab_shard * rows;
  return VocabShard{start, std::clamp<int64_t>(c_.vocab_size - start, 0, rows), c_.vocab_size, comm_};
}

void TokenEnds::bind(const EndsViews& v, const Arena& workspace, const BlockKernels& k) {
  math_ = k.gemm_math;
  comm_ = k.comm;
  if (sharded())
    LMF_CHECK(comm_ != nullptr && comm_->world_size() == c_.vocab_shards && comm_->rank() == c_.vocab_shard,
              "token ends: a vocabulary shard ", c_.vocab_shard, " of ", c_.vocab_shards,
              " needs its tensor-parallel communicator");
  auto get = [](const TensorLookup& f, const std::string& name) {
    Tensor t = f(name);
    LMF_CHECK(t.defined(), "model parameters: no tensor '", name, "'");
    return t;
  };
  tok_emb_ = get(v.master, "tok_emb.weight");
  pos_emb_ = v.master("pos_emb.weight");
  head_ = get(v.master, head_name());
  head_gemm_ = get(v.gemm, head_name());
  d_tok_emb_ = v.grad("tok_emb.weight");
  d_pos_emb_ = v.grad("pos_emb.weight");
  d_head_ = v.grad(head_name());
  logits_scratch_ = workspace.get("logits_scratch");
}

void TokenEnds::input_forward(Tensor x, Tensor inputs, Tensor positions, OpProfiler* prof) {
  ProfileScope scope(prof, "embedding fwd");
  if (sharded()) {  // this rank's rows of the table (and the positions on one rank), summed over the ranks
    LMF_CHECK(!positions.defined(), "token ends: serving with a vocabulary-parallel table is not built");
    embedding_forward_shard(x, inputs, tok_emb_, c_.vocab_shard == 0 ? pos_emb_ : Tensor(), shard().start,
                            c_.padded_vocab());
    comm_->all_reduce_sum(x);
    return;
  }
  if (positions.defined()) embedding_forward(x, inputs, tok_emb_, pos_emb_, positions);
  else embedding_forward(x, inputs, tok_emb_, pos_emb_);
}

void TokenEnds::input_backward(Tensor dx, Tensor inputs, OpProfiler* prof) {
  ProfileScope scope(prof, "embedding bwd");
  if (sharded()) embedding_backward_shard(d_tok_emb_, d_pos_emb_, dx, inputs, shard().start, c_.padded_vocab());
  else embedding_backward(d_tok_emb_, d_pos_emb_, dx, inputs);
}

void TokenEnds::output_loss(Tensor losses, Tensor dx, Tensor x, Tensor targets, float grad_scale,
                            GradMode weights_mode, OpProfiler* prof) {
  const int64_t N = x.dim(0);
  if (sharded()) {  // vocabulary-parallel: every rank gets every row's loss; dx's shares summed here
    ProfileScope scope(prof, "lm_head + cross-entropy (vocab-parallel)");
    lm_head_cross_entropy_sharded(losses, dx, dx.defined() ? d_head_ : Tensor(), x, head_gemm_, targets.view({N}),
                                  logits_scratch_, shard(), grad_scale, weights_mode);
    if (dx.defined()) comm_->all_reduce_sum(dx);
    return;
  }
  if (!dx.defined()) {
    lm_head_cross_entropy(losses, Tensor(), Tensor(), x, head_gemm_, targets.view({N}), logits_scratch_,
                          c_.vocab_size, 0.0f, GradMode::Accumulate, math_);
    return;
  }
  ProfileScope scope(prof, "lm_head + cross-entropy fwd+bwd",
                     6.0 * static_cast<double>(N) * static_cast<double>(c_.d_model) * static_cast<double>(c_.vocab_size));
  lm_head_cross_entropy(losses, dx, d_head_, x, head_gemm_, targets.view({N}), logits_scratch_, c_.vocab_size,
                        grad_scale, weights_mode, math_);
}

void TokenEnds::output_values(Tensor out, Tensor x) {
  // out's width: the real vocabulary, or the padded one (bf16 GEMMs keep their rows 16-byte aligned)
  LMF_CHECK(!sharded(), "output_values: the logits of a vocabulary-parallel head are never gathered");
  const int64_t W = out.dim(-1);
  LMF_CHECK(W == c_.vocab_size || W == c_.padded_vocab(), "output_values: tensor '", out.name, "' has shape ",
            out.shape_str(), ", expected (N, ", c_.vocab_size, " or ", c_.padded_vocab(), ")");
  const Tensor head = x.dtype == DType::bf16 ? head_gemm_ : head_;
  linear_forward(out.view({x.dim(0), W}), x, head.rows(0, W), Tensor(), math_);
}

}  // namespace lmf
