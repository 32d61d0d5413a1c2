#include "vec.h"

#include "multiversion.h"

namespace relaydiff {

RD_MULTIVERSION void vec_axpy_f32(float* __restrict y, const float* __restrict x, float a,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

RD_MULTIVERSION void vec_add_f32(float* __restrict y, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

RD_MULTIVERSION void vec_mul_f32(float* __restrict y, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= x[i];
}

RD_MULTIVERSION void vec_scale_f32(float* y, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

RD_MULTIVERSION void vec_fma_f32(float* __restrict y, const float* __restrict a,
                                 const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a[i] * x[i];
}

}  // namespace relaydiff
