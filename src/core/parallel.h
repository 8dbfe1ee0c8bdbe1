// parallel.h: the CPU backend's worker threads. Every parallel loop of the CPU ops goes through
// parallel_for; nothing else in lmforge starts compute threads (OpenBLAS is pinned to one thread,
// ops/blas.h).
//
// Why not OpenMP's parallel for: its end-of-loop barrier waits for every thread of the team. On a
// machine whose cores are shared (another process, a build, PyTorch in the same benchmark) a thread
// that is descheduled before it reaches the loop holds the whole step for a scheduler time slice,
// at every op; OpenMP's default busy-waiting makes that worse, its passive policy makes every op
// pay a wake-up. Here:
// - The work is a fixed list of chunks (fixed by n and grain, never by the thread count). Threads
//   claim chunks one at a time from a shared counter; the caller claims chunks too and, once none
//   is left, waits only for chunks already running. A worker that wakes late finds nothing to do
//   and is never waited for, so a busy machine degrades to the caller running everything itself.
// - Between loops the workers spin for a few microseconds, then yield the core for a while, then
//   sleep on a futex (parallel.cpp): back-to-back ops of a step see no wake-up latency, a shared
//   machine loses little to spinning, and an idle process uses no CPU.
// Determinism: a chunk's result may not depend on which thread runs it or on the other chunks'
// progress (each chunk writes its own outputs; a reduction writes one partial per chunk and the
// caller combines them in chunk order). Then results are the same bits for any thread count.
//
// Thread count: omp_get_max_threads() at each call (OMP_NUM_THREADS, omp_set_num_threads), so the
// usual knob and the tests that vary it keep working; workers start at the first loop that needs
// them (set-up: the first training step is a warm-up) and stay. A parallel_for called from inside a
// chunk runs its chunks inline on the calling thread (same chunks, same results).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lmf {

// Threads a parallel_for uses now (the caller included).
int cpu_threads();

// True on a thread that is running a chunk of a parallel_for (nested loops run inline).
bool in_parallel_for();

namespace detail {
using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_run(int64_t n, int64_t grain, ChunkFn fn, void* ctx);
}  // namespace detail

// Calls fn(begin, end) for the chunks [k grain, min(n, (k + 1) grain)) of [0, n), k = 0, 1, ...,
// spread over cpu_threads() threads; returns when all have run. grain >= 1. One chunk (n <= grain),
// one thread or a nested call: the chunks run in order on the calling thread. fn must not throw
// (an exception escaping a chunk terminates the process, as it would in an OpenMP loop).
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  auto call = [](void* ctx, int64_t b, int64_t e) { (*static_cast<std::remove_reference_t<F>*>(ctx))(b, e); };
  detail::parallel_run(n, grain, call, const_cast<void*>(static_cast<const void*>(&fn)));
}

// A chunk size for loops over independent rows: at most kMaxChunks chunks of at least min_grain rows.
// Fixed by n (not by the thread count): 64 chunks keep 2 to 16 threads balanced even when one starts
// late; min_grain keeps each chunk worth its claim (a few microseconds of work).
inline int64_t grain_for(int64_t n, int64_t min_grain) {
  constexpr int64_t kMaxChunks = 64;
  return std::max<int64_t>(std::max<int64_t>(min_grain, 1), (n + kMaxChunks - 1) / kMaxChunks);
}

}  // namespace lmf
