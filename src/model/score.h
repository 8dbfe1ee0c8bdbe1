// score.h: the log-probabilities a model gives a sequence's tokens, computed the way training computes
// its loss (the forward of the training step, then the cross-entropy's per-row losses, negated), so
// they are bitwise the trainer's. `lmforge score` prints them; the Python package's
// Model.logprobs() returns them.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"

namespace lmf {

class SequenceScorer {
 public:
  // params: the model's weights (on the GPU with their bf16 copy). precision: auto (bf16 on the GPU,
  // fp32 on the CPU), fp32, tf32 or bf16, as --precision. batch_invariant: --batch-invariant's plans
  // (model/plan.h): the numbers are bitwise the batch-invariant sampler's.
  SequenceScorer(const ModelConfig& c, Parameters& params, std::string precision = "auto",
                 bool batch_invariant = false);
  ~SequenceScorer();

  // rows: B sequences of the same length n, 2 <= n <= context_length + 1, every id in the vocabulary.
  // Returns B * (n - 1) values, row by row: value [b][i] = log p(rows[b][i + 1] | rows[b][0..i]).
  std::vector<float> logprobs(const std::vector<std::vector<int32_t>>& rows);
  // The same into `out` (B * (n - 1) f32 on the model's device: a GPU caller may keep it there).
  void logprobs_into(const std::vector<std::vector<int32_t>>& rows, Tensor out);
  // Every following call's forward reports its activations op by op (model/block.h; the
  // batch-invariance harness). Empty: none.
  void set_activation_tap(ActivationTap f) { tap_ = std::move(f); }
  // "" when the rows can be scored, else one line saying why not.
  std::string problem(const std::vector<std::vector<int32_t>>& rows) const;
  Device device() const { return params_.device(); }

 private:
  struct Planned {
    std::unique_ptr<Model> model;
    Arena io;  // tokens, targets (B, T) i32 on the model's device
  };
  Planned& planned(int64_t B, int64_t T);

  ModelConfig cfg_;
  Parameters& params_;
  std::string precision_;
  bool batch_invariant_ = false;
  ActivationTap tap_;
  std::map<std::pair<int64_t, int64_t>, Planned> plans_;  // by (B, T); the last few shapes
  std::vector<std::pair<int64_t, int64_t>> order_;      // oldest first
};

}  // namespace lmf
