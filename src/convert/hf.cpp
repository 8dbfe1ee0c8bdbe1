#include "convert/hf.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "core/bf16.h"
#include "core/fp16.h"
#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "core/memory.h"
#include "model/gpt.h"
#include "train/safetensors.h"

namespace lmf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// config.json, read field by field: every field a reader asks for (or declares harmless) is marked,
// and check_all_read() refuses the rest, naming them. A null field reads as absent (transformers
// writes null for "the default").
class HfConfig {
 public:
  HfConfig(const std::string& text, const std::string& path) : path_(path) {
    j_ = json_parse(text, path);
    if (!j_.is_object()) fail(path, ": expected a JSON object");
  }
  const std::string& path() const { return path_; }

  // Present and not null; marks the field read.
  bool has(const char* key) {
    read_.insert(key);
    return j_.contains(key) && !j_.at(key).is_null();
  }
  const json& raw(const char* key) {
    read_.insert(key);
    return j_.at(key);
  }
  // Absent fields take `dflt` (transformers' default for the model class) or are an error without one.
  int64_t integer(const char* key, int64_t lo, int64_t hi, std::optional<int64_t> dflt = std::nullopt) {
    if (!has(key)) return required(key, dflt);
    const std::optional<int64_t> v = json_int64(j_.at(key));
    if (!v || *v < lo || *v > hi) bad(key, "must be an integer in [", lo, ", ", hi, "]");
    return *v;
  }
  double number(const char* key, std::optional<double> dflt = std::nullopt) {
    if (!has(key)) return required(key, dflt);
    const json& v = j_.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>())) bad(key, "must be a finite number");
    return v.get<double>();
  }
  bool boolean(const char* key, std::optional<bool> dflt = std::nullopt) {
    if (!has(key)) return required(key, dflt);
    if (!j_.at(key).is_boolean()) bad(key, "must be true or false");
    return j_.at(key).get<bool>();
  }
  std::string string(const char* key, std::optional<std::string> dflt = std::nullopt) {
    if (!has(key)) return required(key, dflt);
    if (!j_.at(key).is_string()) bad(key, "must be a string");
    return j_.at(key).get<std::string>();
  }
  // `key` absent (transformers' default, which is `want`) or equal to `want`: the one value lmforge computes.
  void require(const char* key, const json& want, const char* why) {
    if (has(key) && j_.at(key) != want) bad(key, "lmforge supports only ", want.dump(), " (", why, ")");
  }
  // Fields that do not change the model's function (ids, dtypes, versions, dropout): read and dropped.
  void ignore(std::initializer_list<const char*> keys) {
    for (const char* k : keys) read_.insert(k);
  }
  template <class... A>
  [[noreturn]] void bad(const std::string& key, const A&... why) {
    const json v = j_.contains(key) ? j_.at(key) : json();
    fail(path_, ": field '", excerpt(key), "' is ", json_excerpt(v), ": ", why...);
  }
  void check_all_read(HfArch a) const {
    std::string unknown;
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!read_.count(it.key())) unknown += (unknown.empty() ? "'" : ", '") + excerpt(it.key()) + "'";
    if (!unknown.empty())
      fail(path_, ": unknown field(s) ", unknown, " for ", hf_arch_class(a),
           " (lmforge cannot tell whether they change the model; docs/IMPORT.md lists the fields it reads)");
  }

 private:
  template <class T>
  T required(const char* key, const std::optional<T>& dflt) const {
    if (!dflt) fail(path_, ": no field '", key, "'");
    return *dflt;
  }
  std::string path_;
  json j_;
  std::set<std::string> read_;
};

// Fields of every model class that do not change what the model computes.
void ignore_common(HfConfig& h) {
  h.ignore({"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "output_attentions",
            "output_hidden_states", "return_dict", "tokenizer_class", "id2label", "label2id", "problem_type",
            "task_specific_params", "attention_dropout"});
}

