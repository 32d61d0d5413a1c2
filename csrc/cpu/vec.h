// Row primitives of the CPU kernels. The float versions are compiled for AVX-512, AVX2
// and baseline x86-64 (vec.cpp); the rest of the kernel code is built for baseline x86-64
// only, so its hot loops go through these. Other types use the plain loops below.
#pragma once

#include <cstdint>

namespace relaydiff {

void vec_axpy_f32(float* y, const float* x, float a, int64_t n);  // y += a x
void vec_add_f32(float* y, const float* x, int64_t n);            // y += x
void vec_mul_f32(float* y, const float* x, int64_t n);            // y *= x
void vec_scale_f32(float* y, float a, int64_t n);                 // y *= a
void vec_fma_f32(float* y, const float* a, const float* x, int64_t n);  // y += a * x, elementwise

template <typename T>
inline void vec_axpy(T* __restrict y, const T* __restrict x, T a, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    vec_axpy_f32(y, x, a, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
}

template <typename T>
inline void vec_add(T* __restrict y, const T* __restrict x, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    vec_add_f32(y, x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
}

template <typename T>
inline void vec_mul(T* __restrict y, const T* __restrict x, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    vec_mul_f32(y, x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] *= x[i];
  }
}

template <typename T>
inline void vec_scale(T* y, T a, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    vec_scale_f32(y, a, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
  }
}

// y = a x (the float64 patch transform; float bands go through patch_cols_f32)
template <typename T>
inline void vec_set_scaled(T* __restrict y, const T* __restrict x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

template <typename T>
inline void vec_fma(T* __restrict y, const T* __restrict a, const T* __restrict x, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    vec_fma_f32(y, a, x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += a[i] * x[i];
  }
}

}  // namespace relaydiff
