// cpu_math.h: shared scalar/row helpers of the CPU reference ops (header-only, all inline).
//
// Used by attention.cpp and paged_attention.cpp (row_max, exp_nonpos, row_sum, row_dot; through
// attention_row.h), cross_entropy.cpp and sampling.cpp (row_max, exp_nonpos, row_sum_double, the
// log-softmax pair) and activation.cpp (exp_f32). Invariants every helper keeps:
// - Fixed reduction order that depends only on the row length n: kLanes = 8 interleaved partial
//   results (lane j takes elements j, j + 8, j + 16, ... of the first 8 floor(n / 8) elements),
//   combined left to right in lane order, then the tail elements in index order. No dependence on
//   thread count, batch size or alignment, so results are deterministic and batch-invariant.
// - Vectorisable at -O3 without -ffast-math (the build uses -O3 -march=x86-64-v3): the lane loops
//   are written so the compiler need not reassociate, and the exps are branch-free with integer
//   selects only (under the default -ftrapping-math GCC does not if-convert a float compare).
// - Bitwise contract: changing any expression here (even p * r * r into p * (r * r)) changes
//   results; both exps are kept exactly as they were when they lived in the .cpp files.
// - Error bounds: both exps are within 1.4 ulp of exp(x) (the Cephes figure; measured against
//   double exp over every float of the range, -O3 -march=x86-64-v3: max 1.02 ulp for exp_nonpos on
//   [-87.33, 0] and for exp_f32 on [-87, 87]). Sums and dots are plain accumulations over 8 lanes,
//   so at most about n/8 + 15 roundings deep: |error| <= (n/8 + 15) u sum_i |x_i| (|x_i y_i| for
//   row_dot, plus one u per product), u = 2^-24 (2^-53 for row_sum_double), to first order.
// - Special inputs: see each function. row_max ignores NaN unless x[0] is NaN (x > m compares false).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace lmf::cpu_math {

// ---- fixed-order row reductions ----------------------------------------------------------------

constexpr int64_t kLanes = 8;

// max_i x[i], n >= 1. Lanes start at x[0]; a NaN element other than x[0] is skipped (x > m is
// false); -inf and +inf are handled as ordinary values.
inline float row_max(const float* x, int64_t n) {
  float m[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) m[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  float r = m[0];
  for (int64_t j = 1; j < kLanes; ++j) r = m[j] > r ? m[j] : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

// sum_i x[i] accumulated in Acc (float or double), n >= 0 (0 for n = 0). NaN/inf propagate.
template <class Acc>
inline Acc row_sum_as(const float* x, int64_t n) {
  Acc s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) s[j] += x[i + j];
  Acc r = 0;
  for (int64_t j = 0; j < kLanes; ++j) r += s[j];
  for (; i < n; ++i) r += x[i];
  return r;
}

// sum_i x[i] in float.
inline float row_sum(const float* x, int64_t n) { return row_sum_as<float>(x, n); }

// sum_i x[i] in double (long rows, e.g. a 50k-term softmax denominator, where a float sum loses
// ~3 digits).
inline double row_sum_double(const float* x, int64_t n) { return row_sum_as<double>(x, n); }

// ---- log-softmax of a row of logits ------------------------------------------------------------
// One definition for the training loss (cross_entropy.cpp) and serving's log-probabilities
// (sampling.cpp), so that a sampled token's log-probability is bitwise minus the trainer's loss for it.

// row_sum_double of exp_nonpos(x[i] - mx), i < n, without storing the exps (the same bits as writing
// them and summing; the exps are defined below).
inline float exp_nonpos(float x);
inline double row_sum_exp_double(const float* x, int64_t n, float mx) {
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) s[j] += exp_nonpos(x[i + j] - mx);
  double r = 0;
  for (int64_t j = 0; j < kLanes; ++j) r += s[j];
  for (; i < n; ++i) r += exp_nonpos(x[i] - mx);
  return r;
}

// -log softmax(x)[t] from the row's max, x[t] and the sum of exp(x - max): (max - x[t]) + log(sum) in
// double, rounded to float once.
inline float neg_log_softmax(float mx, float x_t, double sum_exp) {
  return static_cast<float>(static_cast<double>(mx) - static_cast<double>(x_t) + std::log(sum_exp));
}

