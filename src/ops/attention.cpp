// attention.cpp: CPU reference of causal multi-head / grouped-query attention, GEMMs through OpenBLAS.
//
// For each (b, h) in order, the Q, K, V heads are strided views into the qkv buffer (leading
// dimension C3 = (NH + 2 NKV) HS, no copies) and the output head a strided view into out (leading
// dimension NH HS). Rows are processed in blocks of kRowBlock queries; a block only touches key
// columns [0, end of block), so the GEMMs skip (most of) the masked upper triangle:
//   S = scale Q K^T; P = softmax over s <= t (max-subtracted, sum in float), 0 for s > t; O = P V
// Backward (accumulating, += into dqkv):
//   dP = dO V^T; dV += P^T dO; dS = P * (dP - rowsum(dP * P)); dQ += scale dS K; dK += scale dS^T Q
// With GQA several q heads add into the same dK/dV, always in increasing head order: deterministic
// (OpenBLAS sgemm is deterministic for a fixed thread count; softmax rows are independent).
#include "ops/attention.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>

namespace lmf {
namespace {

constexpr const char* kOpForward = "attention_forward";
constexpr const char* kOpBackward = "attention_backward";
constexpr const char* kOpDecode = "attention_decode_forward";

// Query rows per block. A fixed constant, so the order of every reduction depends only on T.
constexpr int kRowBlock = 128;

// Sizes of one attention call.
struct AttnDims {
  int B, T, NH, NKV, HS;
  int C3() const { return (NH + 2 * NKV) * HS; }  // qkv row length
  int CO() const { return NH * HS; }              // out row length
};

// In place on p[0, t] (scores of query row t): p = softmax(p); then zeros in p[t+1, width).
inline void softmax_causal_row(float* p, int t, int width) {
  float mx = p[0];
  for (int s = 1; s <= t; ++s) mx = std::max(mx, p[s]);
  float sum = 0.0f;
  for (int s = 0; s <= t; ++s) {
    const float e = std::exp(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int s = 0; s <= t; ++s) p[s] *= inv;
  for (int s = t + 1; s < width; ++s) p[s] = 0.0f;
}

// out: (B, T, NH*HS); probs: (B, NH, T, T); qkv: (B, T, (NH + 2 NKV) * HS). All row-major.
void attention_forward_cpu(float* out, float* probs, const float* qkv, AttnDims d) {
  const int T = d.T, HS = d.HS, C3 = d.C3(), CO = d.CO(), group = d.NH / d.NKV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HS));
  for (int b = 0; b < d.B; ++b) {
    for (int h = 0; h < d.NH; ++h) {
      const int kvh = h / group;
      const float* q = qkv + static_cast<int64_t>(b) * T * C3 + h * HS;               // (T, HS), ld C3
      const float* k = qkv + static_cast<int64_t>(b) * T * C3 + (d.NH + kvh) * HS;    // (T, HS), ld C3
      const float* v = qkv + static_cast<int64_t>(b) * T * C3 + (d.NH + d.NKV + kvh) * HS;
      float* o = out + static_cast<int64_t>(b) * T * CO + h * HS;                     // (T, HS), ld CO
      float* p = probs + (static_cast<int64_t>(b) * d.NH + h) * T * T;                // (T, T)
      for (int r0 = 0; r0 < T; r0 += kRowBlock) {
        const int r1 = std::min(T, r0 + kRowBlock), rb = r1 - r0;
        // p[r0:r1, 0:r1] = scale q[r0:r1] k[0:r1]^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, r1, HS, scale, q + static_cast<int64_t>(r0) * C3,
                    C3, k, C3, 0.0f, p + static_cast<int64_t>(r0) * T, T);
#pragma omp parallel for schedule(static) if (rb * r1 >= 4096)
        for (int t = r0; t < r1; ++t) softmax_causal_row(p + static_cast<int64_t>(t) * T, t, T);
        // o[r0:r1] = p[r0:r1, 0:r1] v[0:r1]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, HS, r1, 1.0f, p + static_cast<int64_t>(r0) * T,
                    T, v, C3, 0.0f, o + static_cast<int64_t>(r0) * CO, CO);
      }
    }
  }
}

