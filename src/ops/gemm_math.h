// gemm_math.h: how an fp32 GEMM computes on the GPU, chosen at plan time and passed with every call
// (never process-wide state; DESIGN.md section 5):
//   fp32: CUDA-core FMA, true fp32 (matches the CPU within fp32 rounding)
//   tf32: tensor cores with inputs rounded to TF32 (10-bit mantissa), fp32 accumulation and output
// bf16 GEMMs always run on the tensor cores and ignore it; the CPU always computes in fp32.
#pragma once
#include <cstdint>

namespace lmf {

enum class GemmMath : uint8_t { fp32, tf32 };

}  // namespace lmf
