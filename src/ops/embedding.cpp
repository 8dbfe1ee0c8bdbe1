// embedding.cpp: CPU reference of the token + learned position embedding (embedding.h).
//
// On the CPU every token id is checked to lie in [0, Vp) before any memory is touched; the error names
// the (b, t) position and the value. On the GPU ids are not checked (no host sync inside a step): the
// data loader validates them (embedding.h).
// Backward accumulates (+=) into dwte and dwpe (src/ops/README.md) and is deterministic without
// atomics: dwte runs over fixed blocks of columns, and within a block visits the rows n = b*T + t in
// increasing order, so rows sharing a token are summed in increasing (b, t) order whatever the thread
// count; dwpe runs over positions t (independent rows), summing b = 0..B-1 in order.
// bf16 `out` / `dout` (mixed precision) run on the GPU only: the CPU stays the fp32 reference
// (docs/MIXED_PRECISION.md), and a bf16 tensor here fails naming it.
#include "ops/embedding.h"

#include <algorithm>
#include <initializer_list>

#include "core/parallel.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr int64_t kMinGrain = 1 << 13;  // elements per parallel chunk (smaller ops run on one thread)
constexpr int64_t kColBlock = 64;          // columns per task in the dwte reduction

// out: (B*T, C) row-major; tokens: (B*T); wte: (Vp, C); wpe: (maxT, C) or nullptr, rows from pos_offset
// wte holds rows [vocab_start, vocab_start + rows) of the table (tensor parallelism's shard; the whole
// table: 0, Vp): a token outside them reads a zero row.
void embedding_forward_cpu(float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                           int64_t T, int64_t C, const int32_t* positions, int64_t pos_offset, int64_t vocab_start,
                           int64_t rows) {
  const int64_t N = B * T;
  parallel_for(N, grain_for(N, kMinGrain / C + 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t local = static_cast<int64_t>(tokens[n]) - vocab_start;
      const float* te = local >= 0 && local < rows ? wte + local * C : nullptr;
      float* o = out + n * C;
      if (wpe) {
        const float* pe = wpe + (positions ? positions[n] : pos_offset + n % T) * C;
        if (te) for (int64_t i = 0; i < C; ++i) o[i] = te[i] + pe[i];
        else for (int64_t i = 0; i < C; ++i) o[i] = pe[i];
      } else if (te) {
        for (int64_t i = 0; i < C; ++i) o[i] = te[i];
      } else {
        for (int64_t i = 0; i < C; ++i) o[i] = 0.0f;
      }
    }
  });
}

// dwte: (Vp, C) +=; dout: (N, C) row-major; tokens: (N). Rows summed in increasing n per column.
// Tokens outside rows [vocab_start, vocab_start + rows) of a shard are skipped.
void embedding_backward_wte_cpu(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int64_t C,
                                int64_t vocab_start, int64_t rows) {
  // Columns are independent (each sums its rows in order): any grouping of them gives the same bits.
  parallel_for(C, N * C >= kMinGrain ? kColBlock : C, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t local = static_cast<int64_t>(tokens[n]) - vocab_start;
      if (local < 0 || local >= rows) continue;
      float* dw = dwte + local * C;
      const float* dy = dout + n * C;
      for (int64_t j = c0; j < c1; ++j) dw[j] += dy[j];
    }
  });
}

// dwpe: (maxT, C) +=, rows [0, T); dout: (B, T, C) row-major. dwpe[t] += dout[0,t] + ... in b order.
void embedding_backward_wpe_cpu(float* dwpe, const float* dout, int64_t B, int64_t T, int64_t C) {
  parallel_for(T, grain_for(T, kMinGrain / (B * C) + 1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dp = dwpe + t * C;
      for (int64_t b = 0; b < B; ++b) {
        const float* dy = dout + (b * T + t) * C;
        for (int64_t i = 0; i < C; ++i) dp[i] += dy[i];
      }
    }
  });
}

// Fails naming the first (b, t) whose token is outside [0, Vp). tokens: (B, T)
void check_tokens(const int32_t* tokens, int64_t B, int64_t T, int64_t Vp, const char* op, const char* name) {
  for (int64_t n = 0; n < B * T; ++n)
    if (tokens[n] < 0 || tokens[n] >= Vp)
      fail(op, ": tensor '", name, "' has token ", tokens[n], " at (b=", n / T, ", t=", n % T,
           "), outside the vocabulary [0, Vp=", Vp, ")");
}

