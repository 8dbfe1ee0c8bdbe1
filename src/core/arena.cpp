#include "core/arena.h"

#include "core/device.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lmf {

namespace {
std::atomic<size_t> g_arena_allocs{0};
size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
}  // namespace

size_t arena_allocation_count() { return g_arena_allocs.load(); }

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Arena::Arena(std::string arena_name, std::vector<TensorSpec> specs, Device device, bool pinned)
    : name_(std::move(arena_name)), specs_(std::move(specs)), device_(device), pinned_(pinned && device == Device::cpu) {
  offsets_.reserve(specs_.size());
  size_t off = 0;
  for (const TensorSpec& s : specs_) {
    LMF_CHECK(!s.shape.empty() && s.shape.size() <= Tensor::kMaxDims, "arena '", name_, "': tensor '", s.name,
              "' has ", s.shape.size(), " dims");
    for (int64_t d : s.shape) LMF_CHECK(d >= 0, "arena '", name_, "': tensor '", s.name, "' has dimension ", d);
    off = align_up(off, kAlign);
    offsets_.push_back(off);
    off += s.nbytes();
  }
  bytes_ = align_up(off, kAlign);
  if (bytes_ == 0) return;
  if (device_ == Device::cuda) {
    base_ = device_alloc(bytes_, "arena '" + name_ + "'");  // zero-filled
  } else if (pinned_) {
    base_ = host_alloc_pinned(bytes_, "arena '" + name_ + "'");
    std::memset(base_, 0, bytes_);
  } else {
    base_ = std::aligned_alloc(kAlign, bytes_);
    if (!base_) fail("arena '", name_, "': cannot allocate ", bytes_, " bytes");
    std::memset(base_, 0, bytes_);
  }
  g_arena_allocs++;
}

namespace {
void release(void* p, Device d, bool pinned) {
  if (d == Device::cuda) device_free(p);
  else if (pinned) host_free_pinned(p);
  else std::free(p);
}
}  // namespace

Arena::~Arena() { release(base_, device_, pinned_); }

Arena::Arena(Arena&& o) noexcept { *this = std::move(o); }

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    release(base_, device_, pinned_);
    name_ = std::move(o.name_);
    specs_ = std::move(o.specs_);
    offsets_ = std::move(o.offsets_);
    bytes_ = o.bytes_;
    base_ = o.base_;
    device_ = o.device_;
    pinned_ = o.pinned_;
    o.base_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

Tensor Arena::operator[](size_t i) const {
  LMF_CHECK(i < specs_.size(), "arena '", name_, "' has ", specs_.size(), " tensors, asked for #", i);
  const TensorSpec& s = specs_[i];
  Tensor t;
  t.data = static_cast<char*>(base_) + offsets_[i];
  t.dtype = s.dtype;
  t.device = device_;
  t.ndim = static_cast<int>(s.shape.size());
  for (int d = 0; d < t.ndim; ++d) t.shape[d] = s.shape[d];
  t.name = s.name.c_str();
  return t;
}

size_t Arena::offset_bytes(size_t i) const {
  LMF_CHECK(i < specs_.size(), "arena '", name_, "' has ", specs_.size(), " tensors, asked for the offset of #", i);
  return offsets_[i];
}

size_t Arena::offset_elems(size_t i) const { return offset_bytes(i) / dtype_size(specs_[i].dtype); }

long Arena::find(const std::string& name) const {
  for (size_t i = 0; i < specs_.size(); ++i)
    if (specs_[i].name == name) return static_cast<long>(i);
  return -1;
}

Tensor Arena::get(const std::string& name) const {
  long i = find(name);
  LMF_CHECK(i >= 0, "arena '", name_, "' has no tensor '", name, "'");
  return (*this)[static_cast<size_t>(i)];
}

Tensor Arena::flat_f32() const { return flat(DType::f32); }

Tensor Arena::flat(DType dt) const {
  for (const TensorSpec& s : specs_)
    LMF_CHECK(s.dtype == dt, "arena '", name_, "': a flat ", dtype_name(dt), " view needs all-", dtype_name(dt),
              " specs, '", s.name, "' is ", dtype_name(s.dtype));
  return Tensor(base_, dt, {static_cast<int64_t>(bytes_ / dtype_size(dt))}, name_.c_str(), device_);
}

void Arena::zero() {
  if (!base_) return;
  if (device_ == Device::cuda) device_memset0(base_, bytes_);
  else std::memset(base_, 0, bytes_);
}

}  // namespace lmf
