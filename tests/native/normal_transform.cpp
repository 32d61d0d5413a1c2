// Exhaustive checks of the float32 Box-Muller transform of csrc/common/philox.h, run by
// tests/test_normal_transform.py. The radius depends only on k = r_even >> 9 (2^23 values)
// and the angle only on j = r_odd >> 8 (2^24 values), so every input is covered.
//
// Prints one line of key=value pairs:
//   u_mismatch / x_mismatch / q_mismatch: the conversion-free inputs of box_muller_f32
//     against the plain definitions (unit_open, unit_halfopen, q = (int)(4 v + 0.5),
//     x = (v - q/4) 2 pi in float32): counts of differing bits, must be 0.
//   radius_rel: max |radius - sqrt(-2 ln u)| / sqrt(-2 ln u), the float64 value as truth.
//   trig_abs: max |sin - sin(2 pi v)|, |cos - cos(2 pi v)|, float64 truth.
//   normal_abs: max |n_cos - radius64 cos64| over a strided sample of pairs (|n| up to 5.8).
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "../../csrc/common/philox.h"

using namespace relaydiff;

int main() {
  long u_mismatch = 0, x_mismatch = 0, q_mismatch = 0;
  double radius_rel = 0.0, trig_abs = 0.0, normal_abs = 0.0;
  const double two_pi = 6.283185307179586476925;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t r = k << 9;
    const float u = bits_float(0x3F800000u | k) - 0.99999994f;
    u_mismatch += float_bits(u) != float_bits(unit_open(r));
    const float radius = sqrtf(-2.0f * log_f32(u));
    const double truth = std::sqrt(-2.0 * std::log(unit_open_f64(r)));
    radius_rel = std::fmax(radius_rel, std::fabs(radius - truth) / truth);
  }
  for (uint32_t j = 0; j < (1u << 24); ++j) {
    const uint32_t r = j << 8;
    const float v = unit_halfopen(r);
    const int q_ref = static_cast<int>(v * 4.0f + 0.5f);
    const float x_ref = (v - static_cast<float>(q_ref) * 0.25f) * 6.28318530717958648f;
    const uint32_t q = (j + (1u << 21)) >> 22;
    const float d = bits_float(0x4B000000u | (j + (1u << 22) - (q << 22))) - 12582912.0f;
    const float x = d * (6.28318530717958648f * 5.9604644775390625e-8f);
    q_mismatch += static_cast<int>(q) != q_ref;
    x_mismatch += float_bits(x) != float_bits(x_ref);
    float s, c;
    sincos_2pi_f32(r, s, c);
    const double a = two_pi * unit_halfopen_f64(r);
    trig_abs = std::fmax(trig_abs, std::fmax(std::fabs(s - std::sin(a)), std::fabs(c - std::cos(a))));
  }
  uint32_t state = 12345u;
  for (int i = 0; i < (1 << 22); ++i) {
    state = state * 1664525u + 1013904223u;
    const uint32_t re = state;
    state = state * 1664525u + 1013904223u;
    const uint32_t ro = state;
    float nc, ns;
    box_muller_f32(re, ro, nc, ns);
    const double rad = std::sqrt(-2.0 * std::log(unit_open_f64(re)));
    const double a = two_pi * unit_halfopen_f64(ro);
    normal_abs = std::fmax(normal_abs, std::fmax(std::fabs(nc - rad * std::cos(a)),
                                                 std::fabs(ns - rad * std::sin(a))));
  }
  std::printf("u_mismatch=%ld x_mismatch=%ld q_mismatch=%ld radius_rel=%.3e trig_abs=%.3e normal_abs=%.3e\n",
              u_mismatch, x_mismatch, q_mismatch, radius_rel, trig_abs, normal_abs);
  return 0;
}
