// fp16.h: IEEE 754 binary16 -> float on the CPU, exact (every half is a float), for weights read from
// other formats (GGUF F16 tensors and the scales of its quantized blocks, fp16 safetensors).
#pragma once
#include <cstdint>
#include <cstring>

namespace lmf {

// The float whose binary16 bits are `h`: normals, subnormals, signed zeros, infinities and NaN (the
// payload kept, shifted) all convert exactly.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // 112 = 127 - 15
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {        // subnormal: mant * 2^-24, normalised
    int e = 113;  // 127 - 14
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace lmf
