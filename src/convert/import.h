// import.h: models from other formats, and the one rule by which every command takes a model.
//
// A model source is an lmforge checkpoint (a checkpoint directory, or a training out-dir with
// checkpoints/latest), a Hugging Face model directory (convert/hf.h) or a GGUF file (convert/gguf.h).
// generate, serve, `train --init-from` and `export` all load through load_model_source(); `lmforge
// import` writes an imported model as a checkpoint (write_imported_checkpoint), which then loads like
// any other, without converting again.
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "convert/imported.h"
#include "model/params.h"
#include "train/checkpoint.h"

namespace lmf {

// A directory whose config.json is a JSON object naming a model class ("architectures") or type
// ("model_type"); an lmforge checkpoint's config.json has neither.
bool is_hf_dir(const std::string& path);
// A regular file starting with the GGUF magic "GGUF".
bool is_gguf_file(const std::string& path);

// A GGUF file -> import_gguf; a directory -> import_hf; anything else is an error naming the path.
ImportedModel import_model(const std::string& path);

// The imported tensors as named views in checkpoint order (gpt_param_specs of its config), after
// checking that they are exactly those parameters with their shapes (errors name m.source). The views
// point into m.tensors and are only read.
std::vector<std::pair<std::string, Tensor>> imported_weights(const ImportedModel& m);

// An lmforge checkpoint directory holding the imported model: model.safetensors (lmforge's names and
// layout), config.json, and tokenizer.json / chat_template.jinja when it has them. Written whole into
// a temporary directory and renamed into place (core/fsutil.h write_dir_atomic): an existing non-empty
// out_dir is refused unless overwrite; on any error nothing is left behind.
void write_imported_checkpoint(const ImportedModel& m, const std::string& out_dir, bool overwrite = false);

// A model to load: its config and assets now, its weights on demand (once the caller has laid out
// Parameters for the config, on the device it wants).
struct ModelSource {
  std::string path;  // the checkpoint directory, or the imported path (logs, --model-name)
  std::string what;  // for messages: "checkpoint <dir>" or the ImportedModel's source
  ModelConfig config;
  ModelAssets assets;
  // Fills params (laid out by gpt_param_specs(config)) and their bf16 copy. Call it once: an imported
  // model's fp32 tensors are released after the copy.
  std::function<void(Parameters& params)> load_weights;
};

// The source at `path`: a GGUF file or a Hugging Face directory is imported (in memory, nothing is
// written), anything else is resolved as a checkpoint (train/checkpoint.h resolve_checkpoint). A
// non-finite weight is an error when loading unless allow_nonfinite.
ModelSource load_model_source(const std::string& path, bool allow_nonfinite = false);

}  // namespace lmf
