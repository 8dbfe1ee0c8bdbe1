// launch.h: launch configurations and their validation against a device's limits
// (DESIGN.md section 4). Plain C++: the validation is unit-tested on the CPU with synthetic limits.
//
// Every CUDA launch in lmforge goes through lmf::cuda::launch() (core/cuda_launch.cuh), which calls
// launch_problem() before launching and describe_launch() when anything fails, so an error names
// the op, the shapes, grid, block, dynamic shared memory, the device and what CUDA said.
//
// Building a LaunchSpec allocates nothing (a training step makes no host allocation): its shapes
// are a fixed-capacity ShapeText written with shape_text("N=", N, " C=", C); only the messages of
// a failed launch (launch_problem, describe_launch) are std::strings.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace lmf {

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
};

// What a launch must respect (filled from cudaDeviceProp on a GPU; synthetic in tests).
struct DeviceLimits {
  int device = 0;
  std::string name;
  int64_t max_threads_per_block = 1024;
  Dim3 max_block{1024, 1024, 64};
  Dim3 max_grid{2147483647, 65535, 65535};
  size_t smem_per_block = 48 * 1024;         // without opt-in
  size_t smem_per_block_optin = 227 * 1024;  // with cudaFuncAttributeMaxDynamicSharedMemorySize
  int sm_count = 0;
};

// A launch's shapes as text ("N=8192 C=768") in a fixed buffer: no heap allocation. Text longer
// than the buffer is cut and ends with "..." (it never overflows). Implicit from a string literal.
struct ShapeText {
  static constexpr size_t kCapacity = 120;  // bytes, including the terminating NUL
  char text[kCapacity];
  size_t size = 0;

  constexpr ShapeText() : text{} {}
  constexpr ShapeText(const char* s) : text{} { append(s ? std::string_view(s) : std::string_view()); }  // NOLINT

  const char* c_str() const { return text; }
  std::string_view view() const { return {text, size}; }

  constexpr void append(std::string_view s) {
    const size_t room = kCapacity - 1 - size;
    const size_t n = s.size() < room ? s.size() : room;
    for (size_t i = 0; i < n; ++i) text[size + i] = s[i];
    size += n;
    text[size] = '\0';
    if (n < s.size()) {  // cut: end with "..." to show it
      for (size_t i = kCapacity - 4; i < kCapacity - 1; ++i) text[i] = '.';
    }
  }
};

namespace detail {
template <class T>
inline constexpr bool kShapeTextUnsupported = false;

inline void append_shape_int(ShapeText& t, long long v) {
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%lld", v);
  if (n > 0) t.append(std::string_view(buf, static_cast<size_t>(n)));
}
inline void append_shape_uint(ShapeText& t, unsigned long long v) {
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%llu", v);
  if (n > 0) t.append(std::string_view(buf, static_cast<size_t>(n)));
}
inline void append_shape_float(ShapeText& t, double v) {  // %g: as operator<< prints it
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%g", v);
  if (n > 0) t.append(std::string_view(buf, static_cast<size_t>(n) < sizeof(buf) ? static_cast<size_t>(n) : sizeof(buf) - 1));
}

template <class T>
void append_shape_arg(ShapeText& t, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    t.append(v ? "true" : "false");
  } else if constexpr (std::is_same_v<T, char>) {
    t.append(std::string_view(&v, 1));
  } else if constexpr (std::is_enum_v<T>) {
    append_shape_arg(t, static_cast<std::underlying_type_t<T>>(v));
  } else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) {
    append_shape_int(t, static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<T>) {
    append_shape_uint(t, static_cast<unsigned long long>(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    append_shape_float(t, static_cast<double>(v));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    t.append(std::string_view(v));  // string literals, const char*, std::string_view (and std::string, uncopied)
  } else {
    static_assert(kShapeTextUnsupported<T>, "shape_text: unsupported argument type");
  }
}
}  // namespace detail

// shape_text("N=", N, " C=", C) == "N=8192 C=768": concatenates strings (string literals,
// const char*, std::string_view) and numbers (integers in decimal, floating point as %g) into a
// ShapeText, allocating nothing. Same text as the std::to_string / operator+ it replaces.
template <class... Args>
ShapeText shape_text(const Args&... args) {
  ShapeText t;
  (detail::append_shape_arg(t, args), ...);
  return t;
}

struct LaunchSpec {
  const char* op = "";  // op entry name, e.g. "layernorm_forward"
  ShapeText shapes;     // e.g. "N=8192 C=768" (shape_text("N=", N, " C=", C))
  Dim3 grid, block;
  size_t smem = 0;      // dynamic shared memory bytes
};

// "" when the launch fits the device, else what is wrong ("grid.y=70000 exceeds 65535").
std::string launch_problem(const DeviceLimits& lim, const LaunchSpec& s);
// "op=layernorm_forward shapes=(N=8192 C=768) grid=(8192,1,1) block=(256,1,1) smem=0 device=0 (NVIDIA H200)"
std::string describe_launch(const LaunchSpec& s, const DeviceLimits& lim);

}  // namespace lmf
