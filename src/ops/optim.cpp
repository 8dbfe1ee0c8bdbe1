// optim.cpp: CPU reference of the global gradient norm and the AdamW update.
//
// grad_global_norm: the elements are cut into fixed blocks of kNormBlock; each block's sum of
// squares is accumulated in double (kNormLanes interleaved partial sums, combined in lane order),
// and the block sums are added in block order. The result depends only on the data, never on the
// number of threads. No heap allocation: blocks are handled kNormGroup at a time.
// adamw_update: the header's formula per element in float; the bias corrections are computed once
// on the host (in double, rounded to float) and the CPU multiplies by their reciprocals (rounded to
// float once per call) where the GPU kernel divides (within an ulp); the clip factor is read from the
// norm tensor by the kernel (no host sync on the GPU path).
// adamw_update_flat: the flat array is cut at the range boundaries into decayed and undecayed
// segments, and each segment goes through adamw_update's own loop with its decay, so every element
// is computed by the same code as per tensor (bitwise equal).
#include "ops/optim.h"

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/arena.h"
#include "core/parallel.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr const char* kOpNorm = "grad_global_norm";
constexpr const char* kOpAdamW = "adamw_update";
constexpr const char* kOpAdamWFlat = "adamw_update_flat";

constexpr int kNormGroup = 64;           // blocks per parallel group (stack array of partial sums)
constexpr int kNormLanes = 8;            // interleaved double accumulators in a block (vectorisable)

// sum of g[i]^2 for i in [0, n), in double, in a fixed order.
double block_sum_squares(const float* g, int64_t n) {
  double lane[kNormLanes] = {};
  int64_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes)
    for (int j = 0; j < kNormLanes; ++j) lane[j] += static_cast<double>(g[i + j]) * g[i + j];
  for (int j = 0; i < n; ++i, ++j) lane[j] += static_cast<double>(g[i]) * g[i];
  double s = 0.0;
  for (int j = 0; j < kNormLanes; ++j) s += lane[j];
  return s;
}

// norm: (1); grads: (n) flat.
void grad_global_norm_cpu(float* norm, const float* grads, int64_t n) {
  const int64_t n_blocks = (n + kNormBlock - 1) / kNormBlock;
  double total = 0.0;
  for (int64_t g0 = 0; g0 < n_blocks; g0 += kNormGroup) {
    const int nb = static_cast<int>(std::min<int64_t>(kNormGroup, n_blocks - g0));
    double part[kNormGroup];
    parallel_for(nb, 1, [&](int64_t b, int64_t) {  // one block per chunk
      const int64_t i0 = (g0 + b) * kNormBlock;
      part[b] = block_sum_squares(grads + i0, std::min(kNormBlock, n - i0));
    });
    for (int b = 0; b < nb; ++b) total += part[b];
  }
  norm[0] = static_cast<float>(std::sqrt(total));
}

// The per-element constants of one update.
struct AdamWConsts {
  float clip, beta1, beta2, one_m_b1, one_m_b2, inv_corr1, inv_corr2, lr, eps, weight_decay;
};

// The element update on 8 lanes (AVX2/FMA), with explicit fused and unfused operations: every element
// gets exactly these whichever part of a range it falls in (aligned body, head or tail), so its bits
// do not depend on where the range starts (adamw_update_flat's segments vs adamw_update's tensors).
__attribute__((target("avx2,fma"))) inline void adamw_lanes(const AdamWConsts& k, __m256 grad, __m256& p, __m256& m,
                                                             __m256& v) {
  const __m256 g = _mm256_mul_ps(_mm256_set1_ps(k.clip), grad);
  m = _mm256_fmadd_ps(_mm256_set1_ps(k.beta1), m, _mm256_mul_ps(_mm256_set1_ps(k.one_m_b1), g));
  v = _mm256_fmadd_ps(_mm256_set1_ps(k.beta2), v, _mm256_mul_ps(_mm256_set1_ps(k.one_m_b2), _mm256_mul_ps(g, g)));
  const __m256 m_hat = _mm256_mul_ps(m, _mm256_set1_ps(k.inv_corr1));
  const __m256 v_hat = _mm256_mul_ps(v, _mm256_set1_ps(k.inv_corr2));
  const __m256 step = _mm256_div_ps(m_hat, _mm256_add_ps(_mm256_sqrt_ps(v_hat), _mm256_set1_ps(k.eps)));
  const __m256 upd = _mm256_fmadd_ps(_mm256_set1_ps(k.weight_decay), p, step);
  p = _mm256_fnmadd_ps(_mm256_set1_ps(k.lr), upd, p);  // p - lr * upd
}

