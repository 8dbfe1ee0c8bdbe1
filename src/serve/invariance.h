// invariance.h: the ground-truth harness of batch invariance (docs/SERVING.md, "Batch invariance";
// `lmforge check-invariance`). Does a sequence's log-probabilities depend on what is computed beside
// it? A probe request is decoded greedily alone; then its numbers are compared, bit for bit, with
//   - the trainer's forward + loss (SequenceScorer, `lmforge score`) over the whole sequence: prefill
//     of every position at once against the sampler's decode, and trainer = sampler;
//   - the trainer's forward with the probe at a random row of batches of other sequences, and with
//     the probe as the prefix of a longer row (its later positions must not matter);
//   - the sampler with the probe among other requests of random lengths (continuous batching, chunked
//     prefill at two budgets, padded row buckets): the same tokens and log-probabilities.
// Dense and MoE models alike (whatever the config is), on the device the weights are on.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace lmf {

struct InvarianceOptions {
  int64_t prompt_len = 24;   // the probe's prompt (random ids)
  int64_t new_tokens = 16;   // tokens the probe decodes
  std::vector<int64_t> batches = {1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256};  // batch sizes / concurrent requests swept
  uint64_t seed = 1;
  std::string precision = "auto";  // the trainer's (auto: bf16 on a GPU, fp32 on the CPU)
  bool batch_invariant = false;    // --batch-invariant: the trainer's and the sampler's plans in that mode
};
// One line naming the option when one is out of range ("" when fine); vocab and context from the model.
std::string invariance_options_problem(const InvarianceOptions& o, const ModelConfig& c);

struct InvarianceCheck {
  std::string what;         // "trainer, batch of 8 (probe at row 5)"
  int64_t values = 0;       // values compared
  int64_t differing = 0;    // of them, not bitwise equal
  int64_t first = -1;       // index of the first differing value (-1: none)
  double worst_abs = 0;     // max |a - b|
  std::string first_op;     // trainer checks (and trainer vs sampler) that differ: the first op whose output
                            // differs, and where
  bool sampler = false;     // a sampler check (its tokens compared too)
  bool tokens_equal = true; // sampler checks: the same tokens
  bool equal() const { return differing == 0 && tokens_equal; }
};

struct InvarianceReport {
  std::vector<InvarianceCheck> checks;
  bool all_equal() const;
  // A table, one row per check, and a last line: "batch-invariant: yes" or "... no (k of n checks differ)".
  void print(std::ostream& os) const;
};

// The first op whose output differs between the trainer's forward over seq (SequenceScorer, every
// position at once, trainer_params) and the decode of seq's first prompt_len tokens alone by an engine
// (sampler_params: the same weights in check_invariance; tests plant a difference), each op compared at
// every position both computed with the same input tokens: "layer 1: attention (position 3)", or "" when
// every op's output is bitwise equal.
std::string first_op_trainer_vs_sampler(const ModelConfig& c, Parameters& trainer_params, Parameters& sampler_params,
                                        const std::vector<int32_t>& seq, int64_t prompt_len,
                                        const std::string& precision, bool batch_invariant);

// Runs every check (progress, one line per check, to `progress` when given).
InvarianceReport check_invariance(const ModelConfig& c, Parameters& params, const InvarianceOptions& o,
                                  std::ostream* progress = nullptr);

}  // namespace lmf
