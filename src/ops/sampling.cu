// sampling.cu: CUDA launchers of batched next-token sampling (sampling.h); the CPU reference is
// sampling.cpp, and the two agree token for token (tests/test_cuda_sampling.cpp).
//
// One block of kThreads threads per row, rows independent: a row's results depend only on its logits,
// its SampleParams and V (never on M, W or the other rows), and every reduction has a fixed order, so
// they are bitwise reproducible and batch-invariant. No allocation, no host synchronisation (it runs
// inside the engine's CUDA graphs); the launcher only checks sizes it was given.
//
// Layout: logits (M, W), the first V columns used, f32 or bf16; thread t owns the vectors (kVec
// consecutive columns: 16 bytes when every row is 16-byte aligned, else one column) t, t + kThreads,
// ... and visits them in order. Ordering: a column's key is its logit's order-preserving integer
// (order_key: -0 counts as +0, as the CPU's `!=`; bf16 keys are 16 bits), and "column a precedes
// column b" means (key desc, id asc), the CPU's ByLogit. A prefix of that order is a Cut {val, id}:
// the columns with key > val, or key == val and column <= id.
//
// Pass 1 (every row): max and the sum of exp(l - max) (per thread online, one rescale per vector,
// __expf; then a fixed butterfly) and the argmax (key, lowest id): a greedy row is done. Rows whose
// bytes fit (kCacheMaxBytes: bf16 V <= 102,400, f32 V <= 51,200) are copied to shared memory on the
// way, and the later passes read them there; larger rows are re-read from global memory (L2).
// The draw (temperature > 0): one more pass, the Gumbel-max argmax over the columns inside the cut
// (every column without top_k/top_p, the common case: two passes in all). Every thread's best starts
// at the argmax column's score (the argmax is inside every cut), so a column whose best possible score
// l / T + 17.5 (17.5 > the largest Gumbel value of a 24-bit u) is below the thread's best draws
// nothing (no Philox, no logs): exact, as fma rounding is monotone; for LLM logits most columns.
// Cuts without sorting: radix select over the keys, 8 bits a pass from the top (2 passes for bf16,
// 4 for f32): a pass histograms the digit of the columns still in range (256 bins in shared memory;
// integer atomics, warp-aggregated with __match_any_sync, so the counts are exact and
// order-independent) and one warp scans the bins from the top for the bin where the running metric
// reaches the target. top_k and top_n: the metric is the count (target k). top_p: the metric is the
// mass exp((l - max) / temperature) of the candidates left by top_k, in 2^-39 fixed point (64-bit
// integer sums: exact, order-independent), target ceil(top_p * total). Ties at the threshold key are
// cut by id exactly as the ordered definition says (the c lowest ids: a second radix select over
// V - 1 - id, only when the cut falls inside a group of equal logits). Then the draw above.
// Gumbel scores are the CPU's float expression: fmaf(l, 1/T, -logf(-logf(u))) (x86-64-v3 builds of
// sampling.cpp contract it to an FMA), u from Philox (one block per four columns), CUDA's logf (<= 1
// ulp, glibc's < 1 ulp): a GPU token differs from the CPU's only when two scores are within an ulp or
// two.
// top_p masses: fp32 exp of the correctly rounded (l - max) / T, then fixed point, against the CPU's
// double: the cut can differ where a prefix's mass is within ~1e-6 of top_p times the total.
// top_n: the top_n columns by the same radix select (count), gathered into shared memory and ranked
// by counting (top_n <= kMaxTopN). logprobs = (l - max) - log(sum), fp32.
#include <climits>
#include <cmath>
#include <cstring>

#include "core/check.h"
#include "core/cuda_launch.cuh"
#include "ops/packed.cuh"
#include "ops/sampling.h"

