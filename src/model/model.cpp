#include "model/model.h"

#include <algorithm>
#include <set>

#include "core/device.h"
#include "core/profiler.h"
#include "model/kv_cache.h"
#include "ops/embedding.h"
#include "ops/gemm_cuda.h"
#include "ops/linear.h"
#include "ops/norm.h"
#include "ops/optim.h"
#include "ops/paged_attention.h"
#include "ops/rope.h"

namespace lmf {

namespace {

std::string layer_name(int i, const std::string& rest) { return "layers." + std::to_string(i) + "." + rest; }

// One layer's views through `find` (a parameter, gradient or copy lookup); absent optional tensors
// stay absent, a missing required one is an error naming it.
BlockWeights block_bind(const TensorLookup& find, const ModelConfig& c, int i) {
  auto get = [&](const std::string& name) {
    Tensor t = find(name);
    LMF_CHECK(t.defined(), "model parameters: no tensor '", name, "'");
    return t;
  };
  BlockWeights l;
  l.norm1 = {get(layer_name(i, "norm1.weight")), find(layer_name(i, "norm1.bias"))};
  l.qkv_w = get(layer_name(i, "attn.qkv.weight"));
  l.qkv_b = find(layer_name(i, "attn.qkv.bias"));
  l.proj_w = get(layer_name(i, "attn.proj.weight"));
  l.proj_b = find(layer_name(i, "attn.proj.bias"));
  l.norm2 = {get(layer_name(i, "norm2.weight")), find(layer_name(i, "norm2.bias"))};
  if (c.is_moe_layer(i)) {
    l.router_w = get(layer_name(i, "moe.router.weight"));
    l.sel_bias = find(layer_name(i, "moe.router.selection_bias"));
    l.w_in = get(layer_name(i, "moe.experts.w_in"));
    l.w_out = get(layer_name(i, "moe.experts.w_out"));
    l.ws_in = find(layer_name(i, "moe.shared.w_in"));
    l.ws_out = find(layer_name(i, "moe.shared.w_out"));
    l.ws_gate = find(layer_name(i, "moe.shared.gate"));
  } else {
    l.fc_w = get(layer_name(i, "mlp.fc.weight"));
    l.fc_b = find(layer_name(i, "mlp.fc.bias"));
    l.mproj_w = get(layer_name(i, "mlp.proj.weight"));
    l.mproj_b = find(layer_name(i, "mlp.proj.bias"));
  }
  return l;
}

TensorLookup lookup(const Arena& a) {
  return [&a](const std::string& name) {
    const long i = a.find(name);
    return i < 0 ? Tensor() : a[static_cast<size_t>(i)];
  };
}

// Mean of the per-row losses in double, fixed order; `host` is planned staging of losses.numel().
double mean_of(const Tensor& losses, std::vector<float>& host) {
  tensor_to_host(host.data(), losses);
  double s = 0;
  for (int64_t i = 0; i < losses.numel(); ++i) s += host[static_cast<size_t>(i)];
  return s / static_cast<double>(losses.numel());
}

// Training keeps every layer's activations for the backward; a forward-only plan needs two sets
// (block l reads set (l-1) % 2 and writes set l % 2 and the next layer's ln1 in set (l+1) % 2).
int activation_sets(const ModelConfig& c, const ModelPlan& p) { return p.training ? c.n_layer : std::min(c.n_layer, 2); }

// Rows of the residual stream this rank holds: N, or N / tp under sequence parallelism.
int64_t seq_rows(const BlockKernels& k, int64_t N) {
  if (!k.sequence_parallel) return N;
  const int64_t tp = k.comm->world_size();
  LMF_CHECK(N % tp == 0, "--sequence-parallel: the micro-batch's B x T = ", N, " rows do not split over --tp=", tp,
            " ranks");
  return N / tp;
}

// Whether activation `what` of a training layer is one buffer shared by every layer (recomputed before
// each layer's backward, ModelPlan::recompute) rather than the layer's own.
bool recomputed(const ModelPlan& p, const BlockKernels& k, const std::string& what) {
  if (p.training && k.recompute_act && what == "act") return true;
  if (!p.training || p.recompute == Recompute::none) return false;
  if (what == "qkv" || what == "probs" || what == "att") return true;
  if (p.recompute == Recompute::attention) return false;
  return what != "ln1" && what != "ln1_mean" && what != "ln1_rstd" && what != "res2" &&
         !(what.starts_with("moe.") && moe_state_is_routing(what.substr(4)));
}

// The name of layer l's activation `what` in the arena: "recompute.<what>" when shared.
std::string act_name(const ModelPlan& p, const BlockKernels& k, int l, const std::string& what) {
  return recomputed(p, k, what) ? "recompute." + what : layer_name(l, what);
}

// Everything the backward reads, per layer (the layer names match the parameters').
std::vector<TensorSpec> activation_specs(const ModelConfig& cfg, const ModelPlan& plan, const BlockKernels& k,
                                         const MoeConfig& moe) {
  const int64_t B = plan.B, T = plan.T, N = checked_mul(B, T, "activations: B*T"), C = cfg.d_model, NH = cfg.n_head,
                HS = cfg.head_size();
  const DType adt = plan.bf16() ? DType::bf16 : DType::f32;  // activations and their gradients
  std::vector<TensorSpec> as;
  std::set<std::string> names;  // a shared (recomputed) buffer is added by the first layer that has it
  auto add = [&](std::string name, std::vector<int64_t> shape, DType dt = DType::f32) {
    if (names.insert(name).second) as.push_back({std::move(name), std::move(shape), dt});
  };
  add("encoded", {B, T, C}, adt);
  // the residual stream and the norms: this rank's rows under sequence parallelism (block.h)
  const int64_t Nl = seq_rows(k, N);
  const std::vector<int64_t> stream = k.sequence_parallel ? std::vector<int64_t>{Nl, C} : std::vector<int64_t>{B, T, C};
  const int sets = activation_sets(cfg, plan);
  auto set_has = [&](int s, bool is_moe) {
    for (int l = s; l < cfg.n_layer; l += sets)
      if (cfg.is_moe_layer(l) == is_moe) return true;
    return false;
  };
  for (int l = 0; l < sets; ++l) {
    auto at = [&](const std::string& what) { return act_name(plan, k, l, what); };
    add(at("ln1"), stream, adt);
    add(at("ln1_mean"), {Nl});
    add(at("ln1_rstd"), {Nl});
    add(at("qkv"), {B, T, cfg.qkv_dim()}, adt);
    if (k.attention == AttentionImpl::flash) add(at("probs"), {B, NH, T});  // the log-sum-exp
    else if (k.attention == AttentionImpl::reference) add(at("probs"), {B, NH, T, T});
    add(at("att"), {B, T, NH * HS}, adt);
    add(at("res1"), stream, adt);
    add(at("ln2"), stream, adt);
    add(at("ln2_mean"), {Nl});
    add(at("ln2_rstd"), {Nl});
    if (set_has(l, true)) {
      for (TensorSpec& sp : moe_state_specs(moe, N, adt, "moe.")) {
        const std::string what = sp.name;  // "moe.<field>"
        add(at(what), sp.shape, sp.dtype);
      }
      // training: this layer's gathered input, kept for the backward (no second gather)
      if (plan.training) add(at("moe.xg"), {moe_rows(moe, N), C}, adt);
    }
    if (set_has(l, false)) {
      add(at("fc"), {B, T, cfg.fc_dim()}, adt);
      add(at("act"), {B, T, cfg.d_ff}, adt);
    }
    add(at("res2"), stream, adt);
  }
  add("lnf", stream, adt);
  add("lnf_mean", {Nl});
  add("lnf_rstd", {Nl});
  add("losses", {N});
  return as;
}

// The backward's shared scratch, the ends' workspace, the RoPE table, the MoE scratch.
std::vector<TensorSpec> workspace_specs(const ModelConfig& cfg, const ModelPlan& plan, const BlockKernels& k,
                                        const MoeConfig& moe, const ModelEnds& ends) {
  const int64_t B = plan.B, T = plan.T, N = checked_mul(B, T, "workspace: B*T"), C = cfg.d_model, NH = cfg.n_head,
                HS = cfg.head_size();
  const DType adt = plan.bf16() ? DType::bf16 : DType::f32;
  bool any_dense = false, any_moe = false;
  for (int l = 0; l < cfg.n_layer; ++l) (cfg.is_moe_layer(l) ? any_moe : any_dense) = true;
  std::vector<TensorSpec> ws = ends.workspace_specs(plan);
  auto add = [&](std::string name, std::vector<int64_t> shape, DType dt = DType::f32) {
    ws.push_back({std::move(name), std::move(shape), dt});
  };
  if (cfg.positions == PositionKind::rope) add("rope_freqs", {cfg.context_length, HS / 2, 2});
  if (k.sequence_parallel) {  // the gathered rows and partial sums, shared by the layers (block.h)
    add("seq_gathered", {B, T, C}, adt);
    add("seq_partial", {B, T, C}, adt);
    if (plan.training) add("seq_grad", {B, T, C}, adt);
  }
  if (plan.training) {
    const std::vector<int64_t> stream =
        k.sequence_parallel ? std::vector<int64_t>{seq_rows(k, N), C} : std::vector<int64_t>{B, T, C};
    add("d_res", stream, adt);
    add("d_ln", stream, adt);
    add("d_qkv", {B, T, cfg.qkv_dim()}, adt);
    add("d_att", {B, T, NH * HS}, adt);
    if (any_dense) add("d_fc", {B, T, cfg.fc_dim()}, adt);
    // the fused GELU backward rides on the mproj dX GEMM's epilogue: no separate d(act) buffer
    if (any_dense && !k.fused_bias_gelu) add("d_act", {B, T, cfg.d_ff}, adt);
    if (k.attention == AttentionImpl::flash) add("d_probs", {B, NH, T});  // delta = rowsum(dout * out)
    else add("d_probs", {B, NH, T, T});
  }
  if (plan.serve) add("sampled", {plan.samples, C}, adt);
  if (any_moe)
    for (TensorSpec& sp : moe_scratch_specs(moe, N, adt, plan.training, "moe.")) ws.push_back(std::move(sp));
  return ws;
}

}  // namespace

std::vector<TensorSpec> trunk_param_specs(const ModelConfig& c) {
  const int64_t C = c.d_model, HS = c.head_size();
  const bool ln_bias = c.norm == NormKind::layernorm && c.bias;
  std::vector<TensorSpec> s;
  for (int i = 0; i < c.n_layer; ++i) {
    s.push_back({layer_name(i, "norm1.weight"), {C}});
    if (ln_bias) s.push_back({layer_name(i, "norm1.bias"), {C}});
    s.push_back({layer_name(i, "attn.qkv.weight"), {c.qkv_dim(), C}});
    if (c.has_qkv_bias()) s.push_back({layer_name(i, "attn.qkv.bias"), {c.qkv_dim()}});
    s.push_back({layer_name(i, "attn.proj.weight"), {C, c.n_head * HS}});
    if (c.bias) s.push_back({layer_name(i, "attn.proj.bias"), {C}});
    s.push_back({layer_name(i, "norm2.weight"), {C}});
    if (ln_bias) s.push_back({layer_name(i, "norm2.bias"), {C}});
    if (c.is_moe_layer(i)) {
      const MoeConfig m = model_moe_config(c);
      const int64_t E = m.E, S = m.n_shared, Fi = moe_f_in(m), Fe = m.F;
      s.push_back({layer_name(i, "moe.router.weight"), {E, C}});
      if (c.moe.bias_rate > 0) s.push_back({layer_name(i, "moe.router.selection_bias"), {E}});
      s.push_back({layer_name(i, "moe.experts.w_in"), {E, Fi, C}});
      s.push_back({layer_name(i, "moe.experts.w_out"), {E, C, Fe}});
      if (S > 0) {
        s.push_back({layer_name(i, "moe.shared.w_in"), {S, Fi, C}});
        s.push_back({layer_name(i, "moe.shared.w_out"), {S, C, Fe}});
        if (m.shared_gate) s.push_back({layer_name(i, "moe.shared.gate"), {S, C}});
      }
      continue;
    }
    s.push_back({layer_name(i, "mlp.fc.weight"), {c.fc_dim(), C}});
    if (c.bias) s.push_back({layer_name(i, "mlp.fc.bias"), {c.fc_dim()}});
    s.push_back({layer_name(i, "mlp.proj.weight"), {C, c.d_ff}});
    if (c.bias) s.push_back({layer_name(i, "mlp.proj.bias"), {C}});
  }
  s.push_back({"norm_f.weight", {C}});
  if (ln_bias) s.push_back({"norm_f.bias", {C}});
  return s;
}

std::vector<TensorSpec> model_param_specs(const ModelConfig& c, const ModelEnds& ends) {
  std::vector<TensorSpec> s = ends.input_param_specs();
  for (TensorSpec& t : trunk_param_specs(c)) s.push_back(std::move(t));
  for (TensorSpec& t : ends.output_param_specs()) s.push_back(std::move(t));
  return s;
}

MoeConfig model_moe_config(const ModelConfig& c) {
  MoeConfig m;
  if (c.moe.experts == 0) return m;
  m.E = c.moe.experts;
  m.K = c.moe.top_k;
  m.C = c.d_model;
  m.F = c.d_expert();
  m.activation = c.activation == ActivationKind::swiglu ? MoeActivation::swiglu : MoeActivation::gelu;
  m.score = c.moe.sigmoid ? MoeScore::sigmoid : MoeScore::softmax;
  m.renormalize = c.moe.renormalize;
  m.capacity_factor = c.moe.capacity_factor;
  m.aux_coef = c.moe.aux_coef;
  m.z_coef = c.moe.z_coef;
  m.n_shared = c.moe.shared;
  m.shared_gate = c.moe.shared_gate;
  return m;
}

MoeConfig plan_moe_config(const ModelConfig& c, const ModelPlan& p) {
  MoeConfig m = model_moe_config(c);
  if (p.serve || p.batch_invariant) m.capacity_factor = 0;
  return m;
}

size_t Model::plan_bytes(const ModelConfig& c, const ModelPlan& p, const ModelEnds& ends, const BlockKernels* kernels) {
  plan_validate(c, p);
  const BlockKernels k = kernels ? *kernels : block_kernels(c, p);
  const MoeConfig moe = plan_moe_config(c, p);
  return checked_add(arena_plan_bytes(activation_specs(c, p, k, moe), "activations"),
                     arena_plan_bytes(workspace_specs(c, p, k, moe, ends), "workspace"), "activations + workspace");
}

std::vector<std::string> Model::lazy_grads(const ModelConfig& c, const ModelPlan& p, const ModelEnds& ends,
                                           const BlockKernels* kernels) {
  const BlockKernels k = kernels ? *kernels : block_kernels(c, p);
  std::vector<std::string> names = ends.lazy_grads(k);
  if (!k.lazy_weight_grads) return names;
  // Every weight-gradient GEMM writes its whole matrix (beta 0 right after zero_grad); so do the
  // routed experts' grouped GEMMs (MoeExtraGrads::expert_grads_zero).
  for (int i = 0; i < c.n_layer; ++i) {
    for (const char* n : {"attn.qkv.weight", "attn.proj.weight"}) names.push_back(layer_name(i, n));
    if (c.is_moe_layer(i))
      for (const char* n : {"moe.experts.w_in", "moe.experts.w_out"}) names.push_back(layer_name(i, n));
    else
      for (const char* n : {"mlp.fc.weight", "mlp.proj.weight"}) names.push_back(layer_name(i, n));
  }
  return names;
}

Model::Model(const ModelConfig& c, const ModelPlan& p, Parameters& params, TrainingState* state,
             std::unique_ptr<ModelEnds> ends, const BlockKernels* kernels)
    : cfg_(c), plan_(p), params_(params), state_(state), ends_(std::move(ends)) {
  plan_validate(cfg_, plan_);
  LMF_CHECK(ends_ != nullptr, "Model: no ends");
  input_spec_ = ends_->input_spec(plan_);
  target_spec_ = ends_->target_spec(plan_);
  LMF_CHECK(!plan_.training || state_ != nullptr, "Model: a training plan needs a TrainingState");
  const std::vector<TensorSpec> specs = model_param_specs(cfg_, *ends_);
  {  // where each layer's parameters start (its first is always norm1.weight), and the output end's
    size_t i = ends_->input_param_specs().size();
    for (int l = 0; l < cfg_.n_layer; ++l) {
      const std::string prefix = layer_name(l, "");
      layer_first_param_.push_back(i);
      while (i < specs.size() && specs[i].name.starts_with(prefix)) ++i;
    }
    layer_first_param_.push_back(i);
  }
  const Arena& m = params_.master();
  LMF_CHECK(m.size() == specs.size(), "Model: the parameters hold ", m.size(), " tensors, the model has ", specs.size());
  for (size_t i = 0; i < specs.size(); ++i)
    LMF_CHECK(m.spec(i).name == specs[i].name && m.spec(i).shape == specs[i].shape, "Model: parameter ", i, " is '",
              m.spec(i).name, "', the model's is '", specs[i].name, "'");
  LMF_CHECK(params_.device() == plan_.device, "Model: parameters on ", device_name(params_.device()), ", plan on ",
            device_name(plan_.device));
  kernels_ = kernels ? *kernels : block_kernels(cfg_, plan_);
  if (kernels_.sequence_parallel)
    LMF_CHECK(kernels_.comm != nullptr && !plan_.serve && plan_.device == Device::cpu && !plan_.bf16(),
              "Model: sequence parallelism runs tensor-parallel fp32 training and evaluation on the CPU");
  LMF_CHECK((kernels_.attention == AttentionImpl::paged) == plan_.serve,
            "Model: paged attention is the serving plans' (and theirs only)");
  LMF_CHECK(!kernels_.gemm_reads_copy || params_.has_copy(), "Model: a bf16 plan needs parameters with a bf16 copy");
  moe_cfg_ = plan_moe_config(cfg_, plan_);
  flops_ = block_flops(cfg_, moe_cfg_, plan_.B, plan_.T);
  op_plans_.set_batch_invariant(plan_.batch_invariant);
  const OpPlansScope plans(op_plans_);  // cuDNN's attention plans are built at set-up, into this model's
  plan_activations();
  plan_workspace();
  bind_weights();
  losses_host_.resize(static_cast<size_t>(plan_.B * plan_.T));
  moe_counts_host_.resize(static_cast<size_t>(moe_cfg_.E));
  moe_stats_host_.resize(3);
}

TrainingState& Model::state() {
  LMF_CHECK(state_ != nullptr, "Model: planned without training state");
  return *state_;
}

// Everything the backward reads, per layer (the layer names match the parameters').
void Model::plan_activations() {
  const int sets = activation_sets(cfg_, plan_);
  acts_ = Arena("activations", activation_specs(cfg_, plan_, kernels_, moe_cfg_), plan_.device);

  auto get = [&](const std::string& name) { return acts_.find(name) < 0 ? Tensor() : acts_.get(name); };
  encoded_ = acts_.get("encoded");
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const int k = l % sets;  // the layer's activation set (or the shared recompute buffers)
    auto a = [&](const std::string& n) { return get(act_name(plan_, kernels_, k, n)); };
    auto norm_out = [&](const std::string& stem) { return NormOut{a(stem), a(stem + "_mean"), a(stem + "_rstd")}; };
    BlockActs x;
    x.ln1 = norm_out("ln1");
    x.qkv = a("qkv");
    x.probs = a("probs");
    x.att = a("att");
    x.res1 = a("res1");
    x.ln2 = norm_out("ln2");
    x.fc = a("fc");
    x.act = a("act");
    x.res2 = a("res2");
    if (cfg_.is_moe_layer(l)) {
      x.moe = moe_state_bind([&](const std::string& field) { return acts_.get(act_name(plan_, kernels_, k, "moe." + field)); },
                             moe_cfg_);
      moe_states_.push_back(x.moe);
    }
    acts_l_.push_back(x);
  }
  lnf_ = NormOut{get("lnf"), get("lnf_mean"), get("lnf_rstd")};
  losses_ = acts_.get("losses");
}