HfArch detect_arch(HfConfig& h) {
  static constexpr HfArch kAll[] = {HfArch::gpt2, HfArch::llama, HfArch::qwen2, HfArch::mixtral, HfArch::qwen2_moe};
  std::string cls;
  if (h.has("architectures")) {
    const json& a = h.raw("architectures");
    if (!a.is_array() || a.size() != 1 || !a[0].is_string()) h.bad("architectures", "must list one model class");
    cls = a[0].get<std::string>();
  }
  const std::string type = h.has("model_type") ? h.string("model_type") : "";
  if (cls.empty() && type.empty()) fail(h.path(), ": names no model class (no 'architectures' or 'model_type')");
  for (HfArch x : kAll) {
    if (cls.empty() ? type != hf_arch_model_type(x) : cls != hf_arch_class(x)) continue;
    if (!type.empty() && type != hf_arch_model_type(x)) h.bad("model_type", "does not match architectures ", cls);
    return x;
  }
  fail(h.path(), ": model class '", excerpt(cls.empty() ? type : cls),
       "' is not supported (lmforge imports GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, "
       "Qwen2MoeForCausalLM)");
}

ModelConfig gpt2_config(HfConfig& h) {
  using L = ConfigLimits;
  ignore_common(h);
  h.ignore({"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
            "summary_proj_to_labels", "summary_type", "summary_use_proj", "n_ctx", "reorder_and_upcast_attn"});
  ModelConfig c;
  c.vocab_size = h.integer("vocab_size", 1, L::vocab_size);
  c.d_model = h.integer("n_embd", 1, L::d_model);
  c.n_layer = static_cast<int>(h.integer("n_layer", 1, L::n_layer));
  c.n_head = c.n_kv_head = static_cast<int>(h.integer("n_head", 1, L::n_head));
  c.context_length = h.integer("n_positions", 1, L::context_length);
  c.d_ff = h.integer("n_inner", 1, L::d_ff, 4 * c.d_model);
  c.norm = NormKind::layernorm;
  c.norm_eps = static_cast<float>(h.number("layer_norm_epsilon", 1e-5));
  const std::string act = h.string("activation_function", "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh" && act != "gelu_fast")
    h.bad("activation_function", "lmforge's GELU is the tanh approximation (gelu_new, gelu_pytorch_tanh, gelu_fast)");
  c.activation = ActivationKind::gelu;
  c.positions = PositionKind::learned;
  c.bias = true;
  c.tied_embeddings = h.boolean("tie_word_embeddings", true);
  h.require("scale_attn_weights", true, "attention scaled by 1/sqrt(head size)");
  h.require("scale_attn_by_inverse_layer_idx", false, "attention scaled by 1/sqrt(head size) in every layer");
  h.require("add_cross_attention", false, "a decoder-only model");
  return c;
}

// RoPE's base from rope_theta (transformers 4) or rope_parameters (5); any scaling is refused.
float rope_theta(HfConfig& h, double dflt) {
  if (h.has("rope_scaling")) h.bad("rope_scaling", "RoPE scaling is not supported (lmforge's RoPE is the plain one)");
  if (h.has("partial_rotary_factor") && h.number("partial_rotary_factor") != 1.0)
    h.bad("partial_rotary_factor", "partial rotary embeddings are not supported");
  double theta = h.number("rope_theta", dflt);
  if (h.has("rope_parameters")) {
    const json& r = h.raw("rope_parameters");
    if (!r.is_object()) h.bad("rope_parameters", "must be an object");
    for (auto it = r.begin(); it != r.end(); ++it) {
      if (it.key() == "rope_type" && it.value() == "default") continue;
      if (it.key() == "rope_theta" && it.value().is_number() && std::isfinite(it.value().get<double>())) {
        theta = it.value().get<double>();
        continue;
      }
      fail(h.path(), ": field 'rope_parameters." , excerpt(it.key()), "' is ", json_excerpt(it.value()),
           ": lmforge supports only rope_type \"default\" and a finite rope_theta (no RoPE scaling)");
    }
  }
  return static_cast<float>(theta);
}

