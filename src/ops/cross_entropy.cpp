// cross_entropy.cpp: CPU reference of the LM head fused with softmax cross-entropy (GEMMs through
// blas_sgemm, ops/blas.h).
//
// Rows are processed in chunks of R = logits_scratch rows, in increasing order:
//   logits = x_chunk W[:V]^T            (sgemm into the scratch, leading dimension Vp; rows V..Vp-1 of
//                                       W are never read, so they never enter the softmax)
//   loss   = logsumexp(logits) - logits[target], max-subtracted; exp in float (exp_nonpos, 1.4 ulp),
//            the sum (8 fixed lanes) and the log in double (a 50k-term float sum loses ~3 digits)
//   dlogits = grad_scale (softmax - onehot), written in place over the scratch (only when dx/dw)
//   dx_chunk += dlogits W[:V];  dW[:V] += dlogits^T x_chunk          (sgemm, beta = 1)
// Padded rows of dW are never written (they receive zero gradient). Rows of a chunk are
// independent (parallel_for over rows); the chunk order is fixed, so results are deterministic.
// bf16 x / w / logits_scratch / dx (mixed precision) run on the GPU only: the CPU stays the fp32
// reference (docs/MIXED_PRECISION.md), and a bf16 tensor here fails naming it.
#include "ops/cross_entropy.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/comm.h"
#include "core/parallel.h"
#include "ops/blas.h"
#include "ops/cpu_math.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr const char* kOp = "lm_head_cross_entropy";

// Fixed-order row reductions and the x <= 0 exp: ops/cpu_math.h.
using cpu_math::exp_nonpos;
using cpu_math::neg_log_softmax;
using cpu_math::row_max;
using cpu_math::row_sum_double;

// losses: (N); dx: (N, C) or nullptr; dw: (Vp, C) or nullptr (both or neither); x: (N, C);
// w: (Vp, C); targets: (N) in [0, V); logits: (R, Vp) scratch. All row-major. dw_overwrite: the
// first chunk writes dw (GEMM beta 0: the same bits as zeroing it and adding, blas.h) and rows
// [V, Vp) are zeroed.
// shard (tensor parallelism's vocabulary-parallel head): w holds rows [start, start + Vp) of the full
// head and V of them are real; targets are ids of the full vocabulary. A row's max, sum of exp and
// target logit are combined over the ranks (all_reduce_max, all_reduce_sum of R floats per chunk), so
// every rank gets the whole row's loss; dx is this rank's share (the caller sums the shares), dw its
// rows' gradient. Without a shard the stages reduce nothing and the bits are the single-rank ones.
void lm_head_cross_entropy_cpu(float* losses, float* dx, float* dw, const float* x, const float* w,
                               const int32_t* targets, float* logits, int N, int C, int V, int Vp, int R,
                               float grad_scale, bool dw_overwrite, const VocabShard* shard) {
  const bool grad = dx != nullptr;
  const int64_t start = shard ? shard->start : 0;
  // per-row staging of the chunk: max, target logit, sum of exp (grown once, then reused)
  static thread_local std::vector<float> row_mx, row_tgt, row_sum_f;
  static thread_local std::vector<double> row_sum;
  if (static_cast<int>(row_mx.size()) < R) {
    row_mx.resize(static_cast<size_t>(R));
    row_tgt.resize(static_cast<size_t>(R));
    row_sum_f.resize(static_cast<size_t>(R));
    row_sum.resize(static_cast<size_t>(R));
  }
  // (pointers: the workers of parallel_for must see this thread's buffers, not their own thread_locals)
  float* const mx_of = row_mx.data();
  float* const tgt_of = row_tgt.data();
  float* const sum_f = row_sum_f.data();
  double* const sum_of = row_sum.data();
  auto local_target = [&](int n) -> int64_t {  // the target's column in this shard, or -1
    const int64_t t = static_cast<int64_t>(targets[n]) - start;
    return t >= 0 && t < V ? t : -1;
  };
  if (grad && dw_overwrite) std::fill(dw + static_cast<int64_t>(V) * C, dw + static_cast<int64_t>(Vp) * C, 0.0f);
  for (int n0 = 0; n0 < N; n0 += R) {
    const int rows = std::min(R, N - n0);
    const int64_t grain = grain_for(rows, (1 << 14) / std::max(V, 1) + 1);
    const float* xc = x + static_cast<int64_t>(n0) * C;  // (rows, C)
    // logits[0:rows, 0:V] = xc W[:V]^T
    if (V > 0) blas_sgemm(false, true, rows, V, C, 1.0f, xc, C, w, C, 0.0f, logits, Vp);
    parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* l = logits + static_cast<int64_t>(r) * Vp;
        const int64_t t = local_target(n0 + static_cast<int>(r));
        tgt_of[r] = t >= 0 ? l[t] : 0.0f;
        mx_of[r] = V > 0 ? row_max(l, V) : -INFINITY;
      }
    });
    if (shard) {
      shard->comm->all_reduce_max(Tensor(mx_of, DType::f32, {rows}, "row max"));
      shard->comm->all_reduce_sum(Tensor(tgt_of, DType::f32, {rows}, "target logit"));
    }
    parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* l = logits + static_cast<int64_t>(r) * Vp;  // (V)
        const float mx = mx_of[r];
        for (int j = 0; j < V; ++j) l[j] = exp_nonpos(l[j] - mx);  // keep exp(l - max) for the gradient
        sum_of[r] = V > 0 ? row_sum_double(l, V) : 0.0;
      }
    });
    if (shard) {  // the shares of the sum travel as floats (each summed in double here)
      for (int r = 0; r < rows; ++r) sum_f[r] = static_cast<float>(sum_of[r]);
      shard->comm->all_reduce_sum(Tensor(sum_f, DType::f32, {rows}, "sum of exp"));
      for (int r = 0; r < rows; ++r) sum_of[r] = sum_f[r];
    }
    parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* l = logits + static_cast<int64_t>(r) * Vp;
        const double sum = sum_of[r];
        const float mx = mx_of[r], l_tgt = tgt_of[r];
        losses[n0 + r] = neg_log_softmax(mx, l_tgt, sum);
        if (grad) {
          const float inv = static_cast<float>(1.0 / sum);
          const int64_t t = local_target(n0 + static_cast<int>(r));
          const float e_tgt = t >= 0 ? l[t] : 0.0f;
          for (int j = 0; j < V; ++j) l[j] = grad_scale * (l[j] * inv);
          if (t >= 0) l[t] = grad_scale * (e_tgt * inv - 1.0f);
        }
      }
    });
    if (!grad || V == 0) continue;
    // dx[n0:n0+rows] += dlogits (rows, V) W[:V] (V, C)
    blas_sgemm(false, false, rows, C, V, 1.0f, logits, Vp, w, C, 1.0f, dx + static_cast<int64_t>(n0) * C, C);
    // dW[:V] += dlogits^T (V, rows) xc (rows, C)
    blas_sgemm(true, false, V, C, rows, 1.0f, logits, Vp, xc, C, dw_overwrite && n0 == 0 ? 0.0f : 1.0f, dw, C);
  }
}

}  // namespace