// The workspace arena (workspace_specs) and its views; the CUDA launchers' workspace.
void Model::plan_workspace() {
  bool any_moe = false;
  for (int l = 0; l < cfg_.n_layer; ++l) any_moe = any_moe || cfg_.is_moe_layer(l);
  work_ = Arena("workspace", workspace_specs(cfg_, plan_, kernels_, moe_cfg_, *ends_), plan_.device);
  auto get = [&](const char* name) { return work_.find(name) < 0 ? Tensor() : work_.get(name); };
  sampled_ = get("sampled");
  seq_gathered_ = get("seq_gathered");
  seq_grad_ = get("seq_grad");
  seq_partial_ = get("seq_partial");
  stream_in_ = encoded_;
  if (kernels_.sequence_parallel) {
    const int64_t N = plan_.B * plan_.T, Nl = seq_rows(kernels_, N), r = kernels_.comm->rank();
    stream_in_ = encoded_.view({N, cfg_.d_model}).rows(r * Nl, (r + 1) * Nl);
  }
  d_ = BlockGrads{get("d_res"), get("d_ln"), get("d_qkv"), get("d_att"), get("d_fc"), get("d_act"), get("d_probs")};

  // MoE scratch: shared by the layers, each training layer with its own saved xg
  const MoeScratch shared = any_moe ? moe_scratch_bind(work_, moe_cfg_, plan_.training, "moe.") : MoeScratch{};
  for (int l = 0; l < cfg_.n_layer; ++l) {
    acts_l_[static_cast<size_t>(l)].moe_scratch = shared;
    if (cfg_.is_moe_layer(l) && plan_.training) {
      acts_l_[static_cast<size_t>(l)].moe_scratch.xg = acts_.get(act_name(plan_, kernels_, l, "moe.xg"));
      acts_l_[static_cast<size_t>(l)].moe_scratch.xg_saved = true;
    }
  }
  if (cfg_.positions == PositionKind::rope) {
    rope_freqs_ = work_.get("rope_freqs");
    std::vector<float> table(static_cast<size_t>(rope_freqs_.numel()));
    Tensor host = rope_freqs_;
    host.data = table.data();
    host.device = Device::cpu;
    rope_table_init(host, cfg_.rope_theta);
    tensor_from_host(rope_freqs_, table.data());
  }

#ifdef LMF_WITH_CUDA
  // The CUDA launchers' scratch (deterministic two-pass reductions, sorts, GEMM workspace), reserved
  // once for the largest user: uses never overlap on the one stream. It covers the optimizer's global
  // gradient norm over the parameters too.
  if (plan_.device == Device::cuda) {
    const int64_t B = plan_.B, T = plan_.T, N = B * T, C = cfg_.d_model, HS = cfg_.head_size();
    size_t bytes = kGemmWorkspaceBytes;
    bytes = std::max(bytes, norm_backward_cuda_workspace(N, C));
    bytes = std::max(bytes, ends_->cuda_workspace(plan_));
    bytes = std::max(bytes, linear_backward_cuda_workspace(N, std::max({cfg_.qkv_dim(), cfg_.fc_dim(), C})));
    bytes = std::max(bytes, grad_global_norm_cuda_workspace(params_.master().flat_f32().numel()));
    if (any_moe) bytes = std::max(bytes, moe_cuda_workspace(moe_cfg_, N));
    // cuDNN attention: builds its forward and backward plans here (set-up), never inside a step
    if (kernels_.attention == AttentionImpl::flash && cfg_.n_layer > 0)
      bytes = std::max(bytes, flash_attention_cuda_workspace(plan_.attention, B, T, cfg_.n_head, cfg_.n_kv_head, HS));
    if (kernels_.attention == AttentionImpl::paged)
      bytes = std::max(bytes, paged_attention_cuda_workspace(N, cfg_.n_head, HS, cfg_.context_length));
    cuda_reserve_workspace(bytes);
  }
#endif
}

