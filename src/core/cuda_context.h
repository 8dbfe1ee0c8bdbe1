// cuda_context.h: lmforge's one CUDA stream and its library handles (device.cu), for host code that
// enqueues work: the launchers (through cuda_launch.cuh) and the library wrappers written in plain C++
// (ops/flash_attention_cudnn.cpp). CUDA builds only.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

namespace lmf::cuda {

cudaStream_t stream();      // every kernel, copy and library call goes on this stream
cublasLtHandle_t blaslt();  // bound to the current device
void count_launch();        // cuda_launch_count(): one per kernel launch or library call that enqueues work

}  // namespace lmf::cuda
