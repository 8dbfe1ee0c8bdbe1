// rng.h: counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//
// A value is a pure function of (seed, stream, index): no hidden state, so initialisation is
// reproducible in any order, on any number of threads, and the CUDA backend computes the same bits.
// Conventions used throughout lmforge:
//   uniform(seed, stream, i)  in [0, 1), 24 random bits
//   normal(seed, stream, i)   Box-Muller on the first two 32-bit words of block (stream, i)
#pragma once
#include <array>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define LMF_HD __host__ __device__
#else
#define LMF_HD
#endif

namespace lmf {

LMF_HD inline std::array<uint32_t, 4> philox4x32(uint64_t seed, uint64_t stream, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = static_cast<uint64_t>(M0) * c0;
    uint64_t p1 = static_cast<uint64_t>(M1) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0; k1 += W1;
  }
  return {c0, c1, c2, c3};
}

// 24-bit uniform in [0, 1).
LMF_HD inline float uniform_from_bits(uint32_t u) { return static_cast<float>(u >> 8) * (1.0f / 16777216.0f); }

LMF_HD inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return uniform_from_bits(philox4x32(seed, stream, index)[0]);
}

inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t index) {
  auto b = philox4x32(seed, stream, index);
  return (static_cast<uint64_t>(b[1]) << 32) | b[0];
}

inline float rng_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  auto b = philox4x32(seed, stream, index);
  // u1 in (0, 1] so log() is finite.
  double u1 = (static_cast<double>(b[0] >> 8) + 1.0) / 16777216.0;
  double u2 = static_cast<double>(b[1] >> 8) / 16777216.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

}  // namespace lmf
