#include "patch_rows.h"

#include <cstring>
#include <utility>

#include "multiversion.h"

namespace relaydiff {
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

// Lane l of term j reads element j of l's patch: (l - l % P) + j.
template <int P, int J>
struct LaneMask {
  static constexpr v16i value{(0 / P) * P + J,  (1 / P) * P + J,  (2 / P) * P + J,  (3 / P) * P + J,
              (4 / P) * P + J,  (5 / P) * P + J,  (6 / P) * P + J,  (7 / P) * P + J,
              (8 / P) * P + J,  (9 / P) * P + J,  (10 / P) * P + J, (11 / P) * P + J,
              (12 / P) * P + J, (13 / P) * P + J, (14 / P) * P + J, (15 / P) * P + J};
};

// coef[j][l] = m[l % P][j]: the weight lane l gives to element j of its patch
template <int P>
inline void row_coefs(const float* m, v16f* coef) {
  for (int j = 0; j < P; ++j)
    for (int l = 0; l < 16; ++l) coef[j][l] = m[(l % P) * P + j];
}

template <int P, int... J>
inline void rows_vec(const v16f* coef, const float* __restrict in, float* __restrict out,
                     int64_t W16, std::integer_sequence<int, J...>) {
  for (int64_t x = 0; x < W16; x += 16) {
    v16f v;
    std::memcpy(&v, in + x, sizeof(v));
    v16f acc = __builtin_shuffle(v, LaneMask<P, 0>::value) * coef[0];
    ((J > 0 ? (void)(acc += __builtin_shuffle(v, LaneMask<P, J>::value) * coef[J]) : (void)0), ...);
    std::memcpy(out + x, &acc, sizeof(acc));
  }
}

template <int P>
RD_MULTIVERSION void rows_f32(const float* m, const float* __restrict in, float* __restrict out,
                              int64_t W, int rows) {
  const int64_t W16 = W - W % 16;
  v16f coef[P];
  row_coefs<P>(m, coef);
  for (int r = 0; r < rows; ++r) {
    rows_vec<P>(coef, in + r * W, out + r * W, W16, std::make_integer_sequence<int, P>{});
    patch_rows_scalar<P, float>(m, in + r * W, out + r * W, W16, W);
  }
}

// out[i][x] = sum_r m[i][r] in[r][x], summed r ascending as m[i][0] in[0][x] + m[i][1] in[1][x]
// + ... (the order and roundings of vec_set_scaled + vec_axpy), 16 columns at a time.
template <int P>
RD_MULTIVERSION void cols_f32(const float* m, const float* __restrict in, float* __restrict out,
                              int64_t W) {
  const int64_t W16 = W - W % 16;
  for (int64_t x = 0; x < W16; x += 16) {
    v16f t[P];
    for (int r = 0; r < P; ++r) std::memcpy(&t[r], in + r * W + x, sizeof(v16f));
    for (int i = 0; i < P; ++i) {
      v16f acc = m[i * P] * t[0];
      for (int r = 1; r < P; ++r) acc += m[i * P + r] * t[r];
      std::memcpy(out + i * W + x, &acc, sizeof(acc));
    }
  }
  for (int64_t x = W16; x < W; ++x) {
    for (int i = 0; i < P; ++i) {
      float acc = m[i * P] * in[x];
      for (int r = 1; r < P; ++r) acc += m[i * P + r] * in[r * W + x];
      out[i * W + x] = acc;
    }
  }
}

}  // namespace

void patch_rows_f32(int P, const float* m, const float* in, float* out, int64_t W, int rows) {
  switch (P) {
    case 2: rows_f32<2>(m, in, out, W, rows); break;
    case 4: rows_f32<4>(m, in, out, W, rows); break;
    case 8: rows_f32<8>(m, in, out, W, rows); break;
    default: rows_f32<16>(m, in, out, W, rows); break;
  }
}

void patch_cols_f32(int P, const float* m, const float* in, float* out, int64_t W) {
  switch (P) {
    case 2: cols_f32<2>(m, in, out, W); break;
    case 4: cols_f32<4>(m, in, out, W); break;
    case 8: cols_f32<8>(m, in, out, W); break;
    default: cols_f32<16>(m, in, out, W); break;
  }
}

}  // namespace relaydiff
