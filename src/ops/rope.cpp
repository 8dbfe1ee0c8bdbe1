// rope.cpp: CPU reference of rotary position embedding, "rotate half" convention (rope.h).
//
// The (cos, sin) table is computed in double and rounded to f32 once, so every backend reads the
// same angles. Forward rotates the q and k heads of each qkv row in place by +angle; backward applies
// the transpose (rotation by -angle) to the q and k gradients in place (it does not accumulate);
// v and dv are untouched. Rows are independent, so results do not depend on the thread count.
// bf16 qkv/dqkv (mixed precision) run on the GPU only; the CPU stays the fp32 reference.
#include "ops/rope.h"

#include <cmath>
#include <initializer_list>

#include "core/parallel.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr int64_t kMinGrain = 1 << 13;  // elements per parallel chunk (smaller ops run on one thread)

// freqs: (maxT, half, 2) of (cos, sin) of p * theta^(-2i/HS), HS = 2 * half
void rope_table_init_cpu(float* freqs, int64_t maxT, int64_t half, double theta) {
  const double HS = static_cast<double>(2 * half);
  parallel_for(maxT, grain_for(maxT, kMinGrain / half + 1), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / HS);
        freqs[(p * half + i) * 2 + 0] = static_cast<float>(std::cos(angle));
        freqs[(p * half + i) * 2 + 1] = static_cast<float>(std::sin(angle));
      }
  });
}

// qkv: (B*T, row) row-major with row = (NH + 2*NKV) * HS; the first n_rot = NH + NKV heads (q then k)
// are rotated. freqs: (maxT, half, 2); row n has position positions[n], or pos_offset + n % T without them.
// sign = +1 rotates by +angle (forward), -1 by -angle (backward: the transpose).
void rope_rotate_cpu(float* qkv, const float* freqs, int64_t B, int64_t T, int64_t row, int64_t n_rot,
                     int64_t half, const int32_t* positions, int64_t pos_offset, float sign) {
  const int64_t N = B * T, HS = 2 * half;
  parallel_for(N, grain_for(N, kMinGrain / (n_rot * HS) + 1), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* cs = freqs + (positions ? positions[n] : pos_offset + n % T) * half * 2;  // (half, 2)
      for (int64_t h = 0; h < n_rot; ++h) {
        float* x = qkv + n * row + h * HS;  // (HS) = [x1 (half) | x2 (half)]
        for (int64_t i = 0; i < half; ++i) {
          const float c = cs[2 * i], s = sign * cs[2 * i + 1];
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c - x2 * s;
          x[i + half] = x2 * c + x1 * s;
        }
      }
    }
  });
}

// Validates qkv/freqs/heads/positions; returns (rows are B*T) half = HS/2. qkv f32, or bf16 on the
// GPU (check_dtype names a bf16 qkv on the CPU); freqs f32.
// positions_tensor: the rows' positions come from a tensor (checked by the caller), not pos_offset + t.
int64_t check_rope(const Tensor& qkv, const Tensor& freqs, int n_head, int n_kv_head, int64_t pos_offset,
                   bool positions_tensor,
                   const char* op) {
  check_dtype(qkv, qkv.defined() && qkv.dtype == DType::bf16 ? DType::bf16 : DType::f32, op);
  check_f32(freqs, op);
  check_same_device(op, {&qkv, &freqs});
  LMF_CHECK(freqs.ndim == 3 && freqs.dim(2) == 2 && freqs.dim(1) > 0, op, ": tensor '", freqs.name,
            "' has shape ", freqs.shape_str(), ", expected (maxT, HS/2, 2)");
  LMF_CHECK(n_head > 0 && n_kv_head > 0, op, ": n_head=", n_head, " n_kv_head=", n_kv_head, " must be > 0");
  const int64_t half = freqs.dim(1), HS = 2 * half, maxT = freqs.dim(0);
  LMF_CHECK(qkv.ndim == 3 && qkv.dim(2) == (n_head + 2 * static_cast<int64_t>(n_kv_head)) * HS, op,
            ": tensor '", qkv.name, "' has shape ", qkv.shape_str(), ", expected (B, T, (NH + 2*NKV) * HS) with NH=",
            n_head, " NKV=", n_kv_head, " HS=", HS, " (from '", freqs.name, "')");
  const int64_t T = qkv.dim(1);
  LMF_CHECK(positions_tensor || (pos_offset >= 0 && pos_offset + T <= maxT), op, ": positions [", pos_offset, ", ", pos_offset + T,
            ") of tensor '", qkv.name, "' exceed the table '", freqs.name, "' with maxT=", maxT);
  return half;
}

}  // namespace