// Lanes [0, n) of 8 (n <= 8).
__attribute__((target("avx2,fma"))) inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Elements [i0, i1). The 32-byte-aligned body of a large update writes param, m and v with streaming
// stores: the arrays are far larger than the caches and not read again before the next step, and a
// plain store first reads each line it writes (GPT-2's 124M parameters: 40 bytes of traffic per
// element become 28). Head and tail elements go through masked loads and stores.
__attribute__((target("avx2,fma"))) void adamw_range_avx2(float* param, float* m, float* v, const float* grad,
                                                          int64_t i0, int64_t i1, const AdamWConsts& k, bool stream) {
  int64_t i = i0;
  const int64_t misalign = (reinterpret_cast<uintptr_t>(param + i) & 31) / sizeof(float);
  stream = stream && (reinterpret_cast<uintptr_t>(m + i) & 31) == (reinterpret_cast<uintptr_t>(param + i) & 31) &&
           (reinterpret_cast<uintptr_t>(v + i) & 31) == (reinterpret_cast<uintptr_t>(param + i) & 31);
  const int64_t head = stream && misalign ? std::min<int64_t>(8 - misalign, i1 - i) : 0;
  for (int64_t done = 0; i < i1; i += done) {
    const int64_t left = i1 - i;
    done = i < i0 + head ? head : std::min<int64_t>(8, left);
    if (done == 8) {
      __m256 p = _mm256_loadu_ps(param + i), mm = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
      adamw_lanes(k, _mm256_loadu_ps(grad + i), p, mm, vv);
      if (stream) {
        _mm256_stream_ps(param + i, p);
        _mm256_stream_ps(m + i, mm);
        _mm256_stream_ps(v + i, vv);
      } else {
        _mm256_storeu_ps(param + i, p);
        _mm256_storeu_ps(m + i, mm);
        _mm256_storeu_ps(v + i, vv);
      }
    } else {
      const __m256i lanes = first_lanes(done);
      __m256 p = _mm256_maskload_ps(param + i, lanes), mm = _mm256_maskload_ps(m + i, lanes);
      __m256 vv = _mm256_maskload_ps(v + i, lanes);
      adamw_lanes(k, _mm256_maskload_ps(grad + i, lanes), p, mm, vv);
      _mm256_maskstore_ps(param + i, lanes, p);
      _mm256_maskstore_ps(m + i, lanes, mm);
      _mm256_maskstore_ps(v + i, lanes, vv);
    }
  }
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: done before the chunk reports done
}

// The same operations one element at a time, for CPUs without AVX2/FMA.
void adamw_range_scalar(float* param, float* m, float* v, const float* grad, int64_t i0, int64_t i1,
                        const AdamWConsts& k) {
  for (int64_t i = i0; i < i1; ++i) {
    const float g = k.clip * grad[i];
    const float mi = std::fma(k.beta1, m[i], k.one_m_b1 * g);
    const float vi = std::fma(k.beta2, v[i], k.one_m_b2 * (g * g));
    m[i] = mi;
    v[i] = vi;
    const float step = (mi * k.inv_corr1) / (std::sqrt(vi * k.inv_corr2) + k.eps);
    param[i] = std::fma(-k.lr, std::fma(k.weight_decay, param[i], step), param[i]);
  }
}

// Arrays of at least this many elements take streaming stores (smaller ones stay in cache for the
// next step: the tiny model's 0.8M parameters and moments fit in L2 and L3).
constexpr int64_t kStreamMin = int64_t{1} << 22;

