#include "support/gpu_util.h"

#include <cmath>

#include <cstdlib>
#include <random>

namespace lmf::test {

uint64_t fresh_seed() {
  if (const char* e = std::getenv("LMF_TEST_SEED")) return std::strtoull(e, nullptr, 10);
  return (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) { p_ = device_alloc(bytes ? bytes : 4, "test buffer"); }

DeviceBuffer::~DeviceBuffer() { device_free(p_); }

void DeviceBuffer::poison() {
  std::vector<unsigned char> nan(bytes_, 0xff);
  copy_to_device(p_, nan.data(), bytes_);
}

Tensor DeviceBuffer::tensor(DType dt, std::initializer_list<int64_t> shape, const char* name) const {
  Tensor t(p_, dt, shape, name, Device::cuda);
  LMF_CHECK(t.nbytes() <= bytes_, "tensor ", t.describe(), " larger than its buffer of ", bytes_, " bytes");
  return t;
}

std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16(v[i]);
  return r;
}

std::vector<float> from_bf16(const std::vector<bf16>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}

std::vector<float> round_bf16(const std::vector<float>& v) { return from_bf16(to_bf16(v)); }

double rel_l2_error(const std::vector<float>& got, const std::vector<float>& ref) {
  LMF_CHECK(got.size() == ref.size(), "rel_l2_error: sizes ", got.size(), " and ", ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace lmf::test