// Qwen2 and Qwen2-MoE: full attention in every layer.
void refuse_sliding_window(HfConfig& h, int n_layer) {
  if (h.boolean("use_sliding_window", false)) h.bad("use_sliding_window", "sliding-window attention is not supported");
  h.ignore({"sliding_window", "max_window_layers"});  // read by transformers only with use_sliding_window
  if (!h.has("layer_types")) return;
  const json& t = h.raw("layer_types");
  bool ok = t.is_array() && static_cast<int64_t>(t.size()) == n_layer;
  for (size_t i = 0; ok && i < t.size(); ++i) ok = t[i] == "full_attention";
  if (!ok) h.bad("layer_types", "lmforge supports only \"full_attention\" in each of the ", n_layer, " layers");
}

void mixtral_moe(HfConfig& h, ModelConfig& c) {
  using L = ConfigLimits;
  h.ignore({"output_router_logits", "router_jitter_noise"});  // training switches of transformers' own loop
  c.moe.experts = h.integer("num_local_experts", 1, L::experts);
  c.moe.top_k = h.integer("num_experts_per_tok", 1, std::min(c.moe.experts, L::top_k));
  c.moe.d_expert = c.d_ff;
  c.moe.renormalize = true;
  c.moe.capacity_factor = 0;
  c.moe.aux_coef = static_cast<float>(h.number("router_aux_loss_coef", 0.001));
  if (h.has("sliding_window") && h.integer("sliding_window", 1, INT64_MAX) < c.context_length)
    h.bad("sliding_window", "sliding-window attention shorter than max_position_embeddings=", c.context_length,
          " is not supported");
}

// Qwen2-MoE's MoE layers ((l + 1) % decoder_sparse_step == 0, not in mlp_only_layers) as lmforge's
// first_dense / every, or an error when they are not every k-th layer from one on.
void qwen2_moe_layers(HfConfig& h, ModelConfig& c) {
  const int64_t step = h.integer("decoder_sparse_step", 1, c.n_layer, 1);
  std::set<int64_t> dense_only;
  if (h.has("mlp_only_layers")) {
    const json& m = h.raw("mlp_only_layers");
    if (!m.is_array()) h.bad("mlp_only_layers", "must be a list of layer indices");
    for (const json& v : m) {
      const std::optional<int64_t> l = json_int64(v);
      if (!l || *l < 0 || *l >= c.n_layer) h.bad("mlp_only_layers", "must hold layer indices in [0, ", c.n_layer, ")");
      dense_only.insert(*l);
    }
  }
  std::vector<int> moe;
  for (int l = 0; l < c.n_layer; ++l)
    if ((l + 1) % step == 0 && !dense_only.count(l)) moe.push_back(l);
  if (moe.empty()) fail(h.path(), ": decoder_sparse_step and mlp_only_layers leave no MoE layer");
  c.moe.first_dense = moe[0];
  c.moe.every = moe.size() > 1 ? moe[1] - moe[0] : c.n_layer - moe[0];
  for (int l = 0; l < c.n_layer; ++l)
    if (c.is_moe_layer(l) != (std::count(moe.begin(), moe.end(), l) > 0))
      fail(h.path(), ": the MoE layers that decoder_sparse_step=", step,
           " and mlp_only_layers give are not every k-th layer from the first one (lmforge's moe.every / first_dense)");
}

void qwen2_moe(HfConfig& h, ModelConfig& c) {
  using L = ConfigLimits;
  h.ignore({"output_router_logits", "router_jitter_noise"});
  c.moe.experts = h.integer("num_experts", 1, L::experts);
  c.moe.top_k = h.integer("num_experts_per_tok", 1, std::min(c.moe.experts, L::top_k));
  const int64_t F = h.integer("moe_intermediate_size", 1, L::d_ff);
  c.moe.d_expert = F;
  const int64_t shared = h.integer("shared_expert_intermediate_size", 1, L::d_ff);
  if (shared % F != 0 || shared / F > L::shared)
    h.bad("shared_expert_intermediate_size", "must be k x moe_intermediate_size=", F, " with k <= ", L::shared,
          " (lmforge splits the shared expert into k experts of the routed experts' width)");
  c.moe.shared = shared / F;
  c.moe.shared_gate = true;
  c.moe.renormalize = h.boolean("norm_topk_prob", false);
  c.moe.capacity_factor = 0;
  c.moe.aux_coef = static_cast<float>(h.number("router_aux_loss_coef", 0.001));
  qwen2_moe_layers(h, c);
}

