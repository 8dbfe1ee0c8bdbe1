// scaled_compare.h: comparing a CUDA result with the CPU reference when both are fp32 sums
// (GEMMs, column sums), header-only.
//
// Two fp32 summations of the same terms in different orders differ by at most a few units of
// roundoff u = 2^-24 times sum_k |term_k| (the classical bound is K u sum |term|; with random inputs
// the error is a small multiple of u sum |term|, whatever K). So each element gets its own scale,
// scale = |alpha| sum_k |A_ik| |B_kj| + |beta| |C_ij| + |bias_j|, computed by a GEMM of absolute
// values, and the check is |gpu - cpu| <= tol * scale. Unlike one atol for a whole tensor, this
// stays tight for small elements, and a single wrong or missing term (about |A_ik B_kj|) fails it.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "ops/blas.h"

namespace lmf::test {

inline constexpr double kRoundoff = 1.0 / (1 << 24);  // u, fp32 unit roundoff

inline std::vector<float> abs_of(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = std::fabs(v[i]);
  return r;
}

// Row-major scale (M, ldc) of C = alpha op(A) op(B) + beta C0 + bias (bias may be empty), as blas_sgemm.
inline std::vector<float> gemm_error_scale(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                                           const std::vector<float>& A, int64_t lda, const std::vector<float>& B,
                                           int64_t ldb, float beta, const std::vector<float>& C0, int64_t ldc,
                                           const std::vector<float>& bias = {}) {
  std::vector<float> a = abs_of(A), b = abs_of(B), s = abs_of(C0);
  blas_sgemm(ta, tb, M, N, K, std::fabs(alpha), a.data(), lda, b.data(), ldb, std::fabs(beta), s.data(), ldc);
  if (!bias.empty())
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) s[i * ldc + j] += std::fabs(bias[j]);
  return s;
}

// |got[i] - ref[i]| <= tol * scale[i] everywhere (NaN must match NaN). On failure: the worst index,
// both values, the scale and how much of the tolerance was used.
inline ::testing::AssertionResult within_scale(const std::string& what, const std::vector<float>& got,
                                               const std::vector<float>& ref, const std::vector<float>& scale,
                                               double tol) {
  if (got.size() != ref.size() || got.size() != scale.size())
    return ::testing::AssertionFailure() << what << ": sizes " << got.size() << ", " << ref.size() << ", "
                                         << scale.size();
  double worst_used = 0, max_abs = 0;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(ref[i]))
      return ::testing::AssertionFailure()
             << what << ": NaN mismatch at index " << i << ": value " << got[i] << " reference " << ref[i];
    if (std::isnan(got[i])) continue;
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double allowed = tol * scale[i] + 1e-37;
    max_abs = std::max(max_abs, err);
    if (err / allowed > worst_used) {
      worst_used = err / allowed;
      worst = i;
    }
  }
  if (worst_used <= 1.0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << what << ": out of tolerance at index " << worst << " of " << got.size() << ": value " << got[worst]
     << " reference " << ref[worst] << " scale " << scale[worst] << "; max abs err " << max_abs << ", tolerance used "
     << worst_used * 100 << "% (tol " << tol << " * scale)";
  return ::testing::AssertionFailure() << os.str();
}

// Bitwise equality of two float vectors (determinism checks); reports the first difference.
inline ::testing::AssertionResult bitwise_equal(const std::string& what, const std::vector<float>& a,
                                                const std::vector<float>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << what << ": sizes " << a.size() << " vs " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << what << ": first bitwise difference at index " << i << " of " << a.size()
                                           << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

// True when the float's bits are the DeviceBuffer::poison() pattern (every byte 0xff).
inline bool is_poison(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits == 0xffffffffu;
}

}  // namespace lmf::test
