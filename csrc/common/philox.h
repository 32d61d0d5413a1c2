// Counter-based random numbers shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., SC'11) keyed by the seed, counted by element index, and a
// Box-Muller transform written with float32 polynomials so that CPU (any vector width)
// and CUDA compute the same normals. The stream layout is documented in
// relaydiff/ops/_philox.py, whose pure-PyTorch generator is the test oracle.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RD_HD __host__ __device__ __forceinline__
#else
#define RD_HD inline
#endif

namespace relaydiff {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

constexpr uint32_t kStreamWhite = 0;  // the white field e of the mixed noise
constexpr uint32_t kStreamBlock = 1;  // the field e2 that block noise is built from

struct PhiloxKey {
  uint32_t k0, k1;
};

RD_HD PhiloxKey philox_key(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// Four 32-bit outputs of Philox4x32-10 for counter (c0, c1, c2, c3).
RD_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key,
                         uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  r0 = c0; r1 = c1; r2 = c2; r3 = c3;
}

// Box-Muller inputs: u in (0, 1) exactly representable in float32, v in [0, 1).
RD_HD float unit_open(uint32_t r) { return static_cast<float>(((r >> 9) << 1) | 1u) * 5.9604644775390625e-8f; }
RD_HD float unit_halfopen(uint32_t r) { return static_cast<float>(r >> 8) * 5.9604644775390625e-8f; }
RD_HD double unit_open_f64(uint32_t r) { return static_cast<double>(((r >> 9) << 1) | 1u) * 5.9604644775390625e-8; }
RD_HD double unit_halfopen_f64(uint32_t r) { return static_cast<double>(r >> 8) * 5.9604644775390625e-8; }

// Device intrinsics only in the device pass: nvcc's host pass compiles RD_HD code too.
RD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } c{f};
  return c.u;
#endif
}

RD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union { uint32_t u; float f; } c{u};
  return c.f;
#endif
}

// ln(u) for normal positive u (here u >= 2^-24): u = 2^e * m, m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.1716, series to s^11 (error < 1e-10).
RD_HD float log_f32(float u) {
  const uint32_t bits = float_bits(u);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float poly = 0.0909090909f;                 // 1/11
  poly = poly * s2 + 0.1111111111f;           // 1/9
  poly = poly * s2 + 0.1428571429f;           // 1/7
  poly = poly * s2 + 0.2f;
  poly = poly * s2 + 0.3333333333f;
  poly = poly * s2 + 1.0f;
  const float fe = static_cast<float>(e);
  // ln 2 split so that fe * hi is exact (Cody-Waite)
  return fe * 0.693145751953125f + (fe * 1.428606765330187e-6f + 2.0f * s * poly);
}

// sin(2 pi v) and cos(2 pi v) for v in [0, 1): reduce to x = 2 pi (v - q/4), |x| <= pi/4,
// Taylor series to x^9 / x^10 (error < 3e-9), then rotate by the quadrant q.
RD_HD void sincos_2pi_f32(float v, float& s_out, float& c_out) {
  const int q = static_cast<int>(v * 4.0f + 0.5f);   // 0..4
  const float x = (v - static_cast<float>(q) * 0.25f) * 6.28318530717958648f;
  const float x2 = x * x;
  float sp = 2.75573192239859e-6f;                   //  1/9!
  sp = sp * x2 - 1.98412698412698e-4f;               // -1/7!
  sp = sp * x2 + 8.33333333333333e-3f;               //  1/5!
  sp = sp * x2 - 1.66666666666667e-1f;               // -1/3!
  const float sn = x + x * x2 * sp;
  float cp = -2.75573192239859e-7f;                  // -1/10!
  cp = cp * x2 + 2.48015873015873e-5f;               //  1/8!
  cp = cp * x2 - 1.38888888888889e-3f;               // -1/6!
  cp = cp * x2 + 4.16666666666667e-2f;               //  1/4!
  cp = cp * x2 - 0.5f;
  const float cs = 1.0f + x2 * cp;
  const int quad = q & 3;
  const float s1 = (quad & 1) ? cs : sn;
  const float c1 = (quad & 1) ? sn : cs;
  s_out = (quad & 2) ? -s1 : s1;
  c_out = ((quad + 1) & 2) ? -c1 : c1;
}

// The two normals of one Box-Muller pair (r_even, r_odd), float32 path.
RD_HD void box_muller_f32(uint32_t r_even, uint32_t r_odd, float& n_cos, float& n_sin) {
  const float u = unit_open(r_even);
  const float v = unit_halfopen(r_odd);
  const float radius = sqrtf(-2.0f * log_f32(u));
  float s, c;
  sincos_2pi_f32(v, s, c);
  n_cos = radius * c;
  n_sin = radius * s;
}

}  // namespace relaydiff