namespace lmf::cuda {
namespace {

constexpr int kThreads = 1024;         // one block per row; block_combine assumes 32 warps
constexpr int kBins = 256;             // radix digit: 8 bits
constexpr int kMaxTopN = 1024;         // top log-probabilities per row
constexpr int64_t kMaxV = 1 << 24;     // ids and counts in 32 bits; fixed-point mass sums below 2^63
constexpr float kMassScale = 0x1p39f;  // fixed point of a weight in [0, 1]
constexpr float kGumbelMax = 17.5f;    // > -log(-log(1 - 2^-25)) = 17.33, the largest Gumbel value
constexpr size_t kCacheMaxBytes = 200 * 1024;
constexpr unsigned kFull = 0xffffffffu;

// The shared state of a row's block, at the start of the dynamic shared memory (all of it dynamic, so
// that the launch helper opts in whenever the total passes 48 KiB); the row cache follows it.
struct Shared {
  uint32_t cnt[kBins];              // radix histogram: columns per digit
  unsigned long long mass[kBins];   // and their fixed-point mass (top_p)
  uint2 red[32];                    // block_combine's per-warp partials
  struct Step {                     // one radix pass's choice (scan_bins)
    uint32_t bin, n_above, n_bin;   // the digit; columns in range above it; columns in it
    unsigned long long above, m_bin, target;  // metric above it (count or mass); its mass; the target
  } step;
  int n_top;                        // top_n gather slots
  unsigned long long top[kMaxTopN]; // (key << 32) | (~id): larger = earlier in the order
};
constexpr size_t kSharedBytes = (sizeof(Shared) + 15) / 16 * 16;  // the row cache starts here

// ---- keys, cuts --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t order_key(float x) {  // monotone in x; -0 and +0 equal
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
template <class T>
inline constexpr int kKeyBits = sizeof(T) == 2 ? 16 : 32;  // a bf16 logit's low 16 float bits are 0
template <class T>
__device__ __forceinline__ uint32_t key_of(float x) {
  return order_key(x) >> (32 - kKeyBits<T>);
}

struct Cut {  // the prefix of the order ending at (key val, column id)
  uint32_t val;
  int id;
};
__device__ __forceinline__ bool within(const Cut& c, uint32_t key, int id) {
  return key > c.val || (key == c.val && id <= c.id);
}

// ---- the row -----------------------------------------------------------------------------------

// Row of V columns at p (global memory or the shared cache), read in vectors of kVec columns.
template <class T, int kVec>
struct RowView {
  const T* p;
  int V, nvec;
  // f(id0, x[kVec], n): thread t's vectors t, t + kThreads, ... in order; n valid columns (0 past the
  // row). The trip count is the same in every thread, so f may use warp collectives.
  template <class F>
  __device__ __forceinline__ void each(F&& f) const {
    for (int v0 = 0; v0 < nvec; v0 += kThreads) {
      const int v = v0 + static_cast<int>(threadIdx.x);
      float x[kVec];
      int n = 0;
      if (v < nvec) {
        load_f32<kVec>(x, p + static_cast<int64_t>(v) * kVec);
        n = min(kVec, V - v * kVec);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = -INFINITY;
      }
      f(v * kVec, x, n);
    }
  }
};

// ---- block reductions of (value, id) pairs -------------------------------------------------------

template <class P>
__device__ __forceinline__ P shfl_xor(P v, int off) {
  static_assert(sizeof(P) == 8);
  uint2 w;
  memcpy(&w, &v, 8);
  w.x = __shfl_xor_sync(kFull, w.x, off);
  w.y = __shfl_xor_sync(kFull, w.y, off);
  memcpy(&v, &w, 8);
  return v;
}

// The xor butterfly of block_reduce.cuh over 8-byte pairs with a commutative combine (so every lane
// ends with the same bits); returns the block's result to every thread. Contains __syncthreads().
template <class P, class F>
__device__ __forceinline__ P block_combine(P v, F comb, uint2* scratch) {
  static_assert(kThreads == 32 * 32);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = comb(v, shfl_xor(v, off));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) memcpy(&scratch[warp], &v, 8);
  __syncthreads();
  P r;
  memcpy(&r, &scratch[lane], 8);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) r = comb(r, shfl_xor(r, off));
  __syncthreads();
  return r;
}