void Model::bind_weights() {
  const TensorLookup master = [this](const std::string& n) { return params_.find(n); };
  const TensorLookup gemm = kernels_.gemm_reads_copy ? TensorLookup([this](const std::string& n) { return params_.find_copy(n); })
                                                     : master;
  const TensorLookup grad = plan_.training ? lookup(state_->grads_for_backward())
                                           : TensorLookup([](const std::string&) { return Tensor(); });
  for (int l = 0; l < cfg_.n_layer; ++l) {
    w_.push_back(block_bind(master, cfg_, l));
    wg_.push_back(block_bind(gemm, cfg_, l));
    if (plan_.training) g_.push_back(block_bind(grad, cfg_, l));
  }
  final_w_ = {master("norm_f.weight"), master("norm_f.bias")};
  final_g_ = {grad("norm_f.weight"), grad("norm_f.bias")};
  ends_->bind({master, gemm, grad}, work_, kernels_);
}

BlockStep Model::step_of(int l) {
  const size_t i = static_cast<size_t>(l);
  const bool last = l + 1 == cfg_.n_layer;
  BlockStep s;
  s.cfg = &cfg_;
  s.moe = &moe_cfg_;
  s.k = &kernels_;
  s.flops = &flops_;
  s.prof = prof_;
  s.layer = l;
  s.B = plan_.B;
  s.T = plan_.T;
  s.w = &w_[i];
  s.wg = &wg_[i];
  s.g = plan_.training ? &g_[i] : nullptr;
  s.tail_w = last ? final_w_ : w_[i + 1].norm1;
  if (plan_.training) s.tail_g = last ? final_g_ : g_[i + 1].norm1;
  s.x = l == 0 ? stream_in_ : acts_l_[i - 1].res2;
  s.a = &acts_l_[i];
  s.tail = last ? lnf_ : acts_l_[i + 1].ln1;
  s.d = &d_;
  s.rope_freqs = rope_freqs_;
  s.seq_gathered = seq_gathered_;
  s.seq_grad = seq_grad_;
  s.seq_partial = seq_partial_;
  return s;
}

