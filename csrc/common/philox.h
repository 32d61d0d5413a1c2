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

// Box-Muller inputs: u in (0, 1) exactly representable in float32, v in [0, 1). The float32
// path below builds the same values without int-to-float conversions; these spell them out.
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

// a * b + c rounded once, written out so that every compiler and vector width computes the
// same value: the CPU build turns off FMA contraction (-ffp-contract=off) and nvcc contracts
// by its own rules, so the polynomials below use fused steps explicitly. On x86-64-v3/v4
// (the CPU clones that run on any AVX2 machine) and on the GPU this is one instruction; the
// baseline x86-64 clone calls libm fma (same value, slower).
RD_HD float fma_f32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// a / b for b in [1, 4) and sqrt(x) for normal positive x. On the GPU these are the
// approximate instructions that -prec-div=false / -prec-sqrt=false select anyway
// (div.full.f32, sqrt.approx.f32: <= 2 ulp) minus their handling of extreme and subnormal
// operands, which cannot occur here: the same values in fewer instructions. The CPU rounds
// correctly.
RD_HD float div_f32(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

RD_HD float sqrt_f32(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return std::sqrt(x);
#endif
}

// Small integer n in [0, 2^23) as a float, exactly, without a conversion instruction:
// 2^23 + n has n as its mantissa.
RD_HD float small_uint_float(uint32_t n) { return bits_float(0x4B000000u | n) - 8388608.0f; }

// ln(u) for normal positive u (here u >= 2^-24): u = 2^e * m, m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.1716, series to s^11 (error < 1e-10).
RD_HD float log_f32(float u) {
  const uint32_t bits = float_bits(u);
  const uint32_t be = (bits >> 23) & 0xffu;         // biased exponent, 103..126 here
  const uint32_t mb = (bits & 0x007fffffu) | 0x3f800000u;      // m in [1, 2)
  const uint32_t big = static_cast<uint32_t>(mb > 0x3FB504F3u);  // m > 1.41421356f
  const float m = bits_float(mb - (big << 23));                   // m / 2 when big, exactly
  const float s = div_f32(m - 1.0f, m + 1.0f);
  const float s2 = s * s;
  float poly = 0.0909090909f;                        // 1/11
  poly = fma_f32(poly, s2, 0.1111111111f);           // 1/9
  poly = fma_f32(poly, s2, 0.1428571429f);           // 1/7
  poly = fma_f32(poly, s2, 0.2f);
  poly = fma_f32(poly, s2, 0.3333333333f);
  poly = fma_f32(poly, s2, 1.0f);
  // fe = e = be - 127 (+1 when m was halved), exact
  const float fe = small_uint_float(be + big) - 127.0f;
  // ln 2 split so that fe * hi is exact (Cody-Waite)
  return fma_f32(fe, 0.693145751953125f, fma_f32(fe, 1.428606765330187e-6f, (2.0f * s) * poly));
}

// sin(2 pi v) and cos(2 pi v) for v = j 2^-24, j = r >> 8 < 2^24: quadrant q = round(4 v)
// (0..4) and x = 2 pi (v - q/4), |x| <= pi/4, both from the integer j (v - q/4 = (j - q 2^22)
// 2^-24 exactly); Taylor series to x^9 / x^10 (error < 3e-9), then rotate by q.
RD_HD void sincos_2pi_f32(uint32_t r, float& s_out, float& c_out) {
  const uint32_t j = r >> 8;
  const uint32_t q = (j + (1u << 21)) >> 22;
  // j - q 2^22 in [-2^21, 2^21] as a float: (2^23 + 2^22 + j - q 2^22) - (2^23 + 2^22)
  const float d = bits_float(0x4B000000u | (j + (1u << 22) - (q << 22))) - 12582912.0f;
  const float x = d * (6.28318530717958648f * 5.9604644775390625e-8f);  // 2 pi 2^-24
  const float x2 = x * x;
  float sp = 2.75573192239859e-6f;                   //  1/9!
  sp = fma_f32(sp, x2, -1.98412698412698e-4f);       // -1/7!
  sp = fma_f32(sp, x2, 8.33333333333333e-3f);        //  1/5!
  sp = fma_f32(sp, x2, -1.66666666666667e-1f);       // -1/3!
  const float sn = fma_f32(x * x2, sp, x);
  float cp = -2.75573192239859e-7f;                  // -1/10!
  cp = fma_f32(cp, x2, 2.48015873015873e-5f);        //  1/8!
  cp = fma_f32(cp, x2, -1.38888888888889e-3f);       // -1/6!
  cp = fma_f32(cp, x2, 4.16666666666667e-2f);        //  1/4!
  cp = fma_f32(cp, x2, -0.5f);
  const float cs = fma_f32(x2, cp, 1.0f);
  const uint32_t quad = q & 3u;
  const uint32_t swap = 0u - (quad & 1u);  // all ones in odd quadrants: sin and cos swap
  const uint32_t sb = float_bits(sn), cb = float_bits(cs);
  const float s1 = bits_float((cb & swap) | (sb & ~swap));
  const float c1 = bits_float((sb & swap) | (cb & ~swap));
  s_out = bits_float(float_bits(s1) ^ ((quad & 2u) << 30));
  c_out = bits_float(float_bits(c1) ^ (((quad + 1u) & 2u) << 30));
}

// The two normals of one Box-Muller pair (r_even, r_odd), float32 path:
// radius = sqrt(-2 ln u), u = unit_open(r_even) = (1 + k 2^-23) - (1 - 2^-24) exactly, k = r >> 9.
RD_HD void box_muller_f32(uint32_t r_even, uint32_t r_odd, float& n_cos, float& n_sin) {
  const float u = bits_float(0x3F800000u | (r_even >> 9)) - 0.99999994f;
  const float radius = sqrt_f32(-2.0f * log_f32(u));  // -2 ln u >= 1.19e-7
  float s, c;
  sincos_2pi_f32(r_odd, s, c);
  n_cos = radius * c;
  n_sin = radius * s;
}

}  // namespace relaydiff
