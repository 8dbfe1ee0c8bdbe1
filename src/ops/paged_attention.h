// paged_attention.h: the attention of serving (docs/SERVING.md): one batch holds rows of many
// sequences (prompt chunks being prefilled and single decode positions), and every sequence's keys
// and values live in a paged KV cache.
//
// The cache of one layer: k_cache, v_cache (num_blocks, block_size, NKV * HS); f32 on the CPU, bf16 on
// the GPU. A sequence's position p lives in block block_tables[seq, p / block_size] at offset
// p % block_size; a row's slot is block * block_size + offset.
//
// Per row n of a batch of N rows (i32 tensors on the tensors' device):
//   slots[n]      where row n's k and v go (-1: a padding row, nothing written)
//   seqs[n]       the row of block_tables holding row n's sequence (-1: a padding row, out row zero)
//   positions[n]  row n's position in its sequence: it attends to positions [0, positions[n]] of it
// qkv (N, (NH + 2 NKV) HS) as in attention.h (RoPE applied), GQA: q head h reads kv head h / (NH/NKV),
// scale 1/sqrt(HS). kv_cache_write runs first, so the rows of one prompt chunk see each other causally.
//
// Deterministic and batch-invariant: a row's output depends only on its query and its own sequence's
// cached keys and values, never on the other rows of the batch (the CPU computes each (row, head) with
// the training forward's arithmetic, bitwise attention_forward's row; the GPU kernel splits the
// positions into fixed chunks combined in a fixed order). With --batch-invariant (OpPlans::batch_invariant)
// the GPU runs cuda::paged_attention_forward_invariant instead: the training flash forward's own step per
// row (ops/flash_tile.cuh), so that serving's rows are bitwise training's too.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"

namespace lmf {

void kv_cache_write(Tensor k_cache, Tensor v_cache, Tensor qkv, Tensor slots, int n_head, int n_kv_head);

// The head sizes the GPU kernels run (the one rule: plans and the launchers ask it): 16, 32, 64, 80, 96,
// 112, 128, 256; with batch_invariant (the training flash forward's step) lmforge's flash set
// (attention.h flash_head_size_supported). The CPU runs any head size. paged_head_sizes_text names them.
bool paged_head_size_supported(int64_t HS, bool batch_invariant);
const char* paged_head_sizes_text(bool batch_invariant);

// out: (N, NH HS), same dtype as qkv; block_tables: (S, max_blocks) i32.
void paged_attention_forward(Tensor out, Tensor qkv, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqs,
                             Tensor positions, int n_head, int n_kv_head);

// out (M, C) = rows rows[m] of x (N, C); rows (M) i32 in [0, N). f32, or bf16 on the GPU.
void gather_rows(Tensor out, Tensor x, Tensor rows);

// Bytes of lmf::cuda_workspace paged_attention_forward needs for N rows reaching max_context positions
// (0 without CUDA). Reserve at set-up.
size_t paged_attention_cuda_workspace(int64_t N, int n_head, int64_t HS, int64_t max_context);

namespace cuda {  // launchers (paged_attention.cu); shapes as above, validated by the op entries
void kv_cache_write(bf16* k_cache, bf16* v_cache, const bf16* qkv, const int32_t* slots, int64_t N, int64_t NH,
                    int64_t NKV, int64_t HS, int64_t num_slots);
void paged_attention_forward(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                             const int32_t* block_tables, const int32_t* seqs, const int32_t* positions, int64_t N,
                             int64_t NH, int64_t NKV, int64_t HS, int64_t block_size, int64_t max_blocks,
                             float scale);
// --batch-invariant (OpPlans::batch_invariant): the training flash forward's arithmetic per row, so that
// serving's rows are bitwise training's (no workspace).
void paged_attention_forward_invariant(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache,
                                       const int32_t* block_tables, const int32_t* seqs, const int32_t* positions,
                                       int64_t N, int64_t NH, int64_t NKV, int64_t HS, int64_t block_size,
                                       int64_t max_blocks, float scale);
size_t paged_attention_workspace(int64_t N, int64_t NH, int64_t HS, int64_t max_context);
void gather_rows(bf16* out, const bf16* x, const int32_t* rows, int64_t M, int64_t C);
void gather_rows(float* out, const float* x, const int32_t* rows, int64_t M, int64_t C);
}  // namespace cuda

}  // namespace lmf