Tensor Model::seq_all(Tensor local, Tensor full) {
  if (!kernels_.sequence_parallel) return local;
  ProfileScope scope(prof_, "sequence all-gather");
  kernels_.comm->all_gather(full.view({full.numel()}), local.view({local.numel()}));
  return full;
}

void Model::trunk_forward(Tensor inputs, KvCache* cache, const PagedBatch* batch) {
  ends_->input_forward(encoded_, inputs, batch ? batch->positions : Tensor(), prof_);
  {  // the head: the first layer's norm1 (the final norm without layers)
    ProfileScope scope(prof_, "norm fwd");
    norm_forward(cfg_, cfg_.n_layer > 0 ? acts_l_[0].ln1 : lnf_, stream_in_, cfg_.n_layer > 0 ? w_[0].norm1 : final_w_);
  }
  if (tap_) {
    tap_(-1, "input end (embedding)", encoded_);
    tap_(-1, "first norm", cfg_.n_layer > 0 ? acts_l_[0].ln1.out : lnf_.out);
  }
  for (int l = 0; l < cfg_.n_layer; ++l) {
    BlockStep s = step_of(l);
    s.cache = cache;
    s.batch = batch;
    s.tap = tap_ ? &tap_ : nullptr;
    block_forward(s);
  }
}