struct Lse {  // running max and sum of exp(l - max)
  float m, s;
};
__device__ __forceinline__ Lse lse_combine(Lse a, Lse b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, (a.m == -INFINITY ? 0.0f : a.s * __expf(a.m - m)) + (b.m == -INFINITY ? 0.0f : b.s * __expf(b.m - m))};
}

struct ArgKey {  // argmax by key, ties: lowest id
  uint32_t key;
  int id;
};
__device__ __forceinline__ ArgKey arg_combine(ArgKey a, ArgKey b) {
  return (b.key > a.key || (b.key == a.key && b.id < a.id)) ? b : a;
}

struct Best {  // Gumbel-max: best score, ties: lowest id
  float s;
  int id;
};
__device__ __forceinline__ bool better(float s, int id, const Best& b) { return s > b.s || (s == b.s && id < b.id); }
__device__ __forceinline__ Best best_combine(Best a, Best b) { return better(b.s, b.id, a) ? b : a; }

// ---- the Gumbel-max draw -----------------------------------------------------------------------

// -log(-log(u)) for sample_uniform's u of the 32-bit Philox word w (the same float expression).
__device__ __forceinline__ float neg_gumbel(uint32_t w) {
  const float u = (static_cast<float>(w >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return logf(-logf(u));
}

// best = the better of best and the candidates among columns id0 .. id0 + kVec - 1 (score
// fmaf(l, inv_t, -log(-log(u))), as sampling.cpp). Columns whose bound fmaf(l, inv_t, kGumbelMax) is
// below best.s cannot reach it (fma rounding is monotone) and draw nothing; a Philox block only when
// one of its four columns may.
template <int kVec>
__device__ __forceinline__ void gumbel_draw(Best& best, int id0, const float (&x)[kVec], const bool (&cand)[kVec],
                                            uint64_t seed, uint64_t index, float inv_t) {
  if constexpr (kVec % 4 == 0) {  // id0 % 4 == 0: one Philox block per 4 columns, sample_uniform's layout
    const uint64_t stream = (kSampleStream << 40) ^ index;
#pragma unroll
    for (int g = 0; g < kVec / 4; ++g) {
      bool keep[4], any = false;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        keep[k] = cand[4 * g + k] && fmaf(x[4 * g + k], inv_t, kGumbelMax) >= best.s;
        any = any || keep[k];
      }
      if (!any) continue;
      const auto b = philox4x32(seed, stream, static_cast<uint64_t>(id0 + 4 * g) >> 2);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!keep[k]) continue;
        const float s = fmaf(x[4 * g + k], inv_t, -neg_gumbel(b[k]));
        if (better(s, id0 + 4 * g + k, best)) best = {s, id0 + 4 * g + k};
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (!cand[k] || !(fmaf(x[k], inv_t, kGumbelMax) >= best.s)) continue;
      const float u = sample_uniform(seed, index, id0 + k);
      const float s = fmaf(x[k], inv_t, -logf(-logf(u)));
      if (better(s, id0 + k, best)) best = {s, id0 + k};
    }
  }
}

// ---- radix select --------------------------------------------------------------------------------

// Adds the active lanes' columns to bin `bin` (count, and with kMass their fixed-point mass q <= 2^39):
// one atomic per distinct bin of the warp. Integer sums: the result is independent of the order.
template <bool kMass>
__device__ __forceinline__ void hist_add(Shared& sm, bool act, uint32_t bin, unsigned long long q) {
  if (__ballot_sync(kFull, act) == 0) return;
  const unsigned peers = __match_any_sync(kFull, act ? bin : 0xffffffffu);
  if (!act) return;
  const bool leader = __ffs(peers) - 1 == static_cast<int>(threadIdx.x % 32);
  if constexpr (kMass) {  // 32 lanes: the 19 high bits sum below 2^24, the 20 low bits below 2^25
    const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(q >> 20));
    const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(q & 0xfffffu));
    if (leader) atomicAdd(&sm.mass[bin], (static_cast<unsigned long long>(hi) << 20) + lo);
  }
  if (leader) atomicAdd(&sm.cnt[bin], static_cast<unsigned>(__popc(peers)));
}