// dqkv: (B, T, C3) accumulated; dprobs: (B, NH, T, T) scratch; dout: (B, T, NH*HS);
// qkv: (B, T, C3); probs: (B, NH, T, T) from the forward.
void attention_backward_cpu(float* dqkv, float* dprobs, const float* dout, const float* qkv, const float* probs,
                            AttnDims d) {
  const int T = d.T, HS = d.HS, C3 = d.C3(), CO = d.CO(), group = d.NH / d.NKV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HS));
  for (int b = 0; b < d.B; ++b) {
    for (int h = 0; h < d.NH; ++h) {
      const int kvh = h / group;
      const int64_t base = static_cast<int64_t>(b) * T * C3;
      const float* q = qkv + base + h * HS;                      // (T, HS), ld C3
      const float* k = qkv + base + (d.NH + kvh) * HS;
      const float* v = qkv + base + (d.NH + d.NKV + kvh) * HS;
      float* dq = dqkv + base + h * HS;
      float* dk = dqkv + base + (d.NH + kvh) * HS;
      float* dv = dqkv + base + (d.NH + d.NKV + kvh) * HS;
      const float* dO = dout + static_cast<int64_t>(b) * T * CO + h * HS;            // (T, HS), ld CO
      const float* p = probs + (static_cast<int64_t>(b) * d.NH + h) * T * T;         // (T, T)
      float* dp = dprobs + (static_cast<int64_t>(b) * d.NH + h) * T * T;             // (T, T)
      for (int r0 = 0; r0 < T; r0 += kRowBlock) {
        const int r1 = std::min(T, r0 + kRowBlock), rb = r1 - r0;
        const float* pb = p + static_cast<int64_t>(r0) * T;   // (rb, r1), ld T
        float* dpb = dp + static_cast<int64_t>(r0) * T;       // (rb, r1), ld T
        const float* dOb = dO + static_cast<int64_t>(r0) * CO;
        // dp[r0:r1, 0:r1] = dO[r0:r1] v[0:r1]^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rb, r1, HS, 1.0f, dOb, CO, v, C3, 0.0f, dpb, T);
        // dv[0:r1] += p[r0:r1, 0:r1]^T dO[r0:r1]
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, HS, rb, 1.0f, pb, T, dOb, CO, 1.0f, dv, C3);
        // ds = p * (dp - sum_s dp p), in place over dp; zero for s > t
#pragma omp parallel for schedule(static) if (rb * r1 >= 4096)
        for (int t = r0; t < r1; ++t) {
          const float* pr = p + static_cast<int64_t>(t) * T;
          float* dr = dp + static_cast<int64_t>(t) * T;
          float dot = 0.0f;
          for (int s = 0; s <= t; ++s) dot += dr[s] * pr[s];
          for (int s = 0; s <= t; ++s) dr[s] = pr[s] * (dr[s] - dot);
          for (int s = t + 1; s < r1; ++s) dr[s] = 0.0f;
        }
        // dq[r0:r1] += scale ds[r0:r1, 0:r1] k[0:r1]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rb, HS, r1, scale, dpb, T, k, C3, 1.0f,
                    dq + static_cast<int64_t>(r0) * C3, C3);
        // dk[0:r1] += scale ds[r0:r1, 0:r1]^T q[r0:r1]
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, HS, rb, scale, dpb, T,
                    q + static_cast<int64_t>(r0) * C3, C3, 1.0f, dk, C3);
      }
    }
  }
}

// out: (NH*HS); scores: (NH, maxT) scratch; q: (NH*HS); k_cache, v_cache: (maxT, NKV*HS), rows
// [0, n_ctx) used. Same arithmetic as one row of the forward: scale applied to the dot product,
// max-subtracted softmax with a float sum, then the probability-weighted sum of V rows.
void attention_decode_cpu(float* out, float* scores, const float* q, const float* k_cache, const float* v_cache,
                          int n_ctx, int maxT, int NH, int NKV, int HS) {
  const int group = NH / NKV, ldkv = NKV * HS;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HS));
  for (int h = 0; h < NH; ++h) {
    const int kvh = h / group;
    float* sc = scores + static_cast<int64_t>(h) * maxT;
    // sc[0:n_ctx] = scale k[0:n_ctx] q_h
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n_ctx, HS, scale, k_cache + kvh * HS, ldkv, q + h * HS, 1, 0.0f, sc,
                1);
    softmax_causal_row(sc, n_ctx - 1, n_ctx);
    // out_h = v[0:n_ctx]^T sc[0:n_ctx]
    cblas_sgemv(CblasRowMajor, CblasTrans, n_ctx, HS, 1.0f, v_cache + kvh * HS, ldkv, sc, 1, 0.0f, out + h * HS,
                1);
  }
}

// Checks the head counts against the qkv row length C3 and returns HS.
int64_t head_size(const char* op, const Tensor& qkv, int n_head, int n_kv_head) {
  LMF_CHECK(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0, op, ": n_head=", n_head,
            " must be a positive multiple of n_kv_head=", n_kv_head);
  LMF_CHECK(qkv.ndim == 3, op, ": qkv '", qkv.name, "' must be (B, T, (NH + 2 NKV) HS), got ", qkv.shape_str());
  const int64_t C3 = qkv.shape[2], heads = n_head + 2 * int64_t{n_kv_head};
  LMF_CHECK(C3 >= heads && C3 % heads == 0, op, ": qkv '", qkv.name, "' ", qkv.shape_str(), " last dim ", C3,
            " is not a multiple of NH + 2 NKV = ", heads, " (n_head=", n_head, ", n_kv_head=", n_kv_head, ")");
  LMF_CHECK(qkv.shape[0] <= INT_MAX && qkv.shape[1] <= INT_MAX && C3 <= INT_MAX, op, ": qkv '", qkv.name, "' ",
            qkv.shape_str(), " exceeds the BLAS int range");
  return C3 / heads;
}

}  // namespace

