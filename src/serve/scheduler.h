// scheduler.h: continuous batching's decisions (the serving issue), apart from the model. Each step
// the engine asks schedule() which positions to compute: every running sequence decodes one token,
// prompts are prefilled in chunks under a token budget, waiting requests are admitted in arrival
// order while sequences and KV blocks allow; when the blocks run out the newest running sequence is
// preempted (its blocks go back to the pool; it waits again and later recomputes its tokens). A
// request that could ever fit is never refused; one that never can is refused at add(). Deterministic:
// the same calls give the same plans.
//
// A sequence's tokens are its prompt plus what it generated; `computed` positions have their keys and
// values cached. Computing the last known position samples the next token.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <vector>

#include "serve/block_pool.h"

namespace lmf {

struct SchedulerLimits {
  int32_t max_seqs = 32;             // running sequences at once
  int64_t max_prefill_tokens = 512;  // prompt positions computed per step, all sequences together (>= 1)
  int64_t max_context = 0;           // positions a sequence may reach (the model's context_length)
};

// One sequence's part of a step: positions [start, start + count) are computed.
struct SeqWork {
  int64_t id = 0;
  int64_t start = 0;
  int64_t count = 0;
  bool samples = false;  // the step ends at the sequence's last known token: it samples the next one
};

struct StepPlan {
  std::vector<SeqWork> work;       // in arrival order
  std::vector<int64_t> preempted;  // sequences that lost their blocks this step (they wait again)
  bool empty() const { return work.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerLimits& limits, BlockPool& pool);

  // A new request of prompt_len >= 1 tokens generating up to max_new >= 1. Throws one line naming the
  // limit when it can never run (its tokens exceed max_context, or need more blocks than the pool has).
  void add(int64_t id, int64_t prompt_len, int64_t max_new);
  StepPlan schedule();
  // After the engine ran `plan`: the positions are cached and every sampling sequence got one token.
  // `finished`: sequences that stopped early (a stop token or string); a sequence that reached max_new
  // tokens or max_context finishes by itself. Finished sequences free their blocks.
  void complete(const StepPlan& plan, const std::vector<int64_t>& finished = {});
  // Drops a request wherever it is (a client went away); unknown ids are ignored.
  void cancel(int64_t id);

  bool has(int64_t id) const { return seqs_.count(id) > 0; }
  int64_t generated(int64_t id) const;
  const std::vector<int32_t>& block_table(int64_t id) const;
  size_t running() const { return running_.size(); }
  size_t waiting() const { return waiting_.size(); }

 private:
  struct Seq {
    int64_t prompt = 0, max_new = 0, generated = 0, computed = 0;
    uint64_t arrival = 0;
    std::vector<int32_t> table;
    int64_t tokens() const { return prompt + generated; }
  };
  const Seq& seq(int64_t id) const;
  void preempt(int64_t id, StepPlan& plan);
  void finish(int64_t id);
  // Grows id's table to hold `positions`; false (nothing changed) when the pool is short.
  bool reserve(int64_t id, int64_t positions);

  SchedulerLimits limits_;
  BlockPool& pool_;
  std::map<int64_t, Seq> seqs_;
  std::vector<int64_t> running_;  // in arrival order
  std::deque<int64_t> waiting_;   // in arrival order (preempted ones go back to their place)
  uint64_t arrivals_ = 0;
};

}  // namespace lmf
