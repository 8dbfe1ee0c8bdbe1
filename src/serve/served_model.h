// served_model.h: a model loaded to run (generate, serve, score, and the Python package's
// lmforge.load): its config and assets, its weights on the chosen device (fp32 masters; on the GPU
// also the bf16 copy the serving plans read) and its tokenizer. From anything
// convert/import.h load_model_source() takes: a checkpoint, an out-dir, a Hugging Face directory, a
// GGUF file.
#pragma once
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "model/config.h"
#include "model/params.h"
#include "train/checkpoint.h"

namespace lmf {

struct ServedModel {
  std::string dir;  // what was loaded (load_model_source's path)
  std::string what;  // for messages: "checkpoint <dir>" or the imported source
  ModelConfig cfg;
  ModelAssets assets;  // tokenizer.json and chat template text, when the model has them
  std::unique_ptr<Parameters> params;
  std::unique_ptr<Tokenizer> tok;
  double load_seconds = 0;
};

// device: auto | cpu | cuda (core/device.h parse_device). tokenizer: "auto" (the model's own, else
// byte), "byte" or a tokenizer.json path; a tokenizer with more tokens than the model's vocabulary is
// an error. Every error is one line naming the path or the flag.
ServedModel load_served_model(const std::string& path, const std::string& device, bool allow_nonfinite = false,
                              const std::string& tokenizer = "auto");

// "2 layers, d_model 32, 4/2 heads, vocab 100, context 64, 12,345 parameters (MoE: 4 experts, top 2,
// 1 shared); tokenizer: yes; chat template: no"
std::string model_summary(const ModelConfig& c, bool tokenizer, bool chat_template);

}  // namespace lmf