// Llama, Qwen2, Mixtral, Qwen2-MoE: RMSNorm, SwiGLU, RoPE, no biases but Qwen's on q, k, v.
ModelConfig llama_family_config(HfConfig& h, HfArch a) {
  using L = ConfigLimits;
  ignore_common(h);
  ModelConfig c;
  c.vocab_size = h.integer("vocab_size", 1, L::vocab_size);
  c.d_model = h.integer("hidden_size", 1, L::d_model);
  c.d_ff = h.integer("intermediate_size", 1, L::d_ff);
  c.n_layer = static_cast<int>(h.integer("num_hidden_layers", 1, L::n_layer));
  c.n_head = static_cast<int>(h.integer("num_attention_heads", 1, L::n_head));
  // Llama's default is num_attention_heads; the other classes' defaults differ: required there
  const std::optional<int64_t> kv = a == HfArch::llama ? std::optional<int64_t>(c.n_head) : std::nullopt;
  c.n_kv_head = static_cast<int>(h.integer("num_key_value_heads", 1, L::n_head, kv));
  c.context_length = h.integer("max_position_embeddings", 1, L::context_length);
  if (h.has("head_dim") && (c.d_model % c.n_head != 0 || h.integer("head_dim", 1, L::d_model) != c.d_model / c.n_head))
    h.bad("head_dim", "lmforge's head size is hidden_size / num_attention_heads = ", c.d_model, " / ", c.n_head);
  if (h.string("hidden_act", "silu") != "silu") h.bad("hidden_act", "lmforge's gated FFN is SwiGLU (silu)");
  const bool mixtral = a == HfArch::mixtral;
  c.norm = NormKind::rmsnorm;
  c.norm_eps = static_cast<float>(h.number("rms_norm_eps", mixtral ? 1e-5 : 1e-6));
  c.activation = ActivationKind::swiglu;
  c.positions = PositionKind::rope;
  c.rope_theta = rope_theta(h, mixtral ? 1e6 : 1e4);
  c.bias = false;
  c.tied_embeddings = h.boolean("tie_word_embeddings", false);
  switch (a) {
    case HfArch::llama:
      h.require("attention_bias", false, "no attention biases");
      h.require("mlp_bias", false, "no MLP biases");
      h.ignore({"pretraining_tp"});  // slices the same matmuls
      break;
    case HfArch::qwen2:
      c.qkv_bias = true;
      refuse_sliding_window(h, c.n_layer);
      break;
    case HfArch::mixtral: mixtral_moe(h, c); break;
    case HfArch::qwen2_moe:
      c.qkv_bias = h.boolean("qkv_bias", true);
      refuse_sliding_window(h, c.n_layer);
      qwen2_moe(h, c);
      break;
    case HfArch::gpt2: break;
  }
  return c;
}

// The weights: model.safetensors, or the shards of model.safetensors.index.json.
class HfWeights {
 public:
  explicit HfWeights(const fs::path& dir) {
    const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
    std::error_code ec;
    if (fs::exists(single, ec)) {
      where_ = single.string();
      add(std::make_unique<SafetensorsFile>(where_));
      for (const SafetensorsEntry& e : files_[0]->entries()) index_[e.name] = {files_[0].get(), &e};
    } else if (fs::exists(index, ec)) {
      where_ = index.string();
      open_shards(dir);
    } else if (fs::exists(dir / "pytorch_model.bin", ec) || fs::exists(dir / "pytorch_model.bin.index.json", ec)) {
      fail(dir.string(), ": holds PyTorch pickle weights (pytorch_model.bin) only; lmforge reads safetensors "
           "(save the model with transformers' save_pretrained, which writes model.safetensors)");
    } else {
      fail(dir.string(), ": no model.safetensors or model.safetensors.index.json");
    }
  }

  bool has_prefix(const std::string& prefix) const {
    for (const auto& [name, w] : index_)
      if (name.rfind(prefix, 0) == 0) return true;
    return false;
  }

