// config.h: the model configuration (docs/MODEL.md) and its presets.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lmf {

enum class NormKind { layernorm, rmsnorm };
enum class ActivationKind { gelu, swiglu };
enum class PositionKind { learned, rope };
// What the model reads and predicts (its ends, model/ends.h): tokens (a language model) or real
// values (a time-series forecaster, docs/TIMESERIES.md).
enum class ModelFamily { text, timeseries };

// The time-series family (Time-MoE style): point-wise inputs, one linear head per horizon (head j
// predicts the next horizons[j] values from each position), Huber loss averaged over the heads.
struct TimeSeriesModelConfig {
  std::vector<int64_t> horizons = {1, 8, 32, 64};  // strictly increasing, each in [1, 4096]
  float huber_delta = 2.0f;                        // > 0
  int64_t max_horizon() const { return horizons.empty() ? 0 : horizons.back(); }
  int64_t head_outputs() const {
    int64_t s = 0;
    for (int64_t h : horizons) s += h;
    return s;
  }
};

// Mixture-of-Experts FFNs (docs/MODEL.md "MoE"): experts == 0 means a dense model.
struct MoeModelConfig {
  int64_t experts = 0;         // E routed experts per MoE layer (0: no MoE)
  int64_t top_k = 2;           // K experts per token
  int64_t d_expert = 0;        // hidden width of each expert (0: d_ff)
  int every = 1;               // layer l is MoE when l >= first_dense and (l - first_dense) % every == 0
  int first_dense = 0;         // the first layers stay dense
  int64_t shared = 0;          // shared (always-on) experts per MoE layer
  bool shared_gate = false;    // sigmoid(Linear(d, 1)) gate on each shared expert (Time-MoE)
  bool sigmoid = false;        // router scores: softmax (false) or sigmoid (true)
  bool renormalize = true;     // divide the top-K weights by their sum
  float capacity_factor = 0;   // 0: dropless; else per-expert capacity ceil(cf N K / E)
  float aux_coef = 0.01f;      // Switch load-balancing loss
  float z_coef = 0;            // router z-loss
  float bias_rate = 0;         // aux-loss-free balancing (DeepSeek-V3): selection-bias step size, 0 = off
};

// The largest sizes a config may ask for (docs/MODEL.md "Limits"). They keep every size computed
// from a config far inside int64 and the models a config can describe buildable; a model within
// them may still need more memory than the machine has, which set-up reports before allocating.
struct ConfigLimits {
  static constexpr int64_t vocab_size = 1 << 21;        // token ids are int32; Qwen2 151,936, Llama-3 128,256
  static constexpr int64_t pad_vocab_multiple = 65536;
  static constexpr int64_t context_length = 1 << 20;
  static constexpr int n_layer = 500;                   // training's weight-decay table: <= 4 ranges a layer
  static constexpr int n_head = 1024;                   // and n_kv_head
  static constexpr int64_t d_model = 65536;
  static constexpr int64_t d_ff = 1 << 20;              // and moe.d_expert
  static constexpr int64_t experts = 256;
  static constexpr int64_t top_k = 16;
  static constexpr int64_t shared = 64;                 // moe.shared
};

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
  bool qkv_bias = false;  // a bias on the QKV projection only (Qwen2); implied by bias
  MoeModelConfig moe;
  ModelFamily family = ModelFamily::text;
  TimeSeriesModelConfig ts;  // family == timeseries
  // Tensor parallelism (dist/tensor_parallel.h) runs each rank on a share of the model: a copy of the
  // config with n_head, n_kv_head, d_ff, moe.d_expert divided by the ranks, and these fields, which are
  // never read from or written to JSON. head_dim keeps the full model's head size (0: d_model /
  // n_head); the token tables hold rows [vocab_shard, vocab_shard + 1) x padded_vocab() / vocab_shards
  // of the full padded vocabulary.
  int64_t head_dim = 0;
  int vocab_shards = 1, vocab_shard = 0;

  int64_t padded_vocab() const { return (vocab_size + pad_vocab_multiple - 1) / pad_vocab_multiple * pad_vocab_multiple; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : d_model / n_head; }
  // Rows of this rank's token tables (the padded vocabulary without tensor parallelism).
  int64_t vocab_rows() const { return padded_vocab() / vocab_shards; }
  int64_t qkv_dim() const { return (n_head + 2 * n_kv_head) * head_size(); }
  int64_t fc_dim() const { return activation == ActivationKind::swiglu ? 2 * d_ff : d_ff; }
  bool is_moe_layer(int l) const {
    return moe.experts > 0 && l >= moe.first_dense && (l - moe.first_dense) % moe.every == 0;
  }
  int64_t d_expert() const { return moe.d_expert > 0 ? moe.d_expert : d_ff; }
  bool has_qkv_bias() const { return bias || qkv_bias; }

  // Every field in range (ConfigLimits), every float finite, the rules between fields; throws
  // lmf::Error naming `where` (the file or preset), the field and the problem.
  void validate(const std::string& where) const;
};

// JSON text <-> config. Unknown keys and wrong types are errors naming `where` and the key.
ModelConfig config_from_json(const std::string& json_text, const std::string& where);
std::string config_to_json(const ModelConfig& c);
ModelConfig config_from_file(const std::string& path);

// Presets: "tiny" (the demo), "tiny-moe", "test-gpt2", "test-llama" and "test-moe" (unit tests),
// "gpt2-124m", "llama-style", "llama-1b" (the serving benchmark), "moe-bench" (issue 4's benchmark MoE) and "moe-bench-dense" (its dense
// twin of the same active size).
ModelConfig config_preset(const std::string& name);
std::vector<std::string> config_preset_names();

}  // namespace lmf
