// SIMD Philox4x32-10. Each 32-bit counter word lives in the low half of a 64-bit lane, so
// a round is two widening multiplies (vpmuludq reads only the low halves), two shifts and
// two three-way xors; the high halves carry garbage that no later step reads. The result
// is bit-identical to philox4x32_10() in philox.h (the scalar path and the CUDA kernels).
#include "philox_cpu.h"

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define RD_X86_SIMD 1
#include <immintrin.h>
#endif

namespace relaydiff {
namespace {

void philox_scalar(PhiloxKey key, uint32_t stream, uint64_t jb, int64_t nb, uint32_t* r0,
                   uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  for (int64_t i = 0; i < nb; ++i) {
    const uint64_t j = jb + static_cast<uint64_t>(i);
    philox4x32_10(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), stream, 0u, key,
                  r0[i], r1[i], r2[i], r3[i]);
  }
}

#if RD_X86_SIMD
__attribute__((target("avx512f"))) void philox_avx512(PhiloxKey key, uint32_t stream,
                                                      uint64_t jb, int64_t nb, uint32_t* r0,
                                                      uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t i = 0;
  for (; i + 8 <= nb; i += 8) {
    const __m512i j = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(jb + i)), lanes);
    __m512i c0 = j, c1 = _mm512_srli_epi64(j, 32);
    __m512i c2 = _mm512_set1_epi64(stream), c3 = _mm512_setzero_si512();
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      const __m512i p0 = _mm512_mul_epu32(c0, m0);
      const __m512i p1 = _mm512_mul_epu32(c2, m1);
      const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i kk1 = _mm512_set1_epi32(static_cast<int>(k1));
      c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1, kk0, 0x96);
      c1 = p1;
      c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3, kk1, 0x96);
      c3 = p0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + i), _mm512_cvtepi64_epi32(c0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + i), _mm512_cvtepi64_epi32(c1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + i), _mm512_cvtepi64_epi32(c2));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3 + i), _mm512_cvtepi64_epi32(c3));
  }
  philox_scalar(key, stream, jb + i, nb - i, r0 + i, r1 + i, r2 + i, r3 + i);
}

__attribute__((target("avx2"))) inline void store_low_halves(uint32_t* dst, __m256i v) {
  const __m256i even = _mm256_permutevar8x32_epi32(v, _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(even));
}

__attribute__((target("avx2"))) void philox_avx2(PhiloxKey key, uint32_t stream, uint64_t jb,
                                                 int64_t nb, uint32_t* r0, uint32_t* r1,
                                                 uint32_t* r2, uint32_t* r3) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
  int64_t i = 0;
  for (; i + 4 <= nb; i += 4) {
    const __m256i j = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(jb + i)), lanes);
    __m256i c0 = j, c1 = _mm256_srli_epi64(j, 32);
    __m256i c2 = _mm256_set1_epi64x(stream), c3 = _mm256_setzero_si256();
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i p0 = _mm256_mul_epu32(c0, m0);
      const __m256i p1 = _mm256_mul_epu32(c2, m1);
      const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i kk1 = _mm256_set1_epi32(static_cast<int>(k1));
      c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), kk0);
      c1 = p1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), kk1);
      c3 = p0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    store_low_halves(r0 + i, c0);
    store_low_halves(r1 + i, c1);
    store_low_halves(r2 + i, c2);
    store_low_halves(r3 + i, c3);
  }
  philox_scalar(key, stream, jb + i, nb - i, r0 + i, r1 + i, r2 + i, r3 + i);
}
#endif

using PhiloxFn = void (*)(PhiloxKey, uint32_t, uint64_t, int64_t, uint32_t*, uint32_t*,
                          uint32_t*, uint32_t*);

struct Choice {
  PhiloxFn fn;
  const char* name;
};

// RELAYDIFF_CPU_ISA=avx2|scalar caps the choice (the tests check every path gives the same bits).
Choice choose() {
  const char* cap = std::getenv("RELAYDIFF_CPU_ISA");
  const std::string want = cap ? cap : "";
#if RD_X86_SIMD
  __builtin_cpu_init();
  if (want != "avx2" && want != "scalar" && __builtin_cpu_supports("avx512f"))
    return {philox_avx512, "avx512"};
  if (want != "scalar" && __builtin_cpu_supports("avx2")) return {philox_avx2, "avx2"};
#endif
  return {philox_scalar, "scalar"};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

}  // namespace

void philox_blocks(PhiloxKey key, uint32_t stream, uint64_t jb, int64_t nb, uint32_t* r0,
                   uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  choice().fn(key, stream, jb, nb, r0, r1, r2, r3);
}

const char* philox_isa() { return choice().name; }

}  // namespace relaydiff
