#include "core/tensor.h"

#include <sstream>

namespace lmf {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::u16: return 2;
  }
  fail("unknown dtype ", static_cast<int>(t));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u16: return "u16";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

namespace {
template <class Shape>
void set_shape(Tensor& t, const Shape& shape) {
  LMF_CHECK(shape.size() >= 1 && shape.size() <= Tensor::kMaxDims, "tensor '", t.name, "' has ", shape.size(),
            " dims; 1..", Tensor::kMaxDims, " supported");
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) {
    LMF_CHECK(s >= 0, "tensor '", t.name, "' dimension ", i, " is ", s);
    t.shape[static_cast<size_t>(i++)] = s;
  }
}
}  // namespace

Tensor::Tensor(void* data_, DType dtype_, std::initializer_list<int64_t> shape_, const char* name_, Device device_)
    : data(data_), dtype(dtype_), device(device_), name(name_) {
  set_shape(*this, shape_);
}

Tensor::Tensor(void* data_, DType dtype_, const std::vector<int64_t>& shape_, const char* name_, Device device_)
    : data(data_), dtype(dtype_), device(device_), name(name_) {
  set_shape(*this, shape_);
}

int64_t Tensor::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

int64_t Tensor::dim(int i) const {
  int j = i < 0 ? ndim + i : i;
  LMF_CHECK(j >= 0 && j < ndim, "tensor '", name, "' ", shape_str(), " has no dimension ", i);
  return shape[j];
}

std::string Tensor::shape_str() const {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << ")";
  return os.str();
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << (name && *name ? name : "<unnamed>") << " " << dtype_name(dtype) << " " << shape_str() << " "
     << device_name(device);
  return os.str();
}

Tensor Tensor::view(std::initializer_list<int64_t> new_shape) const {
  Tensor t(data, dtype, new_shape, name, device);
  LMF_CHECK(t.numel() == numel(), "view of '", name, "' ", shape_str(), " as ", t.shape_str(),
            " changes the element count");
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  LMF_CHECK(ndim >= 1 && 0 <= begin && begin <= end && end <= shape[0], "rows [", begin, ", ", end, ") of '",
            name, "' ", shape_str());
  Tensor t = *this;
  int64_t row = numel() / (shape[0] ? shape[0] : 1);
  t.data = static_cast<char*>(data) + static_cast<size_t>(begin * row) * dtype_size(dtype);
  t.shape[0] = end - begin;
  return t;
}

void check_shape(const Tensor& t, std::initializer_list<int64_t> shape, const char* op) {
  bool ok = t.defined() && t.ndim == static_cast<int>(shape.size());
  if (ok) {
    int i = 0;
    for (int64_t s : shape) ok = ok && t.shape[i++] == s;
  }
  if (!ok) {
    std::ostringstream want;
    want << "(";
    int i = 0;
    for (int64_t s : shape) want << (i++ ? ", " : "") << s;
    want << ")";
    fail(op, ": tensor '", t.name, "' has shape ", t.defined() ? t.shape_str() : std::string("<absent>"),
         ", expected ", want.str());
  }
}

void check_f32(const Tensor& t, const char* op) {
  if (!t.defined()) fail(op, ": tensor '", t.name, "' is absent");
  if (t.dtype != DType::f32) fail(op, ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype), ", expected f32");
}

void check_dtype(const Tensor& t, DType dt, const char* op) {
  if (!t.defined()) fail(op, ": tensor '", t.name, "' is absent");
  if (t.dtype != dt)
    fail(op, ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype), ", expected ", dtype_name(dt));
  if (dt == DType::bf16 && t.device != Device::cuda) fail(op, ": bf16 tensors run on the GPU only ('", t.name, "')");
}

void check_same_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    if (!first) first = t;
    else if (t->device != first->device)
      fail(op, ": tensor '", t->name, "' is on ", device_name(t->device), " but '", first->name, "' is on ",
           device_name(first->device));
  }
}

}  // namespace lmf

#include <cstring>

#include "core/device.h"

namespace lmf {

void tensor_zero(const Tensor& t) {
  if (t.device == Device::cpu) std::memset(t.data, 0, t.nbytes());
  else device_memset0(t.data, t.nbytes());
}

void tensor_copy(const Tensor& dst, const Tensor& src) {
  LMF_CHECK(dst.nbytes() == src.nbytes() && dst.device == src.device, "tensor_copy: '", src.name, "' (",
            src.describe(), ") into '", dst.name, "' (", dst.describe(), ")");
  if (dst.data == src.data) return;
  if (dst.device == Device::cpu) std::memcpy(dst.data, src.data, dst.nbytes());
  else device_copy(dst.data, src.data, dst.nbytes());
}

void tensor_from_host(const Tensor& dst, const void* src) {
  if (dst.device == Device::cpu) std::memcpy(dst.data, src, dst.nbytes());
  else copy_to_device(dst.data, src, dst.nbytes());
}

void tensor_to_host(void* dst, const Tensor& src) {
  if (src.device == Device::cpu) std::memcpy(dst, src.data, src.nbytes());
  else copy_to_host(dst, src.data, src.nbytes());
}

}  // namespace lmf