  // Every tensor of the layout present with its shape and a float dtype; nothing else except the
  // `ignorable` ones. Reads no data.
  template <class Ignorable>
  void check(const HfLayout& layout, HfArch a, Ignorable&& ignorable) const {
    std::set<std::string> expected;
    for (const TensorSpec& s : layout.hf_tensors) {
      expected.insert(s.name);
      const auto it = index_.find(s.name);
      if (it == index_.end())
        fail(where_, ": missing tensor '", s.name, "' (a ", hf_arch_class(a), " of this config.json has it)");
      const SafetensorsEntry& e = *it->second.entry;
      if (e.shape != s.shape)
        fail(it->second.file->path(), ": tensor '", s.name, "' has shape ", json(e.shape).dump(), ", expected ",
             json(s.shape).dump(), " (from config.json)");
      if (e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16")
        fail(it->second.file->path(), ": tensor '", s.name, "' has dtype ", e.dtype, " (lmforge imports F32, F16, BF16)");
    }
    for (const auto& [name, w] : index_)
      if (!expected.count(name) && !ignorable(name))
        fail(w.file->path(), ": unexpected tensor '", excerpt(name), "' (not part of a ", hf_arch_class(a),
             " of this config.json)");
  }

  // Tensor `name` (checked by check()) as fp32.
  std::vector<float> read(const std::string& name) const {
    const Where& w = index_.at(name);
    const SafetensorsEntry& e = *w.entry;
    const char* p = static_cast<const char*>(w.file->data(e));
    const size_t bytes = e.end - e.begin, el = e.dtype == "F32" ? 4 : 2;
    std::vector<float> out(bytes / el);
    if (el == 4) {
      std::memcpy(out.data(), p, bytes);
      return out;
    }
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = e.dtype == "BF16" ? bf16::to_float(h) : fp16_to_float(h);
    }
    return out;
  }

 private:
  struct Where {
    const SafetensorsFile* file;
    const SafetensorsEntry* entry;
  };

  void add(std::unique_ptr<SafetensorsFile> f) { files_.push_back(std::move(f)); }

  void open_shards(const fs::path& dir) {
    const json j = json_parse(read_regular_file(where_, "safetensors index"), where_);
    if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
      fail(where_, ": no 'weight_map' object");
    std::map<std::string, const SafetensorsFile*> shards;
    for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it) {
      const std::string shard = it.value().is_string() ? it.value().get<std::string>() : std::string();
      if (shard.empty() || shard == "." || shard == ".." || shard.find_first_of("/\\") != std::string::npos)
        fail(where_, ": weight_map['", excerpt(it.key()), "'] is ", json_excerpt(it.value()),
             ", not the name of a file in the directory");
      if (!shards.count(shard)) {
        add(std::make_unique<SafetensorsFile>((dir / shard).string()));
        shards[shard] = files_.back().get();
      }
      const SafetensorsFile* f = shards.at(shard);
      const SafetensorsEntry* e = f->find(it.key());
      if (!e) fail(f->path(), ": has no tensor '", excerpt(it.key()), "' (", where_, " places it there)");
      index_[it.key()] = {f, e};
    }
    for (const auto& f : files_)
      for (const SafetensorsEntry& e : f->entries())
        if (index_.at(e.name).file != f.get()) fail(f->path(), ": tensor '", excerpt(e.name), "' is not in ", where_);
  }

  std::string where_;  // the file named when a tensor is missing: model.safetensors or the index
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Where> index_;
};

// Tensors a checkpoint may hold that are not weights: GPT-2's causal-mask buffers, old Llama files'
// RoPE frequencies, and the LM head of a tied model (transformers ties it to the embedding).
bool ignorable_tensor(const std::string& name, bool tied) {
  return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with(".rotary_emb.inv_freq") ||
         (tied && name == "lm_head.weight");
}