// param, m, v, grad: (n) flat; norm: (1) global gradient norm, or nullptr when clipping is off.
void adamw_update_cpu(float* param, float* m, float* v, const float* grad, const float* norm, int64_t n, float max_norm,
                      float lr, float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                      float bias_corr2) {
  // torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))
  const float clip = (norm && max_norm > 0.0f) ? std::min(1.0f, max_norm / (norm[0] + 1e-6f)) : 1.0f;
  // Multiplying by the reciprocals of the bias corrections: two divisions per element fewer (the
  // update is 460 -> 290 ms for GPT-2's 124M parameters on one core); within an ulp of dividing, as
  // the GPU kernel does.
  const AdamWConsts k{clip,          beta1,       beta2, 1.0f - beta1, 1.0f - beta2, 1.0f / bias_corr1,
                      1.0f / bias_corr2, lr, eps,   weight_decay};
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool stream = n >= kStreamMin;
  parallel_for(n, grain_for(n, 1 << 14), [&](int64_t i0, int64_t i1) {
    if (avx2) adamw_range_avx2(param, m, v, grad, i0, i1, k, stream);
    else adamw_range_scalar(param, m, v, grad, i0, i1, k);
  });
}

// Checks shared by adamw_update and adamw_update_flat (op = the entry's name); returns the bias
// corrections 1 - beta1^step, 1 - beta2^step (computed in double, rounded to float) and the norm
// pointer the kernels read (nullptr when clipping is off).
struct AdamWPrep {
  float bc1, bc2;
  const float* norm;
};

AdamWPrep adamw_prepare(const char* op, const Tensor& param, const Tensor& m, const Tensor& v, const Tensor& grad,
                        const Tensor& norm, float max_norm, float beta1, float beta2, int64_t step) {
  check_f32(param, op);
  check_f32(m, op);
  check_f32(v, op);
  check_f32(grad, op);
  check_same_device(op, {&param, &m, &v, &grad, &norm});
  const int64_t n = param.numel();
  LMF_CHECK(m.numel() == n, op, ": m '", m.name, "' ", m.shape_str(), " has ", m.numel(), " elements but param '",
            param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(v.numel() == n, op, ": v '", v.name, "' ", v.shape_str(), " has ", v.numel(), " elements but param '",
            param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(grad.numel() == n, op, ": grad '", grad.name, "' ", grad.shape_str(), " has ", grad.numel(),
            " elements but param '", param.name, "' ", param.shape_str(), " has ", n);
  LMF_CHECK(step >= 1, op, ": step=", step, " for param '", param.name, "' must count from 1");
  LMF_CHECK(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f, op, ": beta1=", beta1,
            " beta2=", beta2, " must be in [0, 1)");
  // The norm is only read when clipping is on.
  if (max_norm > 0.0f) {
    check_f32(norm, op);
    check_shape(norm, {1}, op);
  }
  float sched[3];
  adamw_schedule(sched, 0.0f, beta1, beta2, step);
  return {sched[1], sched[2], max_norm > 0.0f ? norm.f32() : nullptr};
}

}  // namespace

void adamw_schedule(float out[3], float lr, float beta1, float beta2, int64_t step) {
  out[0] = lr;
  out[1] = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step)));
  out[2] = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step)));
}

size_t grad_global_norm_cuda_workspace(int64_t n) {
  return static_cast<size_t>((n + kNormBlock - 1) / kNormBlock) * sizeof(double);
}

void grad_global_norm(Tensor norm, Tensor grads) {
  check_f32(norm, kOpNorm);
  check_f32(grads, kOpNorm);
  check_same_device(kOpNorm, {&norm, &grads});
  check_shape(norm, {1}, kOpNorm);
  if (norm.device == Device::cpu) grad_global_norm_cpu(norm.f32(), grads.f32(), grads.numel());
  else LMF_CUDA_DISPATCH(kOpNorm, cuda::grad_global_norm(norm.f32(), grads.f32(), grads.numel()));
}