// The activation tensor (out, dout) picks the path: bf16 (GPU only) or else f32.
DType activation_dtype(const Tensor& t) { return t.defined() && t.dtype == DType::bf16 ? DType::bf16 : DType::f32; }

// Tokens (B, T) i32.
void check_token_tensor(const Tensor& tokens, const char* op) {
  if (!tokens.defined()) fail(op, ": tensor '", tokens.name, "' is absent");
  LMF_CHECK(tokens.dtype == DType::i32 && tokens.ndim == 2, op, ": tensor '", tokens.name, "' is ",
            tokens.describe(), ", expected i32 (B, T)");
}

}  // namespace

namespace {
// positions: absent (row t of a sequence has position pos_offset + t) or (B*T) i32 per row.
// full_vocab > 0: wte is the shard of rows [vocab_start, vocab_start + its rows) of a table of full_vocab
// rows (tokens are checked against full_vocab); 0: wte is the whole table.
void embedding_forward_impl(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t pos_offset, Tensor positions,
                            int64_t vocab_start = 0, int64_t full_vocab = 0) {
  const char* op = full_vocab > 0 ? "embedding_forward_shard" : "embedding_forward";
  check_token_tensor(tokens, op);
  // bf16 out (GPU only; check_dtype fails for one on the CPU): wte, wpe stay f32 (masters).
  const bool bf = activation_dtype(out) == DType::bf16;
  check_dtype(out, bf ? DType::bf16 : DType::f32, op);
  check_f32(wte, op);
  if (wpe.defined()) check_f32(wpe, op);
  if (positions.defined()) check_dtype(positions, DType::i32, op);
  check_same_device(op, {&out, &tokens, &wte, &wpe, &positions});
  LMF_CHECK(wte.ndim == 2, op, ": tensor '", wte.name, "' has shape ", wte.shape_str(), ", expected (Vp, C)");
  const int64_t B = tokens.dim(0), T = tokens.dim(1), Vp = wte.dim(0), C = wte.dim(1);
  check_shape(out, {B, T, C}, op);
  if (positions.defined()) check_shape(positions, {B * T}, op);
  if (wpe.defined()) {
    LMF_CHECK(wpe.ndim == 2 && wpe.dim(1) == C, op, ": tensor '", wpe.name, "' has shape ", wpe.shape_str(),
              ", expected (maxT, C=", C, ")");
    if (!positions.defined())
      LMF_CHECK(pos_offset >= 0 && pos_offset + T <= wpe.dim(0), op, ": positions [", pos_offset, ", ",
                pos_offset + T, ") exceed tensor '", wpe.name, "' with maxT=", wpe.dim(0));
  }
  const int32_t* pos = positions.defined() ? positions.i32() : nullptr;
  if (full_vocab > 0) {
    LMF_CHECK(out.device == Device::cpu, op, ": the vocabulary-parallel table runs on the CPU backend in this version");
    LMF_CHECK(vocab_start >= 0 && vocab_start + Vp <= full_vocab, op, ": rows [", vocab_start, ", ", vocab_start + Vp,
              ") of tensor '", wte.name, "' outside the table of ", full_vocab, " rows");
  }
  if (out.device == Device::cpu) {
    check_tokens(tokens.i32(), B, T, full_vocab > 0 ? full_vocab : Vp, op, tokens.name);
    if (pos && wpe.defined())
      for (int64_t n = 0; n < B * T; ++n)
        LMF_CHECK(pos[n] >= 0 && pos[n] < wpe.dim(0), op, ": row ", n, " of tensor '", positions.name,
                  "' is position ", pos[n], ", outside tensor '", wpe.name, "' with maxT=", wpe.dim(0));
    embedding_forward_cpu(out.f32(), tokens.i32(), wte.f32(), wpe.defined() ? wpe.f32() : nullptr, B, T, C, pos,
                          pos_offset, vocab_start, Vp);
  } else if (bf) {
    LMF_CUDA_DISPATCH(op, cuda::embedding_forward(out.ptr<bf16>(), tokens.i32(), wte.f32(),
                                                  wpe.defined() ? wpe.f32() : nullptr, B, T, C, pos, pos_offset));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::embedding_forward(out.f32(), tokens.i32(), wte.f32(),
                                                  wpe.defined() ? wpe.f32() : nullptr, B, T, C, pos, pos_offset));
  }
}
}  // namespace

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t pos_offset) {
  embedding_forward_impl(out, tokens, wte, wpe, pos_offset, Tensor());
}

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, Tensor positions) {
  LMF_CHECK(positions.defined(), "embedding_forward: no positions tensor");
  embedding_forward_impl(out, tokens, wte, wpe, 0, positions);
}

