#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "core/device.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/gemm_cuda.h"
#include "ops/linear.h"
#include "ops/optim.h"
#include "ops/norm.h"
#include "ops/residual.h"
#include "ops/rope.h"

namespace lmf {

namespace {

std::string layer_name(int i, const char* rest) { return "layers." + std::to_string(i) + "." + rest; }

// Upper bound on the fused LM-head scratch: the head runs over chunks of rows so no full
// (B*T, Vp) logits buffer exists. CPU: 8M floats (32 MiB, cache-friendly). GPU: 128M floats
// (512 MiB): the weight-gradient GEMM of each chunk reduces over the chunk's rows, and chunks of a
// few thousand rows keep it near the GEMM ceiling (166-row chunks ran at 4 TFLOP/s on an H200).
constexpr int64_t kLogitsScratchElemsCpu = int64_t{8} << 20;
constexpr int64_t kLogitsScratchElemsGpu = int64_t{128} << 20;
// bf16 plans: the logits chunk is bf16, at most 416M elements (832 MiB; 8,671 rows of GPT-2's padded
// vocabulary), and the rows are split into equal chunks (16384 rows: 2 chunks of 8,192). Large
// chunks keep the dx GEMM (rows x C outputs, K = Vp) several waves deep and read-modify-write the
// fp32 dW (Vp x C) fewer times.
constexpr int64_t kLogitsScratchElemsBf16 = int64_t{416} << 20;

}  // namespace

std::vector<TensorSpec> gpt_param_specs(const ModelConfig& c) {
  const int64_t C = c.d_model, Vp = c.padded_vocab(), HS = c.head_size();
  const bool ln_bias = c.norm == NormKind::layernorm && c.bias;
  std::vector<TensorSpec> s;
  s.push_back({"tok_emb.weight", {Vp, C}});
  if (c.positions == PositionKind::learned) s.push_back({"pos_emb.weight", {c.context_length, C}});
  for (int i = 0; i < c.n_layer; ++i) {
    s.push_back({layer_name(i, "norm1.weight"), {C}});
    if (ln_bias) s.push_back({layer_name(i, "norm1.bias"), {C}});
    s.push_back({layer_name(i, "attn.qkv.weight"), {c.qkv_dim(), C}});
    if (c.bias) s.push_back({layer_name(i, "attn.qkv.bias"), {c.qkv_dim()}});
    s.push_back({layer_name(i, "attn.proj.weight"), {C, c.n_head * HS}});
    if (c.bias) s.push_back({layer_name(i, "attn.proj.bias"), {C}});
    s.push_back({layer_name(i, "norm2.weight"), {C}});
    if (ln_bias) s.push_back({layer_name(i, "norm2.bias"), {C}});
    if (c.is_moe_layer(i)) {
      const MoeConfig m = gpt_moe_config(c);
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
  if (!c.tied_embeddings) s.push_back({"lm_head.weight", {Vp, C}});
  return s;
}

int64_t gpt_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c))
    if (include_position_embedding || s.name != "pos_emb.weight") n += s.numel();
  return n;
}

int64_t gpt_active_param_count(const ModelConfig& c, bool include_position_embedding) {
  int64_t n = 0;
  for (const TensorSpec& s : gpt_param_specs(c)) {
    if (!include_position_embedding && s.name == "pos_emb.weight") continue;
    const bool routed = s.name.find(".moe.experts.") != std::string::npos;
    n += routed ? s.numel() / c.moe.experts * c.moe.top_k : s.numel();
  }
  return n;
}

MoeConfig gpt_moe_config(const ModelConfig& c) {
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

double gpt_train_flops_per_token(const ModelConfig& c, int64_t T) {
  return 6.0 * static_cast<double>(gpt_active_param_count(c, false)) +
         12.0 * c.n_layer * static_cast<double>(c.d_model) * static_cast<double>(T);
}

template <class F>
void Gpt::timed(const char* name, double flops, F&& f) {
  ProfileScope scope(prof_, name, flops);
  f();
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::tf32: return "tf32";
    case Precision::bf16: return "bf16";
  }
  return "?";
}

Precision parse_precision(const std::string& s, const char* flag) {
  if (s == "fp32") return Precision::fp32;
  if (s == "tf32") return Precision::tf32;
  if (s == "bf16") return Precision::bf16;
  fail(flag, "=", s, " must be fp32, tf32 or bf16");
}

GptTensors gpt_bind(const Arena& a, const ModelConfig& c) {
  return gpt_bind([&](const std::string& name) { long i = a.find(name); return i < 0 ? Tensor() : a[static_cast<size_t>(i)]; },
                  c);
}

GptTensors gpt_bind(const std::function<Tensor(const std::string&)>& opt, const ModelConfig& c) {
  auto get = [&](const std::string& name) {
    Tensor t = opt(name);
    LMF_CHECK(t.defined(), "model parameters: no tensor '", name, "'");
    return t;
  };
  GptTensors t;
  t.tok_emb = get("tok_emb.weight");
  t.pos_emb = opt("pos_emb.weight");
  t.normf_w = get("norm_f.weight");
  t.normf_b = opt("norm_f.bias");
  t.lm_head = c.tied_embeddings ? t.tok_emb : get("lm_head.weight");
  for (int i = 0; i < c.n_layer; ++i) {
    GptLayerTensors l;
    l.norm1_w = get(layer_name(i, "norm1.weight"));
    l.norm1_b = opt(layer_name(i, "norm1.bias"));
    l.qkv_w = get(layer_name(i, "attn.qkv.weight"));
    l.qkv_b = opt(layer_name(i, "attn.qkv.bias"));
    l.proj_w = get(layer_name(i, "attn.proj.weight"));
    l.proj_b = opt(layer_name(i, "attn.proj.bias"));
    l.norm2_w = get(layer_name(i, "norm2.weight"));
    l.norm2_b = opt(layer_name(i, "norm2.bias"));
    if (c.is_moe_layer(i)) {
      l.router_w = get(layer_name(i, "moe.router.weight"));
      l.sel_bias = opt(layer_name(i, "moe.router.selection_bias"));
      l.w_in = get(layer_name(i, "moe.experts.w_in"));
      l.w_out = get(layer_name(i, "moe.experts.w_out"));
      l.ws_in = opt(layer_name(i, "moe.shared.w_in"));
      l.ws_out = opt(layer_name(i, "moe.shared.w_out"));
      l.ws_gate = opt(layer_name(i, "moe.shared.gate"));
      t.layers.push_back(l);
      continue;
    }
    l.fc_w = get(layer_name(i, "mlp.fc.weight"));
    l.fc_b = opt(layer_name(i, "mlp.fc.bias"));
    l.mproj_w = get(layer_name(i, "mlp.proj.weight"));
    l.mproj_b = opt(layer_name(i, "mlp.proj.bias"));
    t.layers.push_back(l);
  }
  return t;
}