void Model::trunk_backward(Tensor inputs, float loss_scale) {
  tensor_zero(d_.d_res);
  const bool grads_zero = state_->grads_zero();
  for (int l = cfg_.n_layer - 1; l >= 0; --l) {
    BlockStep s = step_of(l);
    s.grads_zero = grads_zero;
    // tensor parallelism: every rank of the group adds the MoE losses' gradient to its partial router
    // gradient and input gradient, which the group sums: each adds its 1 / tp share
    s.d_aux = kernels_.comm ? loss_scale / static_cast<float>(kernels_.comm->world_size()) : loss_scale;
    // recompute: the shared buffers hold the last layer's forward still; every other layer reruns its part
    if (plan_.recompute != Recompute::none && l + 1 < cfg_.n_layer) block_recompute(s, plan_.recompute);
    block_backward(s);
    // layer l's backward wrote layer l + 1's first norm (its tail norm) and layer l's own gradients but
    // its first norm (the layer below writes that one, the head norm for layer 0)
    if (grads_final_) grads_final_(layer_first_param_[static_cast<size_t>(l) + 1]);
  }
  {  // the head
    ProfileScope scope(prof_, "norm bwd");
    const bool layers = cfg_.n_layer > 0;
    norm_backward(cfg_, d_.d_res, layers ? g_[0].norm1 : final_g_, d_.d_ln, stream_in_,
                  layers ? w_[0].norm1 : final_w_, layers ? acts_l_[0].ln1 : lnf_);
  }
  // (sequence parallelism: the input end reads every row's gradient)
  ends_->input_backward(seq_all(d_.d_res, seq_grad_), inputs, prof_);
  if (cfg_.moe.bias_rate > 0) {  // aux-loss-free balancing: each MoE layer's selection bias follows its load
    ProfileScope scope(prof_, "moe selection bias");
    for (int l = 0; l < cfg_.n_layer; ++l)
      if (w_[static_cast<size_t>(l)].sel_bias.defined())
        moe_update_bias(w_[static_cast<size_t>(l)].sel_bias, acts_l_[static_cast<size_t>(l)].moe.counts, cfg_.moe.bias_rate);
  }
}

