#include "support/gpu_util.h"

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

}  // namespace lmf::test
