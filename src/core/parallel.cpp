// parallel.cpp: the worker pool behind parallel_for (see parallel.h for the contract).
//
// One job at a time (a second caller that finds the pool busy runs its chunks inline). A job is
// published through one 64-bit word, state = epoch << 32 | chunks not yet claimed, which every claim
// decrements with a compare-and-swap. A worker reads the job's parameters (fn, ctx, n, grain, chunks)
// only after seeing its epoch with chunks left, and its claim succeeds only if the word has not moved
// since: while a chunk is unclaimed the job cannot have ended, and its caller writes the next job's
// parameters only after every chunk is done, so a successful claim always ran with its own job's
// parameters. (Until 2026-12-07 the word held the next chunk's index and a worker compared it with the
// chunk count it had read: a worker delayed across the end of one job and the start of the next could
// read the next job's count against the old word, claim a chunk of a job not yet published and count it
// done: a rank under heavy oversubscription crashed in a GEMM chunk, or waited forever.) done counts
// finished chunks; the caller returns when it reaches the chunk count, and only then writes the next
// job's parameters.
#include "core/parallel.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "core/check.h"

namespace lmf {
namespace {

// What an idle worker does before it sleeps: spins kSpinPauses pauses (a few microseconds: the gap
// between two back-to-back ops of a step), then yields the core for up to kYieldFor (on an idle core
// a yield returns at once, so the next op still starts without a wake-up; on a shared machine the
// core goes to whoever waits for it). Spinning longer instead took the core from the thread with work
// there (tiny B=8 T=128 beside another build: spinning 0 us 71.0 ms a step, 5 us 71.8, 50 us 75.4,
// 300 us 88.9; quiet: 41.3 / 40.7 / 40.0 / 38.7).
constexpr int kSpinPauses = 128;
constexpr auto kYieldFor = std::chrono::microseconds(200);

thread_local bool tls_in_chunk = false;

void pause_a_while() { _mm_pause(); }

// Sleeps while *word == expected (or until woken); wakes every sleeper on word. Plain futex calls with
// the pool's own sleeper count (publish / sleep_until_changed) rather than std::atomic::wait and
// notify_all, whose waiter bookkeeping is the library's: the protocol stays visible here.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

class Pool {
 public:
  // Never destroyed: the workers sleep (or spin briefly) until the process exits, so nothing waits
  // for them at exit, and a forked child (which has none of them) never tries to join them.
  static Pool& get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  // False when another thread's job is running (the caller then runs its chunks inline).
  bool run(int64_t n, int64_t grain, detail::ChunkFn fn, void* ctx, int threads) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    ensure_workers(threads - 1);
    const int64_t chunks = (n + grain - 1) / grain;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    grain_.store(grain, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    participants_.store(threads, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t epoch = ++epoch_;
    state_.store(static_cast<uint64_t>(epoch) << 32 | static_cast<uint64_t>(chunks), std::memory_order_release);
    publish(epoch);
    tls_in_chunk = true;
    work(epoch, 0);
    tls_in_chunk = false;
    // Wait only for chunks that other threads are running; yield if one of them was descheduled.
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins < 4096) pause_a_while();
      else std::this_thread::yield();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  Pool() = default;

  // Tells the workers about a new job. With sleep_until_changed's order (sleepers_ up, then
  // wake_ read; both sequentially consistent) either the sleeper sees the new value or this sees the
  // sleeper: no lost wake-up. The system call only when a worker sleeps.
  void publish(uint32_t value) {
    wake_.store(value);
    if (sleepers_.load() > 0) futex_wake_all(&wake_);
  }

  void sleep_until_changed(uint32_t seen) {
    sleepers_.fetch_add(1);
    while (wake_.load() == seen) futex_wait(&wake_, seen);
    sleepers_.fetch_sub(1);
  }

  void ensure_workers(int want) {
    while (workers_ < want) {
      const int id = workers_ + 1;  // the caller is participant 0
      std::thread([this, id] { worker(id); }).detach();
      ++workers_;
    }
  }

  // Claims and runs chunks of job `epoch` until none is left (or the job is not `epoch` any more).
  void work(uint32_t epoch, int id) noexcept {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(s >> 32) != epoch) return;
      const int64_t left = static_cast<int64_t>(s & 0xffffffffu);
      if (left == 0) return;
      // job `epoch` has unclaimed chunks: its parameters stand until the claim below (see the top)
      const detail::ChunkFn fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t n = n_.load(std::memory_order_relaxed), grain = grain_.load(std::memory_order_relaxed);
      const int64_t chunks = chunks_.load(std::memory_order_relaxed);
      if (id >= participants_.load(std::memory_order_relaxed)) return;
      std::atomic_thread_fence(std::memory_order_acquire);
      if (!state_.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t k = chunks - left;
      fn(ctx, k * grain, std::min(n, (k + 1) * grain));
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void worker(int id) {
    tls_in_chunk = true;  // a parallel_for inside a chunk runs inline
    uint32_t seen = wake_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t e = seen;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 1; (e = wake_.load(std::memory_order_acquire)) == seen; ++i) {
        if (i < kSpinPauses) {
          pause_a_while();
        } else if (std::chrono::steady_clock::now() - t0 < kYieldFor) {
          std::this_thread::yield();  // a no-op on an idle core; elsewhere the core goes to whoever waits
        } else {
          sleep_until_changed(seen);
        }
      }
      seen = e;
      work(e, id);
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> state_{0};
  std::atomic<uint32_t> wake_{0};  // the latest epoch (or shutdown); idle workers watch it
  std::atomic<int> sleepers_{0};
  uint32_t epoch_ = 0;  // written by the job's caller only (under busy_)
  std::atomic<int64_t> done_{0}, n_{0}, grain_{1}, chunks_{0};
  std::atomic<detail::ChunkFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> participants_{1};
  int workers_ = 0;  // started so far (by job callers only, under busy_)
};

void run_inline(int64_t n, int64_t grain, detail::ChunkFn fn, void* ctx) noexcept {
  for (int64_t b = 0; b < n; b += grain) fn(ctx, b, std::min(n, b + grain));
}

}  // namespace

int cpu_threads() { return std::max(1, omp_get_max_threads()); }

bool in_parallel_for() { return tls_in_chunk; }

namespace detail {
void parallel_run(int64_t n, int64_t grain, ChunkFn fn, void* ctx) {
  const int64_t chunks = (n + grain - 1) / grain;
  LMF_CHECK(chunks < (int64_t{1} << 31), "parallel_for: ", chunks, " chunks (n=", n, ", grain=", grain, ")");
  const int threads = static_cast<int>(std::min<int64_t>(cpu_threads(), chunks));
  if (threads <= 1 || tls_in_chunk || !Pool::get().run(n, grain, fn, ctx, threads)) run_inline(n, grain, fn, ctx);
}
}  // namespace detail

}  // namespace lmf
