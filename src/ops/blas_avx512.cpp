// blas_avx512.cpp: the AVX-512 build of the CPU GEMM's tiles (ops/gemm_tiles.h), compiled with
// -mavx512f (CMakeLists.txt). blas.cpp calls it only on a CPU with AVX-512F; same bits as the other
// builds (gemm_tiles.h: one FMA chain per element, whatever the vector width).
#include "ops/gemm_tiles.h"

namespace lmf::blas_detail {

// 12 x 32 tiles: twenty-four 16-float accumulators of the thirty-two zmm registers.
const GemmIsa& gemm_isa_avx512() { return isa_of<Tiles<Avx512, 12, 2>>(); }

}  // namespace lmf::blas_detail