// Warp 0: the bins from the top (255) down; the first where base + running metric >= target (metric:
// the mass with kMass, else the count). top_p >= 0 (the first mass pass): target = ceil(top_p total)
// first, clamped to [1, total]. No such bin (rounding; an empty range): the lowest non-empty bin.
template <bool kMass>
__device__ void scan_bins(Shared& sm, unsigned long long base, unsigned long long target, float top_p) {
  const int lane = threadIdx.x;
  uint32_t c[8], lc = 0;
  unsigned long long m[8], lm = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int b = kBins - 1 - 8 * lane - j;
    c[j] = sm.cnt[b];
    m[j] = kMass ? sm.mass[b] : c[j];
    lc += c[j];
    lm += m[j];
  }
  uint32_t ic = lc;  // inclusive scans over the lanes (bins in descending order)
  unsigned long long im = lm;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t tc = __shfl_up_sync(kFull, ic, off);
    const unsigned long long tm = __shfl_up_sync(kFull, im, off);
    if (lane >= off) {
      ic += tc;
      im += tm;
    }
  }
  if (top_p >= 0.0f) {
    const unsigned long long total = __shfl_sync(kFull, im, 31);
    const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
    target = t >= static_cast<double>(total) ? total : static_cast<unsigned long long>(t);
    if (target == 0) target = 1;
  }
  // The choice, found with unrolled loops (no local-memory arrays): the first bin of the crossing lane,
  // else the last non-empty bin of the lowest non-empty lane.
  const unsigned hit = __ballot_sync(kFull, base + im >= target);
  const unsigned nonempty = __ballot_sync(kFull, lc > 0);
  const int owner = hit != 0 ? __ffs(hit) - 1 : (nonempty != 0 ? 31 - __clz(nonempty) : -1);
  if (owner < 0) {  // nothing in range
    if (lane == 0) sm.step = {0, 0, 0, 0, 0, target};
    return;
  }
  if (lane != owner) return;
  unsigned long long cum = im - lm;  // metric of the lanes above, relative to base
  uint32_t cc = ic - lc;
  Shared::Step st{0, 0, 0, 0, 0, target};
  bool found = false;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const bool take = hit != 0 ? !found && base + cum + m[j] >= target : c[j] > 0;
    if (take) st = {static_cast<uint32_t>(kBins - 1 - 8 * lane - j), cc, c[j], cum, kMass ? m[j] : 0ull, target};
    found = found || take;
    cum += m[j];
    cc += c[j];
  }
  sm.step = st;
}

struct Pick {
  uint32_t val;                   // the value of the element reaching the target
  uint32_t n_above, n_eq;         // selected elements with a larger value; with this value
  unsigned long long above, m_eq; // their metric (count or mass) above; the mass of the equal ones
  unsigned long long target;
};

