#include "model/config.h"

#include <fstream>
#include <limits>
#include <type_traits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"

namespace lmf {

using json = nlohmann::json;

void ModelConfig::validate(const std::string& where) const {
  auto bad = [&](const auto&... msg) { fail(where, ": ", msg...); };
  if (vocab_size < 1 || vocab_size > 65536) bad("vocab_size=", vocab_size, " must be in [1, 65536] (tokens are uint16)");
  if (pad_vocab_multiple < 1) bad("pad_vocab_multiple=", pad_vocab_multiple, " must be >= 1");
  if (context_length < 1) bad("context_length=", context_length, " must be >= 1");
  if (n_layer < 1) bad("n_layer=", n_layer, " must be >= 1");
  if (n_head < 1) bad("n_head=", n_head, " must be >= 1");
  if (n_kv_head < 1) bad("n_kv_head=", n_kv_head, " must be >= 1");
  if (d_model < 1) bad("d_model=", d_model, " must be >= 1");
  if (d_ff < 1) bad("d_ff=", d_ff, " must be >= 1");
  if (d_model % n_head != 0) bad("n_head=", n_head, " does not divide d_model=", d_model);
  if (n_head % n_kv_head != 0) bad("n_kv_head=", n_kv_head, " does not divide n_head=", n_head);
  if (positions == PositionKind::rope && head_size() % 2 != 0)
    bad("positions=rope needs an even head size, d_model/n_head=", head_size());
  if (!(norm_eps > 0)) bad("norm_eps=", norm_eps, " must be > 0");
  if (!(rope_theta > 0)) bad("rope_theta=", rope_theta, " must be > 0");
}

namespace {

// Strict types: an integer field takes only a JSON integer (no 1.9 -> 1, no true -> 1, no
// out-of-range wrap), a float field any number, a bool field only true/false.
template <class T>
T get_field(const json& j, const char* key, const std::string& where) {
  const json& v = j.at(key);
  bool ok;
  if constexpr (std::is_same_v<T, bool>) ok = v.is_boolean();
  else if constexpr (std::is_integral_v<T>)
    ok = v.is_number_integer() &&
         (v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max())
                                 : v.get<int64_t>() >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
                                       v.get<int64_t>() <= static_cast<int64_t>(std::numeric_limits<T>::max()));
  else if constexpr (std::is_floating_point_v<T>) ok = v.is_number();
  else ok = v.is_string();
  if (!ok) fail(where, ": field '", key, "' has the wrong type or range (", v.dump(), ")");
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
  fail(where, ": field '", key, "' is '", v, "', expected ", list);
}

}  // namespace

ModelConfig config_from_json(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(where, ": invalid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail(where, ": expected a JSON object");
  static const char* known[] = {"vocab_size", "pad_vocab_multiple", "context_length", "n_layer", "n_head",
                                "n_kv_head", "d_model", "d_ff", "norm", "norm_eps", "activation", "positions",
                                "rope_theta", "tied_embeddings", "bias"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool found = false;
    for (const char* k : known) found = found || it.key() == k;
    if (!found) fail(where, ": unknown field '", it.key(), "'");
  }
  ModelConfig c;
  if (j.contains("vocab_size")) c.vocab_size = get_field<int64_t>(j, "vocab_size", where);
  if (j.contains("pad_vocab_multiple")) c.pad_vocab_multiple = get_field<int64_t>(j, "pad_vocab_multiple", where);
  if (j.contains("context_length")) c.context_length = get_field<int64_t>(j, "context_length", where);
  if (j.contains("n_layer")) c.n_layer = get_field<int>(j, "n_layer", where);
  if (j.contains("n_head")) c.n_head = get_field<int>(j, "n_head", where);
  c.n_kv_head = j.contains("n_kv_head") ? get_field<int>(j, "n_kv_head", where) : c.n_head;
  if (j.contains("d_model")) c.d_model = get_field<int64_t>(j, "d_model", where);
  c.d_ff = j.contains("d_ff") ? get_field<int64_t>(j, "d_ff", where) : 4 * c.d_model;
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
  return j.dump(2);
}

ModelConfig config_from_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail(path, ": cannot open config file");
  std::stringstream ss;
  ss << f.rdbuf();
  return config_from_json(ss.str(), path);
}

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
  } else if (name == "gpt2-124m") {
    c.vocab_size = 50257; c.pad_vocab_multiple = 128; c.context_length = 1024;
    c.n_layer = 12; c.n_head = 12; c.n_kv_head = 12; c.d_model = 768; c.d_ff = 3072;
  } else if (name == "llama-style") {  // Llama architecture at GPT-2-small scale, GQA 12/4
    c.vocab_size = 32000; c.pad_vocab_multiple = 128; c.context_length = 2048;
    c.n_layer = 12; c.n_head = 12; c.n_kv_head = 4; c.d_model = 768; c.d_ff = 2048;
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

std::vector<std::string> config_preset_names() { return {"tiny", "test-gpt2", "test-llama", "gpt2-124m", "llama-style"}; }

}  // namespace lmf
