// CUDA residual add against the CPU reference (exact: one fp32 add per element).
#include <gtest/gtest.h>

#include "ops/residual.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

TEST(CudaResidual, ForwardAndBackwardMatchCpuExactly) {
  LMF_REQUIRE_GPU();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{111}, int64_t{1} << 20}) {
    const uint64_t seed = test::fresh_seed();
    std::vector<float> a = test::randn(n, seed), b = test::randn(n, seed + 1), out(n);
    residual_forward(test::tensor_of(out, {n}, "out"), test::tensor_of(a, {n}, "a"), test::tensor_of(b, {n}, "b"));
    test::DeviceBuffer da(a), db(b), dout(n * 4);
    dout.poison();
    residual_forward(dout.tensor(DType::f32, {n}, "out"), da.tensor(DType::f32, {n}, "a"),
                     db.tensor(DType::f32, {n}, "b"));
    EXPECT_EQ(dout.download<float>(), out) << "n=" << n << " seed=" << seed;
    // backward: da += g, db += g
    std::vector<float> g = test::randn(n, seed + 2), ra = a, rb = b;
    residual_backward(test::tensor_of(ra, {n}, "da"), test::tensor_of(rb, {n}, "db"), test::tensor_of(g, {n}, "g"));
    test::DeviceBuffer dg(g);
    residual_backward(da.tensor(DType::f32, {n}, "da"), db.tensor(DType::f32, {n}, "db"), dg.tensor(DType::f32, {n}, "g"));
    EXPECT_EQ(da.download<float>(), ra);
    EXPECT_EQ(db.download<float>(), rb);
  }
}

TEST(CudaResidual, DeviceMismatchIsAnError) {
  LMF_REQUIRE_GPU();
  std::vector<float> a(4);
  test::DeviceBuffer d(16);
  EXPECT_THROW(residual_forward(d.tensor(DType::f32, {4}, "out"), test::tensor_of(a, {4}, "a"),
                                d.tensor(DType::f32, {4}, "b")),
               Error);
}

}  // namespace
}  // namespace lmf