// Among the columns with in(id, x), by value(id, x) (nbits significant bits) in descending order: the
// value where the running metric first reaches `target` (count mode: the target-th largest value; mass
// mode: target = ceil(top_p * total mass), weight(x) the fixed-point mass; columns of mass 0 are left
// out, as they never complete a prefix). Every thread calls it and gets the same Pick; ceil(nbits / 8)
// passes over the row.
template <bool kMass, class T, int kVec, class In, class Value, class Weight>
__device__ Pick radix_select(Shared& sm, const RowView<T, kVec>& row, In in, Value value, Weight weight, int nbits,
                             unsigned long long target, float top_p) {
  const int tid = threadIdx.x;
  const int first = (nbits + 7) / 8 * 8 - 8;
  uint32_t prefix = 0, hi_mask = 0, n_above = 0;
  unsigned long long above = 0;
  Shared::Step st{};
  for (int shift = first; shift >= 0; shift -= 8) {
    for (int b = tid; b < kBins; b += kThreads) {
      sm.cnt[b] = 0;
      sm.mass[b] = 0;
    }
    __syncthreads();
    row.each([&](int id0, const float (&x)[kVec], int n) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        bool act = k < n;
        uint32_t v = 0;
        unsigned long long q = 0;
        if (act) {
          v = value(id0 + k, x[k]);
          act = (v & hi_mask) == prefix && in(id0 + k, x[k]);
          // mass: a column of no mass can neither reach the target nor move it; leave it out
          if (kMass && act) act = (q = weight(x[k])) > 0;
        }
        hist_add<kMass>(sm, act, (v >> shift) & 0xffu, q);
      }
    });
    __syncthreads();
    if (tid < 32) scan_bins<kMass>(sm, above, target, kMass && shift == first ? top_p : -1.0f);
    __syncthreads();
    st = sm.step;
    prefix |= st.bin << shift;
    hi_mask |= 0xffu << shift;
    above += st.above;
    n_above += st.n_above;
    target = st.target;
  }
  return {prefix, n_above, st.n_bin, above, st.m_bin, target};
}

__device__ __forceinline__ int id_bits(int V) { return V > 1 ? 32 - __clz(V - 1) : 1; }

// The cut that keeps the first r_eq columns of the key group k.val inside prev (by id).
template <class T, int kVec>
__device__ Cut cut_ties(Shared& sm, const RowView<T, kVec>& row, const Cut& prev, const Pick& k, uint32_t r_eq) {
  Cut c{k.val, k.val == prev.val ? prev.id : INT_MAX};  // the whole group inside prev
  if (r_eq >= k.n_eq) return c;
  const int V = row.V;
  const uint32_t val = k.val;
  auto in_group = [&](int id, float x) {
    const uint32_t key = key_of<T>(x);
    return key == val && within(prev, key, id);
  };
  auto rev_id = [V](int id, float) { return static_cast<uint32_t>(V - 1 - id); };  // largest: lowest id
  auto none = [](float) { return 0ull; };
  const Pick t = radix_select<false>(sm, row, in_group, rev_id, none, id_bits(V), r_eq, -1.0f);
  c.id = V - 1 - static_cast<int>(t.val);
  return c;
}

// The first r columns (in the order) inside prev.
template <class T, int kVec>
__device__ Cut cut_count(Shared& sm, const RowView<T, kVec>& row, const Cut& prev, uint32_t r) {
  auto in_prev = [&](int id, float x) { return within(prev, key_of<T>(x), id); };
  auto key = [](int, float x) { return key_of<T>(x); };
  auto none = [](float) { return 0ull; };
  const Pick k = radix_select<false>(sm, row, in_prev, key, none, kKeyBits<T>, r, -1.0f);
  return cut_ties(sm, row, prev, k, r - k.n_above);
}

// The shortest prefix of prev whose mass exp((l - mx) / temperature) reaches top_p of prev's.
template <class T, int kVec>
__device__ Cut cut_mass(Shared& sm, const RowView<T, kVec>& row, const Cut& prev, float top_p, float mx,
                        float temperature) {
  auto in_prev = [&](int id, float x) { return within(prev, key_of<T>(x), id); };
  auto key = [](int, float x) { return key_of<T>(x); };
  auto weight = [mx, temperature](float x) -> unsigned long long {
    const float d = x - mx;
    if (d < -28.0f * temperature) return 0;  // exp(-28) 2^39 = 0.38: rounds to 0 anyway, skip the exp
    return __float2ull_rn(expf(__fdiv_rn(d, temperature)) * kMassScale);
  };
  const Pick k = radix_select<true>(sm, row, in_prev, key, weight, kKeyBits<T>, 0, top_p);
  // The equal columns weigh the same: the fewest of them that reach the target (all when none do).
  uint32_t c = k.n_eq;
  if (k.n_eq > 0 && k.m_eq > 0 && k.target > k.above) {
    const unsigned long long q = k.m_eq / k.n_eq, need = (k.target - k.above + q - 1) / q;
    c = need < 1 ? 1 : (need < k.n_eq ? static_cast<uint32_t>(need) : k.n_eq);
  }
  return cut_ties(sm, row, prev, k, c);
}