Gpt::Gpt(const ModelConfig& config, const GptPlan& plan) : cfg_(config), plan_(plan) {
  cfg_.validate("model config");
  const int64_t B = plan.B, T = plan.T, C = cfg_.d_model, NH = cfg_.n_head, Vp = cfg_.padded_vocab();
  const int64_t N = B * T, QKV = cfg_.qkv_dim(), FC = cfg_.fc_dim(), F = cfg_.d_ff, HS = cfg_.head_size();
  if (B < 1) fail("batch size ", B, " must be >= 1");
  if (T < 1 || T > cfg_.context_length)
    fail("sequence length ", T, " must be in [1, context_length=", cfg_.context_length, "]");
  if (plan.precision != Precision::fp32 && plan.device != Device::cuda)
    fail("precision ", precision_name(plan.precision), " uses the GPU's tensor cores: it needs the CUDA device (this plan is on ",
         device_name(plan.device), ")");
  const bool mixed = plan.precision == Precision::bf16;
  if (mixed && HS != 32 && HS != 64 && HS != 128)
    fail("precision bf16 runs attention as flash attention, which supports head sizes 32, 64 and 128; this model's "
         "head size is d_model/n_head = ", HS);
  if (plan.attention == FlashKernels::cudnn && !(mixed && plan.device == Device::cuda))
    fail("attention kernels cudnn are bf16 flash attention on the GPU: use --precision bf16 on --device cuda");
  if (plan.attention == FlashKernels::cudnn && !cudnn_attention_available())
    fail("attention kernels cudnn: cuDNN is not available (lmforge built without cuDNN, or no cuDNN >= 9 at run "
         "time); use --attention lmforge");
  if (mixed && plan.decode_ctx > 0) fail("precision bf16 is for training; KV-cache decoding runs in fp32 on the CPU");
  const DType adt = mixed ? DType::bf16 : DType::f32;  // activations and their gradients
  moe_cfg_ = gpt_moe_config(cfg_);
  bool any_dense = false, any_moe = false;
  for (int l = 0; l < cfg_.n_layer; ++l) (cfg_.is_moe_layer(l) ? any_moe : any_dense) = true;
  if (any_moe && plan.device == Device::cuda && !mixed)
    fail("MoE layers on the GPU run in bf16 mixed precision: use --precision bf16 (this plan is ",
         precision_name(plan.precision), ")");
  if (any_moe && plan.device == Device::cuda && (C % 8 != 0 || cfg_.d_expert() % 8 != 0))
    fail("MoE layers on the GPU need d_model and d_expert multiples of 8 (d_model=", C, " d_expert=", cfg_.d_expert(), ")");

  // --- parameters, gradients, optimizer state: one arena each, same layout -------------------
  auto pspecs = gpt_param_specs(cfg_);
  params_ = Arena("params", pspecs, plan.device);
  p_ = gpt_bind(params_, cfg_);
  if (mixed) {
    // One flat bf16 block with the f32 arena's element offsets, so that element i of the flat f32
    // view and element i of the flat bf16 view are the same weight: the fused AdamW launch and the
    // cast write the copy by flat index. (A bf16 arena of its own would pad each tensor to a
    // different number of elements.)
    const int64_t n = params_.flat_f32().numel();
    params_bf16_ = Arena("params_bf16", {{"flat", {n}, DType::bf16}}, plan.device);
    auto* base = static_cast<lmf::bf16*>(params_bf16_.base());
    bf16_views_.reserve(params_.size());
    for (size_t k = 0; k < params_.size(); ++k) {
      Tensor t = params_[k];
      t.data = base + params_.offset_elems(k);
      t.dtype = DType::bf16;
      bf16_views_.push_back(t);
    }
    pb_ = gpt_bind(
        [&](const std::string& name) {
          const long i = params_.find(name);
          return i < 0 ? Tensor() : bf16_views_[static_cast<size_t>(i)];
        },
        cfg_);
  }
  if (plan.training) {
    decay_ranges_host_ = adamw_decay_ranges(params_);
    decay_ranges_ = Tensor(decay_ranges_host_.data(), DType::i32,
                           {static_cast<int64_t>(decay_ranges_host_.size() / 2), 2}, "decay_ranges");
    grads_ = Arena("grads", pspecs, plan.device);
    m_ = Arena("adam_m", pspecs, plan.device);
    v_ = Arena("adam_v", pspecs, plan.device);
    g_ = gpt_bind(grads_, cfg_);
    if (plan.device == Device::cuda) {  // the lazy ranges: the tensors' own bytes (padding stays eager)
      // The routed experts' weights (MoE plans), and with bf16 the dense weight matrices and the LM
      // head's: the first backward after zero_grad writes each of them whole (a weight-gradient GEMM
      // with beta 0; the LM head's first chunk), so zero_grad does not clear their 440 MB for GPT-2.
      const std::string head = cfg_.tied_embeddings ? "tok_emb.weight" : "lm_head.weight";
      auto lazy = [&](const std::string& name) {
        if (name.find(".moe.experts.") != std::string::npos) return true;
        if (plan.precision != Precision::bf16) return false;
        for (const char* suffix : {".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc.weight", ".mlp.proj.weight"})
          if (name.ends_with(suffix)) return true;
        return name == head;
      };
      size_t at = 0;
      for (size_t i = 0; i < grads_.size(); ++i) {
        if (!lazy(grads_.spec(i).name)) continue;
        const size_t b = grads_.offset_bytes(i), e = b + grads_.spec(i).nbytes();
        if (b > at) eager_grad_ranges_.push_back({at, b - at});
        lazy_grad_ranges_.push_back({b, e - b});
        at = e;
      }
      if (!lazy_grad_ranges_.empty() && at < grads_.bytes()) eager_grad_ranges_.push_back({at, grads_.bytes() - at});
    }
  }

  // --- activations (everything backward reads) ----------------------------------------------
  std::vector<TensorSpec> as;
  auto add = [&](std::vector<TensorSpec>& v, std::string name, std::vector<int64_t> shape,
                 DType dt = DType::f32) { v.push_back({std::move(name), std::move(shape), dt}); };
  add(as, "encoded", {B, T, C}, adt);
  for (int l = 0; l < cfg_.n_layer; ++l) {
    add(as, layer_name(l, "ln1"), {B, T, C}, adt);
    add(as, layer_name(l, "ln1_mean"), {N});
    add(as, layer_name(l, "ln1_rstd"), {N});
    add(as, layer_name(l, "qkv"), {B, T, QKV}, adt);
    if (mixed) add(as, layer_name(l, "lse"), {B, NH, T});  // flash attention keeps only the log-sum-exp
    else add(as, layer_name(l, "probs"), {B, NH, T, T});
    add(as, layer_name(l, "att"), {B, T, NH * HS}, adt);
    add(as, layer_name(l, "res1"), {B, T, C}, adt);
    add(as, layer_name(l, "ln2"), {B, T, C}, adt);
    add(as, layer_name(l, "ln2_mean"), {N});
    add(as, layer_name(l, "ln2_rstd"), {N});
    if (cfg_.is_moe_layer(l)) {
      for (TensorSpec& sp : moe_state_specs(moe_cfg_, N, adt, layer_name(l, "moe."))) as.push_back(std::move(sp));
      // training: this layer's gathered input, kept for the backward (no second gather)
      if (plan.training) add(as, layer_name(l, "moe.xg"), {moe_rows(moe_cfg_, N), C}, adt);
    } else {
      add(as, layer_name(l, "fc"), {B, T, FC}, adt);
      add(as, layer_name(l, "act"), {B, T, F}, adt);
    }
    add(as, layer_name(l, "res2"), {B, T, C}, adt);
  }
  add(as, "lnf", {B, T, C}, adt);
  add(as, "lnf_mean", {N});
  add(as, "lnf_rstd", {N});
  add(as, "losses", {N});
  acts_ = Arena("activations", as, plan.device);
  encoded_ = acts_.get("encoded");
  for (int l = 0; l < cfg_.n_layer; ++l) {
    auto a = [&](const char* n) { return acts_.get(layer_name(l, n)); };
    const bool moe = cfg_.is_moe_layer(l);
    la_.push_back({a("ln1"), a("ln1_mean"), a("ln1_rstd"), a("qkv"), a(mixed ? "lse" : "probs"), a("att"), a("res1"), a("ln2"),
                   a("ln2_mean"), a("ln2_rstd"), moe ? Tensor() : a("fc"), moe ? Tensor() : a("act"), a("res2"), MoeState{}});
    if (moe) {
      la_.back().moe = moe_state_bind(acts_, moe_cfg_, layer_name(l, "moe."));
      moe_states_.push_back(la_.back().moe);
    }
  }
  lnf_ = acts_.get("lnf");
  lnf_mean_ = acts_.get("lnf_mean");
  lnf_rstd_ = acts_.get("lnf_rstd");
  losses_ = acts_.get("losses");

  // --- workspace -------------------------------------------------------------------------------
  const int64_t scratch_elems = mixed ? kLogitsScratchElemsBf16
                                : plan.device == Device::cuda ? kLogitsScratchElemsGpu : kLogitsScratchElemsCpu;
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, scratch_elems / Vp));
  if (mixed) {  // equal chunks: no short last chunk running the LM-head GEMMs at low occupancy
    const int64_t chunks = (N + R - 1) / R;
    R = (N + chunks - 1) / chunks;
  }
  std::vector<TensorSpec> ws;
  add(ws, "logits_scratch", {R, Vp}, adt);
  if (cfg_.positions == PositionKind::rope) add(ws, "rope_freqs", {cfg_.context_length, HS / 2, 2});
  if (plan.training) {
    add(ws, "d_res", {B, T, C}, adt);
    add(ws, "d_ln", {B, T, C}, adt);
    add(ws, "d_qkv", {B, T, QKV}, adt);
    add(ws, "d_att", {B, T, NH * HS}, adt);
    if (any_dense) add(ws, "d_fc", {B, T, FC}, adt);
    // bf16 GPT-2-style MLPs fuse GELU's backward into the GEMM epilogue: no separate d(act) buffer
    if (any_dense && !(mixed && cfg_.activation == ActivationKind::gelu && cfg_.bias)) add(ws, "d_act", {B, T, F}, adt);
    if (mixed) add(ws, "d_probs", {B, NH, T});  // flash attention backward's delta = rowsum(dout * out)
    else add(ws, "d_probs", {B, NH, T, T});
  }
  if (any_moe)
    for (TensorSpec& sp : moe_scratch_specs(moe_cfg_, N, adt, plan.training, "moe.")) ws.push_back(std::move(sp));
  work_ = Arena("workspace", ws, plan.device);
  // MoE scratch, shared by the layers (the workspace), each training layer with its own saved xg
  const MoeScratch shared_scratch = any_moe ? moe_scratch_bind(work_, moe_cfg_, plan.training, "moe.") : MoeScratch{};
  moe_layer_scratch_.assign(static_cast<size_t>(cfg_.n_layer), shared_scratch);
  for (int l = 0; l < cfg_.n_layer && plan.training; ++l)
    if (cfg_.is_moe_layer(l)) {
      moe_layer_scratch_[static_cast<size_t>(l)].xg = acts_.get(layer_name(l, "moe.xg"));
      moe_layer_scratch_[static_cast<size_t>(l)].xg_saved = true;
    }
  moe_counts_host_.resize(static_cast<size_t>(moe_cfg_.E));
  moe_stats_host_.resize(3);
  logits_scratch_ = work_.get("logits_scratch");
  if (cfg_.positions == PositionKind::rope) {
    rope_freqs_ = work_.get("rope_freqs");
    std::vector<float> table(static_cast<size_t>(rope_freqs_.numel()));
    Tensor host = rope_freqs_;
    host.data = table.data();
    host.device = Device::cpu;
    rope_table_init(host, cfg_.rope_theta);
    tensor_from_host(rope_freqs_, table.data());
  }
  losses_host_.resize(static_cast<size_t>(N));