// lmforge's parameters from the checkpoint's tensors through the layout (padded vocabulary rows 0).
std::vector<ImportedTensor> import_tensors(const HfWeights& w, const HfLayout& layout, const ModelConfig& c,
                                           HfArch a) {
  const std::vector<TensorSpec> specs = gpt_param_specs(c);
  check_memory_fits(checked_mul(arena_plan_bytes(specs, "imported weights"), size_t{2}, "import"), Device::cpu,
                    std::string("importing a ") + hf_arch_class(a) + " (" + std::to_string(gpt_param_count(c)) +
                        " parameters in fp32, and one tensor of the checkpoint at a time)");
  std::vector<ImportedTensor> out;
  std::map<std::string, size_t> at;
  for (const TensorSpec& s : specs) {
    at[s.name] = out.size();
    out.push_back({s.name, s.shape, std::vector<float>(static_cast<size_t>(s.numel()), 0.0f)});
  }
  std::map<std::string, std::vector<const HfPiece*>> by_source;
  for (const HfPiece& p : layout.pieces) by_source[p.hf.name].push_back(&p);
  for (const TensorSpec& s : layout.hf_tensors) {
    const std::vector<float> src = w.read(s.name);
    for (const HfPiece* p : by_source[s.name]) {
      ImportedTensor& t = out[at.at(p->lmf.name)];
      hf_copy_block(src.data(), s.shape, p->hf, t.data.data(), t.shape, p->lmf, p->transpose);
    }
  }
  return out;
}

// tokenizer.json; the chat template from chat_template.jinja or tokenizer_config.json.
void read_assets(const fs::path& dir, ImportedModel& im) {
  std::error_code ec;
  if (fs::exists(dir / "tokenizer.json", ec)) im.tokenizer_json = read_regular_file((dir / "tokenizer.json").string(), "tokenizer");
  if (fs::exists(dir / "chat_template.jinja", ec)) {
    im.chat_template = read_regular_file((dir / "chat_template.jinja").string(), "chat template");
    return;
  }
  const fs::path tc = dir / "tokenizer_config.json";
  if (!fs::exists(tc, ec)) return;
  const json j = json_parse(read_regular_file(tc.string(), "tokenizer config"), tc.string());
  if (!j.is_object() || !j.contains("chat_template") || j.at("chat_template").is_null()) return;
  const json& t = j.at("chat_template");
  if (t.is_string()) {
    im.chat_template = t.get<std::string>();
    return;
  }
  if (t.is_array())  // named templates: the "default" one
    for (const json& e : t)
      if (e.is_object() && e.value("name", json()) == "default" && e.contains("template") && e.at("template").is_string()) {
        im.chat_template = e.at("template").get<std::string>();
        return;
      }
  fail(tc.string(), ": 'chat_template' is neither a string nor a list holding a \"default\" template");
}

}  // namespace

HfModelConfig hf_config_from_json(const std::string& text, const std::string& where) {
  HfConfig h(text, where);
  HfModelConfig r;
  r.arch = detect_arch(h);
  r.config = r.arch == HfArch::gpt2 ? gpt2_config(h) : llama_family_config(h, r.arch);
  h.check_all_read(r.arch);
  r.config.validate(where);
  return r;
}

ImportedModel import_hf(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) fail_not_found(dir, ": not found");
  if (!fs::is_directory(dir, ec)) fail(dir, ": not a directory");
  const fs::path d(dir), config = d / "config.json";
  if (!fs::exists(config, ec)) fail_not_found(config.string(), ": not found (a Hugging Face model directory holds config.json)");
  const HfModelConfig hc = hf_config_from_json(read_regular_file(config.string(), "Hugging Face config"), config.string());
  const HfArch a = hc.arch;
  ImportedModel im;
  im.config = hc.config;
  const HfWeights w(d);
  // GPT-2's own hub files were saved from the base model: no "transformer." prefix
  const std::string prefix = a == HfArch::gpt2 && !w.has_prefix("transformer.") ? "" : hf_default_prefix(a);
  const HfLayout layout = hf_layout(a, im.config, prefix);
  const bool tied = im.config.tied_embeddings;
  w.check(layout, a, [tied](const std::string& name) { return ignorable_tensor(name, tied); });
  im.tensors = import_tensors(w, layout, im.config, a);
  read_assets(d, im);
  im.source = std::string("hf ") + hf_arch_class(a) + " (" + dir + ")";
  return im;
}

}  // namespace lmf