// ---- the kernel ----------------------------------------------------------------------------------

// tokens, logprobs: (M); top_ids, top_lps: (M, top_n); logits: (M, W); params: (M). One block per row.
// Dynamic shared memory: Shared, then with `cache` the row (its nvec vectors, copied in pass 1 and read
// there afterwards).
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    sample_tokens_kernel(int32_t* __restrict__ tokens, float* __restrict__ logprobs, int32_t* __restrict__ top_ids,
                         float* __restrict__ top_lps, int top_n, const T* __restrict__ logits, int64_t W, int V,
                         const SampleParams* __restrict__ params, bool cache) {
  extern __shared__ uint4 dyn_smem[];
  Shared& sm = *reinterpret_cast<Shared*>(dyn_smem);
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const T* g = logits + row * W;
  T* c = reinterpret_cast<T*>(reinterpret_cast<char*>(dyn_smem) + kSharedBytes);
  const SampleParams p = params[row];
  const int nvec = (V + kVec - 1) / kVec;
  const bool greedy = p.temperature == 0.0f;
  const float inv_t = greedy ? 0.0f : __fdiv_rn(1.0f, p.temperature);

  // Pass 1: max and sum of exp, argmax; the cache filled.
  Lse lse{-INFINITY, 0.0f};
  ArgKey arg{0, 0};  // key 0: below every float's (no out-of-row id, whatever the row holds)
  for (int v0 = 0; v0 < nvec; v0 += kThreads) {
    const int v = v0 + tid;
    if (v >= nvec) break;
    T raw[kVec];
    load_raw<kVec>(raw, g + static_cast<int64_t>(v) * kVec);
    if (cache) store_raw<kVec>(c + static_cast<int64_t>(v) * kVec, raw);
    float x[kVec];
    const int n = min(kVec, V - v * kVec);
    float vm = -INFINITY;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      x[k] = to_f32(raw[k]);
      if (k < n) vm = fmaxf(vm, x[k]);
    }
    if (vm > lse.m) {  // one rescale per vector
      lse.s = lse.m == -INFINITY ? 0.0f : lse.s * __expf(lse.m - vm);
      lse.m = vm;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= n) continue;
      if (x[k] > -INFINITY) lse.s += __expf(x[k] - lse.m);
      const uint32_t key = order_key(x[k]);
      if (key > arg.key) arg = {key, v * kVec + k};  // ids increase: the lowest id of a tie stays
    }
  }
  lse = block_combine(lse, lse_combine, sm.red);  // its barriers also publish the cache
  arg = block_combine(arg, arg_combine, sm.red);
  const float mx = lse.m, log_sum = logf(lse.s);
  const Cut all{0, INT_MAX};  // every column
  const RowView<T, kVec> rv{cache ? c : g, V, nvec};

  // top_n: the first top_n columns, gathered (any order) and ranked by counting.
  if (top_n > 0) {
    const Cut cn = cut_count(sm, rv, all, static_cast<uint32_t>(top_n));
    if (tid == 0) sm.n_top = 0;
    __syncthreads();
    rv.each([&](int id0, const float (&x)[kVec], int n) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const uint32_t key = key_of<T>(x[k]);
        if (k < n && within(cn, key, id0 + k)) {
          const int slot = atomicAdd(&sm.n_top, 1);
          if (slot < kMaxTopN)
            sm.top[slot] = (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(id0 + k));
        }
      }
    });
    __syncthreads();
    const int n = min(sm.n_top, top_n);
    for (int s = tid; s < n; s += kThreads) {
      const unsigned long long e = sm.top[s];
      int rank = 0;
      for (int j = 0; j < n; ++j) rank += sm.top[j] > e;
      const int id = static_cast<int>(0xffffffffu - static_cast<uint32_t>(e));
      top_ids[row * top_n + rank] = id;
      top_lps[row * top_n + rank] = (to_f32(rv.p[id]) - mx) - log_sum;
    }
  }

  int token = arg.id;
  if (!greedy) {  // cut to top_k, then to top_p (none: every column), then draw inside the cut
    Cut cut = all;
    if (p.top_k > 0 && p.top_k < V) cut = cut_count(sm, rv, cut, static_cast<uint32_t>(p.top_k));
    if (p.top_p < 1.0f) cut = cut_mass(sm, rv, cut, p.top_p, mx, p.temperature);
    // The argmax is inside every cut (first in the order): its score seeds every thread's best, so
    // that from the first column on, columns that cannot reach it draw nothing.
    const float s_arg =
        fmaf(to_f32(rv.p[arg.id]), inv_t, -logf(-logf(sample_uniform(p.seed, p.index, arg.id))));
    Best best{s_arg, arg.id};
    rv.each([&](int id0, const float (&x)[kVec], int n) {
      bool cand[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) cand[k] = k < n && within(cut, key_of<T>(x[k]), id0 + k);
      gumbel_draw<kVec>(best, id0, x, cand, p.seed, p.index, inv_t);
    });
    best = block_combine(best, best_combine, sm.red);
    token = best.id;
  }
  if (tid == 0) {
    tokens[row] = token;
    logprobs[row] = (to_f32(rv.p[token]) - mx) - log_sum;
  }
}