void lm_head_cross_entropy(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets,
                           Tensor logits_scratch, int64_t vocab_size, float grad_scale, GradMode dw_mode,
                           GemmMath math) {
  // x picks the path: f32 everywhere, or bf16 x, w, logits_scratch, dx with f32 losses, dw (GPU only;
  // check_dtype fails for a bf16 tensor on the CPU).
  const bool bf = x.defined() && x.dtype == DType::bf16;
  const DType act = bf ? DType::bf16 : DType::f32;
  check_f32(losses, kOp);
  check_dtype(x, act, kOp);
  check_dtype(w, act, kOp);
  check_dtype(logits_scratch, act, kOp);
  LMF_CHECK(targets.defined() && targets.dtype == DType::i32, kOp, ": targets '", targets.name, "' must be i32, got ",
            targets.defined() ? dtype_name(targets.dtype) : "<absent>");
  LMF_CHECK(dx.defined() == dw.defined(), kOp, ": dx '", dx.name, "' and dw '", dw.name,
            "' must be both present or both absent (dx ", dx.defined() ? "present" : "absent", ", dw ",
            dw.defined() ? "present" : "absent", ")");
  check_same_device(kOp, {&losses, &dx, &dw, &x, &w, &targets, &logits_scratch});
  LMF_CHECK(x.ndim == 2, kOp, ": x '", x.name, "' must be (N, C), got ", x.shape_str());
  LMF_CHECK(w.ndim == 2, kOp, ": w '", w.name, "' must be (Vp, C), got ", w.shape_str());
  const int64_t N = x.shape[0], C = x.shape[1], Vp = w.shape[0];
  LMF_CHECK(C >= 1, kOp, ": x '", x.name, "' has shape ", x.shape_str());
  LMF_CHECK(vocab_size >= 1 && vocab_size <= Vp, kOp, ": vocab_size=", vocab_size, " must be in [1, Vp=", Vp,
            "] of w '", w.name, "' ", w.shape_str());
  check_shape(w, {Vp, C}, kOp);
  check_shape(losses, {N}, kOp);
  check_shape(targets, {N}, kOp);
  LMF_CHECK(logits_scratch.ndim == 2 && logits_scratch.shape[0] >= 1 && logits_scratch.shape[1] == Vp, kOp,
            ": logits_scratch '", logits_scratch.name, "' ", logits_scratch.shape_str(), " must be (R >= 1, Vp=", Vp,
            ")");
  const int64_t R = logits_scratch.shape[0];
  if (dx.defined()) {
    check_dtype(dx, act, kOp);
    check_f32(dw, kOp);
    check_shape(dx, {N, C}, kOp);
    check_shape(dw, {Vp, C}, kOp);
  }
  LMF_CHECK(N <= INT_MAX && C <= INT_MAX && Vp <= INT_MAX, kOp, ": sizes N=", N, " C=", C, " Vp=", Vp,
            " exceed the BLAS int range");
  if (N == 0) return;
  float* dw_ptr = dw.defined() ? dw.f32() : nullptr;
  const int32_t* tg = targets.i32();
  if (bf) {
    // Targets live on the GPU: the data loader validated them (reading them here would sync).
    LMF_CUDA_DISPATCH(kOp, cuda::lm_head_cross_entropy(losses.f32(), dx.defined() ? dx.ptr<bf16>() : nullptr, dw_ptr,
                                                       x.ptr<bf16>(), w.ptr<bf16>(), tg, logits_scratch.ptr<bf16>(),
                                                       N, C, vocab_size, Vp, std::min<int64_t>(R, N), grad_scale,
                                                       dw_mode == GradMode::Accumulate));
    return;
  }
  float* dx_ptr = dx.defined() ? dx.f32() : nullptr;
  const bool dw_overwrite = dw.defined() && dw_mode == GradMode::Overwrite;
  if (x.device == Device::cpu) {
    for (int64_t n = 0; n < N; ++n)
      LMF_CHECK(tg[n] >= 0 && tg[n] < vocab_size, kOp, ": targets '", targets.name, "' row ", n, " is ", tg[n],
                ", outside [0, vocab_size=", vocab_size, ")");
    lm_head_cross_entropy_cpu(losses.f32(), dx_ptr, dw_ptr, x.f32(), w.f32(), tg, logits_scratch.f32(),
                              static_cast<int>(N), static_cast<int>(C), static_cast<int>(vocab_size),
                              static_cast<int>(Vp), static_cast<int>(std::min<int64_t>(R, N)), grad_scale,
                              dw_overwrite, nullptr);
  } else {
    if (dw_overwrite) tensor_zero(dw);  // then accumulated
    // Targets live on the GPU: the data loader validated them (reading them here would sync).
    LMF_CUDA_DISPATCH(kOp, cuda::lm_head_cross_entropy(losses.f32(), dx_ptr, dw_ptr, x.f32(), w.f32(), tg,
                                                       logits_scratch.f32(), N, C, vocab_size, Vp,
                                                       std::min<int64_t>(R, N), grad_scale, math));
  }
}