void Model::forward_backward_device(Tensor inputs, Tensor targets, float loss_scale) {
  LMF_CHECK(plan_.training, "forward_backward on a model planned without training state");
  check_matches_spec(targets, target_spec_, "model forward_backward (targets)");
  check_matches_spec(inputs, input_spec_, "model forward_backward (inputs)");
  TrainingState& st = *state_;
  const OpPlansScope plans(op_plans_);
  st.begin_backward();
  struct Accumulated {  // after this call the gradients hold a backward's sums (also on a throw)
    TrainingState& st;
    ~Accumulated() { st.end_backward(); }
  } accumulated{st};
  trunk_forward(inputs);
  const int64_t N = plan_.B * plan_.T, C = cfg_.d_model;
  // sequence parallelism: the output end reads every row and its input gradient (every row, summed
  // over the ranks by the end or equal on all of them) lands in the scratch; this rank keeps its rows
  const bool sp = kernels_.sequence_parallel;
  const Tensor d_out = sp ? seq_partial_ : d_.d_ln;
  tensor_zero(d_out);
  const GradMode head_mode = kernels_.lazy_weight_grads && st.grads_zero() ? GradMode::Overwrite : GradMode::Accumulate;
  ends_->output_loss(losses_, d_out.view({N, C}), seq_all(lnf_.out, seq_gathered_).view({N, C}), targets,
                     loss_scale / static_cast<float>(N), head_mode, prof_);
  if (sp) {
    const int64_t Nl = d_.d_ln.dim(0), r = kernels_.comm->rank();
    tensor_copy(d_.d_ln, d_out.view({N, C}).rows(r * Nl, (r + 1) * Nl));
  }
  trunk_backward(inputs, loss_scale);
}

