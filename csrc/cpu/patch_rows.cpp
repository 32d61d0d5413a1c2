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

template <int P, int... J>
inline void rows_vec(const float* m, const float* __restrict in, float* __restrict out,
                     int64_t W16, std::integer_sequence<int, J...>) {
  // coef[j][l] = m[l % P][j]: the weight lane l gives to element j of its patch
  v16f coef[P];
  for (int j = 0; j < P; ++j)
    for (int l = 0; l < 16; ++l) coef[j][l] = m[(l % P) * P + j];
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
                              int64_t W) {
  const int64_t W16 = W - W % 16;
  rows_vec<P>(m, in, out, W16, std::make_integer_sequence<int, P>{});
  patch_rows_scalar<P, float>(m, in, out, W16, W);
}

}  // namespace

void patch_rows_f32(int P, const float* m, const float* in, float* out, int64_t W) {
  switch (P) {
    case 2: rows_f32<2>(m, in, out, W); break;
    case 4: rows_f32<4>(m, in, out, W); break;
    case 8: rows_f32<8>(m, in, out, W); break;
    default: rows_f32<16>(m, in, out, W); break;
  }
}

}  // namespace relaydiff