void lm_head_cross_entropy_sharded(Tensor losses, Tensor dx, Tensor dw, Tensor x, Tensor w, Tensor targets,
                                   Tensor logits_scratch, const VocabShard& shard, float grad_scale,
                                   GradMode dw_mode) {
  const char* op = "lm_head_cross_entropy_sharded";
  check_f32(losses, op);
  check_f32(x, op);
  check_f32(w, op);
  check_f32(logits_scratch, op);
  LMF_CHECK(x.device == Device::cpu, op, ": the vocabulary-parallel head runs on the CPU backend in this version");
  LMF_CHECK(shard.comm != nullptr, op, ": no communicator");
  LMF_CHECK(targets.defined() && targets.dtype == DType::i32, op, ": targets '", targets.name, "' must be i32");
  LMF_CHECK(dx.defined() == dw.defined(), op, ": dx and dw must be both present or both absent");
  check_same_device(op, {&losses, &dx, &dw, &x, &w, &targets, &logits_scratch});
  LMF_CHECK(x.ndim == 2 && w.ndim == 2 && w.dim(1) == x.dim(1), op, ": x '", x.name, "' ", x.shape_str(), " and w '",
            w.name, "' ", w.shape_str(), " must be (N, C) and (rows, C)");
  const int64_t N = x.dim(0), C = x.dim(1), rows = w.dim(0);
  LMF_CHECK(shard.start >= 0 && shard.real >= 0 && shard.real <= rows && shard.vocab_size >= 1, op,
            ": shard start=", shard.start, " real=", shard.real, " of ", rows, " rows, vocab_size=", shard.vocab_size);
  check_shape(losses, {N}, op);
  check_shape(targets, {N}, op);
  LMF_CHECK(logits_scratch.ndim == 2 && logits_scratch.dim(0) >= 1 && logits_scratch.dim(1) == rows, op,
            ": logits_scratch '", logits_scratch.name, "' ", logits_scratch.shape_str(), " must be (R >= 1, ", rows, ")");
  if (dx.defined()) {
    check_f32(dx, op);
    check_f32(dw, op);
    check_shape(dx, {N, C}, op);
    check_shape(dw, {rows, C}, op);
  }
  LMF_CHECK(N <= INT_MAX && C <= INT_MAX && rows <= INT_MAX, op, ": sizes exceed the BLAS int range");
  const int32_t* tg = targets.i32();
  for (int64_t n = 0; n < N; ++n)
    LMF_CHECK(tg[n] >= 0 && tg[n] < shard.vocab_size, op, ": targets '", targets.name, "' row ", n, " is ", tg[n],
              ", outside [0, vocab_size=", shard.vocab_size, ")");
  if (N == 0) return;
  lm_head_cross_entropy_cpu(losses.f32(), dx.defined() ? dx.f32() : nullptr, dw.defined() ? dw.f32() : nullptr,
                            x.f32(), w.f32(), tg, logits_scratch.f32(), static_cast<int>(N), static_cast<int>(C),
                            static_cast<int>(shard.real), static_cast<int>(rows),
                            static_cast<int>(std::min<int64_t>(logits_scratch.dim(0), N)), grad_scale,
                            dw.defined() && dw_mode == GradMode::Overwrite, &shard);
}

