// blas_avx2.cpp: the AVX2/FMA build of the CPU GEMM's tiles (ops/gemm_tiles.h), compiled with
// -mavx2 -mfma (CMakeLists.txt). blas.cpp calls it only on a CPU with AVX2 and FMA; same bits as the
// other builds (gemm_tiles.h: one FMA chain per element).
#include "ops/gemm_tiles.h"

namespace lmf::blas_detail {

// 6 x 16 tiles: twelve 8-float accumulators of the sixteen ymm registers.
const GemmIsa& gemm_isa_avx2() { return isa_of<Tiles<Avx2, 6, 2>>(); }

}  // namespace lmf::blas_detail