// sum_i x[i] y[i] in float, n >= 0. Products rounded to float before the add (FMA contraction is the
// compiler's, as everywhere in the build).
inline float row_dot(const float* x, const float* y, int64_t n) {
  float s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) s[j] += x[i + j] * y[i + j];
  float r = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) r += s[j];
  for (; i < n; ++i) r += x[i] * y[i];
  return r;
}

// ---- exp ------------------------------------------------------------------------------------
// Both exps are Cephes expf: range reduction x = n ln2 + r (n = round(x / ln2) by the 1.5 * 2^23
// trick, ln2 split in two, Cody-Waite, so |r| <= ln2/2), a degree-7 polynomial in r, and 2^n built
// from the exponent bits (n in [-126, 126], so 2^n is a normal float). They differ in contract and
// clamping (and, for bitwise compatibility, in how the last polynomial step associates).

namespace detail {

// x = n ln2 + r. Valid for |x| <= 87.33 (the callers clamp first).
struct ExpReduced {
  float n, r;
};
inline ExpReduced exp_reduce(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer (even)
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  return {n, r};
}

// The first six Cephes coefficients by Horner; the caller finishes with exp(r) ~ p r^2 + r + 1.
inline float exp_poly(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p;
}

// Bits of 2^n for integral n in [-126, 126].
inline uint32_t exp2_bits(float n) { return static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23; }

}  // namespace detail

// exp(x) for any float x, for sigmoid-style uses (activation.cpp). |x| is clamped to 87 first
// (exp(87) = 6.1e37, exp(-87) = 1.6e-38, both normal floats), so the result is always finite and
// positive: x > 87 and +inf give exp(87), x < -87 and -inf give exp(-87). NaN is NOT propagated: it
// is clamped like a large magnitude and gives exp(+-87) by its sign bit (callers such as
// x / (1 + exp(-x)) still return NaN through x itself). <= 1.4 ulp on [-87, 87].
inline float exp_f32(float x) {
  // The clamp is integer arithmetic on the magnitude bits, with no compare or select: under the default
  // -ftrapping-math GCC will not if-convert a float compare, and a select it turns into a branch gets
  // jump-threaded (x == 87 folds the rest to a constant); either stops the calling loop vectorising.
  // Non-negative floats order like their bit patterns as int32.
  constexpr int32_t kMaxMag = std::bit_cast<int32_t>(87.0f);
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const int32_t d = static_cast<int32_t>(bits & 0x7fffffffu) - kMaxMag;          // no overflow
  const int32_t mag = kMaxMag + (d & (d >> 31));                                  // min(|x|, 87) bits
  x = std::bit_cast<float>(static_cast<uint32_t>(mag) | (bits & 0x80000000u));    // sign back
  const auto [n, r] = detail::exp_reduce(x);
  float p = detail::exp_poly(r);
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>(detail::exp2_bits(n));
}

// exp(x) for x <= 0 (max-subtracted softmax arguments: attention, cross-entropy), <= 1.4 ulp on
// [-87.33, 0]. Exactly 0 below -87.33 (where exp nears the subnormal range, exp(-87.33) = 1.2e-38)
// and for -inf; NaN in gives a quiet NaN out. x > 0 is outside the contract: the sign bit is forced,
// so it returns exp(-x) (and 0 for +inf). Branch-free with integer selects only, so GCC vectorises it
// under the default -ftrapping-math (a float select before the arithmetic stops it).
inline float exp_nonpos(float x) {
  constexpr uint32_t kSign = 0x80000000u, kInf = 0x7f800000u;
  constexpr uint32_t kLimit = std::bit_cast<uint32_t>(87.33f);
  const uint32_t mag = std::bit_cast<uint32_t>(x) & ~kSign;
  const float xc = std::bit_cast<float>(kSign | std::min(mag, kLimit));  // max(x, -87.33)
  const auto [n, r] = detail::exp_reduce(xc);
  float p = detail::exp_poly(r);
  p = p * (r * r) + r + 1.0f;
  const uint32_t scale = detail::exp2_bits(n);         // 2^n, n >= -126
  const uint32_t keep = mag > kLimit ? 0u : ~0u;       // 0 below -87.33, for -inf and NaN
  const uint32_t nan = mag > kInf ? 0x7fc00000u : 0u;  // NaN in, NaN out
  return std::bit_cast<float>(std::bit_cast<uint32_t>(p * std::bit_cast<float>(scale & keep)) | nan);
}

}  // namespace lmf::cpu_math
