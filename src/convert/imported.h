// imported.h: a model read from another format (a Hugging Face directory, a GGUF file), in lmforge's
// terms: its config, its parameters under lmforge's names and layouts (docs/MODEL.md), and the
// tokenizer and chat template that came with it. Every importer (convert/hf.h, convert/gguf.h)
// produces one; convert/import.h writes it as a checkpoint or loads it into a model.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace lmf {

struct ImportedTensor {
  std::string name;             // lmforge's parameter name ("layers.0.attn.qkv.weight", ...)
  std::vector<int64_t> shape;   // lmforge's shape for that name
  std::vector<float> data;      // fp32, row-major; dequantized / converted from the source dtype
};

struct ImportedModel {
  ModelConfig config;
  std::vector<ImportedTensor> tensors;  // every parameter of model_param_specs(config), in any order
  std::string tokenizer_json;           // a Hugging Face tokenizer.json text; empty when none came
  std::string chat_template;            // the model's Jinja chat template; empty when none came
  std::string source;                   // what it was, for messages: "hf llama (/path)", "gguf llama (/path)"
};

}  // namespace lmf
