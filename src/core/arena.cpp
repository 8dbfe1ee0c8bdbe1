#include "core/arena.h"

#include "core/device.h"
#include "core/memory.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lmf {

namespace {
std::atomic<size_t> g_arena_allocs{0};
size_t align_up(size_t x, size_t a, const std::string& arena) {
  return checked_add(x, (a - x % a) % a, "arena '", arena, "'");
}

// The offset of every spec in an arena's block and the block's size, overflow-checked.
size_t arena_layout(const std::vector<TensorSpec>& specs, const std::string& name, std::vector<size_t>* offsets) {
  size_t off = 0;
  for (const TensorSpec& s : specs) {
    LMF_CHECK(!s.shape.empty() && s.shape.size() <= Tensor::kMaxDims, "arena '", name, "': tensor '", s.name,
              "' has ", s.shape.size(), " dims");
    for (int64_t d : s.shape) LMF_CHECK(d >= 0, "arena '", name, "': tensor '", s.name, "' has dimension ", d);
    off = align_up(off, Arena::kAlign, name);
    if (offsets) offsets->push_back(off);
    off = checked_add(off, s.nbytes(), "arena '", name, "' at tensor '", s.name, "'");
  }
  return align_up(off, Arena::kAlign, name);
}
}  // namespace

size_t arena_allocation_count() { return g_arena_allocs.load(); }

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n = checked_mul(n, s, "tensor '", name, "': element count");
  return n;
}

size_t TensorSpec::nbytes() const {
  return checked_mul(static_cast<size_t>(numel()), dtype_size(dtype), "tensor '", name, "': byte size");
}

size_t arena_plan_bytes(const std::vector<TensorSpec>& specs, const std::string& arena_name) {
  return arena_layout(specs, arena_name, nullptr);
}

Arena::Arena(std::string arena_name, std::vector<TensorSpec> specs, Device device, bool pinned)
    : name_(std::move(arena_name)), specs_(std::move(specs)), device_(device), pinned_(pinned && device == Device::cpu) {
  offsets_.reserve(specs_.size());
  bytes_ = arena_layout(specs_, name_, &offsets_);
  index_.reserve(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) index_.emplace(specs_[i].name, i);
  if (bytes_ == 0) return;
  if (bytes_ > kCheckMemoryBytes) check_memory_fits(bytes_, device_, "arena '" + name_ + "'");
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
    index_ = std::move(o.index_);
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
  const auto it = index_.find(name);
  return it == index_.end() ? -1 : static_cast<long>(it->second);
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