#ifdef LMF_WITH_CUDA
  // The CUDA launchers' scratch (deterministic two-pass reductions, sorts, GEMM workspace), reserved
  // once for the largest user: uses never overlap on the one stream.
  if (plan.device == Device::cuda) {
    size_t ws = kGemmWorkspaceBytes;
    ws = std::max(ws, norm_backward_cuda_workspace(N, C));
    ws = std::max(ws, embedding_backward_cuda_workspace(N, Vp));
    ws = std::max(ws, linear_backward_cuda_workspace(N, std::max({QKV, FC, C})));
    ws = std::max(ws, grad_global_norm_cuda_workspace(params_.flat_f32().numel()));
    if (any_moe) ws = std::max(ws, moe_cuda_workspace(moe_cfg_, N));
    // cuDNN attention: builds its forward and backward plans here (set-up), never inside a step
    if (mixed && cfg_.n_layer > 0)
      ws = std::max(ws, flash_attention_cuda_workspace(plan.attention, B, T, cfg_.n_head, cfg_.n_kv_head, HS));
    cuda_reserve_workspace(ws);
    cuda::set_gemm_math(plan.precision == Precision::tf32 ? cuda::GemmMath::tf32 : cuda::GemmMath::fp32);
  }
#endif
  if (plan.training) {
    d_res_ = work_.get("d_res");
    d_ln_ = work_.get("d_ln");
    d_qkv_ = work_.get("d_qkv");
    d_att_ = work_.get("d_att");
    if (work_.find("d_fc") >= 0) d_fc_ = work_.get("d_fc");
    if (work_.find("d_act") >= 0) d_act_ = work_.get("d_act");
    d_probs_ = work_.get("d_probs");
  }

  // --- decode state (batch 1, KV cache) --------------------------------------------------------
  if (plan.decode_ctx > 0) {
    if (plan.device != Device::cpu) fail("KV-cache decoding runs on the CPU in this version (device ", device_name(plan.device), ")");
    const int64_t S = plan.decode_ctx, KV = cfg_.n_kv_head * HS;
    if (S > cfg_.context_length) fail("decode context ", S, " exceeds context_length=", cfg_.context_length);
    std::vector<TensorSpec> ds;
    add(ds, "k_cache", {cfg_.n_layer, S, KV});
    add(ds, "v_cache", {cfg_.n_layer, S, KV});
    add(ds, "x", {1, 1, C});
    add(ds, "ln", {1, 1, C});
    add(ds, "mean", {1});
    add(ds, "rstd", {1});
    add(ds, "qkv", {1, 1, QKV});
    add(ds, "att", {1, NH * HS});
    add(ds, "tmp", {1, C});
    add(ds, "fc", {1, FC});
    add(ds, "act", {1, F});
    add(ds, "scores", {NH, S});
    add(ds, "logits", {1, cfg_.vocab_size});
    add(ds, "token", {1, 1}, DType::i32);
    if (any_moe) {
      for (TensorSpec& sp : moe_state_specs(moe_cfg_, 1, DType::f32, "moe.")) ds.push_back(std::move(sp));
      for (TensorSpec& sp : moe_scratch_specs(moe_cfg_, 1, DType::f32, false, "moe_scratch.")) ds.push_back(std::move(sp));
    }
    decode_ = Arena("decode", ds);
    k_cache_ = decode_.get("k_cache");
    v_cache_ = decode_.get("v_cache");
    dx_ = decode_.get("x");
    dln_ = decode_.get("ln");
    dmean_ = decode_.get("mean");
    drstd_ = decode_.get("rstd");
    dqkv_ = decode_.get("qkv");
    datt_ = decode_.get("att");
    dtmp_ = decode_.get("tmp");
    dfc_ = decode_.get("fc");
    dact_ = decode_.get("act");
    dscores_ = decode_.get("scores");
    dlogits_ = decode_.get("logits");
    dtok_ = decode_.get("token");
    if (any_moe) {
      decode_moe_ = moe_state_bind(decode_, moe_cfg_, "moe.");
      decode_moe_scratch_ = moe_scratch_bind(decode_, moe_cfg_, false, "moe_scratch.");
    }
  }
}

