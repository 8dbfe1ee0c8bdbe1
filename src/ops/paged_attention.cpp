// paged_attention.cpp: checks and the fp32 CPU reference of serving's attention (paged_attention.h).
//
// One (row, head) at a time, with the training forward's arithmetic for that row (attention_row.h,
// attention.cpp): the scores over the row's positions 0, 1, ..., its causal softmax row, the output as
// one FMA chain over the positions. So a served row is bitwise the trainer's, and rows and heads are
// independent (parallel_for over them): results do not depend on the thread count or on the other
// rows of the batch.
#include "ops/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/device.h"
#include "core/parallel.h"
#include "ops/attention.h"
#include "ops/attention_row.h"
#include "ops/dispatch.h"
#include "ops/op_plans.h"

namespace lmf {
namespace {

constexpr const char* kOpWrite = "kv_cache_write";
constexpr const char* kOpAttn = "paged_attention_forward";
constexpr const char* kOpGather = "gather_rows";

struct CacheDims {
  int64_t blocks, block_size, HS;
};

// k_cache / v_cache (num_blocks, block_size, NKV HS), f32 on the CPU or bf16 on the GPU, matching qkv.
CacheDims check_cache(const Tensor& k, const Tensor& v, const Tensor& qkv, int n_head, int n_kv_head, const char* op) {
  LMF_CHECK(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0, op, ": n_head=", n_head,
            " must be a positive multiple of n_kv_head=", n_kv_head);
  const DType dt = qkv.device == Device::cpu ? DType::f32 : DType::bf16;
  check_dtype(qkv, dt, op);
  check_dtype(k, dt, op);
  check_dtype(v, dt, op);
  check_same_device(op, {&qkv, &k, &v});
  LMF_CHECK(k.ndim == 3 && k.dim(2) % n_kv_head == 0, op, ": tensor '", k.name, "' has shape ", k.shape_str(),
            ", expected (num_blocks, block_size, NKV * HS) with NKV=", n_kv_head);
  check_shape(v, {k.dim(0), k.dim(1), k.dim(2)}, op);
  const int64_t HS = k.dim(2) / n_kv_head;
  LMF_CHECK(qkv.ndim == 2 && qkv.dim(1) == (n_head + 2 * int64_t{n_kv_head}) * HS, op, ": tensor '", qkv.name,
            "' has shape ", qkv.shape_str(), ", expected (N, (NH + 2 NKV) HS) with NH=", n_head, " NKV=", n_kv_head,
            " HS=", HS, " (from '", k.name, "')");
  return {k.dim(0), k.dim(1), HS};
}

void check_rows(const Tensor& t, int64_t N, const Tensor& like, const char* op) {
  check_dtype(t, DType::i32, op);
  check_same_device(op, {&t, &like});
  check_shape(t, {N}, op);
}

void write_cpu(float* kc, float* vc, const float* qkv, const int32_t* slots, int64_t N, int64_t q_dim,
               int64_t kv_dim) {
  const int64_t row = q_dim + 2 * kv_dim;
  for (int64_t n = 0; n < N; ++n) {
    if (slots[n] < 0) continue;
    const float* r = qkv + n * row;
    std::memcpy(kc + slots[n] * kv_dim, r + q_dim, sizeof(float) * static_cast<size_t>(kv_dim));
    std::memcpy(vc + slots[n] * kv_dim, r + q_dim + kv_dim, sizeof(float) * static_cast<size_t>(kv_dim));
  }
}

void attention_cpu(float* out, const float* qkv, const float* kc, const float* vc, const int32_t* tables,
                   const int32_t* seqs, const int32_t* positions, int64_t N, int64_t NH, int64_t NKV, int64_t HS,
                   int64_t bs, int64_t max_blocks) {
  const int64_t row = (NH + 2 * NKV) * HS, kv_dim = NKV * HS, group = NH / NKV;
  const float scale = attention_scale(HS);
  parallel_for(N * NH, 1, [&](int64_t i0, int64_t i1) {  // one (row, head) per chunk
    // this thread's scores of one row (grown once to the block table's positions, then reused)
    thread_local std::vector<float> p_buf, q_buf;
    if (static_cast<int64_t>(p_buf.size()) < max_blocks * bs) p_buf.resize(static_cast<size_t>(max_blocks * bs));
    if (static_cast<int64_t>(q_buf.size()) < HS) q_buf.resize(static_cast<size_t>(HS));
    float* p = p_buf.data();
    float* qs = q_buf.data();
    for (int64_t nh = i0; nh < i1; ++nh) {
      const int64_t n = nh / NH, h = nh % NH;
      float* o = out + n * NH * HS + h * HS;
      std::fill(o, o + HS, 0.0f);
      if (seqs[n] < 0) continue;
      const float* q = qkv + n * row + h * HS;
      const int32_t* table = tables + seqs[n] * max_blocks;
      const int64_t kvh = h / group, len = positions[n] + 1;
      // position s's row of this kv head in a cache (through the block table)
      auto at = [&](const float* cache, int64_t s) {
        return cache + (static_cast<int64_t>(table[s / bs]) * bs + s % bs) * kv_dim + kvh * HS;
      };
      // the training forward's arithmetic for this row (attention.cpp): scores = one FMA chain over the
      // head dimension of (scale q) and k, as its GEMM computes them; its causal softmax row; the
      // output = one FMA chain over the positions in order, as its P V GEMM
      for (int64_t i = 0; i < HS; ++i) qs[i] = scale * q[i];
      for (int64_t s = 0; s < len; ++s) {
        const float* k = at(kc, s);
        float acc = 0.0f;
        for (int64_t i = 0; i < HS; ++i) acc = std::fma(qs[i], k[i], acc);
        p[s] = acc;
      }
      softmax_causal_row(p, len - 1, len);
      for (int64_t s = 0; s < len; ++s) {
        const float* v = at(vc, s);
        for (int64_t i = 0; i < HS; ++i) o[i] = std::fma(p[s], v[i], o[i]);
      }
    }
  });
}

}  // namespace

void kv_cache_write(Tensor k_cache, Tensor v_cache, Tensor qkv, Tensor slots, int n_head, int n_kv_head) {
  const CacheDims d = check_cache(k_cache, v_cache, qkv, n_head, n_kv_head, kOpWrite);
  const int64_t N = qkv.dim(0), num_slots = d.blocks * d.block_size;
  check_rows(slots, N, qkv, kOpWrite);
  if (qkv.device == Device::cpu) {
    for (int64_t n = 0; n < N; ++n)
      LMF_CHECK(slots.i32()[n] >= -1 && slots.i32()[n] < num_slots, kOpWrite, ": row ", n, " of tensor '", slots.name,
                "' is slot ", slots.i32()[n], ", outside [-1, ", num_slots, ") of '", k_cache.name, "'");
    write_cpu(k_cache.f32(), v_cache.f32(), qkv.f32(), slots.i32(), N, n_head * d.HS, n_kv_head * d.HS);
  } else {
    LMF_CUDA_DISPATCH(kOpWrite, cuda::kv_cache_write(k_cache.ptr<bf16>(), v_cache.ptr<bf16>(), qkv.ptr<bf16>(),
                                                     slots.i32(), N, n_head, n_kv_head, d.HS, num_slots));
  }
}

void paged_attention_forward(Tensor out, Tensor qkv, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqs,
                             Tensor positions, int n_head, int n_kv_head) {
  const CacheDims d = check_cache(k_cache, v_cache, qkv, n_head, n_kv_head, kOpAttn);
  const int64_t N = qkv.dim(0);
  check_dtype(out, qkv.dtype, kOpAttn);
  check_same_device(kOpAttn, {&out, &qkv, &block_tables});
  check_shape(out, {N, n_head * d.HS}, kOpAttn);
  check_rows(seqs, N, qkv, kOpAttn);
  check_rows(positions, N, qkv, kOpAttn);
  check_dtype(block_tables, DType::i32, kOpAttn);
  LMF_CHECK(block_tables.ndim == 2, kOpAttn, ": tensor '", block_tables.name, "' has shape ",
            block_tables.shape_str(), ", expected (sequences, max_blocks)");
  const int64_t S = block_tables.dim(0), max_blocks = block_tables.dim(1);
  if (qkv.device == Device::cpu) {
    const int32_t *sq = seqs.i32(), *pos = positions.i32(), *tab = block_tables.i32();
    for (int64_t n = 0; n < N; ++n) {
      LMF_CHECK(sq[n] >= -1 && sq[n] < S, kOpAttn, ": row ", n, " of tensor '", seqs.name, "' is sequence ", sq[n],
                ", outside [-1, ", S, ") of '", block_tables.name, "'");
      if (sq[n] < 0) continue;
      LMF_CHECK(pos[n] >= 0 && pos[n] < max_blocks * d.block_size, kOpAttn, ": row ", n, " of tensor '",
                positions.name, "' is position ", pos[n], ", outside the ", max_blocks * d.block_size,
                " positions a block table holds");
      for (int64_t j = 0; j <= pos[n] / d.block_size; ++j) {
        const int32_t b = tab[sq[n] * max_blocks + j];
        LMF_CHECK(b >= 0 && b < d.blocks, kOpAttn, ": block ", j, " of sequence ", sq[n], " in tensor '",
                  block_tables.name, "' is ", b, ", outside [0, ", d.blocks, ") of '", k_cache.name, "'");
      }
    }
    attention_cpu(out.f32(), qkv.f32(), k_cache.f32(), v_cache.f32(), tab, sq, pos, N, n_head, n_kv_head, d.HS,
                  d.block_size, max_blocks);
  } else {
    const float scale = attention_scale(d.HS);  // the training forward's (attention_row.h)
    if (batch_invariant_now())  // the training flash forward's step per row (paged_attention.h)
      LMF_CUDA_DISPATCH(kOpAttn, cuda::paged_attention_forward_invariant(
                                     out.ptr<bf16>(), qkv.ptr<bf16>(), k_cache.ptr<bf16>(), v_cache.ptr<bf16>(),
                                     block_tables.i32(), seqs.i32(), positions.i32(), N, n_head, n_kv_head, d.HS,
                                     d.block_size, max_blocks, scale));
    else
      LMF_CUDA_DISPATCH(kOpAttn, cuda::paged_attention_forward(
                                     out.ptr<bf16>(), qkv.ptr<bf16>(), k_cache.ptr<bf16>(), v_cache.ptr<bf16>(),
                                     block_tables.i32(), seqs.i32(), positions.i32(), N, n_head, n_kv_head, d.HS,
                                     d.block_size, max_blocks, scale));
  }
}

void gather_rows(Tensor out, Tensor x, Tensor rows) {
  LMF_CHECK(x.defined() && x.ndim == 2, kOpGather, ": tensor '", x.name, "' must be (N, C), got ",
            x.defined() ? x.shape_str() : std::string("none"));
  const DType dt = x.dtype == DType::bf16 ? DType::bf16 : DType::f32;
  check_dtype(x, dt, kOpGather);
  check_dtype(out, dt, kOpGather);
  check_dtype(rows, DType::i32, kOpGather);
  check_same_device(kOpGather, {&out, &x, &rows});
  LMF_CHECK(rows.ndim == 1, kOpGather, ": tensor '", rows.name, "' must be (M), got ", rows.shape_str());
  const int64_t M = rows.dim(0), N = x.dim(0), C = x.dim(1);
  check_shape(out, {M, C}, kOpGather);
  if (x.device == Device::cpu) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t r = rows.i32()[m];
      LMF_CHECK(r >= 0 && r < N, kOpGather, ": row ", m, " of tensor '", rows.name, "' is ", r, ", outside [0, ", N,
                ") of '", x.name, "'");
      std::memcpy(out.f32() + m * C, x.f32() + r * C, sizeof(float) * static_cast<size_t>(C));
    }
  } else if (dt == DType::bf16) {
    LMF_CUDA_DISPATCH(kOpGather, cuda::gather_rows(out.ptr<bf16>(), x.ptr<bf16>(), rows.i32(), M, C));
  } else {
    LMF_CUDA_DISPATCH(kOpGather, cuda::gather_rows(out.f32(), x.f32(), rows.i32(), M, C));
  }
}

bool paged_head_size_supported(int64_t HS, bool batch_invariant) {
  if (batch_invariant) return flash_head_size_supported(FlashKernels::lmforge, HS);
  return HS == 16 || HS == 32 || HS == 64 || HS == 80 || HS == 96 || HS == 112 || HS == 128 || HS == 256;
}

const char* paged_head_sizes_text(bool batch_invariant) {
  return batch_invariant ? flash_head_sizes_text(FlashKernels::lmforge) : "16, 32, 64, 80, 96, 112, 128 or 256";
}

size_t paged_attention_cuda_workspace(int64_t N, int n_head, int64_t HS, int64_t max_context) {
#ifdef LMF_WITH_CUDA
  return cuda::paged_attention_workspace(N, n_head, HS, max_context);
#else
  (void)N, (void)n_head, (void)HS, (void)max_context;
  return 0;
#endif
}

}  // namespace lmf
