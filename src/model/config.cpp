#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <type_traits>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"

namespace lmf {

using json = nlohmann::json;

void ModelConfig::validate(const std::string& where) const {
  using L = ConfigLimits;
  auto bad = [&](const auto&... msg) { fail(where, ": ", msg...); };
  auto in_range = [&](const char* name, int64_t v, int64_t lo, int64_t hi, const char* note = "") {
    if (v < lo || v > hi) bad(name, "=", v, " must be in [", lo, ", ", hi, "]", note);
  };
  auto finite = [&](const char* name, float v, float lo, const char* rule) {
    if (!std::isfinite(v) || !(v >= lo)) bad(name, "=", v, " must be a finite number ", rule);
  };
  // Ranges first: the derived sizes below (head size, padded vocabulary) are computed only from
  // values known to be in range.
  in_range("vocab_size", vocab_size, 1, L::vocab_size);
  in_range("pad_vocab_multiple", pad_vocab_multiple, 1, L::pad_vocab_multiple);
  in_range("context_length", context_length, 1, L::context_length);
  in_range("n_layer", n_layer, 1, L::n_layer);
  in_range("n_head", n_head, 1, L::n_head);
  in_range("n_kv_head", n_kv_head, 1, L::n_head);
  in_range("d_model", d_model, 1, L::d_model);
  in_range("d_ff", d_ff, 1, L::d_ff);
  if (head_dim == 0 && d_model % n_head != 0) bad("n_head=", n_head, " does not divide d_model=", d_model);
  if (n_head % n_kv_head != 0) bad("n_kv_head=", n_kv_head, " does not divide n_head=", n_head);
  if (positions == PositionKind::rope && head_size() % 2 != 0)
    bad("positions=rope needs an even head size, d_model/n_head=", head_size());
  if (!std::isfinite(norm_eps) || !(norm_eps > 0 && norm_eps <= 1)) bad("norm_eps=", norm_eps, " must be in (0, 1]");
  finite("rope_theta", rope_theta, 1, ">= 1");
  // The MoE numbers are checked even for a dense model: a config never carries an infinity.
  finite("moe.capacity_factor", moe.capacity_factor, 0, ">= 0 (0 = dropless)");
  finite("moe.aux_coef", moe.aux_coef, 0, ">= 0");
  finite("moe.z_coef", moe.z_coef, 0, ">= 0");
  finite("moe.bias_rate", moe.bias_rate, 0, ">= 0");
  in_range("moe.experts", moe.experts, 0, L::experts, " (0 = dense)");
  if (moe.experts > 0) {
    if (moe.top_k < 1 || moe.top_k > std::min<int64_t>(moe.experts, L::top_k))
      bad("moe.top_k=", moe.top_k, " must be in [1, min(experts=", moe.experts, ", ", L::top_k, ")]");
    in_range("moe.d_expert", moe.d_expert, 0, L::d_ff, " (0 = d_ff)");
    in_range("moe.every", moe.every, 1, L::n_layer);
    if (moe.first_dense < 0 || moe.first_dense >= n_layer)
      bad("moe.first_dense=", moe.first_dense, " must be in [0, n_layer=", n_layer, ") (at least one MoE layer)");
    in_range("moe.shared", moe.shared, 0, L::shared);
  }
  if (family == ModelFamily::timeseries) {
    if (ts.horizons.empty() || ts.horizons.size() > 16) bad("horizons must list 1 to 16 forecast horizons");
    for (size_t i = 0; i < ts.horizons.size(); ++i) {
      in_range("horizons[]", ts.horizons[i], 1, 4096);
      if (i > 0 && ts.horizons[i] <= ts.horizons[i - 1])
        bad("horizons must increase strictly (", ts.horizons[i - 1], " then ", ts.horizons[i], ")");
    }
    finite("huber_delta", ts.huber_delta, 0, "> 0");
    if (!(ts.huber_delta > 0)) bad("huber_delta=", ts.huber_delta, " must be > 0");
    if (positions != PositionKind::rope) bad("family=timeseries reads positions through RoPE: set positions=rope");
  }
}

namespace {

// Strict types: an integer field takes only a JSON integer in the field's range (no 1.9 -> 1, no
// true -> 1, no out-of-range wrap), a float field a number finite as a float (1e39 is a finite double
// but not a float), a bool field only true/false.
template <class T>
T get_field(const json& j, const char* key, const std::string& where) {
  const json& v = j.at(key);
  bool ok;
  if constexpr (std::is_same_v<T, bool>) ok = v.is_boolean();
  else if constexpr (std::is_integral_v<T>) {
    const std::optional<int64_t> i = json_int64(v);
    ok = i && *i >= std::numeric_limits<T>::min() && *i <= std::numeric_limits<T>::max();
  } else if constexpr (std::is_floating_point_v<T>) {
    ok = v.is_number() && std::isfinite(v.get<double>()) &&
         std::abs(v.get<double>()) <= static_cast<double>(std::numeric_limits<T>::max());
  } else {
    ok = v.is_string();
  }
  if (!ok) fail(where, ": field '", key, "' has the wrong type or range (", json_excerpt(v), ")");
  return v.get<T>();
}

std::string get_enum(const json& j, const char* key, const std::string& where, std::initializer_list<const char*> ok) {
  std::string v = get_field<std::string>(j, key, where);
  for (const char* o : ok)
    if (v == o) return v;
  std::string list;
  for (const char* o : ok) {
    if (!list.empty()) list += "|";
    list += o;
  }
  fail(where, ": field '", key, "' is '", excerpt(v), "', expected ", list);
}

// j must be an object whose keys are all in `known`.
void check_object(const json& j, const std::string& where, std::initializer_list<const char*> known) {
  if (!j.is_object()) fail(where, ": expected a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool found = false;
    for (const char* k : known) found = found || it.key() == k;
    if (!found) fail(where, ": unknown field '", excerpt(it.key()), "'");
  }
}

MoeModelConfig moe_from_json(const json& m, const std::string& where) {
  const std::string w = where + ": moe";
  check_object(m, w, {"experts", "top_k", "d_expert", "every", "first_dense", "shared", "shared_gate", "score",
                      "renormalize", "capacity_factor", "aux_coef", "z_coef", "bias_rate"});
  MoeModelConfig c;
  if (m.contains("experts")) c.experts = get_field<int64_t>(m, "experts", w);
  if (m.contains("top_k")) c.top_k = get_field<int64_t>(m, "top_k", w);
  if (m.contains("d_expert")) c.d_expert = get_field<int64_t>(m, "d_expert", w);
  if (m.contains("every")) c.every = get_field<int>(m, "every", w);
  if (m.contains("first_dense")) c.first_dense = get_field<int>(m, "first_dense", w);
  if (m.contains("shared")) c.shared = get_field<int64_t>(m, "shared", w);
  if (m.contains("shared_gate")) c.shared_gate = get_field<bool>(m, "shared_gate", w);
  if (m.contains("score")) c.sigmoid = get_enum(m, "score", w, {"softmax", "sigmoid"}) == "sigmoid";
  if (m.contains("renormalize")) c.renormalize = get_field<bool>(m, "renormalize", w);
  if (m.contains("capacity_factor")) c.capacity_factor = get_field<float>(m, "capacity_factor", w);
  if (m.contains("aux_coef")) c.aux_coef = get_field<float>(m, "aux_coef", w);
  if (m.contains("z_coef")) c.z_coef = get_field<float>(m, "z_coef", w);
  if (m.contains("bias_rate")) c.bias_rate = get_field<float>(m, "bias_rate", w);
  return c;
}

}  // namespace

ModelConfig config_from_json(const std::string& text, const std::string& where) {
  const json j = json_parse(text, where);
  check_object(j, where, {"vocab_size", "pad_vocab_multiple", "context_length", "n_layer", "n_head", "n_kv_head",
                          "d_model", "d_ff", "norm", "norm_eps", "activation", "positions", "rope_theta",
                          "tied_embeddings", "bias", "qkv_bias", "moe", "family", "horizons", "huber_delta"});
  ModelConfig c;
  if (j.contains("vocab_size")) c.vocab_size = get_field<int64_t>(j, "vocab_size", where);
  if (j.contains("pad_vocab_multiple")) c.pad_vocab_multiple = get_field<int64_t>(j, "pad_vocab_multiple", where);
  if (j.contains("context_length")) c.context_length = get_field<int64_t>(j, "context_length", where);
  if (j.contains("n_layer")) c.n_layer = get_field<int>(j, "n_layer", where);
  if (j.contains("n_head")) c.n_head = get_field<int>(j, "n_head", where);
  c.n_kv_head = j.contains("n_kv_head") ? get_field<int>(j, "n_kv_head", where) : c.n_head;
  if (j.contains("d_model")) c.d_model = get_field<int64_t>(j, "d_model", where);
  // d_ff defaults to 4 d_model (an out-of-range d_model is reported by validate(), before d_ff)
  if (j.contains("d_ff")) c.d_ff = get_field<int64_t>(j, "d_ff", where);
  else if (c.d_model >= 1 && c.d_model <= ConfigLimits::d_model) c.d_ff = 4 * c.d_model;
  if (j.contains("norm"))
    c.norm = get_enum(j, "norm", where, {"layernorm", "rmsnorm"}) == "layernorm" ? NormKind::layernorm : NormKind::rmsnorm;
  if (j.contains("norm_eps")) c.norm_eps = get_field<float>(j, "norm_eps", where);
  if (j.contains("activation"))
    c.activation = get_enum(j, "activation", where, {"gelu", "swiglu"}) == "gelu" ? ActivationKind::gelu
                                                                                  : ActivationKind::swiglu;
  if (j.contains("positions"))
    c.positions = get_enum(j, "positions", where, {"learned", "rope"}) == "learned" ? PositionKind::learned
                                                                                    : PositionKind::rope;
  if (j.contains("rope_theta")) c.rope_theta = get_field<float>(j, "rope_theta", where);
  if (j.contains("tied_embeddings")) c.tied_embeddings = get_field<bool>(j, "tied_embeddings", where);
  if (j.contains("bias")) c.bias = get_field<bool>(j, "bias", where);
  if (j.contains("qkv_bias")) c.qkv_bias = get_field<bool>(j, "qkv_bias", where);
  if (j.contains("moe")) c.moe = moe_from_json(j.at("moe"), where);
  if (j.contains("family"))
    c.family = get_enum(j, "family", where, {"text", "timeseries"}) == "text" ? ModelFamily::text : ModelFamily::timeseries;
  if ((j.contains("horizons") || j.contains("huber_delta")) && c.family != ModelFamily::timeseries)
    fail(where, ": fields 'horizons' and 'huber_delta' belong to family=timeseries");
  if (j.contains("horizons")) {
    const json& hs = j.at("horizons");
    if (!hs.is_array()) fail(where, ": field 'horizons' must be an array of integers");
    c.ts.horizons.clear();
    for (size_t i = 0; i < hs.size() && i <= 16; ++i) {
      const std::optional<int64_t> v = json_int64(hs[i]);
      if (!v) fail(where, ": field 'horizons' must be an array of integers (", json_excerpt(hs[i]), ")");
      c.ts.horizons.push_back(*v);
    }
  }
  if (j.contains("huber_delta")) c.ts.huber_delta = get_field<float>(j, "huber_delta", where);
  c.validate(where);
  return c;
}

std::string config_to_json(const ModelConfig& c) {
  json j = {{"vocab_size", c.vocab_size},
            {"pad_vocab_multiple", c.pad_vocab_multiple},
            {"context_length", c.context_length},
            {"n_layer", c.n_layer},
            {"n_head", c.n_head},
            {"n_kv_head", c.n_kv_head},
            {"d_model", c.d_model},
            {"d_ff", c.d_ff},
            {"norm", c.norm == NormKind::layernorm ? "layernorm" : "rmsnorm"},
            {"norm_eps", c.norm_eps},
            {"activation", c.activation == ActivationKind::gelu ? "gelu" : "swiglu"},
            {"positions", c.positions == PositionKind::learned ? "learned" : "rope"},
            {"rope_theta", c.rope_theta},
            {"tied_embeddings", c.tied_embeddings},
            {"bias", c.bias}};
  if (c.qkv_bias) j["qkv_bias"] = true;  // written only when set: configs without it read as before
  if (c.family == ModelFamily::timeseries) {
    j["family"] = "timeseries";
    j["horizons"] = c.ts.horizons;
    j["huber_delta"] = c.ts.huber_delta;
  }
  if (c.moe.experts > 0) {
    const MoeModelConfig& m = c.moe;
    j["moe"] = {{"experts", m.experts},         {"top_k", m.top_k},
                {"d_expert", m.d_expert},       {"every", m.every},
                {"first_dense", m.first_dense}, {"shared", m.shared},
                {"shared_gate", m.shared_gate}, {"score", m.sigmoid ? "sigmoid" : "softmax"},
                {"renormalize", m.renormalize}, {"capacity_factor", m.capacity_factor},
                {"aux_coef", m.aux_coef},       {"z_coef", m.z_coef},
                {"bias_rate", m.bias_rate}};
  }
  return j.dump(2);
}

ModelConfig config_from_file(const std::string& path) { return config_from_json(read_file(path, "config file"), path); }

ModelConfig config_preset(const std::string& name) {
  ModelConfig c;
  if (name == "tiny") {  // the demo: byte-level, ~0.8M params
    c.vocab_size = 256; c.pad_vocab_multiple = 64; c.context_length = 128;
    c.n_layer = 4; c.n_head = 4; c.n_kv_head = 4; c.d_model = 128; c.d_ff = 512;
  } else if (name == "test-gpt2") {
    c.vocab_size = 61; c.pad_vocab_multiple = 16; c.context_length = 16;
    c.n_layer = 2; c.n_head = 4; c.n_kv_head = 4; c.d_model = 32; c.d_ff = 128;
  } else if (name == "test-llama") {
    c.vocab_size = 61; c.pad_vocab_multiple = 16; c.context_length = 16;
    c.n_layer = 2; c.n_head = 4; c.n_kv_head = 2; c.d_model = 32; c.d_ff = 48;
    c.norm = NormKind::rmsnorm; c.activation = ActivationKind::swiglu; c.positions = PositionKind::rope;
    c.tied_embeddings = false; c.bias = false;
  } else if (name == "tiny-moe") {  // the demo model with 4 experts, top-2, in every layer
    c.vocab_size = 256; c.pad_vocab_multiple = 64; c.context_length = 128;
    c.n_layer = 4; c.n_head = 4; c.n_kv_head = 4; c.d_model = 128; c.d_ff = 512;
    c.moe.experts = 4; c.moe.top_k = 2; c.moe.d_expert = 256;
  } else if (name == "test-moe") {
    c.vocab_size = 61; c.pad_vocab_multiple = 16; c.context_length = 16;
    c.n_layer = 2; c.n_head = 4; c.n_kv_head = 4; c.d_model = 32; c.d_ff = 128;
    c.moe.experts = 4; c.moe.top_k = 2; c.moe.d_expert = 48;
  } else if (name == "moe-bench" || name == "moe-bench-dense") {  // issue 4's benchmark and its dense twin
    c.vocab_size = 32768; c.pad_vocab_multiple = 128; c.context_length = 2048;
    c.n_layer = 12; c.n_head = 12; c.n_kv_head = 12; c.d_model = 768; c.d_ff = 6144;
    if (name == "moe-bench") { c.moe.experts = 8; c.moe.top_k = 2; c.moe.d_expert = 3072; }
  } else if (name == "gpt2-124m") {
    c.vocab_size = 50257; c.pad_vocab_multiple = 128; c.context_length = 1024;
    c.n_layer = 12; c.n_head = 12; c.n_kv_head = 12; c.d_model = 768; c.d_ff = 3072;
  } else if (name == "gpt2-350m") {  // GPT-2 medium's shape (issue 23's benchmark)
    c.vocab_size = 50257; c.pad_vocab_multiple = 128; c.context_length = 1024;
    c.n_layer = 24; c.n_head = 16; c.n_kv_head = 16; c.d_model = 1024; c.d_ff = 4096;
  } else if (name == "llama-style") {  // Llama architecture at GPT-2-small scale, GQA 12/4
    c.vocab_size = 32000; c.pad_vocab_multiple = 128; c.context_length = 2048;
    c.n_layer = 12; c.n_head = 12; c.n_kv_head = 4; c.d_model = 768; c.d_ff = 2048;
    c.norm = NormKind::rmsnorm; c.activation = ActivationKind::swiglu; c.positions = PositionKind::rope;
    c.tied_embeddings = false; c.bias = false;
  } else if (name == "tiny-ts" || name == "timemoe-field") {  // the time-series family (docs/TIMESERIES.md)
    c.family = ModelFamily::timeseries;
    c.vocab_size = 1; c.pad_vocab_multiple = 1;
    c.norm = NormKind::rmsnorm; c.activation = ActivationKind::swiglu; c.positions = PositionKind::rope;
    c.tied_embeddings = false; c.bias = false; c.norm_eps = 1e-6f;
    c.moe.top_k = 2; c.moe.shared = 1; c.moe.shared_gate = true; c.moe.aux_coef = 0.02f;
    if (name == "tiny-ts") {  // CPU-sized: trains in minutes on a laptop
      c.context_length = 512; c.n_layer = 4; c.n_head = 4; c.n_kv_head = 4; c.d_model = 64; c.d_ff = 256;
      c.moe.experts = 4; c.moe.d_expert = 64;
    } else {  // the field report's shape (FoundationTS)
      c.context_length = 4096; c.n_layer = 12; c.n_head = 12; c.n_kv_head = 12; c.d_model = 384; c.d_ff = 1536;
      c.moe.experts = 8; c.moe.d_expert = 192;
    }
  } else if (name == "llama-1b") {  // the serving benchmark's Llama-style 1B (the serving issue)
    c.vocab_size = 32000; c.pad_vocab_multiple = 128; c.context_length = 2048;
    c.n_layer = 16; c.n_head = 16; c.n_kv_head = 4; c.d_model = 2048; c.d_ff = 5632;
    c.norm = NormKind::rmsnorm; c.activation = ActivationKind::swiglu; c.positions = PositionKind::rope;
    c.tied_embeddings = false; c.bias = false;
  } else {
    std::string list;
    for (const auto& n : config_preset_names()) {
      if (!list.empty()) list += ", ";
      list += n;
    }
    fail("--preset: unknown preset '", name, "' (known: ", list, ")");
  }
  c.validate("preset " + name);
  return c;
}

std::vector<std::string> config_preset_names() {
  return {"tiny", "tiny-moe", "test-gpt2", "test-llama", "test-moe", "gpt2-124m", "gpt2-350m", "llama-style", "llama-1b", "moe-bench",
          "moe-bench-dense", "tiny-ts", "timemoe-field"};
}

}  // namespace lmf