size_t Gpt::arena_bytes() const {
  return params_.bytes() + grads_.bytes() + m_.bytes() + v_.bytes() + acts_.bytes() + work_.bytes() + decode_.bytes() +
         params_bf16_.bytes();
}

void Gpt::sync_weight_copy() {
  if (bf16()) cast_to_bf16(params_bf16_.flat(DType::bf16), params_.flat_f32());
}

void Gpt::init_weights(uint64_t seed) {
  const double std_base = 0.02, std_proj = 0.02 / std::sqrt(2.0 * cfg_.n_layer);
  const int64_t V = cfg_.vocab_size;
  std::vector<float> host;
  for (size_t k = 0; k < params_.size(); ++k) {
    Tensor t = params_[k];
    const std::string& name = params_.spec(k).name;
    host.assign(static_cast<size_t>(t.numel()), 0.0f);
    float* w = host.data();
    const int64_t n = t.numel();
    auto ends_with = [&](const char* suf) {
      size_t L = std::strlen(suf);
      return name.size() >= L && name.compare(name.size() - L, L, suf) == 0;
    };
    if (ends_with(".bias") || ends_with(".selection_bias")) {
      std::fill(w, w + n, 0.0f);
    } else if (name.find("norm") != std::string::npos) {
      std::fill(w, w + n, 1.0f);
    } else {
      const double sd =
          (ends_with("attn.proj.weight") || ends_with("mlp.proj.weight") || ends_with(".w_out")) ? std_proj : std_base;
      for (int64_t j = 0; j < n; ++j) w[j] = static_cast<float>(sd * rng_normal(seed, k + 1, static_cast<uint64_t>(j)));
      if (name == "tok_emb.weight" || name == "lm_head.weight")  // padded vocab rows stay zero
        std::fill(w + V * cfg_.d_model, w + n, 0.0f);
    }
    tensor_from_host(t, host.data());
  }
  sync_weight_copy();
}

void Gpt::norm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor w, Tensor b) {
  if (cfg_.norm == NormKind::layernorm) layernorm_forward(out, mean, rstd, inp, w, b, cfg_.norm_eps);
  else rmsnorm_forward(out, rstd, inp, w, cfg_.norm_eps);
}

void Gpt::norm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp, Tensor w, Tensor mean, Tensor rstd,
                        Tensor dinp_sum) {
  if (cfg_.norm == NormKind::layernorm) layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, dinp_sum);
  else rmsnorm_backward(dinp, dw, dout, inp, w, rstd, dinp_sum);
}

