// tensor.h: the tensor descriptor every op entry takes.
//
// A Tensor does not own memory: `data` points into an arena (core/arena.h) or into memory the caller
// owns. Tensors are dense and row-major (the last dimension is contiguous); up to 4 dimensions.
// An "absent" optional tensor (e.g. no bias) is a default-constructed Tensor: data == nullptr.
// Op entries check shape/dtype/device with LMF_CHECK_SHAPE and friends and name the tensor in the
// message, so `name` should be set for anything that is user-visible (parameters, activations).
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/check.h"

namespace lmf {

enum class DType : uint8_t { f32, bf16, i32, u16 };
enum class Device : uint8_t { cpu, cuda };

size_t dtype_size(DType t);
const char* dtype_name(DType t);     // "f32", "bf16", "i32", "u16"
const char* device_name(Device d);   // "cpu", "cuda"

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::u16; }

struct Tensor {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  const char* name = "";

  Tensor() = default;
  Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, const char* name = "",
         Device device = Device::cpu);
  // The same with a shape known only at run time (a spec table's, a file's).
  Tensor(void* data, DType dtype, const std::vector<int64_t>& shape, const char* name = "",
         Device device = Device::cpu);

  bool defined() const { return data != nullptr; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  // Size of dimension i; negative i counts from the end.
  int64_t dim(int i) const;
  std::string shape_str() const;  // "(2, 8, 32)"
  std::string describe() const;   // "qkv f32 (2, 8, 96) cpu"

  // Typed pointer; checks the dtype.
  template <class T>
  T* ptr() const {
    LMF_CHECK(dtype == dtype_of<T>(), "tensor '", name, "' has dtype ", dtype_name(dtype), ", expected ",
              dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  float* f32() const { return ptr<float>(); }
  int32_t* i32() const { return ptr<int32_t>(); }

  // The same memory seen with another shape of equal numel.
  Tensor view(std::initializer_list<int64_t> new_shape) const;
  // Rows [begin, end) of dimension 0 (the result keeps the other dimensions).
  Tensor rows(int64_t begin, int64_t end) const;
};

// Throws unless t has exactly the given shape (and is defined).
void check_shape(const Tensor& t, std::initializer_list<int64_t> shape, const char* op);
// Throws unless t is defined and f32 (shape and device are checked separately).
void check_f32(const Tensor& t, const char* op);
void check_same_device(const char* op, std::initializer_list<const Tensor*> ts);
// Throws unless t is defined and of dtype dt; a bf16 tensor must also be on the GPU (bf16 mixed
// precision runs on the GPU only: "<op>: bf16 tensors run on the GPU only ('<name>')").
void check_dtype(const Tensor& t, DType dt, const char* op);

}  // namespace lmf

namespace lmf {

// Device-independent helpers (memcpy/memset on the CPU, the stream's copies on the GPU).
void tensor_zero(const Tensor& t);
void tensor_from_host(const Tensor& dst, const void* src);  // copies dst.nbytes()
void tensor_copy(const Tensor& dst, const Tensor& src);      // same bytes, same device (async on the GPU)
void tensor_to_host(void* dst, const Tensor& src);          // copies src.nbytes(); waits for the GPU

}  // namespace lmf
