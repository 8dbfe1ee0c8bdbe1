// Continuous batching's bookkeeping (src/serve/): the KV block pool and the scheduler's admission,
// chunked prefill, preemption with recompute, cancellation, and block accounting back to full.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "core/check.h"
#include "core/rng.h"
#include "serve/block_pool.h"
#include "serve/scheduler.h"

namespace lmf {
namespace {

TEST(BlockPool, AllocatesReleasesAndRefusesWhatItCannotGive) {
  BlockPool pool(5, 16);
  EXPECT_EQ(pool.blocks_for(0), 0);
  EXPECT_EQ(pool.blocks_for(1), 1);
  EXPECT_EQ(pool.blocks_for(16), 1);
  EXPECT_EQ(pool.blocks_for(17), 2);
  std::vector<int32_t> a, b;
  pool.allocate(a, 3);
  EXPECT_EQ(pool.free_blocks(), 2);
  EXPECT_THROW(pool.allocate(b, 3), Error);  // only 2 free
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(pool.free_blocks(), 2);
  pool.allocate(b, 2);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 5u) << "a block was given twice";
  std::vector<int32_t> copy = a;
  pool.release(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(pool.free_blocks(), 3);
  EXPECT_THROW(pool.release(copy), Error) << "a block released twice";
  EXPECT_EQ(pool.free_blocks(), 3);
  pool.release(b);
  EXPECT_EQ(pool.free_blocks(), 5);
  EXPECT_THROW(BlockPool(0, 16), Error);
}

TEST(Scheduler, AdmitsInArrivalOrderWithinSequencesAndPrefillBudget) {
  BlockPool pool(100, 4);
  Scheduler s({2, 8, 64}, pool);
  s.add(10, 5, 3);
  s.add(11, 5, 3);
  s.add(12, 5, 3);
  StepPlan p = s.schedule();
  ASSERT_EQ(p.work.size(), 2u);
  EXPECT_EQ(p.work[0].id, 10);
  EXPECT_EQ(p.work[0].count, 5);
  EXPECT_TRUE(p.work[0].samples) << "a whole prompt samples its first token";
  EXPECT_EQ(p.work[1].id, 11);
  EXPECT_EQ(p.work[1].count, 3) << "the budget of 8 prefill tokens is shared";
  EXPECT_FALSE(p.work[1].samples);
  EXPECT_EQ(s.running(), 2u);
  EXPECT_EQ(s.waiting(), 1u);
  s.complete(p);
  p = s.schedule();  // 10 decodes (budget free), 11 finishes its prompt; 12 still waits for a slot
  ASSERT_EQ(p.work.size(), 2u);
  EXPECT_EQ(p.work[0].id, 10);
  EXPECT_EQ(p.work[0].start, 5);
  EXPECT_EQ(p.work[0].count, 1);
  EXPECT_EQ(p.work[1].id, 11);
  EXPECT_EQ(p.work[1].start, 3);
  EXPECT_EQ(p.work[1].count, 2);
  EXPECT_TRUE(p.work[1].samples);
  s.complete(p, {10});  // 10 stops early (a stop token): its slot and blocks free up
  EXPECT_FALSE(s.has(10));
  p = s.schedule();
  ASSERT_EQ(p.work.size(), 2u);
  EXPECT_EQ(p.work[1].id, 12);
}

TEST(Scheduler, ChunksALongPromptAcrossSteps) {
  BlockPool pool(100, 4);
  Scheduler s({4, 8, 64}, pool);
  s.add(1, 20, 2);
  std::vector<int64_t> counts;
  for (int step = 0; step < 5 && s.has(1); ++step) {
    const StepPlan p = s.schedule();
    ASSERT_EQ(p.work.size(), 1u);
    counts.push_back(p.work[0].count);
    s.complete(p);
  }
  EXPECT_EQ(counts, (std::vector<int64_t>{8, 8, 4, 1}));  // three prefill chunks, then one decode
  EXPECT_FALSE(s.has(1));
  EXPECT_EQ(pool.free_blocks(), 100);
}

TEST(Scheduler, PreemptsTheNewestAndRecomputesItLater) {
  BlockPool pool(3, 2);  // 6 positions in all
  Scheduler s({4, 16, 6}, pool);
  s.add(1, 2, 4);
  s.add(2, 2, 4);
  bool preempted = false;
  int64_t recompute_start = -1;
  for (int step = 0; step < 50 && (s.has(1) || s.has(2)); ++step) {
    const StepPlan p = s.schedule();
    ASSERT_FALSE(p.empty()) << "no progress at step " << step;
    for (int64_t id : p.preempted) {
      EXPECT_EQ(id, 2) << "the newest running sequence gives its blocks back";
      preempted = true;
    }
    for (const SeqWork& w : p.work)
      if (w.id == 2 && preempted && recompute_start < 0) {
        recompute_start = w.start;
        EXPECT_GE(w.count, 2) << "the preempted sequence recomputes its prompt and generated tokens";
      }
    s.complete(p);
  }
  EXPECT_TRUE(preempted);
  EXPECT_EQ(recompute_start, 0);
  EXPECT_FALSE(s.has(1));
  EXPECT_FALSE(s.has(2));
  EXPECT_EQ(pool.free_blocks(), 3);
}

TEST(Scheduler, RefusesOnlyWhatCanNeverRun) {
  BlockPool pool(4, 4);
  Scheduler s({4, 16, 32}, pool);
  EXPECT_THROW(s.add(1, 0, 4), Error);    // empty prompt
  EXPECT_THROW(s.add(1, 4, 0), Error);    // max_tokens 0
  EXPECT_THROW(s.add(1, 30, 3), Error);   // beyond the context
  EXPECT_THROW(s.add(1, 10, 10), Error);  // 20 positions > 16 in the pool
  s.add(1, 8, 8);                         // 16 positions: the whole pool, later
  EXPECT_THROW(s.add(1, 2, 2), Error);    // duplicate id
  EXPECT_THROW(Scheduler({0, 16, 32}, pool), Error);
}

// Random traffic against a small pool: requests of random sizes arrive over time, some are
// cancelled, some stop early. Every step keeps the books straight; every request that was not
// cancelled ends with exactly the tokens it was allowed; the pool ends full.
TEST(Scheduler, RandomTrafficKeepsTheBooksAndFinishesEveryRequest) {
  BlockPool pool(30, 4);
  const int64_t ctx = 80;
  Scheduler s({8, 16, ctx}, pool);
  std::map<int64_t, int64_t> want;     // id -> tokens it must end with (max_new, or its early stop)
  std::map<int64_t, int64_t> got;      // id -> tokens sampled
  std::set<int64_t> cancelled, live;
  int64_t next_id = 0, steps = 0, preemptions = 0;
  uint64_t draw = 0;
  auto rnd = [&](int64_t n) { return static_cast<int64_t>(rng_u64(99, 0, draw++) % static_cast<uint64_t>(n)); };
  while ((next_id < 200 || !live.empty()) && steps < 20000) {
    ++steps;
    for (int k = 0; k < 2 && next_id < 200; ++k) {  // up to 2 arrivals a step
      if (rnd(3) == 0) continue;
      const int64_t prompt = 1 + rnd(40), max_new = 1 + rnd(30);
      s.add(next_id, prompt, max_new);
      want[next_id] = rnd(4) == 0 ? 1 + rnd(max_new) : max_new;
      got[next_id] = 0;
      live.insert(next_id++);
    }
    if (!live.empty() && rnd(40) == 0) {  // a client goes away
      auto it = live.begin();
      std::advance(it, rnd(static_cast<int64_t>(live.size())));
      s.cancel(*it);
      cancelled.insert(*it);
      live.erase(it);
    }
    const StepPlan p = s.schedule();
    preemptions += static_cast<int64_t>(p.preempted.size());
    std::vector<int64_t> stopped;
    std::set<int64_t> seen;
    for (const SeqWork& w : p.work) {
      ASSERT_TRUE(seen.insert(w.id).second) << "request " << w.id << " twice in one step";
      ASSERT_GE(w.count, 1);
      ASSERT_LE(static_cast<int64_t>(s.block_table(w.id).size()) * 4, ctx + 3);
      ASSERT_GE(static_cast<int64_t>(s.block_table(w.id).size()) * 4, w.start + w.count) << "blocks do not cover the work";
      if (w.samples && ++got[w.id] == want[w.id]) stopped.push_back(w.id);  // (at max_new it stops by itself too)
    }
    s.complete(p, stopped);
    for (auto it = live.begin(); it != live.end();) it = s.has(*it) ? std::next(it) : live.erase(it);
    // the books: every block is free or in exactly one table
    int64_t held = 0;
    std::set<int32_t> blocks;
    for (int64_t id : live) {
      ASSERT_TRUE(s.has(id)) << "request " << id << " vanished";
      for (int32_t b : s.block_table(id)) ASSERT_TRUE(blocks.insert(b).second) << "block " << b << " held twice";
      held += static_cast<int64_t>(s.block_table(id).size());
    }
    ASSERT_EQ(held + pool.free_blocks(), pool.total()) << "at step " << steps;
  }
  EXPECT_LT(steps, 20000) << "the traffic never drained";
  EXPECT_GT(preemptions, 0) << "the pool never ran out: the test did not exercise preemption";
  EXPECT_EQ(s.running() + s.waiting(), 0u);
  EXPECT_EQ(pool.free_blocks(), pool.total());
  for (const auto& [id, n] : want)
    if (!cancelled.count(id)) EXPECT_EQ(got[id], n) << "request " << id;
  std::printf("[ measured ] 200 random requests (%zu cancelled, %lld preemptions) drained in %lld steps\n",
              cancelled.size(), static_cast<long long>(preemptions), static_cast<long long>(steps));
}

}  // namespace
}  // namespace lmf