void adamw_update(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor norm, float max_norm, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step) {
  const AdamWPrep a = adamw_prepare(kOpAdamW, param, m, v, grad, norm, max_norm, beta1, beta2, step);
  const int64_t n = param.numel();
  if (param.device == Device::cpu)
    adamw_update_cpu(param.f32(), m.f32(), v.f32(), grad.f32(), a.norm, n, max_norm, lr, beta1, beta2, eps,
                     weight_decay, a.bc1, a.bc2);
  else
    LMF_CUDA_DISPATCH(kOpAdamW, cuda::adamw_update(param.f32(), m.f32(), v.f32(), grad.f32(), a.norm, n, max_norm, lr,
                                                   beta1, beta2, eps, weight_decay, a.bc1, a.bc2));
}

void adamw_update_flat(Tensor param, Tensor m, Tensor v, Tensor grad, Tensor decay_ranges, Tensor norm, float max_norm,
                       float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                       Tensor param_bf16, Tensor schedule) {
  const char* op = kOpAdamWFlat;
  const AdamWPrep a = adamw_prepare(op, param, m, v, grad, norm, max_norm, beta1, beta2, step);
  const int64_t n = param.numel();
  LMF_CHECK(param.ndim == 1, op, ": param '", param.name, "' has shape ", param.shape_str(),
            ", expected a 1-D flat view (Arena::flat_f32())");
  // The decay table: (S, 2) i32 on the host, sorted, non-overlapping, non-empty ranges inside [0, n).
  const char* rn = decay_ranges.name;
  // A (0, 2) table (no decay anywhere) may have no data (an empty std::vector's data() is null).
  const bool empty_table = decay_ranges.ndim == 2 && decay_ranges.shape[0] == 0 && decay_ranges.shape[1] == 2;
  LMF_CHECK(decay_ranges.defined() || empty_table, op, ": decay_ranges '", rn,
            "' is absent (pass a (0, 2) table for no decay)");
  LMF_CHECK(decay_ranges.dtype == DType::i32, op, ": decay_ranges '", rn, "' has dtype ",
            dtype_name(decay_ranges.dtype), ", expected i32");
  LMF_CHECK(decay_ranges.ndim == 2 && decay_ranges.shape[1] == 2, op, ": decay_ranges '", rn, "' has shape ",
            decay_ranges.shape_str(), ", expected (S, 2) [begin, end) pairs");
  LMF_CHECK(decay_ranges.device == Device::cpu, op, ": decay_ranges '", rn, "' is on ",
            device_name(decay_ranges.device), " but must be a host (cpu) tensor: it is passed to the kernel by value");
  const int64_t S = decay_ranges.shape[0];
  LMF_CHECK(S <= kAdamWMaxDecayRanges, op, ": decay_ranges '", rn, "' has ", S, " ranges, at most ",
            kAdamWMaxDecayRanges, " are supported");
  const int32_t* r = decay_ranges.i32();
  for (int64_t k = 0; k < S; ++k) {
    const int64_t b = r[2 * k], e = r[2 * k + 1];
    LMF_CHECK(0 <= b && b < e && e <= n, op, ": decay_ranges '", rn, "' range #", k, " [", b, ", ", e,
              ") is empty or outside [0, ", n, ") of param '", param.name, "'");
    LMF_CHECK(k == 0 || r[2 * k - 1] <= b, op, ": decay_ranges '", rn, "' range #", k, " [", b, ", ", e,
              ") starts before range #", k - 1, " ends (", r[2 * k - 1], "): ranges must be sorted and disjoint");
  }
  if (schedule.defined()) {
    check_f32(schedule, op);
    check_shape(schedule, {3}, op);
    LMF_CHECK(schedule.device == Device::cuda && param.device == Device::cuda, op, ": schedule '", schedule.name,
              "' is for GPU runs (graph replays); on the CPU pass lr and step");
  }
  if (param_bf16.defined()) {
    check_dtype(param_bf16, DType::bf16, op);
    LMF_CHECK(param_bf16.numel() == n && param.device == Device::cuda, op, ": param_bf16 '", param_bf16.name, "' ",
              param_bf16.shape_str(), " must have the ", n, " elements of param '", param.name, "', on the GPU");
  }
  if (param.device == Device::cpu) {
    float *p = param.f32(), *pm = m.f32(), *pv = v.f32();
    const float* g = grad.f32();
    // Segment [b, e) with decay wd, through adamw_update's loop.
    auto segment = [&](int64_t b, int64_t e, float wd) {
      if (e > b)
        adamw_update_cpu(p + b, pm + b, pv + b, g + b, a.norm, e - b, max_norm, lr, beta1, beta2, eps, wd, a.bc1,
                         a.bc2);
    };
    int64_t pos = 0;
    for (int64_t k = 0; k < S; ++k) {
      segment(pos, r[2 * k], 0.0f);
      segment(r[2 * k], r[2 * k + 1], weight_decay);
      pos = r[2 * k + 1];
    }
    segment(pos, n, 0.0f);
  } else {
    LMF_CUDA_DISPATCH(op, cuda::adamw_update_flat(param.f32(), m.f32(), v.f32(), grad.f32(), a.norm, n, r, S, max_norm,
                                                  lr, beta1, beta2, eps, weight_decay, a.bc1, a.bc2,
                                                  param_bf16.defined() ? param_bf16.ptr<bf16>() : nullptr,
                                                  schedule.defined() ? schedule.f32() : nullptr));
  }
}