void rope_table_init(Tensor freqs, float theta) {
  const char* op = "rope_table_init";
  check_f32(freqs, op);
  LMF_CHECK(freqs.ndim == 3 && freqs.dim(2) == 2 && freqs.dim(1) > 0, op, ": tensor '", freqs.name,
            "' has shape ", freqs.shape_str(), ", expected (maxT, HS/2, 2)");
  LMF_CHECK(theta > 0.0f && std::isfinite(theta), op, ": theta=", theta, " must be positive and finite");
  // CPU only: the model builds the table on the host once and copies it to the device.
  LMF_CHECK(freqs.device == Device::cpu, op, ": tensor '", freqs.name,
            "' is on the GPU; the table is built on the CPU and copied (tensor_from_host)");
  rope_table_init_cpu(freqs.f32(), freqs.dim(0), freqs.dim(1), theta);
}

void rope_forward(Tensor qkv, Tensor freqs, int n_head, int n_kv_head, int64_t pos_offset) {
  const char* op = "rope_forward";
  const int64_t half = check_rope(qkv, freqs, n_head, n_kv_head, pos_offset, false, op);
  if (qkv.dtype == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(qkv.ptr<bf16>(), freqs.f32(), qkv.dim(0), qkv.dim(1), qkv.dim(2),
                                            n_head + n_kv_head, half, nullptr, pos_offset, 1.0f));
  else if (qkv.device == Device::cpu)
    rope_rotate_cpu(qkv.f32(), freqs.f32(), qkv.dim(0), qkv.dim(1), qkv.dim(2), n_head + n_kv_head, half,
                    nullptr, pos_offset, 1.0f);
  else
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(qkv.f32(), freqs.f32(), qkv.dim(0), qkv.dim(1), qkv.dim(2),
                                            n_head + n_kv_head, half, nullptr, pos_offset, 1.0f));
}

void rope_backward(Tensor dqkv, Tensor freqs, int n_head, int n_kv_head, int64_t pos_offset) {
  const char* op = "rope_backward";
  const int64_t half = check_rope(dqkv, freqs, n_head, n_kv_head, pos_offset, false, op);
  if (dqkv.dtype == DType::bf16)
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(dqkv.ptr<bf16>(), freqs.f32(), dqkv.dim(0), dqkv.dim(1), dqkv.dim(2),
                                            n_head + n_kv_head, half, nullptr, pos_offset, -1.0f));
  else if (dqkv.device == Device::cpu)
    rope_rotate_cpu(dqkv.f32(), freqs.f32(), dqkv.dim(0), dqkv.dim(1), dqkv.dim(2), n_head + n_kv_head, half,
                    nullptr, pos_offset, -1.0f);
  else
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(dqkv.f32(), freqs.f32(), dqkv.dim(0), dqkv.dim(1), dqkv.dim(2),
                                            n_head + n_kv_head, half, nullptr, pos_offset, -1.0f));
}

void rope_forward(Tensor qkv, Tensor freqs, int n_head, int n_kv_head, Tensor positions) {
  const char* op = "rope_forward";
  const int64_t half = check_rope(qkv, freqs, n_head, n_kv_head, 0, true, op);
  const int64_t N = qkv.dim(0) * qkv.dim(1), maxT = freqs.dim(0);
  check_dtype(positions, DType::i32, op);
  check_same_device(op, {&qkv, &positions});
  check_shape(positions, {N}, op);
  if (qkv.device == Device::cpu) {
    const int32_t* p = positions.i32();
    for (int64_t n = 0; n < N; ++n)
      LMF_CHECK(p[n] >= 0 && p[n] < maxT, op, ": row ", n, " of tensor '", positions.name, "' is position ", p[n],
                ", outside the table '", freqs.name, "' with maxT=", maxT);
    rope_rotate_cpu(qkv.f32(), freqs.f32(), 1, N, qkv.dim(2), n_head + n_kv_head, half, p, 0, 1.0f);
  } else if (qkv.dtype == DType::bf16) {
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(qkv.ptr<bf16>(), freqs.f32(), 1, N, qkv.dim(2), n_head + n_kv_head, half,
                                            positions.i32(), 0, 1.0f));
  } else {
    LMF_CUDA_DISPATCH(op, cuda::rope_rotate(qkv.f32(), freqs.f32(), 1, N, qkv.dim(2), n_head + n_kv_head, half,
                                            positions.i32(), 0, 1.0f));
  }
}

}  // namespace lmf