void Gpt::forward_body(Tensor tokens) {
  const int64_t B = plan_.B, T = plan_.T, N = B * T, C = cfg_.d_model, HS = cfg_.head_size();
  const int64_t QKV = cfg_.qkv_dim(), FC = cfg_.fc_dim(), F = cfg_.d_ff, NH = cfg_.n_head;
  const double lin_qkv = 2.0 * N * C * QKV, lin_proj = 2.0 * N * NH * HS * C, lin_fc = 2.0 * N * C * FC,
               lin_mproj = 2.0 * N * F * C, attn = 4.0 * B * NH * T * T * HS / 2;  // causal half
  check_shape(tokens, {B, T}, "gpt forward");
  if (bf16()) {
    forward_body_bf16(tokens);
    return;
  }
  timed("embedding fwd", 0, [&] { embedding_forward(encoded_, tokens, p_.tok_emb, p_.pos_emb); });
  Tensor x = encoded_;
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const GptLayerTensors& w = p_.layers[l];
    LayerActs& a = la_[l];
    timed("norm fwd", 0, [&] { norm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, w.norm1_w, w.norm1_b); });
    timed("linear qkv fwd", lin_qkv, [&] { linear_forward(a.qkv, a.ln1, w.qkv_w, w.qkv_b); });
    if (cfg_.positions == PositionKind::rope)
      timed("rope fwd", 0, [&] { rope_forward(a.qkv, rope_freqs_, cfg_.n_head, cfg_.n_kv_head); });
    timed("attention fwd", attn, [&] { attention_forward(a.att, a.probs, a.qkv, cfg_.n_head, cfg_.n_kv_head); });
    timed("linear proj fwd", lin_proj, [&] { linear_forward(a.res1, a.att, w.proj_w, w.proj_b); });
    timed("residual fwd", 0, [&] { residual_forward(a.res1, a.res1, x); });
    timed("norm fwd", 0, [&] { norm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res1, w.norm2_w, w.norm2_b); });
    if (w.moe()) {
      moe_layer_forward(l, a.res2);
    } else {
      timed("linear fc fwd", lin_fc, [&] { linear_forward(a.fc, a.ln2, w.fc_w, w.fc_b); });
      timed("activation fwd", 0, [&] {
        if (cfg_.activation == ActivationKind::gelu) gelu_forward(a.act, a.fc);
        else swiglu_forward(a.act, a.fc);
      });
      timed("linear mproj fwd", lin_mproj, [&] { linear_forward(a.res2, a.act, w.mproj_w, w.mproj_b); });
    }
    timed("residual fwd", 0, [&] { residual_forward(a.res2, a.res2, a.res1); });
    x = a.res2;
  }
  timed("norm fwd", 0, [&] { norm_forward(lnf_, lnf_mean_, lnf_rstd_, x, p_.normf_w, p_.normf_b); });
}

namespace {
// Mean of the per-row losses in double, fixed order; `host` is planned staging of losses.numel().
double mean_of(const Tensor& losses, std::vector<float>& host) {
  tensor_to_host(host.data(), losses);
  double s = 0;
  for (int64_t i = 0; i < losses.numel(); ++i) s += host[static_cast<size_t>(i)];
  return s / static_cast<double>(losses.numel());
}
}  // namespace

double Gpt::forward_loss(Tensor tokens, Tensor targets) {
  forward_loss_device(tokens, targets);
  return mean_of(losses_, losses_host_);
}

void Gpt::forward_loss_device(Tensor tokens, Tensor targets) {
  const int64_t N = plan_.B * plan_.T;
  check_shape(targets, {plan_.B, plan_.T}, "gpt forward (targets)");
  forward_body(tokens);
  lm_head_cross_entropy(losses_, Tensor(), Tensor(), lnf_.view({N, cfg_.d_model}), bf16() ? pb_.lm_head : p_.lm_head,
                        targets.view({N}), logits_scratch_, cfg_.vocab_size, 0.0f);
}

void Gpt::forward_logits(Tensor logits, Tensor tokens) {
  const int64_t N = plan_.B * plan_.T;
  check_shape(logits, {plan_.B, plan_.T, cfg_.vocab_size}, "gpt forward_logits");
  if (bf16()) fail("gpt forward_logits: not available in a bf16 plan (use an fp32 plan for logits)");
  forward_body(tokens);
  linear_forward(logits.view({N, cfg_.vocab_size}), lnf_.view({N, cfg_.d_model}), p_.lm_head.rows(0, cfg_.vocab_size),
                 Tensor());
}

double Gpt::forward_backward(Tensor tokens, Tensor targets, float loss_scale) {
  forward_backward_device(tokens, targets, loss_scale);
  return mean_of(losses_, losses_host_);
}

void Gpt::zero_grad() {
  grads_zero_ = true;
  if (lazy_grad_ranges_.empty()) {
    grads_.zero();
    return;
  }
  auto* base = static_cast<unsigned char*>(grads_.base());
  for (const auto& [at, n] : eager_grad_ranges_) device_memset0(base + at, n);
  lazy_grads_stale_ = true;
}

void Gpt::settle_grads() const {
  if (!lazy_grads_stale_) return;
  auto* base = static_cast<unsigned char*>(grads_.base());
  for (const auto& [at, n] : lazy_grad_ranges_) device_memset0(base + at, n);
  lazy_grads_stale_ = false;
}