void attention_forward(Tensor out, Tensor probs, Tensor qkv, int n_head, int n_kv_head) {
  check_f32(out, kOpForward);
  check_f32(probs, kOpForward);
  check_f32(qkv, kOpForward);
  check_same_device(kOpForward, {&out, &probs, &qkv});
  const int64_t HS = head_size(kOpForward, qkv, n_head, n_kv_head);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(out, {B, T, n_head * HS}, kOpForward);
  check_shape(probs, {B, n_head, T, T}, kOpForward);
  if (B == 0 || T == 0) return;
  const AttnDims d{static_cast<int>(B), static_cast<int>(T), n_head, n_kv_head, static_cast<int>(HS)};
  if (qkv.device == Device::cpu)
    attention_forward_cpu(out.f32(), probs.f32(), qkv.f32(), d);
  else
    fail(kOpForward, ": CUDA backend not built");
}

void attention_backward(Tensor dqkv, Tensor dprobs, Tensor dout, Tensor qkv, Tensor probs, int n_head,
                        int n_kv_head) {
  check_f32(dqkv, kOpBackward);
  check_f32(dprobs, kOpBackward);
  check_f32(dout, kOpBackward);
  check_f32(qkv, kOpBackward);
  check_f32(probs, kOpBackward);
  check_same_device(kOpBackward, {&dqkv, &dprobs, &dout, &qkv, &probs});
  const int64_t HS = head_size(kOpBackward, qkv, n_head, n_kv_head);
  const int64_t B = qkv.shape[0], T = qkv.shape[1];
  check_shape(dqkv, {B, T, qkv.shape[2]}, kOpBackward);
  check_shape(dprobs, {B, n_head, T, T}, kOpBackward);
  check_shape(dout, {B, T, n_head * HS}, kOpBackward);
  check_shape(probs, {B, n_head, T, T}, kOpBackward);
  if (B == 0 || T == 0) return;
  const AttnDims d{static_cast<int>(B), static_cast<int>(T), n_head, n_kv_head, static_cast<int>(HS)};
  if (qkv.device == Device::cpu)
    attention_backward_cpu(dqkv.f32(), dprobs.f32(), dout.f32(), qkv.f32(), probs.f32(), d);
  else
    fail(kOpBackward, ": CUDA backend not built");
}

void attention_decode_forward(Tensor out, Tensor scores, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_ctx,
                              int n_head, int n_kv_head) {
  check_f32(out, kOpDecode);
  check_f32(scores, kOpDecode);
  check_f32(q, kOpDecode);
  check_f32(k_cache, kOpDecode);
  check_f32(v_cache, kOpDecode);
  check_same_device(kOpDecode, {&out, &scores, &q, &k_cache, &v_cache});
  LMF_CHECK(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0, kOpDecode, ": n_head=", n_head,
            " must be a positive multiple of n_kv_head=", n_kv_head);
  LMF_CHECK(k_cache.ndim == 2 && k_cache.shape[1] >= n_kv_head && k_cache.shape[1] % n_kv_head == 0, kOpDecode,
            ": k_cache '", k_cache.name, "' ", k_cache.shape_str(), " must be (maxT, NKV * HS) with n_kv_head=",
            n_kv_head);
  const int64_t maxT = k_cache.shape[0], HS = k_cache.shape[1] / n_kv_head;
  check_shape(v_cache, {maxT, n_kv_head * HS}, kOpDecode);
  check_shape(q, {n_head * HS}, kOpDecode);
  check_shape(out, {n_head * HS}, kOpDecode);
  check_shape(scores, {n_head, maxT}, kOpDecode);
  LMF_CHECK(n_ctx >= 1 && n_ctx <= maxT, kOpDecode, ": n_ctx=", n_ctx, " must be in [1, maxT=", maxT,
            "] of k_cache '", k_cache.name, "'");
  LMF_CHECK(maxT <= INT_MAX && k_cache.shape[1] <= INT_MAX, kOpDecode, ": k_cache '", k_cache.name, "' ",
            k_cache.shape_str(), " exceeds the BLAS int range");
  if (q.device == Device::cpu)
    attention_decode_cpu(out.f32(), scores.f32(), q.f32(), k_cache.f32(), v_cache.f32(), static_cast<int>(n_ctx),
                         static_cast<int>(maxT), n_head, n_kv_head, static_cast<int>(HS));
  else
    fail(kOpDecode, ": CUDA backend not built");
}

}  // namespace lmf
