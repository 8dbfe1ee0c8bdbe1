#include "convert/hf_export.h"

#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "convert/import.h"
#include "core/check.h"
#include "core/fsutil.h"
#include "model/gpt.h"
#include "train/safetensors.h"

namespace lmf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A float config value as the shortest decimal that reads back as the same float (1e-06, not
// 9.999999974752427e-07).
json float_json(float v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::strtod(std::string(buf, r.ptr).c_str(), nullptr);
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace

HfArch hf_arch_for(const ModelConfig& c, const std::string& what) {
  if (c.family != ModelFamily::text)
    fail("export: ", what, " is a time-series model; Hugging Face export covers language models");
  std::vector<std::string> why;
  auto need = [&](bool ok, const char* rule) {
    if (!ok) why.push_back(rule);
  };
  HfArch a;
  if (c.positions == PositionKind::learned) {
    a = HfArch::gpt2;
    need(c.norm == NormKind::layernorm, "norm=layernorm");
    need(c.activation == ActivationKind::gelu, "activation=gelu");
    need(c.bias, "bias=true");
    need(c.n_kv_head == c.n_head, "n_kv_head=n_head");
    need(c.moe.experts == 0, "no moe");
  } else {
    const bool moe = c.moe.experts > 0;
    a = !moe ? (c.qkv_bias ? HfArch::qwen2 : HfArch::llama) : c.moe.shared == 0 ? HfArch::mixtral : HfArch::qwen2_moe;
    need(c.norm == NormKind::rmsnorm, "norm=rmsnorm");
    need(c.activation == ActivationKind::swiglu, "activation=swiglu");
    need(!c.bias, "bias=false");
    need(!moe || !c.moe.sigmoid, "moe.score=softmax");
    need(!moe || c.moe.bias_rate == 0, "moe.bias_rate=0 (no selection bias)");
    if (a == HfArch::mixtral) {
      need(!c.qkv_bias, "qkv_bias=false");
      need(c.moe.every == 1 && c.moe.first_dense == 0, "an MoE FFN in every layer (moe.every=1, moe.first_dense=0)");
      need(c.moe.renormalize, "moe.renormalize=true");
    }
    if (a == HfArch::qwen2_moe) need(c.moe.shared_gate, "moe.shared_gate=true");
  }
  if (!why.empty())
    fail(what, ": the model has no Hugging Face equivalent: ", hf_arch_class(a), " would need ", join(why));
  return a;
}

std::string hf_config_json(HfArch a, const ModelConfig& c) {
  json j = {{"architectures", {hf_arch_class(a)}}, {"model_type", hf_arch_model_type(a)},
            {"vocab_size", c.vocab_size},          {"tie_word_embeddings", c.tied_embeddings},
            {"torch_dtype", "float32"},            {"initializer_range", 0.02},
            {"use_cache", true}};
  if (a == HfArch::gpt2) {
    j.update({{"n_embd", c.d_model}, {"n_layer", c.n_layer}, {"n_head", c.n_head}, {"n_positions", c.context_length},
              {"n_ctx", c.context_length}, {"n_inner", c.d_ff}, {"activation_function", "gelu_new"},
              {"layer_norm_epsilon", float_json(c.norm_eps)}, {"scale_attn_weights", true},
              {"scale_attn_by_inverse_layer_idx", false}, {"reorder_and_upcast_attn", false},
              {"attn_pdrop", 0.0}, {"embd_pdrop", 0.0}, {"resid_pdrop", 0.0}});  // lmforge trains without dropout
    if (c.vocab_size <= 50256) j.update({{"bos_token_id", nullptr}, {"eos_token_id", nullptr}});  // GPT2Config's 50256: no token
    return j.dump(2) + "\n";
  }
  j.update({{"hidden_size", c.d_model}, {"intermediate_size", c.d_ff}, {"num_hidden_layers", c.n_layer},
            {"num_attention_heads", c.n_head}, {"num_key_value_heads", c.n_kv_head},
            {"max_position_embeddings", c.context_length}, {"hidden_act", "silu"},
            {"rms_norm_eps", float_json(c.norm_eps)}, {"rope_theta", float_json(c.rope_theta)}, {"rope_scaling", nullptr},
            {"attention_dropout", 0.0}});
  const bool qwen = a == HfArch::qwen2 || a == HfArch::qwen2_moe;
  if (qwen) j.update({{"use_sliding_window", false}, {"sliding_window", nullptr}, {"max_window_layers", c.n_layer}});
  if (a == HfArch::llama) j.update({{"head_dim", c.head_size()}, {"attention_bias", false}, {"mlp_bias", false}});
  if (a == HfArch::mixtral || a == HfArch::qwen2_moe) {
    j.update({{"num_experts_per_tok", c.moe.top_k}, {"router_aux_loss_coef", float_json(c.moe.aux_coef)},
              {"output_router_logits", false}});
  }
  if (a == HfArch::mixtral) {
    j.update({{"num_local_experts", c.moe.experts}, {"intermediate_size", c.d_expert()}, {"sliding_window", nullptr}});
  }
  if (a == HfArch::qwen2_moe) {
    json dense = json::array();
    for (int l = 0; l < c.n_layer; ++l)
      if (!c.is_moe_layer(l)) dense.push_back(l);
    j.update({{"num_experts", c.moe.experts}, {"moe_intermediate_size", c.d_expert()},
              {"shared_expert_intermediate_size", c.moe.shared * c.d_expert()}, {"norm_topk_prob", c.moe.renormalize},
              {"decoder_sparse_step", 1}, {"mlp_only_layers", dense}, {"qkv_bias", c.qkv_bias}});
  }
  return j.dump(2) + "\n";
}

namespace {

// The Hugging Face tensors from lmforge's parameters through the layout; a block several pieces write
// (Qwen2-MoE's one shared gate) must get the same values from each.
std::vector<std::vector<float>> export_tensors(const HfLayout& layout, const Parameters& params, HfArch a,
                                               const std::string& what) {
  std::map<std::string, size_t> at;
  std::vector<std::vector<float>> out;
  for (const TensorSpec& s : layout.hf_tensors) {
    at[s.name] = out.size();
    out.emplace_back(static_cast<size_t>(s.numel()), 0.0f);
  }
  std::set<std::string> written;  // blocks of Hugging Face tensors
  for (const HfPiece& p : layout.pieces) {
    const size_t i = at.at(p.hf.name);
    const Tensor src = params.find(p.lmf.name);
    LMF_CHECK(src.defined(), "export: no parameter '", p.lmf.name, "'");
    const std::vector<int64_t> sshape(src.shape.begin(), src.shape.begin() + src.ndim);
    const HfBlock& b = p.hf;
    const std::string key = b.name + "/" + std::to_string(b.slab) + "/" + std::to_string(b.row0) + "/" +
                            std::to_string(b.rows) + "/" + std::to_string(b.col0) + "/" + std::to_string(b.cols);
    const bool again = !written.insert(key).second;
    if (!hf_copy_block(src.f32(), sshape, p.lmf, out[i].data(), layout.hf_tensors[i].shape, p.hf, p.transpose, again))
      fail(what, ": '", p.lmf.name, "' holds different rows where ", hf_arch_class(a), " has one '", p.hf.name,
           "' (the shared experts' gates must be equal to export as one shared expert)");
  }
  return out;
}

}  // namespace

HfExportSummary export_hf(const std::string& source, const std::string& out_dir, bool overwrite) {
  if (const std::string p = replace_dir_problem(out_dir, overwrite); !p.empty()) fail(p);
  ModelSource src = load_model_source(source);
  HfExportSummary sum;
  sum.arch = hf_arch_for(src.config, src.what);
  Parameters params(gpt_param_specs(src.config), Device::cpu, false);
  src.load_weights(params);
  const HfLayout layout = hf_layout(sum.arch, src.config, hf_default_prefix(sum.arch));
  std::vector<std::vector<float>> data = export_tensors(layout, params, sum.arch, src.what);
  std::vector<std::pair<std::string, Tensor>> named;
  for (size_t i = 0; i < data.size(); ++i) {
    const TensorSpec& s = layout.hf_tensors[i];
    named.emplace_back(s.name, Tensor(data[i].data(), DType::f32, s.shape, s.name.c_str()));
  }
  const std::string blob = safetensors_serialize(named, {{"format", "pt"}});
  const std::string config = hf_config_json(sum.arch, src.config);
  const ModelAssets& as = src.assets;
  write_dir_atomic(out_dir, overwrite, [&](const std::string& tmp) {
    write_file_atomic((fs::path(tmp) / "model.safetensors").string(), blob);
    write_file_atomic((fs::path(tmp) / "config.json").string(), config);
    if (!as.tokenizer_json.empty()) write_file_atomic((fs::path(tmp) / "tokenizer.json").string(), as.tokenizer_json);
    if (!as.chat_template.empty()) write_file_atomic((fs::path(tmp) / "chat_template.jinja").string(), as.chat_template);
  });
  sum.tensors = static_cast<int64_t>(named.size());
  sum.tokenizer = !as.tokenizer_json.empty();
  sum.chat_template = !as.chat_template.empty();
  return sum;
}

}  // namespace lmf
