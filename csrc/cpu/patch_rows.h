// The two halves of the patch transform of a band of P rows. Along the rows:
// out[qP + i] = sum_j m[i][j] in[qP + j] for every patch q of a row, 16 values (16/P
// patches) at a time with constant lane shuffles; down the columns: P outputs from P rows, 16
// columns at a time. GCC lowers the 64-byte vectors to AVX-512, AVX2 or SSE2 code in the
// clones (patch_rows.cpp). One call per band: at small W the per-call cost dominated. Other
// types, and row tails, take the scalar loops.
#pragma once

#include <cstdint>

namespace relaydiff {

// m is the P x P matrix, row-major; `rows` consecutive rows of W values.
void patch_rows_f32(int P, const float* m, const float* in, float* out, int64_t W, int rows);

// The down-the-columns half for a band of P rows: out[i][x] = sum_r m[i][r] in[r][x], in the
// summation order of one scaled copy and P - 1 axpys (r ascending).
void patch_cols_f32(int P, const float* m, const float* in, float* out, int64_t W);

template <int P, typename T>
void patch_rows_scalar(const T* m, const T* __restrict in, T* __restrict out, int64_t x0,
                       int64_t W) {
  for (int64_t q = x0; q < W; q += P) {
    T acc[P];
    for (int i = 0; i < P; ++i) acc[i] = m[i * P] * in[q];
    for (int j = 1; j < P; ++j) {
      const T v = in[q + j];
      for (int i = 0; i < P; ++i) acc[i] += m[i * P + j] * v;
    }
    for (int i = 0; i < P; ++i) out[q + i] = acc[i];
  }
}

}  // namespace relaydiff
