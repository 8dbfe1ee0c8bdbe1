#include "serve/scheduler.h"

#include <algorithm>

#include "core/check.h"

namespace lmf {

Scheduler::Scheduler(const SchedulerLimits& limits, BlockPool& pool) : limits_(limits), pool_(pool) {
  if (limits_.max_seqs < 1) fail("--max-seqs=", limits_.max_seqs, " must be >= 1");
  if (limits_.max_prefill_tokens < 1) fail("--max-prefill-tokens=", limits_.max_prefill_tokens, " must be >= 1");
  if (limits_.max_context < 1) fail("scheduler: max_context=", limits_.max_context, " must be >= 1");
}

void Scheduler::add(int64_t id, int64_t prompt_len, int64_t max_new) {
  if (seqs_.count(id)) fail("request ", id, " is already scheduled");
  if (prompt_len < 1) fail("request ", id, ": the prompt is empty");
  if (max_new < 1) fail("request ", id, ": max_tokens=", max_new, " must be >= 1");
  if (prompt_len + max_new > limits_.max_context)
    fail("request ", id, ": prompt of ", prompt_len, " tokens + max_tokens ", max_new, " exceeds the context of ",
         limits_.max_context);
  if (pool_.blocks_for(prompt_len + max_new) > pool_.total())
    fail("request ", id, ": ", prompt_len + max_new, " positions need ", pool_.blocks_for(prompt_len + max_new),
         " KV blocks; the cache has ", pool_.total(), " (raise --kv-cache-gb)");
  Seq s;
  s.prompt = prompt_len;
  s.max_new = max_new;
  s.arrival = arrivals_++;
  seqs_.emplace(id, std::move(s));
  waiting_.push_back(id);
}

const Scheduler::Seq& Scheduler::seq(int64_t id) const {
  auto it = seqs_.find(id);
  LMF_CHECK(it != seqs_.end(), "scheduler: no request ", id);
  return it->second;
}

int64_t Scheduler::generated(int64_t id) const { return seq(id).generated; }
const std::vector<int32_t>& Scheduler::block_table(int64_t id) const { return seq(id).table; }

bool Scheduler::reserve(int64_t id, int64_t positions) {
  Seq& s = seqs_.at(id);
  const int32_t need = pool_.blocks_for(positions) - static_cast<int32_t>(s.table.size());
  if (need <= 0) return true;
  if (need > pool_.free_blocks()) return false;
  pool_.allocate(s.table, need);
  return true;
}

void Scheduler::preempt(int64_t id, StepPlan& plan) {
  Seq& s = seqs_.at(id);
  pool_.release(s.table);
  s.computed = 0;  // recomputed from its tokens when it runs again
  running_.erase(std::find(running_.begin(), running_.end(), id));
  auto at = std::find_if(waiting_.begin(), waiting_.end(), [&](int64_t w) { return seqs_.at(w).arrival > s.arrival; });
  waiting_.insert(at, id);
  plan.preempted.push_back(id);
}

void Scheduler::finish(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  pool_.release(it->second.table);
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
  seqs_.erase(it);
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  int64_t budget = limits_.max_prefill_tokens;
  // The count of positions a sequence computes now: its one remaining position (a decode), or a
  // prompt chunk within the prefill budget (0: it waits for budget).
  auto chunk = [&](const Seq& s) {
    const int64_t remaining = s.tokens() - s.computed;
    return remaining == 1 ? int64_t{1} : std::min(remaining, budget);
  };
  auto add_work = [&](int64_t id, int64_t count) {
    const Seq& s = seqs_.at(id);
    if (s.tokens() - s.computed > 1) budget -= count;
    plan.work.push_back({id, s.computed, count, s.computed + count == s.tokens()});
  };
  // Running sequences, oldest first; when blocks run out the newest running one gives its blocks back.
  for (size_t i = 0; i < running_.size(); ++i) {
    const int64_t id = running_[i];
    const int64_t count = chunk(seqs_.at(id));
    if (count == 0) continue;
    bool preempted_self = false;
    while (!reserve(id, seqs_.at(id).computed + count)) {
      const int64_t victim = running_.back();
      preempt(victim, plan);
      if (victim == id) {
        preempted_self = true;
        break;
      }
    }
    if (!preempted_self) add_work(id, count);
  }
  // Admission in arrival order, not in a step that had to preempt (it would only thrash).
  while (plan.preempted.empty() && !waiting_.empty() && running_.size() < static_cast<size_t>(limits_.max_seqs)) {
    const int64_t id = waiting_.front();
    const int64_t count = chunk(seqs_.at(id));
    if (count == 0 || !reserve(id, count)) break;  // the head of the queue waits for budget or blocks
    waiting_.pop_front();
    const uint64_t arrival = seqs_.at(id).arrival;
    running_.insert(std::find_if(running_.begin(), running_.end(),
                                 [&](int64_t r) { return seqs_.at(r).arrival > arrival; }),
                    id);
    add_work(id, count);
  }
  return plan;
}

void Scheduler::complete(const StepPlan& plan, const std::vector<int64_t>& finished) {
  std::vector<int64_t> done;
  for (const SeqWork& w : plan.work) {
    auto it = seqs_.find(w.id);
    if (it == seqs_.end()) continue;  // cancelled while the step ran
    Seq& s = it->second;
    LMF_CHECK(w.start == s.computed, "scheduler: request ", w.id, " completed positions from ", w.start,
              " but has ", s.computed, " cached");
    s.computed += w.count;
    if (w.samples && ++s.generated >= s.max_new) done.push_back(w.id);
  }
  for (int64_t id : done) finish(id);
  for (int64_t id : finished) finish(id);
}

void Scheduler::cancel(int64_t id) { finish(id); }

}  // namespace lmf
