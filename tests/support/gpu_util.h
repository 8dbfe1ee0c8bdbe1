// gpu_util.h: helpers for the CUDA-vs-CPU tests (tests/test_cuda_*.cpp).
//
// LMF_REQUIRE_GPU() at the top of a test reports it SKIPPED (never passed) when this build has no
// CUDA backend or the machine has no GPU. DeviceBuffer holds a copy of a host vector on the GPU;
// poison() fills it with NaN so an element the kernel never wrote fails the comparison.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"

#define LMF_REQUIRE_GPU()                                                                        \
  do {                                                                                           \
    if (!::lmf::cuda_built()) GTEST_SKIP() << "built without the CUDA backend";                  \
    if (::lmf::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine";       \
  } while (0)

namespace lmf::test {

// A new seed every run (fresh random inputs, METHOD.md), or LMF_TEST_SEED to reproduce a failure.
// Tests print it in their failure messages.
uint64_t fresh_seed();

// bf16 helpers for the mixed-precision tests (docs/MIXED_PRECISION.md): inputs are rounded to bf16
// once, the CPU fp32 reference runs on the rounded values, and the GPU result is compared with
// rel_l2_error (||got - ref|| / ||ref||, in double) against a bound stated per op.
std::vector<bf16> to_bf16(const std::vector<float>& v);      // round to nearest even
std::vector<float> from_bf16(const std::vector<bf16>& v);    // exact
std::vector<float> round_bf16(const std::vector<float>& v);  // from_bf16(to_bf16(v))
double rel_l2_error(const std::vector<float>& got, const std::vector<float>& ref);

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  template <class T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    upload(host);
  }
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T>
  void upload(const std::vector<T>& host) {
    LMF_CHECK(host.size() * sizeof(T) == bytes_, "upload of ", host.size() * sizeof(T), " bytes into ", bytes_);
    copy_to_device(p_, host.data(), bytes_);
  }
  template <class T>
  std::vector<T> download() const {
    std::vector<T> h(bytes_ / sizeof(T));
    copy_to_host(h.data(), p_, bytes_);
    return h;
  }
  void poison();  // every byte 0xff: NaN for f32/bf16
  Tensor tensor(DType dt, std::initializer_list<int64_t> shape, const char* name) const;
  void* data() const { return p_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace lmf::test
