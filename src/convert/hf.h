// hf.h: a Hugging Face model directory -> ImportedModel (docs/IMPORT.md).
//
// The directory holds config.json and the weights as model.safetensors or as shards listed in
// model.safetensors.index.json (F32, F16 or BF16; converted to fp32 exactly), and optionally
// tokenizer.json and a chat template (chat_template.jinja, or tokenizer_config.json's
// "chat_template"). Model classes: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM,
// MixtralForCausalLM, Qwen2MoeForCausalLM; their tensors map onto lmforge's by convert/hf_layout.h.
//
// config.json is read against an allow-list per model class: every field is either translated into
// the lmforge config, required to hold the one value lmforge computes (rope_scaling null, no sliding
// window in use, head_dim = hidden_size / num_attention_heads, ...), or known not to change the
// model's function (token ids, dtype, dropout, versions); any other field is an error naming it.
// Every problem -- a missing file, a corrupt or truncated safetensors, a tensor missing, unexpected
// or of the wrong shape or dtype, an unsupported field or value -- is one lmf::Error line naming the
// file and the problem. Nothing is written: the result lives in memory.
#pragma once
#include <string>

#include "convert/hf_layout.h"
#include "convert/imported.h"

namespace lmf {

ImportedModel import_hf(const std::string& dir);

// config.json's text -> the model class and lmforge's config (validated); errors name `where`.
struct HfModelConfig {
  HfArch arch = HfArch::gpt2;
  ModelConfig config;
};
HfModelConfig hf_config_from_json(const std::string& text, const std::string& where);

}  // namespace lmf
