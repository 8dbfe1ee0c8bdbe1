// bf16.h: bfloat16 storage type usable on the CPU (and, later, bit-compatible with __nv_bfloat16).
// Conversion float -> bf16 rounds to nearest even; NaN stays NaN (quiet). bf16 -> float is exact.
#pragma once
#include <cstdint>
#include <cstring>

namespace lmf {

struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN: keep quiet
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round half to even
    return static_cast<uint16_t>((u + rounding) >> 16);
  }
  static float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bf16) == 2);

}  // namespace lmf