void Model::forward_loss_device(Tensor inputs, Tensor targets) {
  check_matches_spec(targets, target_spec_, "model forward (targets)");
  check_matches_spec(inputs, input_spec_, "model forward (inputs)");
  const OpPlansScope plans(op_plans_);
  trunk_forward(inputs);
  const int64_t N = plan_.B * plan_.T;
  ends_->output_loss(losses_, Tensor(), seq_all(lnf_.out, seq_gathered_).view({N, cfg_.d_model}), targets, 0.0f,
                     GradMode::Accumulate, prof_);
}

double Model::forward_backward(Tensor inputs, Tensor targets, float loss_scale) {
  forward_backward_device(inputs, targets, loss_scale);
  return mean_of(losses_, losses_host_);
}

double Model::forward_loss(Tensor inputs, Tensor targets) {
  forward_loss_device(inputs, targets);
  return mean_of(losses_, losses_host_);
}

void Model::forward_values(Tensor out, Tensor inputs) {
  check_shape(out, {plan_.B, plan_.T, ends_->output_width()}, "model forward_values");
  LMF_CHECK(!kernels_.sequence_parallel, "model forward_values: not available with sequence parallelism");
  if (plan_.bf16() && cfg_.family == ModelFamily::text)
    fail("model forward_values: not available in a bf16 plan (use an fp32 plan for logits)");
  check_matches_spec(inputs, input_spec_, "model forward_values (inputs)");
  const OpPlansScope plans(op_plans_);
  trunk_forward(inputs);
  ends_->output_values(out, lnf_.out.view({plan_.B * plan_.T, cfg_.d_model}));
}