template <class T>
void sample_rows(int32_t* tokens, float* logprobs, int32_t* top_ids, float* top_logprobs, int64_t top_n,
                 const T* logits, int64_t M, int64_t W, int64_t V, const SampleParams* params) {
  const char* op = "sample_tokens";
  LMF_CHECK(V >= 1 && V <= W && V <= kMaxV, op, ": V=", V, " must be in [1, min(W=", W, ", ", kMaxV, ")]");
  LMF_CHECK(top_n >= 0 && top_n <= V && top_n <= kMaxTopN, op, ": top_n=", top_n, " must be in [0, min(V=", V,
            ", ", kMaxTopN, ")] on the GPU");
  if (M == 0) return;
  constexpr int kP = kPack<T>;
  const bool vec = W % kP == 0 && aligned16(logits);
  const int64_t row_bytes = vec ? ceil_div(V, kP) * 16 : V * static_cast<int64_t>(sizeof(T));
  const bool cache = row_bytes <= static_cast<int64_t>(kCacheMaxBytes) &&
                     kSharedBytes + static_cast<size_t>(row_bytes) <= cuda_limits().smem_per_block_optin;
  const LaunchSpec spec{op, shape_text("M=", M, " W=", W, " V=", V, " top_n=", top_n, vec ? " vec" : " scalar"),
                        {M, 1, 1}, {kThreads, 1, 1}, kSharedBytes + (cache ? static_cast<size_t>(row_bytes) : 0)};
  if (vec)
    launch(spec, sample_tokens_kernel<T, kP>, tokens, logprobs, top_ids, top_logprobs, static_cast<int>(top_n), logits,
           W, static_cast<int>(V), params, cache);
  else
    launch(spec, sample_tokens_kernel<T, 1>, tokens, logprobs, top_ids, top_logprobs, static_cast<int>(top_n), logits,
           W, static_cast<int>(V), params, cache);
}

}  // namespace

void sample_tokens(int32_t* tokens, float* logprobs, int32_t* top_ids, float* top_logprobs, int64_t top_n,
                   const bf16* logits, int64_t M, int64_t W, int64_t V, const SampleParams* params) {
  sample_rows(tokens, logprobs, top_ids, top_logprobs, top_n, as_nv(logits), M, W, V, params);
}

void sample_tokens(int32_t* tokens, float* logprobs, int32_t* top_ids, float* top_logprobs, int64_t top_n,
                   const float* logits, int64_t M, int64_t W, int64_t V, const SampleParams* params) {
  sample_rows(tokens, logprobs, top_ids, top_logprobs, top_n, logits, M, W, V, params);
}

}  // namespace lmf::cuda