std::vector<int32_t> adamw_decay_ranges(const Arena& params) {
  const Tensor flat = params.flat_f32();  // checks that every spec is f32
  const int64_t n = flat.numel();
  LMF_CHECK(n <= INT32_MAX, "adamw_decay_ranges: arena '", params.name(), "' has ", n,
            " f32 elements, more than the i32 decay table can address (", INT32_MAX, ")");
  std::vector<int32_t> r;
  bool open = false;  // the last range may still grow: only decayed tensors and padding since its start
  for (size_t i = 0; i < params.size(); ++i) {
    const TensorSpec& s = params.spec(i);
    if (s.numel() == 0) continue;  // no elements: neither extends nor breaks a range
    const bool decay = s.shape.size() >= 2;  // matrices, and stacks of them (MoE experts)
    if (!decay) {
      open = false;
      continue;
    }
    const auto b = static_cast<int32_t>(params.offset_elems(i));
    const auto e = static_cast<int32_t>(params.offset_elems(i) + static_cast<size_t>(s.numel()));
    if (open) {
      r.back() = e;
    } else {
      r.push_back(b);
      r.push_back(e);
      open = true;
    }
  }
  LMF_CHECK(static_cast<int64_t>(r.size() / 2) <= kAdamWMaxDecayRanges, "adamw_decay_ranges: arena '", params.name(),
            "' needs ", r.size() / 2, " decay ranges, at most ", kAdamWMaxDecayRanges, " are supported");
  return r;
}

void cast_to_bf16(Tensor dst, Tensor src) {
  const char* op = "cast_to_bf16";
  check_dtype(dst, DType::bf16, op);
  check_f32(src, op);
  check_same_device(op, {&dst, &src});
  LMF_CHECK(dst.numel() == src.numel(), op, ": '", dst.name, "' ", dst.shape_str(), " and '", src.name, "' ",
            src.shape_str(), " differ in size");
  LMF_CUDA_DISPATCH(op, cuda::cast_to_bf16(dst.ptr<bf16>(), src.f32(), src.numel()));
}

void nonfinite_guard(Tensor guard, Tensor loss, Tensor norm) {
  const char* op = "nonfinite_guard";
  check_dtype(guard, DType::i32, op);
  check_f32(loss, op);
  check_f32(norm, op);
  check_same_device(op, {&guard, &loss, &norm});
  check_shape(guard, {2}, op);
  check_shape(loss, {1}, op);
  check_shape(norm, {1}, op);
  if (guard.device == Device::cpu) {
    int32_t* g = guard.i32();
    g[0] += 1;
    if (g[1] == 0 && !(std::isfinite(loss.f32()[0]) && std::isfinite(norm.f32()[0]))) g[1] = g[0];
  } else {
    LMF_CUDA_DISPATCH(op, cuda::nonfinite_guard(guard.i32(), loss.f32(), norm.f32()));
  }
}

}  // namespace lmf
