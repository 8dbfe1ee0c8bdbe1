// alloc_counter.h: counts every malloc-family call of the process (operator new included, it
// calls malloc) while counting is on, for the "no allocation inside a step" tests.
//
// It DEFINES malloc, calloc, realloc, aligned_alloc and posix_memalign, forwarding to glibc's
// __libc_* entry points: include it in exactly one translation unit of a test binary.
// LMF_TRACE_ALLOCS=1 prints a backtrace of the first three counted allocations (debugging aid).
#pragma once
#include <execinfo.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>

extern "C" void* __libc_malloc(size_t);
extern "C" void* __libc_calloc(size_t, size_t);
extern "C" void* __libc_realloc(void*, size_t);
extern "C" void* __libc_memalign(size_t, size_t);

namespace lmf::test {
inline std::atomic<long> g_allocs{0};
inline std::atomic<bool> g_counting{false};

inline void count_alloc() {
  if (!g_counting.load(std::memory_order_relaxed)) return;
  long n = g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (n < 3 && std::getenv("LMF_TRACE_ALLOCS")) {
    g_counting = false;
    void* bt[16];
    int k = backtrace(bt, 16);
    backtrace_symbols_fd(bt, k, 2);
    (void)!write(2, "----\n", 5);
    g_counting = true;
  }
}

// Allocations counted while `f` runs.
template <class F>
long count_allocations(F&& f) {
  g_allocs = 0;
  g_counting = true;
  f();
  g_counting = false;
  return g_allocs.load();
}
}  // namespace lmf::test

extern "C" void* malloc(size_t n) { lmf::test::count_alloc(); return __libc_malloc(n); }
extern "C" void* calloc(size_t a, size_t b) { lmf::test::count_alloc(); return __libc_calloc(a, b); }
extern "C" void* realloc(void* p, size_t n) { lmf::test::count_alloc(); return __libc_realloc(p, n); }
extern "C" void* aligned_alloc(size_t a, size_t n) { lmf::test::count_alloc(); return __libc_memalign(a, n); }
extern "C" int posix_memalign(void** p, size_t a, size_t n) {
  lmf::test::count_alloc();
  *p = __libc_memalign(a, n);
  return *p ? 0 : ENOMEM;
}
