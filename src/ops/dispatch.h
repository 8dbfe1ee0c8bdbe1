// dispatch.h: how an op entry reaches its CUDA launcher.
//
//   if (out.device == Device::cpu) residual_forward_cpu(...);
//   else LMF_CUDA_DISPATCH(op, cuda::residual_forward(...));
//
// In a build without CUDA no tensor can live on the GPU (arenas refuse), but the branch still
// fails loudly rather than computing something else.
#pragma once
#include "core/check.h"

#ifdef LMF_WITH_CUDA
#define LMF_CUDA_DISPATCH(op, call) call
#else
#define LMF_CUDA_DISPATCH(op, call) \
  ::lmf::fail(op, ": tensors are on the GPU but lmforge was built without the CUDA backend")
#endif
