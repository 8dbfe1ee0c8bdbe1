// grouped_gemm.h: deterministic bf16 grouped ("segmented") GEMMs for Mixture-of-Experts (GPU only,
// sm_90a), one per pass of an expert's linear layer.
//
// Rows [offsets[g], offsets[g+1]) of the row buffers belong to group (expert) g, g in [0, G).
// offsets: device int32, G + 1 entries, offsets[0] == 0, non-decreasing, offsets[G] <= max_rows. They
// are read on the device only: no host synchronisation, so every call can be captured into a CUDA
// graph; the grid is sized for the worst case (ceil(max_rows / BM) + G row tiles) and tiles without
// work exit at once. Rows >= offsets[G] of the row outputs are never written.
//
// Numerics: bf16 operands, fp32 accumulation on the tensor cores, the output rounded once (bf16:
// round to nearest even). Deterministic: every output element is reduced inside one thread block
// in a fixed order (no atomics, no split over blocks), so repeated calls are bitwise identical.
//
// Preconditions (checked on the host, lmf::Error naming the op and the value): N, K, M positive
// multiples of 8; A, B, C 16-byte aligned device pointers; 0 <= G <= 256; max_rows >= 0.
// Nothing is allocated; everything runs on lmforge's stream.
#pragma once
#include <cstdint>

#include "core/bf16.h"

namespace lmf::cuda {

// NT (forward): C[r, 0:N] = A[r, 0:K] . B[g]^T for r in group g.
// A: (max_rows, K) bf16, B: (G, N, K) bf16 (nn.Linear layout per group), C: (max_rows, N) bf16.
void grouped_gemm_nt(bf16* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t N, int64_t K);

// NN (input gradient): C[r, 0:N] = A[r, 0:K] . B[g] for r in group g.
// A: (max_rows, K) bf16, B: (G, K, N) bf16, C: (max_rows, N) bf16.
void grouped_gemm_nn(bf16* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t N, int64_t K);

// TN (weight gradient): C[g] = beta * C[g] + sum over rows r of group g of A[r, 0:M]^T B[r, 0:N].
// A: (max_rows, M) bf16, B: (max_rows, N) bf16, C: (G, M, N) f32. beta is 0 or 1; with beta == 0 C
// is not read (it may hold NaN). Groups with no rows still get C[g] = beta * C[g].
void grouped_gemm_tn(float* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t M, int64_t N, float beta);

// Which kernels the three run (both compute the same function; each is bitwise repeatable):
//   wgmma     wgmma.m64n256k16 from shared memory (the default, the fast one): a persistent,
//             warp-specialized kernel fed by TMA (cp.async.bulk.tensor + mbarriers); the environment
//             variable LMF_GROUPED_GEMM_NO_TMA=1 (read once) selects the older cp.async pipeline
//   mma_sync  mma.sync m16n8k16 with ldmatrix (the fallback; about 0.6x the speed of wgmma)
// Process-wide, set before use; for tests and benchmarks.
enum class GroupedGemmKernel : uint8_t { wgmma, mma_sync };
void grouped_gemm_set_kernel(GroupedGemmKernel k);

}  // namespace lmf::cuda
