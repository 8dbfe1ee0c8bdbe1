// checkpoint.h: training checkpoints.
//
// A checkpoint is a directory <out-dir>/checkpoints/step_NNNNNN/ holding
//   model.safetensors      parameters (names and order of docs/MODEL.md), opens in other tools
//   optimizer.safetensors  AdamW state: "m.<param>" and "v.<param>"
//   config.json            the model config
//   state.json             step, seed, data loader position, the training options
//   tokenizer.json, chat_template.jinja   the model's tokenizer and chat template, when it has them
//                          (ModelAssets: an imported model's, carried on by runs that start from it)
// and <out-dir>/checkpoints/latest names the newest one. Saving writes a temporary directory
// (each file fsynced) and renames it into place under a name no other checkpoint has (a re-save of
// step N becomes step_NNNNNN.v2, ...), then replaces `latest` atomically, and only then removes what
// it supersedes: a crash at any point leaves `latest` naming a complete checkpoint. A state with a
// non-finite value (NaN/Inf) is never saved. Loading validates every tensor's name, dtype, shape,
// byte size and (unless allowed) finiteness before anything is read, and reports the first problem.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "model/train_state.h"

namespace lmf {

struct CheckpointState {
  int64_t step = 0;             // optimizer steps completed
  uint64_t seed = 0;
  uint64_t data_position = 0;   // DataLoader::position()
  std::string options_json;     // the TrainOptions of the run, for the record
};

// What a model carries besides its weights (an imported model's, convert/import.h): the Hugging Face
// tokenizer.json text and the Jinja chat template; empty = absent.
struct ModelAssets {
  std::string tokenizer_json;
  std::string chat_template;
};
// The assets files of a checkpoint directory (tokenizer.json, chat_template.jinja), those that exist.
ModelAssets load_checkpoint_assets(const std::string& ckpt_dir);

// The model part of a checkpoint, written into the existing directory `dir`: model.safetensors (the
// tensors in the given order, the config in its metadata), config.json and the assets' files, each
// atomically. The weights are serialized and checked finite before the first byte is written; a
// non-finite one is "<what>: tensor 'X' holds a non-finite value (NaN/Inf); no checkpoint is written".
// save_checkpoint and convert/import.h's write_imported_checkpoint both write through it.
void write_model_files(const std::string& dir, const ModelConfig& config,
                       const std::vector<std::pair<std::string, Tensor>>& weights, const ModelAssets& assets,
                       const std::string& what);

// state.json's text -> the state. step: an integer in [0, 2^63); seed: an integer in [0, 2^64);
// data_position: an integer in [0, 2^63); options: an object when present. Anything else (19.5, -1,
// 1e30, a string, deep nesting) is one line naming `where` and the field.
CheckpointState checkpoint_state_from_json(const std::string& text, const std::string& where);

// Saves into <out_dir>/checkpoints/step_NNNNNN (or a fresh .vN name when that exists) and points
// `latest` at it; then removes older versions of the step and, with keep_last > 0, every checkpoint
// but the newest keep_last. Returns the directory.
std::string save_checkpoint(const std::string& out_dir, const ModelConfig& config, Parameters& params,
                            TrainingState& train, const CheckpointState& state, int64_t keep_last = 0,
                            const ModelAssets& assets = {});

// The checkpoint directories of <out_dir>/checkpoints in save order (step, then version).
std::vector<std::string> list_checkpoints(const std::string& out_dir);
// The step a checkpoint directory name holds (step_000120 or step_000120.v2 -> 120), -1 if not one.
int64_t checkpoint_step(const std::string& dir_name);
// Leftovers of interrupted saves (.step_*.tmp, .step_*.old, latest.tmp.*, *.tmp.<pid> files):
// removed; returns how many. Call only while holding the out-dir's lock.
int clean_interrupted_saves(const std::string& out_dir);

// `path` is a checkpoint directory or an out-dir with checkpoints/latest. Returns the directory.
std::string resolve_checkpoint(const std::string& path);
ModelConfig load_checkpoint_config(const std::string& ckpt_dir);
// Parameters only (generation), laid out for the checkpoint's config; then their bf16 copy follows.
// A non-finite weight is an error unless allow_nonfinite (--allow-nonfinite).
void load_checkpoint_weights(const std::string& ckpt_dir, Parameters& params, bool allow_nonfinite = false);
// Parameters, AdamW state and the run's state (resume). Everything is validated before anything is read.
CheckpointState load_checkpoint(const std::string& ckpt_dir, Parameters& params, TrainingState& train,
                                bool allow_nonfinite = false);
// The state.json of a checkpoint alone (validated as load_checkpoint does).
CheckpointState read_checkpoint_state(const std::string& ckpt_dir);

}  // namespace lmf