namespace {

void embedding_backward_impl(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                             int64_t full_vocab) {
  const char* op = full_vocab > 0 ? "embedding_backward_shard" : "embedding_backward";
  check_token_tensor(tokens, op);
  // bf16 dout (GPU only; check_dtype fails for one on the CPU): dwte, dwpe stay f32.
  const bool bf = activation_dtype(dout) == DType::bf16;
  check_dtype(dout, bf ? DType::bf16 : DType::f32, op);
  check_f32(dwte, op);
  if (dwpe.defined()) check_f32(dwpe, op);
  check_same_device(op, {&dwte, &dwpe, &dout, &tokens});
  LMF_CHECK(dwte.ndim == 2, op, ": tensor '", dwte.name, "' has shape ", dwte.shape_str(), ", expected (Vp, C)");
  const int64_t B = tokens.dim(0), T = tokens.dim(1), Vp = dwte.dim(0), C = dwte.dim(1);
  check_shape(dout, {B, T, C}, op);
  if (dwpe.defined())
    LMF_CHECK(dwpe.ndim == 2 && dwpe.dim(1) == C && T <= dwpe.dim(0), op, ": tensor '", dwpe.name,
              "' has shape ", dwpe.shape_str(), ", expected (maxT >= T=", T, ", C=", C, ")");
  if (full_vocab > 0) {
    LMF_CHECK(dout.device == Device::cpu, op, ": the vocabulary-parallel table runs on the CPU backend in this version");
    LMF_CHECK(vocab_start >= 0 && vocab_start + Vp <= full_vocab, op, ": rows [", vocab_start, ", ", vocab_start + Vp,
              ") of tensor '", dwte.name, "' outside the table of ", full_vocab, " rows");
  }
  if (dout.device == Device::cpu) {
    check_tokens(tokens.i32(), B, T, full_vocab > 0 ? full_vocab : Vp, op, tokens.name);
    embedding_backward_wte_cpu(dwte.f32(), dout.f32(), tokens.i32(), B * T, C, vocab_start, Vp);
    if (dwpe.defined()) embedding_backward_wpe_cpu(dwpe.f32(), dout.f32(), B, T, C);
  } else if (bf) {
    LMF_CUDA_DISPATCH(op, cuda::embedding_backward_wte(dwte.f32(), dout.ptr<bf16>(), tokens.i32(), B * T, C, Vp));
    if (dwpe.defined()) LMF_CUDA_DISPATCH(op, cuda::embedding_backward_wpe(dwpe.f32(), dout.ptr<bf16>(), B, T, C));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::embedding_backward_wte(dwte.f32(), dout.f32(), tokens.i32(), B * T, C, Vp));
    if (dwpe.defined()) LMF_CUDA_DISPATCH(op, cuda::embedding_backward_wpe(dwpe.f32(), dout.f32(), B, T, C));
  }
}

}  // namespace

void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  embedding_backward_impl(dwte, dwpe, dout, tokens, 0, 0);
}

void embedding_forward_shard(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start, int64_t full_vocab) {
  LMF_CHECK(full_vocab >= 1, "embedding_forward_shard: full_vocab=", full_vocab);
  embedding_forward_impl(out, tokens, wte, wpe, 0, Tensor(), vocab_start, full_vocab);
}

void embedding_backward_shard(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                              int64_t full_vocab) {
  LMF_CHECK(full_vocab >= 1, "embedding_backward_shard: full_vocab=", full_vocab);
  embedding_backward_impl(dwte, dwpe, dout, tokens, vocab_start, full_vocab);
}

size_t embedding_backward_cuda_workspace(int64_t N, int64_t Vp) {
#ifdef LMF_WITH_CUDA
  return cuda::embedding_backward_workspace(N, Vp);
#else
  return 0;
#endif
}

}  // namespace lmf
