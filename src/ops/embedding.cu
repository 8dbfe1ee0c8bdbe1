// embedding.cu: CUDA launchers of the token + learned position embedding (embedding.h).
//
// Forward: element-wise over (N, C), out = wte[token] + wpe[pos] (the CPU's expression, so exact).
// Backward, deterministic without float atomics:
// - dwte: the (token, row) pairs are sorted by token with CUB's radix sort, which is stable, so the
//   rows of each token come out in increasing n = b*T + t. Then one block per sorted index: the
//   block at the first index of a token's run owns that token's dwte row and, column by column,
//   adds the dout rows of the run in increasing n to the existing value (acc = dwte; acc += dout_n
//   ...). That is exactly the CPU reference's sequence of fp32 adds, so dwte matches it bitwise;
//   every other block exits. Rows of distinct tokens are disjoint: no two blocks write one element.
//   Token ids are not range-checked here (see embedding.h): the data loader has validated them.
// - dwpe: element-wise over (T, C), dwpe[t] += dout[0, t] + dout[1, t] + ... in b order (again the
//   CPU's order: bitwise equal).
// Workspace (lmf::cuda_workspace, size from embedding_backward_workspace): sorted keys, the row
// indices 0..N-1, the sorted row indices, then CUB's temporary storage; each 256-byte aligned.
// bf16 activations (docs/MIXED_PRECISION.md): the kernels are templates on the storage type of
// out/dout (float or __nv_bfloat16); wte, wpe, dwte, dwpe are always fp32. The forward computes the
// fp32 sum and rounds it once (round to nearest even, as lmf::bf16); the backward widens dout
// exactly, so both backward passes equal the f32 path run on the widened dout, bitwise
// (to_f32 / from_f32 from ops/packed.cuh).
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include <climits>
#include <string>

#include "ops/elementwise.cuh"
#include "ops/embedding.h"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

constexpr const char* kOpBackward = "embedding_backward";
// Threads per token run: one per W-column pack up to 1024 (then looping over the columns), so that a long
// run's dependent adds run in C parallel chains, each with kUnroll loads in flight.
constexpr int64_t kWteMaxBlock = 1024;
constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Radix-sort bits for ids in [0, Vp): the smallest b >= 1 with 2^b >= Vp.
int key_bits(int64_t Vp) {
  int bits = 1;
  while ((int64_t{1} << bits) < Vp) ++bits;
  return bits;
}

// Byte offsets of the workspace pieces.
struct SortLayout {
  size_t keys_sorted, rows, rows_sorted, temp, temp_bytes, total;
};

SortLayout sort_layout(int64_t N, int64_t Vp) {
  LMF_CHECK(N >= 0 && N <= INT_MAX, kOpBackward, ": N=", N, " tokens exceed the sort's int range");
  LMF_CHECK(Vp >= 1 && Vp <= INT_MAX, kOpBackward, ": Vp=", Vp, " outside [1, INT_MAX]");
  size_t temp_bytes = 0;
  LMF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), static_cast<int>(N), 0, key_bits(Vp),
                                                 stream()));
  const size_t arr = align_up(static_cast<size_t>(N) * sizeof(int32_t));
  return {0, arr, 2 * arr, 3 * arr, temp_bytes, 3 * arr + align_up(temp_bytes)};
}

// One block per sorted index i; only the first index of each token's run works. The run's end is
// found by a galloping search from i over the sorted keys (one load for a run of one, ~2 log2 L for
// a run of L); then each thread adds its W columns' dout rows in run order, loading kUnroll rows ahead
// of the adds: the same sequence of fp32 adds per column as the CPU (bitwise), with the loads of a long
// run (a frequent token: thousands of rows in natural text) in flight together instead of one
// dependent load per row. W = 16 bytes of Act per thread (8 bf16 or 4 f32 columns) when C allows it,
// else 1: small blocks, so that the many blocks of short runs (and the blocks that exit) pass quickly.
// dwte: (Vp, C) +=; dout: (N, C) float or __nv_bfloat16; keys: (N) sorted token ids; rows: (N) row n
// of each key, increasing within a run.
template <class Act, int W>
__global__ void embedding_wte_runs_kernel(float* dwte, const Act* dout, const int32_t* keys, const int32_t* rows,
                                          int64_t N, int64_t C) {
  constexpr int kUnroll = 16;
  const int64_t i = blockIdx.x;
  const int32_t tok = keys[i];
  if (i > 0 && keys[i - 1] == tok) return;  // not the start of a run
  int64_t lo = i + 1, hi = N;  // keys[lo - 1] == tok; the end is the first index in [lo, hi] whose key differs
  for (int64_t span = 1;; span *= 2) {
    const int64_t p = i + span;
    if (p >= N) break;
    if (keys[p] != tok) {
      hi = p;
      break;
    }
    lo = p + 1;
  }
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == tok) lo = mid + 1;
    else hi = mid;
  }
  const int64_t end = lo;
  float* dw = dwte + static_cast<int64_t>(tok) * C;
  for (int64_t c = threadIdx.x * static_cast<int64_t>(W); c < C; c += static_cast<int64_t>(blockDim.x) * W) {
    float acc[W];
    load_f32<W>(acc, dw + c);
    int64_t j = i;
    for (; j + kUnroll <= end; j += kUnroll) {
      float v[kUnroll][W];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) load_f32<W>(v[k], dout + static_cast<int64_t>(rows[j + k]) * C + c);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] += v[k][e];
    }
    for (; j < end; ++j) {
      float v[W];
      load_f32<W>(v, dout + static_cast<int64_t>(rows[j]) * C + c);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] += v[e];
    }
    store_f32<W>(dw + c, acc);
  }
}