void Gpt::forward_backward_device(Tensor tokens, Tensor targets, float loss_scale) {
  LMF_CHECK(plan_.training, "forward_backward on a model planned without training state");
  // Stale expert gradients are written whole by this backward only when the gradients hold zeros
  // otherwise (expert_grads_zero); any other state was settled by grads() already.
  if (!grads_zero_) settle_grads();
  struct Accumulated {  // after this call the gradients hold a backward's sums (also on a throw)
    bool& zero;
    bool& stale;
    ~Accumulated() { zero = stale = false; }
  } accumulated{grads_zero_, lazy_grads_stale_};
  const int64_t B = plan_.B, T = plan_.T, N = B * T, C = cfg_.d_model, HS = cfg_.head_size();
  const int64_t QKV = cfg_.qkv_dim(), FC = cfg_.fc_dim(), F = cfg_.d_ff, NH = cfg_.n_head;
  const double lin_qkv = 4.0 * N * C * QKV, lin_proj = 4.0 * N * NH * HS * C, lin_fc = 4.0 * N * C * FC,
               lin_mproj = 4.0 * N * F * C, attn = 8.0 * B * NH * T * T * HS / 2;  // backward: 2x forward
  check_shape(targets, {B, T}, "gpt forward_backward (targets)");
  forward_body(tokens);
  if (bf16()) {
    tensor_zero(d_ln_);
    const float grad_scale = loss_scale / static_cast<float>(N);
    timed("lm_head + cross-entropy fwd+bwd", 6.0 * N * C * cfg_.vocab_size, [&] {
      lm_head_cross_entropy(losses_, d_ln_.view({N, C}), g_.lm_head, lnf_.view({N, C}), pb_.lm_head,
                            targets.view({N}), logits_scratch_, cfg_.vocab_size, grad_scale,
                            grads_zero_ ? GradMode::Overwrite : GradMode::Accumulate);
    });
    backward_layers_bf16(tokens, loss_scale);
    if (cfg_.moe.bias_rate > 0) moe_update_selection_bias();
    return;
  }

  // LM head + cross-entropy: losses, d(lnf) and d(head weight) in one pass.
  tensor_zero(d_ln_);
  const float grad_scale = loss_scale / static_cast<float>(N);
  timed("lm_head + cross-entropy fwd+bwd", 6.0 * N * C * cfg_.vocab_size, [&] {
    lm_head_cross_entropy(losses_, d_ln_.view({N, C}), g_.lm_head, lnf_.view({N, C}), p_.lm_head, targets.view({N}),
                          logits_scratch_, cfg_.vocab_size, grad_scale);
  });

  // d_res carries d(loss)/d(residual stream), walking back through the layers.
  tensor_zero(d_res_);
  Tensor x_last = cfg_.n_layer > 0 ? la_.back().res2 : encoded_;
  timed("norm bwd", 0, [&] { norm_backward(d_res_, g_.normf_w, g_.normf_b, d_ln_, x_last, p_.normf_w, lnf_mean_, lnf_rstd_); });

  for (int l = cfg_.n_layer - 1; l >= 0; --l) {
    const GptLayerTensors& w = p_.layers[l];
    const GptLayerTensors& gw = g_.layers[l];
    LayerActs& a = la_[l];
    Tensor x_in = l == 0 ? encoded_ : la_[l - 1].res2;

    // MLP block: res2 = res1 + act(fc(norm2(res1))) Wm^T + bm  (or res1 + moe(norm2(res1)))
    if (w.moe()) {
      tensor_zero(d_ln_);
      moe_layer_backward(l, loss_scale);
    } else {
      tensor_zero(d_act_);
      timed("linear mproj bwd", lin_mproj, [&] { linear_backward(d_act_, gw.mproj_w, gw.mproj_b, d_res_, a.act, w.mproj_w); });
      tensor_zero(d_fc_);
      timed("activation bwd", 0, [&] {
        if (cfg_.activation == ActivationKind::gelu) gelu_backward(d_fc_, d_act_, a.fc);
        else swiglu_backward(d_fc_, d_act_, a.fc);
      });
      tensor_zero(d_ln_);
      timed("linear fc bwd", lin_fc, [&] { linear_backward(d_ln_, gw.fc_w, gw.fc_b, d_fc_, a.ln2, w.fc_w); });
    }
    timed("norm bwd", 0, [&] { norm_backward(d_res_, gw.norm2_w, gw.norm2_b, d_ln_, a.res1, w.norm2_w, a.ln2_mean, a.ln2_rstd); });

    // Attention block: res1 = x_in + attn(rope(qkv(norm1(x_in)))) Wp^T + bp
    tensor_zero(d_att_);
    timed("linear proj bwd", lin_proj, [&] { linear_backward(d_att_, gw.proj_w, gw.proj_b, d_res_, a.att, w.proj_w); });
    tensor_zero(d_qkv_);
    timed("attention bwd", attn, [&] {
      attention_backward(d_qkv_, d_probs_, d_att_, a.qkv, a.probs, cfg_.n_head, cfg_.n_kv_head);
    });
    if (cfg_.positions == PositionKind::rope)
      timed("rope bwd", 0, [&] { rope_backward(d_qkv_, rope_freqs_, cfg_.n_head, cfg_.n_kv_head); });
    tensor_zero(d_ln_);
    timed("linear qkv bwd", lin_qkv, [&] { linear_backward(d_ln_, gw.qkv_w, gw.qkv_b, d_qkv_, a.ln1, w.qkv_w); });
    timed("norm bwd", 0, [&] { norm_backward(d_res_, gw.norm1_w, gw.norm1_b, d_ln_, x_in, w.norm1_w, a.ln1_mean, a.ln1_rstd); });
  }
  timed("embedding bwd", 0, [&] { embedding_backward(g_.tok_emb, g_.pos_emb, d_res_, tokens); });
  if (cfg_.moe.bias_rate > 0) moe_update_selection_bias();
}

// bf16 mixed precision (docs/MIXED_PRECISION.md): GEMMs read the bf16 weight copy pb_, norms and
// embeddings the f32 masters p_. Residual adds are fused into the next norm: the output projection of
// each block writes its result into the residual buffer, and residual_*norm_forward adds the block's
// input and normalises in one pass. GELU is fused into the fc GEMM's epilogue when the layer has a
// bias (GPT-2), its backward into the mproj dX GEMM's epilogue; attention is flash attention.
void Gpt::forward_body_bf16(Tensor tokens) {
  const int64_t B = plan_.B, T = plan_.T, N = B * T, C = cfg_.d_model, HS = cfg_.head_size();
  const int64_t QKV = cfg_.qkv_dim(), FC = cfg_.fc_dim(), F = cfg_.d_ff, NH = cfg_.n_head;
  const double lin_qkv = 2.0 * N * C * QKV, lin_proj = 2.0 * N * NH * HS * C, lin_fc = 2.0 * N * C * FC,
               lin_mproj = 2.0 * N * F * C, attn = 4.0 * B * NH * T * T * HS / 2;
  const bool layernorm = cfg_.norm == NormKind::layernorm;
  const bool fused_gelu = cfg_.activation == ActivationKind::gelu && cfg_.bias;
  // res = a + b, out = norm(res) with the weights w/b (f32 masters)
  auto residual_norm = [&](Tensor res, Tensor out, Tensor mean, Tensor rstd, Tensor a, Tensor b, Tensor w, Tensor bias) {
    timed("residual + norm fwd", 0, [&] {
      if (layernorm) residual_layernorm_forward(res, out, mean, rstd, a, b, w, bias, cfg_.norm_eps);
      else residual_rmsnorm_forward(res, out, rstd, a, b, w, cfg_.norm_eps);
    });
  };
  timed("embedding fwd", 0, [&] { embedding_forward(encoded_, tokens, p_.tok_emb, p_.pos_emb); });
  if (cfg_.n_layer == 0) {
    timed("norm fwd", 0, [&] { norm_forward(lnf_, lnf_mean_, lnf_rstd_, encoded_, p_.normf_w, p_.normf_b); });
    return;
  }
  timed("norm fwd", 0, [&] {
    norm_forward(la_[0].ln1, la_[0].ln1_mean, la_[0].ln1_rstd, encoded_, p_.layers[0].norm1_w, p_.layers[0].norm1_b);
  });
  Tensor x = encoded_;
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const GptLayerTensors& w = p_.layers[l];
    const GptLayerTensors& wb = pb_.layers[l];
    LayerActs& a = la_[l];
    timed("linear qkv fwd", lin_qkv, [&] { linear_forward(a.qkv, a.ln1, wb.qkv_w, wb.qkv_b); });
    if (cfg_.positions == PositionKind::rope)
      timed("rope fwd", 0, [&] { rope_forward(a.qkv, rope_freqs_, cfg_.n_head, cfg_.n_kv_head); });
    timed("flash attention fwd", attn, [&] { flash_attention_forward(a.att, a.probs, a.qkv, cfg_.n_head, cfg_.n_kv_head, plan_.attention);
    });
    timed("linear proj fwd", lin_proj, [&] { linear_forward(a.res1, a.att, wb.proj_w, wb.proj_b); });
    residual_norm(a.res1, a.ln2, a.ln2_mean, a.ln2_rstd, x, a.res1, w.norm2_w, w.norm2_b);
    if (w.moe()) {
      moe_layer_forward(l, a.res2);
    } else if (fused_gelu) {
      timed("linear fc + gelu fwd", lin_fc, [&] { linear_gelu_forward(a.act, a.fc, a.ln2, wb.fc_w, wb.fc_b); });
    } else {
      timed("linear fc fwd", lin_fc, [&] { linear_forward(a.fc, a.ln2, wb.fc_w, wb.fc_b); });
      timed("activation fwd", 0, [&] {
        if (cfg_.activation == ActivationKind::gelu) gelu_forward(a.act, a.fc);
        else swiglu_forward(a.act, a.fc);
      });
    }
    if (!w.moe()) timed("linear mproj fwd", lin_mproj, [&] { linear_forward(a.res2, a.act, wb.mproj_w, wb.mproj_b); });
    if (l + 1 < cfg_.n_layer) {
      LayerActs& n = la_[l + 1];
      residual_norm(a.res2, n.ln1, n.ln1_mean, n.ln1_rstd, a.res1, a.res2, p_.layers[l + 1].norm1_w,
                    p_.layers[l + 1].norm1_b);
    } else {
      residual_norm(a.res2, lnf_, lnf_mean_, lnf_rstd_, a.res1, a.res2, p_.normf_w, p_.normf_b);
    }
    x = a.res2;
  }
}

