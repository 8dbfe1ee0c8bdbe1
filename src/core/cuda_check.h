// cuda_check.h: one macro family for every CUDA runtime / cuBLAS(Lt) call (STYLE.md practice 8).
// On failure: the statement text, file:line, the device and the library's error name and string,
// thrown as lmf::Error from a [[noreturn]] cold function. CUDA translation units only.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/check.h"

namespace lmf::detail {
[[noreturn]] void cuda_call_failed(const char* stmt, cudaError_t err, const char* file, int line);
[[noreturn]] void cublas_call_failed(const char* stmt, cublasStatus_t st, const char* file, int line);
}  // namespace lmf::detail

#define LMF_CUDA_CHECK(stmt)                                                               \
  do {                                                                                     \
    cudaError_t lmf_err_ = (stmt);                                                         \
    if (lmf_err_ != cudaSuccess) [[unlikely]]                                              \
      ::lmf::detail::cuda_call_failed(#stmt, lmf_err_, __FILE__, __LINE__);                \
  } while (0)

#define LMF_CUBLAS_CHECK(stmt)                                                             \
  do {                                                                                     \
    cublasStatus_t lmf_st_ = (stmt);                                                       \
    if (lmf_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                     \
      ::lmf::detail::cublas_call_failed(#stmt, lmf_st_, __FILE__, __LINE__);               \
  } while (0)
