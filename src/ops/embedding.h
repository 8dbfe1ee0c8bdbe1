// embedding.h: token embedding plus optional learned position embedding.
//
// Token ids: the CPU path checks every id against [0, Vp) and fails naming the (b, t) position. The
// CUDA path does not (that would need a host sync inside the step): ids reaching the GPU were
// validated by the data loader (DataLoader::finish_setup checks every shard token against
// vocab_size), and an out-of-range id there is undefined behaviour (an out-of-bounds row).
//
// Mixed precision (docs/MIXED_PRECISION.md), GPU only: `out` / `dout` may be bf16 while wte, wpe
// (fp32 masters) and dwte, dwpe (fp32 gradients) stay f32. The forward sums in fp32 and rounds once
// to bf16; the backward widens each bf16 dout element exactly and accumulates in fp32, in the same
// order as the f32 path. A bf16 tensor on the CPU is an error.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace lmf {

// out: (B, T, C) = wte[tokens[b,t]] + wpe[pos_offset + t]   (wpe term only when wpe is defined)
// tokens: (B, T) i32, each in [0, Vp); wte: (Vp, C); wpe: (maxT, C) or absent (RoPE models)
// out: f32 or bf16 (GPU); wte, wpe: f32
void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t pos_offset = 0);
// Serving (ragged rows of many sequences): row n's position is positions[n]; positions (B*T) i32, each in
// [0, maxT) (the CPU checks every one; on the GPU the caller guarantees it).
void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, Tensor positions);

// dwte[tokens[b,t]] += dout[b,t]; dwpe[t] += sum_b dout[b,t]   (accumulates; dwpe may be absent)
// Deterministic: rows are reduced in a fixed order (no float atomics).
// dout: f32 or bf16 (GPU); dwte, dwpe: f32
void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens);

// Tensor parallelism's vocabulary-parallel table (dist/tensor_parallel.h): wte / dwte hold rows
// [vocab_start, vocab_start + rows) of a table of full_vocab rows; a token outside them reads (forward)
// a zero row and adds (backward) nothing, so summing the ranks' outputs gives the whole table's. Tokens
// are checked against [0, full_vocab). CPU only in this version.
void embedding_forward_shard(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start, int64_t full_vocab);
void embedding_backward_shard(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                              int64_t full_vocab);

// Bytes of CUDA workspace (lmf::cuda_reserve_workspace) that embedding_backward needs on the GPU for
// N = B*T tokens and a vocabulary of Vp rows; 0 in a build without CUDA. Reserve it at set-up.
size_t embedding_backward_cuda_workspace(int64_t N, int64_t Vp);

namespace cuda {  // launchers (embedding.cu); called by the op entries after validation
// out: (B*T, C); tokens: (B*T); wte: (Vp, C); wpe: (maxT, C) or nullptr; row n reads wpe row positions[n]
// (positions not null) or pos_offset + n % T
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                       int64_t C, const int32_t* positions, int64_t pos_offset);
size_t embedding_backward_workspace(int64_t N, int64_t Vp);
// dwte: (Vp, C) +=; dout: (N, C); tokens: (N). Uses embedding_backward_workspace(N, Vp) bytes of workspace.
void embedding_backward_wte(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t Vp);
// dwpe: (maxT, C) +=, rows [0, T); dout: (B, T, C)
void embedding_backward_wpe(float* dwpe, const float* dout, int64_t B, int64_t T, int64_t C);
// bf16 activations (same shapes and workspace as above): out = bf16(wte[token] + wpe[pos]) rounded
// once from the fp32 sum; the backward widens dout to fp32 and adds in the f32 path's order.
void embedding_forward(bf16* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B, int64_t T,
                       int64_t C, const int32_t* positions, int64_t pos_offset);
void embedding_backward_wte(float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int64_t C, int64_t Vp);
void embedding_backward_wpe(float* dwpe, const bf16* dout, int64_t B, int64_t T, int64_t C);
}  // namespace cuda

}  // namespace lmf
