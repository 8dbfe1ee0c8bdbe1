// arena.h: memory planned up front (DESIGN.md section 1).
//
// A spec table (name, shape, dtype) is turned into one allocation; each tensor is a slice of it,
// aligned to kAlign bytes. All sizes are known before the first step; nothing is allocated later.
// Padding between slices is zeroed and never written, so a flat f32 view of the whole arena can be
// reduced over (e.g. the global gradient norm) without touching anything but real elements and zeros.
//
// Sizes are overflow-checked (a shape from a config or a file can be anything): a spec whose element
// count or byte size does not fit, or an arena whose total does not, is an error naming the tensor.
// Before allocating, an arena of more than kCheckMemoryBytes asks whether the memory is there
// (core/memory.h) and refuses in one line when it is not.
#pragma once
#include <cstddef>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace lmf {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::f32;

  int64_t numel() const;  // throws when the product overflows int64
  size_t nbytes() const;   // throws when it overflows size_t
};

// The bytes an Arena of these specs allocates (the same aligned layout), without allocating.
size_t arena_plan_bytes(const std::vector<TensorSpec>& specs, const std::string& arena_name);

class Arena {
 public:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kCheckMemoryBytes = size_t{16} << 20;  // larger arenas check the memory first

  Arena() = default;
  // Allocates one zero-filled block holding every spec, in order. pinned (CPU arenas of a CUDA run):
  // page-locked host memory, so stream-ordered copies to and from it are asynchronous.
  Arena(std::string arena_name, std::vector<TensorSpec> specs, Device device = Device::cpu, bool pinned = false);
  ~Arena();
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  size_t size() const { return specs_.size(); }
  const TensorSpec& spec(size_t i) const { return specs_.at(i); }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  Tensor operator[](size_t i) const;
  // Where tensor i starts in the block: in bytes from base(), and in elements of its dtype (the
  // index of its first element in flat_f32() for an all-f32 arena). Multiples of kAlign bytes.
  size_t offset_bytes(size_t i) const;
  size_t offset_elems(size_t i) const;
  Tensor get(const std::string& name) const;  // throws if absent
  // Index of `name` (the first tensor of that name), or -1. Constant time: models look up every
  // layer's tensors by name, and a linear search made that quadratic in n_layer.
  long find(const std::string& name) const;
  // The whole block as a 1-D f32 tensor (only if every spec is f32).
  Tensor flat_f32() const;
  // The whole block as a 1-D tensor of dtype dt (only if every spec has dtype dt).
  Tensor flat(DType dt) const;
  size_t bytes() const { return bytes_; }
  void* base() const { return base_; }
  void zero();
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::vector<TensorSpec> specs_;
  std::vector<size_t> offsets_;
  std::unordered_map<std::string, size_t> index_;  // name -> first spec of that name
  size_t bytes_ = 0;
  void* base_ = nullptr;
  Device device_ = Device::cpu;
  bool pinned_ = false;
};

// Number of arena allocations made so far in this process (for the "no allocation in a step" tests).
size_t arena_allocation_count();

}  // namespace lmf
