// config.h: the model configuration (docs/MODEL.md) and its presets.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lmf {

enum class NormKind { layernorm, rmsnorm };
enum class ActivationKind { gelu, swiglu };
enum class PositionKind { learned, rope };

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t pad_vocab_multiple = 64;
  int64_t context_length = 128;
  int n_layer = 4;
  int n_head = 4;
  int n_kv_head = 4;
  int64_t d_model = 128;
  int64_t d_ff = 512;
  NormKind norm = NormKind::layernorm;
  float norm_eps = 1e-5f;
  ActivationKind activation = ActivationKind::gelu;
  PositionKind positions = PositionKind::learned;
  float rope_theta = 10000.0f;
  bool tied_embeddings = true;
  bool bias = true;

  int64_t padded_vocab() const { return (vocab_size + pad_vocab_multiple - 1) / pad_vocab_multiple * pad_vocab_multiple; }
  int64_t head_size() const { return d_model / n_head; }
  int64_t qkv_dim() const { return (n_head + 2 * n_kv_head) * head_size(); }
  int64_t fc_dim() const { return activation == ActivationKind::swiglu ? 2 * d_ff : d_ff; }

  // Throws lmf::Error naming the field and the problem (`where` names the file or preset).
  void validate(const std::string& where) const;
};

// JSON text <-> config. Unknown keys and wrong types are errors naming `where` and the key.
ModelConfig config_from_json(const std::string& json_text, const std::string& where);
std::string config_to_json(const ModelConfig& c);
ModelConfig config_from_file(const std::string& path);

// Presets: "tiny" (the demo), "test-gpt2" and "test-llama" (unit tests), "gpt2-124m", "llama-style".
ModelConfig config_preset(const std::string& name);
std::vector<std::string> config_preset_names();

}  // namespace lmf
