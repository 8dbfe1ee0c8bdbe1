// hf_export.h: an lmforge model -> a Hugging Face model directory (docs/IMPORT.md "Export").
//
// Writes config.json and model.safetensors (F32) that transformers loads as the matching class:
//   learned positions, LayerNorm, GELU (tanh), biases            GPT2LMHeadModel
//   RoPE, RMSNorm, SwiGLU, no biases                             LlamaForCausalLM
//   the same with a QKV bias (qkv_bias)                          Qwen2ForCausalLM
//   MoE in every layer, no shared experts                        MixtralForCausalLM
//   MoE with gated shared experts (Qwen2-MoE's split, hf_layout.h)  Qwen2MoeForCausalLM
// plus tokenizer.json and chat_template.jinja when the model has them. Tensors follow the one table
// of convert/hf_layout.h; the vocabulary is the config's vocab_size (lmforge's padding rows are
// dropped). A config with no Hugging Face equivalent is one error line naming what does not map.
#pragma once
#include <cstdint>
#include <string>

#include "convert/hf_layout.h"
#include "model/config.h"

namespace lmf {

// The model class a config exports as, or an error (naming `what` and every field that does not map).
HfArch hf_arch_for(const ModelConfig& c, const std::string& what);

// config.json's text for `c` exported as class `a`.
std::string hf_config_json(HfArch a, const ModelConfig& c);

struct HfExportSummary {
  HfArch arch;
  int64_t tensors = 0;
  bool tokenizer = false, chat_template = false;
};

// Exports the model at `source` (anything load_model_source accepts) into out_dir, whole or not at
// all (an existing non-empty out_dir is refused unless overwrite).
HfExportSummary export_hf(const std::string& source, const std::string& out_dir, bool overwrite = false);

}  // namespace lmf