void Gpt::backward_layers_bf16(Tensor tokens, float loss_scale) {
  const int64_t B = plan_.B, T = plan_.T, N = B * T, C = cfg_.d_model, HS = cfg_.head_size();
  const int64_t QKV = cfg_.qkv_dim(), FC = cfg_.fc_dim(), F = cfg_.d_ff, NH = cfg_.n_head;
  const double lin_qkv = 4.0 * N * C * QKV, lin_proj = 4.0 * N * NH * HS * C, lin_fc = 4.0 * N * C * FC,
               lin_mproj = 4.0 * N * F * C, attn = 8.0 * B * NH * T * T * HS / 2;
  const bool fused_gelu = cfg_.activation == ActivationKind::gelu && cfg_.bias;
  // The dense weight gradients are lazy (zero_grad left them): this backward writes them
  const GradMode wmode = grads_zero_ ? GradMode::Overwrite : GradMode::Accumulate;
  // Each norm backward leaves d(residual stream) in d_res_, the output gradient of the projection that
  // wrote into the stream before it (MLP output before a block's norm1 and the final norm, attention
  // output before norm2); it also sums its columns: that projection's bias gradient, in the same pass.
  auto mproj_bias_grad = [&](int l) { return l >= 0 && !p_.layers[l].moe() ? g_.layers[l].mproj_b : Tensor(); };
  tensor_zero(d_res_);
  Tensor x_last = cfg_.n_layer > 0 ? la_.back().res2 : encoded_;
  timed("norm bwd", 0, [&] {
    norm_backward(d_res_, g_.normf_w, g_.normf_b, d_ln_, x_last, p_.normf_w, lnf_mean_, lnf_rstd_,
                  mproj_bias_grad(cfg_.n_layer - 1));
  });
  for (int l = cfg_.n_layer - 1; l >= 0; --l) {
    const GptLayerTensors& w = p_.layers[l];
    const GptLayerTensors& wb = pb_.layers[l];
    const GptLayerTensors& gw = g_.layers[l];
    LayerActs& a = la_[l];
    Tensor x_in = l == 0 ? encoded_ : la_[l - 1].res2;
    if (w.moe()) {
      tensor_zero(d_ln_);
      moe_layer_backward(l, loss_scale);
    } else if (fused_gelu) {
      timed("linear mproj + gelu bwd", lin_mproj, [&] {
        linear_backward_dgelu(d_fc_, gw.mproj_w, Tensor(), d_res_, a.act, wb.mproj_w, a.fc, wmode);
      });
    } else {
      timed("linear mproj bwd", lin_mproj, [&] {
        linear_backward(d_act_, gw.mproj_w, Tensor(), d_res_, a.act, wb.mproj_w, GradMode::Overwrite, wmode);
      });
      tensor_zero(d_fc_);
      timed("activation bwd", 0, [&] {
        if (cfg_.activation == ActivationKind::gelu) gelu_backward(d_fc_, d_act_, a.fc);
        else swiglu_backward(d_fc_, d_act_, a.fc);
      });
    }
    if (!w.moe())
      timed("linear fc bwd", lin_fc, [&] {
        linear_backward(d_ln_, gw.fc_w, gw.fc_b, d_fc_, a.ln2, wb.fc_w, GradMode::Overwrite, wmode);
      });
    timed("norm bwd", 0, [&] {
      norm_backward(d_res_, gw.norm2_w, gw.norm2_b, d_ln_, a.res1, w.norm2_w, a.ln2_mean, a.ln2_rstd, gw.proj_b);
    });
    timed("linear proj bwd", lin_proj, [&] {
      linear_backward(d_att_, gw.proj_w, Tensor(), d_res_, a.att, wb.proj_w, GradMode::Overwrite, wmode);
    });
    timed("flash attention bwd", attn, [&] {
      flash_attention_backward(d_qkv_, d_probs_, d_att_, a.qkv, a.att, a.probs, cfg_.n_head, cfg_.n_kv_head,
                               GradMode::Overwrite, plan_.attention);
    });
    if (cfg_.positions == PositionKind::rope)
      timed("rope bwd", 0, [&] { rope_backward(d_qkv_, rope_freqs_, cfg_.n_head, cfg_.n_kv_head); });
    timed("linear qkv bwd", lin_qkv, [&] {
      linear_backward(d_ln_, gw.qkv_w, gw.qkv_b, d_qkv_, a.ln1, wb.qkv_w, GradMode::Overwrite, wmode);
    });
    timed("norm bwd", 0, [&] {
      norm_backward(d_res_, gw.norm1_w, gw.norm1_b, d_ln_, x_in, w.norm1_w, a.ln1_mean, a.ln1_rstd,
                    mproj_bias_grad(l - 1));
    });
  }
  timed("embedding bwd", 0, [&] { embedding_backward(g_.tok_emb, g_.pos_emb, d_res_, tokens); });
}

