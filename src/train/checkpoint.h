// checkpoint.h: training checkpoints.
//
// A checkpoint is a directory <out-dir>/checkpoints/step_NNNNNN/ holding
//   model.safetensors      parameters (names and order of docs/MODEL.md), opens in other tools
//   optimizer.safetensors  AdamW state: "m.<param>" and "v.<param>"
//   config.json            the model config
//   state.json             step, seed, data loader position, the training options
// and <out-dir>/checkpoints/latest names the newest one. Saving writes a temporary directory
// (each file fsynced), renames it into place, then replaces `latest` atomically: a crash mid-save
// leaves the previous checkpoint and `latest` intact. Loading validates every tensor's name, dtype,
// shape and byte size before the run starts, and reports the first problem precisely.
#pragma once
#include <cstdint>
#include <string>

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

// state.json's text -> the state. step: an integer in [0, 2^63); seed: an integer in [0, 2^64);
// data_position: an integer in [0, 2^63); options: an object when present. Anything else (19.5, -1,
// 1e30, a string, deep nesting) is one line naming `where` and the field.
CheckpointState checkpoint_state_from_json(const std::string& text, const std::string& where);

// Saves into <out_dir>/checkpoints/step_NNNNNN and points `latest` at it; returns the directory.
std::string save_checkpoint(const std::string& out_dir, const ModelConfig& config, Parameters& params,
                            TrainingState& train, const CheckpointState& state);

// `path` is a checkpoint directory or an out-dir with checkpoints/latest. Returns the directory.
std::string resolve_checkpoint(const std::string& path);
ModelConfig load_checkpoint_config(const std::string& ckpt_dir);
// Parameters only (generation), laid out for the checkpoint's config; then their bf16 copy follows.
void load_checkpoint_weights(const std::string& ckpt_dir, Parameters& params);
// Parameters, AdamW state and the run's state (resume). Everything is validated before anything is read.
CheckpointState load_checkpoint(const std::string& ckpt_dir, Parameters& params, TrainingState& train);

}  // namespace lmf