void loss_mean(Tensor dst, Tensor losses, float scale, bool accumulate) {
  const char* op = "loss_mean";
  check_f32(dst, op);
  check_f32(losses, op);
  check_shape(dst, {1}, op);
  LMF_CHECK(losses.ndim == 1 && losses.numel() >= 1, op, ": losses '", losses.name, "' must be 1-D and non-empty, got ",
            losses.shape_str());
  check_same_device(op, {&dst, &losses});
  const int64_t n = losses.numel();
  if (dst.device == Device::cpu) {
    const float* l = losses.f32();
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += l[i];
    float* d = dst.f32();
    d[0] = static_cast<float>((accumulate ? static_cast<double>(d[0]) : 0.0) +
                              static_cast<double>(scale) * (s / static_cast<double>(n)));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::loss_mean(dst.f32(), losses.f32(), n, scale, accumulate));
  }
}

void token_logprobs(Tensor logprobs, Tensor logits, Tensor tokens, int64_t vocab_size) {
  const char* op = "token_logprobs";
  check_f32(logprobs, op);
  check_dtype(tokens, DType::i32, op);
  check_same_device(op, {&logprobs, &logits, &tokens});
  LMF_CHECK(logits.ndim == 2 && logprobs.ndim == 1 && tokens.ndim == 1 && logprobs.dim(0) == logits.dim(0) &&
                tokens.dim(0) == logits.dim(0),
            op, ": logprobs '", logprobs.name, "' ", logprobs.shape_str(), ", logits '", logits.name, "' ",
            logits.shape_str(), " and tokens '", tokens.name, "' ", tokens.shape_str(), " must be (M), (M, W), (M)");
  const int64_t M = logits.dim(0), W = logits.dim(1);
  LMF_CHECK(vocab_size >= 1 && vocab_size <= W, op, ": vocab_size=", vocab_size, " must be in [1, W=", W, "]");
  if (logits.device == Device::cpu) {
    check_f32(logits, op);
    for (int64_t m = 0; m < M; ++m) {
      const int32_t t = tokens.i32()[m];
      LMF_CHECK(t >= 0 && t < vocab_size, op, ": token ", t, " of row ", m, " is outside [0, ", vocab_size, ")");
      const float* l = logits.f32() + m * W;
      const float mx = row_max(l, vocab_size);
      logprobs.f32()[m] = -neg_log_softmax(mx, l[t], cpu_math::row_sum_exp_double(l, vocab_size, mx));
    }
  } else {
    check_dtype(logits, DType::bf16, op);
    LMF_CUDA_DISPATCH(op, cuda::token_logprobs(logprobs.f32(), logits.ptr<bf16>(), tokens.i32(), M, vocab_size, W));
  }
}

}  // namespace lmf