// MoE layers: the router and the routed experts read the f32 router weight (fp32 logits) and, in bf16
// plans, the bf16 copies of the expert weights; the shared gate and the selection bias are f32.
void Gpt::moe_layer_forward(int l, Tensor out) {
  const int64_t N = plan_.B * plan_.T, C = cfg_.d_model;
  const GptLayerTensors& w = p_.layers[l];
  const GptLayerTensors& wb = bf16() ? pb_.layers[l] : p_.layers[l];
  const MoeConfig& m = moe_cfg_;
  const double flops = 2.0 * N * (m.E * C + (m.K + m.n_shared) * (moe_f_in(m) + m.F) * C);
  timed("moe fwd", flops, [&] {
    moe_forward(out.view({N, C}), la_[l].moe, moe_layer_scratch_[static_cast<size_t>(l)], la_[l].ln2.view({N, C}),
                w.router_w, wb.w_in, wb.w_out,
                MoeExtra{wb.ws_in, wb.ws_out, w.ws_gate, w.sel_bias}, m);
  });
}

void Gpt::moe_layer_backward(int l, float d_aux) {
  const int64_t N = plan_.B * plan_.T, C = cfg_.d_model;
  const GptLayerTensors& w = p_.layers[l];
  const GptLayerTensors& wb = bf16() ? pb_.layers[l] : p_.layers[l];
  const GptLayerTensors& gw = g_.layers[l];
  const MoeConfig& m = moe_cfg_;
  const double flops = 4.0 * N * (m.E * C + (m.K + m.n_shared) * (moe_f_in(m) + m.F) * C);
  timed("moe bwd", flops, [&] {
    moe_backward(d_ln_.view({N, C}), gw.router_w, gw.w_in, gw.w_out,
                 MoeExtraGrads{gw.ws_in, gw.ws_out, gw.ws_gate, grads_zero_},
                 d_res_.view({N, C}), la_[l].moe, moe_layer_scratch_[static_cast<size_t>(l)], la_[l].ln2.view({N, C}),
                 w.router_w, wb.w_in,
                 wb.w_out, MoeExtra{wb.ws_in, wb.ws_out, w.ws_gate, w.sel_bias}, m, d_aux);
  });
}

void Gpt::moe_update_selection_bias() {
  timed("moe selection bias", 0, [&] {
    for (int l = 0; l < cfg_.n_layer; ++l)
      if (p_.layers[l].sel_bias.defined()) moe_update_bias(p_.layers[l].sel_bias, la_[l].moe.counts, cfg_.moe.bias_rate);
  });
}

Gpt::MoeSummary Gpt::moe_summary() const {
  MoeSummary s;
  if (moe_states_.empty()) return s;
  const int64_t NK = plan_.B * plan_.T * moe_cfg_.K;
  s.load_min = 1e300;
  s.load_max = 0;
  for (const MoeState& st : moe_states_) {
    tensor_to_host(moe_counts_host_.data(), st.counts);
    tensor_to_host(moe_stats_host_.data(), st.stats);
    s.aux += static_cast<double>(moe_stats_host_[0]) + moe_stats_host_[1];
    s.dropped += static_cast<int64_t>(moe_stats_host_[2]);
    s.assignments += NK;
    for (int32_t c : moe_counts_host_) {
      const double f = static_cast<double>(c) / static_cast<double>(NK);
      s.load_min = std::min(s.load_min, f);
      s.load_max = std::max(s.load_max, f);
    }
  }
  return s;
}

const float* Gpt::decode_step(int32_t token, int64_t pos) {
  LMF_CHECK(plan_.decode_ctx > 0, "decode_step on a model planned without a KV cache");
  if (pos < 0 || pos >= plan_.decode_ctx) fail("decode position ", pos, " outside the KV cache of ", plan_.decode_ctx);
  const int64_t C = cfg_.d_model, HS = cfg_.head_size(), NH = cfg_.n_head, KV = cfg_.n_kv_head * HS;
  dtok_.i32()[0] = token;
  embedding_forward(dx_, dtok_, p_.tok_emb, p_.pos_emb, pos);
  Tensor x = dx_.view({1, C});
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const GptLayerTensors& w = p_.layers[l];
    norm_forward(dln_, dmean_, drstd_, dx_, w.norm1_w, w.norm1_b);
    linear_forward(dqkv_, dln_, w.qkv_w, w.qkv_b);
    if (cfg_.positions == PositionKind::rope) rope_forward(dqkv_, rope_freqs_, cfg_.n_head, cfg_.n_kv_head, pos);
    // append this position's k and v to the cache
    const float* qkv = dqkv_.f32();
    float* kc = k_cache_.f32() + (static_cast<int64_t>(l) * plan_.decode_ctx + pos) * KV;
    float* vc = v_cache_.f32() + (static_cast<int64_t>(l) * plan_.decode_ctx + pos) * KV;
    std::memcpy(kc, qkv + NH * HS, sizeof(float) * KV);
    std::memcpy(vc, qkv + NH * HS + KV, sizeof(float) * KV);
    Tensor kcache(k_cache_.f32() + static_cast<int64_t>(l) * plan_.decode_ctx * KV, DType::f32, {plan_.decode_ctx, KV}, "k_cache");
    Tensor vcache(v_cache_.f32() + static_cast<int64_t>(l) * plan_.decode_ctx * KV, DType::f32, {plan_.decode_ctx, KV}, "v_cache");
    Tensor q(dqkv_.f32(), DType::f32, {NH * HS}, "q");
    attention_decode_forward(datt_.view({NH * HS}), dscores_, q, kcache, vcache, pos + 1, cfg_.n_head, cfg_.n_kv_head);
    linear_forward(dtmp_, datt_, w.proj_w, w.proj_b);
    residual_forward(x, x, dtmp_);
    norm_forward(dln_, dmean_, drstd_, dx_, w.norm2_w, w.norm2_b);
    if (w.moe()) {
      moe_forward(dtmp_, decode_moe_, decode_moe_scratch_, dln_.view({1, C}), w.router_w, w.w_in, w.w_out,
                  w.moe_extra(), moe_cfg_);
    } else {
      linear_forward(dfc_, dln_.view({1, C}), w.fc_w, w.fc_b);
      if (cfg_.activation == ActivationKind::gelu) gelu_forward(dact_, dfc_);
      else swiglu_forward(dact_, dfc_);
      linear_forward(dtmp_, dact_, w.mproj_w, w.mproj_b);
    }
    residual_forward(x, x, dtmp_);
  }
  norm_forward(dln_, dmean_, drstd_, dx_, p_.normf_w, p_.normf_b);
  linear_forward(dlogits_, dln_.view({1, C}), p_.lm_head.rows(0, cfg_.vocab_size), Tensor());
  return dlogits_.f32();
}

}  // namespace lmf