void Model::forward_paged(Tensor out, const PagedBatch& batch, KvCache& cache) {
  LMF_CHECK(plan_.serve, "forward_paged on a model not planned for serving");
  check_matches_spec(batch.tokens, input_spec_, "model forward_paged (tokens)");
  const OpPlansScope plans(op_plans_);
  trunk_forward(batch.tokens, &cache, &batch);
  {
    ProfileScope scope(prof_, "gather sampled rows");
    gather_rows(sampled_, lnf_.out.view({plan_.T, cfg_.d_model}), batch.sample_rows);
  }
  ProfileScope scope(prof_, "lm_head fwd");
  ends_->output_values(out, sampled_);
}

Model::MoeSummary Model::moe_summary() const {
  MoeSummary s;
  if (moe_states_.empty()) return s;
  const int64_t NK = plan_.B * plan_.T * moe_cfg_.K;
  s.load_min = 1e300;
  s.load_max = 0;
  for (const MoeState& st : moe_states_) {
    tensor_to_host(moe_counts_host_.data(), st.counts);
    tensor_to_host(moe_stats_host_.data(), st.stats);
    const double aux = static_cast<double>(moe_stats_host_[0]) + moe_stats_host_[1];
    s.aux += aux;
    s.layer_aux.push_back(aux);
    s.dropped += static_cast<int64_t>(moe_stats_host_[2]);
    s.assignments += NK;
    std::vector<double>& loads = s.loads.emplace_back();
    for (int32_t c : moe_counts_host_) {
      const double f = static_cast<double>(c) / static_cast<double>(NK);
      loads.push_back(f);
      s.load_min = std::min(s.load_min, f);
      s.load_max = std::max(s.load_max, f);
    }
  }
  return s;
}

}  // namespace lmf