// out: (B*T, C) float or __nv_bfloat16 = wte[token] + wpe[pos], summed in fp32, stored once.
template <class Act>
void forward_impl(Act* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                  int64_t C, const int32_t* positions, int64_t pos_offset) {
  if (wpe) {
    launch_elementwise("embedding_forward", B * T * C, [=] __device__(int64_t i) {
      const int64_t n = i / C, c = i - n * C;
      out[i] = from_f32<Act>(wte[static_cast<int64_t>(tokens[n]) * C + c] + wpe[(positions ? positions[n] : pos_offset + n % T) * C + c]);
    });
  } else {
    launch_elementwise("embedding_forward", B * T * C, [=] __device__(int64_t i) {
      const int64_t n = i / C, c = i - n * C;
      out[i] = from_f32<Act>(wte[static_cast<int64_t>(tokens[n]) * C + c]);
    });
  }
}

// dwte: (Vp, C) +=; dout: (N, C) float or __nv_bfloat16; tokens: (N).
template <class Act>
void backward_wte_impl(float* dwte, const Act* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t Vp) {
  if (N == 0 || C == 0) return;
  const SortLayout L = sort_layout(N, Vp);
  char* ws = static_cast<char*>(cuda_workspace(L.total, kOpBackward));
  int32_t* keys_sorted = reinterpret_cast<int32_t*>(ws + L.keys_sorted);
  int32_t* rows = reinterpret_cast<int32_t*>(ws + L.rows);
  int32_t* rows_sorted = reinterpret_cast<int32_t*>(ws + L.rows_sorted);
  launch_elementwise(kOpBackward, N, [=] __device__(int64_t i) { rows[i] = static_cast<int32_t>(i); });
  size_t temp_bytes = L.temp_bytes;
  LMF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(ws + L.temp, temp_bytes, tokens, keys_sorted, rows, rows_sorted,
                                                 static_cast<int>(N), 0, key_bits(Vp), stream()));
  const ShapeText shapes = shape_text("N=", N, " C=", C, " Vp=", Vp);
  constexpr int W = kPack<Act>;  // 16 bytes of dout per load
  if (C % W == 0 && aligned16(dwte, dout)) {
    const int64_t block = std::min<int64_t>(kWteMaxBlock, ceil_div(C / W, 32) * 32);
    launch({kOpBackward, shapes, {N, 1, 1}, {block, 1, 1}, 0}, embedding_wte_runs_kernel<Act, W>, dwte, dout,
           static_cast<const int32_t*>(keys_sorted), static_cast<const int32_t*>(rows_sorted), N, C);
  } else {
    const int64_t block = std::min<int64_t>(kWteMaxBlock, ceil_div(C, 32) * 32);
    launch({kOpBackward, shapes, {N, 1, 1}, {block, 1, 1}, 0}, embedding_wte_runs_kernel<Act, 1>, dwte, dout,
           static_cast<const int32_t*>(keys_sorted), static_cast<const int32_t*>(rows_sorted), N, C);
  }
}

// dwpe: (maxT, C) +=, rows [0, T); dout: (B, T, C) float or __nv_bfloat16.
template <class Act>
void backward_wpe_impl(float* dwpe, const Act* dout, int64_t B, int64_t T, int64_t C) {
  launch_elementwise(kOpBackward, T * C, [=] __device__(int64_t i) {
    float acc = dwpe[i];  // i = t * C + c
    for (int64_t b = 0; b < B; ++b) acc += to_f32(dout[b * T * C + i]);
    dwpe[i] = acc;
  });
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                       int64_t C, const int32_t* positions, int64_t pos_offset) {
  forward_impl(out, tokens, wte, wpe, B, T, C, positions, pos_offset);
}

void embedding_forward(bf16* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                       int64_t C, const int32_t* positions, int64_t pos_offset) {
  forward_impl(as_nv(out), tokens, wte, wpe, B, T, C, positions, pos_offset);
}

size_t embedding_backward_workspace(int64_t N, int64_t Vp) { return N > 0 ? sort_layout(N, Vp).total : 0; }

void embedding_backward_wte(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t Vp) {
  backward_wte_impl(dwte, dout, tokens, N, C, Vp);
}

void embedding_backward_wte(float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t Vp) {
  backward_wte_impl(dwte, as_nv(dout), tokens, N, C, Vp);
}

void embedding_backward_wpe(float* dwpe, const float* dout, int64_t B, int64_t T, int64_t C) {
  backward_wpe_impl(dwpe, dout, B, T, C);
}

void embedding_backward_wpe(float* dwpe, const bf16* dout, int64_t B, int64_t T, int64_t C) {
  backward_wpe_impl(dwpe, as_nv(dout), B, T, C);
}

}  // namespace lmf::cuda
