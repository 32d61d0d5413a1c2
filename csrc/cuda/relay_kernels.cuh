// Device code of every relaydiff op on CUDA: ONE tile kernel, templated on the storage type
// S (float, double, __half, __nv_bfloat16; computing in float, double for double), the
// patch size P (compile time: the transforms unroll into FMAs with constant operands) and
// the op kind. Raw pointers only, no torch headers (this compiles in about a second).
//
// A thread block owns a tile of kTileH x kTileW pixels of one plane (docs/cuda.md) and
// passes over it in four phases separated by barriers:
//   1. load every input once (16-byte loads where the layout allows, any strides
//      otherwise) into shared memory; compute the sample's per-coefficient factors;
//      generate the block-noise source e2 for the tile plus (s-1) halo rows above and
//      columns left (wrapping around the image)
//   2. DCT along the rows of every patch; horizontal s-box sums of e2
//   3. DCT down the columns, scale by the factors (A, B), inverse DCT down the columns;
//      generate the white noise e of the tile into shared memory when W % 4 != 0
//   4. inverse DCT along the rows, add the white noise (drawn here, in registers, when
//      W % 4 == 0: then each 4 columns are one Philox block) and the vertical box sum of
//      the block noise, convert and write the output once
// so every op reads its inputs once and writes its output once: one pass over memory.
//
// Noise is Philox4x32-10 keyed by the seed and counted by the element's linear index in
// logical [B, C, H, W] order, through the float32 polynomial Box-Muller of philox.h (libm
// double math for float64), so CUDA and CPU give the same field for the same seed. Each
// Philox call yields the 4 normals of 4 consecutive elements, all of them used.
//
// Every phase is a plain loop over work items strided by the thread count, and threads
// share data only through shared memory between barriers. tests/cuda_emu compiles this
// header for the CPU (RELAYDIFF_EMULATE) and runs the phases thread by thread with a race
// and uninitialised-read detector on shared memory, so the indexing is tested without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../common/philox.h"
#include "../common/relay_math.h"
#include "relay_launch.h"

#if defined(__CUDACC__)
#define RD_DEV __device__ __forceinline__
#define RD_UNROLL _Pragma("unroll")
#else
#define RD_DEV inline
#define RD_UNROLL
#endif

#if defined(RELAYDIFF_EMULATE)
namespace relaydiff {
namespace emu {
void shared_read(const void* p, size_t bytes, size_t align);
void shared_write(const void* p, size_t bytes, size_t align);
void global_read(const void* p, size_t bytes, size_t align);
void global_write(const void* p, size_t bytes, size_t align);
}  // namespace emu
}  // namespace relaydiff
#define RD_SHARED_READ(p, n, a) ::relaydiff::emu::shared_read(p, n, a)
#define RD_SHARED_WRITE(p, n, a) ::relaydiff::emu::shared_write(p, n, a)
#define RD_GLOBAL_READ(p, n, a) ::relaydiff::emu::global_read(p, n, a)
#define RD_GLOBAL_WRITE(p, n, a) ::relaydiff::emu::global_write(p, n, a)
#else
#define RD_SHARED_READ(p, n, a) ((void)0)
#define RD_SHARED_WRITE(p, n, a) ((void)0)
#define RD_GLOBAL_READ(p, n, a) ((void)0)
#define RD_GLOBAL_WRITE(p, n, a) ((void)0)
#endif

namespace relaydiff {
namespace cuda {

template <typename S>
using compute_t = std::conditional_t<std::is_same<S, double>::value, double, float>;

template <typename T>
RD_HD T min_of(T a, T b) { return a < b ? a : b; }

// ------------------------------------------------------------------ storage <-> compute

RD_DEV float to_compute(float v) { return v; }
RD_DEV double to_compute(double v) { return v; }
RD_DEV float to_compute(__half v) { return __half2float(v); }
RD_DEV float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S>
RD_DEV S from_compute(compute_t<S> v);
template <>
RD_DEV float from_compute<float>(float v) { return v; }
template <>
RD_DEV double from_compute<double>(double v) { return v; }
template <>
RD_DEV __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <>
RD_DEV __nv_bfloat16 from_compute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of storage elements, as moved by one vector load/store.
struct Raw16 {
  uint32_t w[4];
};

RD_DEV double hilo_double(uint32_t hi, uint32_t lo) {
#if defined(__CUDACC__)
  return __hiloint2double(static_cast<int>(hi), static_cast<int>(lo));
#else
  const uint64_t u = (static_cast<uint64_t>(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

RD_DEV void double_hilo(double d, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDACC__)
  hi = static_cast<uint32_t>(__double2hiint(d));
  lo = static_cast<uint32_t>(__double2loint(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, 8);
  hi = static_cast<uint32_t>(u >> 32);
  lo = static_cast<uint32_t>(u);
#endif
}

// Bits of the 16-bit storage types.
RD_DEV unsigned short half_bits(__half h) { return __half_raw(h).x; }
RD_DEV unsigned short half_bits(__nv_bfloat16 h) { return __nv_bfloat16_raw(h).x; }

template <typename H>
RD_DEV H half_of_bits(unsigned short bits) {
  std::conditional_t<std::is_same<H, __half>::value, __half_raw, __nv_bfloat16_raw> raw;
  raw.x = bits;
  return H(raw);
}

// The 16 bytes as 16 / sizeof(S) compute values, and back (round to nearest even).
RD_DEV void unpack(const Raw16& r, float* v, float*) {
  RD_UNROLL for (int i = 0; i < 4; ++i) v[i] = bits_float(r.w[i]);
}
RD_DEV void unpack(const Raw16& r, double* v, double*) {
  RD_UNROLL for (int i = 0; i < 2; ++i) v[i] = hilo_double(r.w[2 * i + 1], r.w[2 * i]);
}
template <typename H>  // __half, __nv_bfloat16
RD_DEV void unpack(const Raw16& r, float* v, H*) {
  RD_UNROLL for (int i = 0; i < 8; ++i) {
    v[i] = to_compute(half_of_bits<H>(static_cast<unsigned short>(r.w[i >> 1] >> (16 * (i & 1)))));
  }
}

RD_DEV Raw16 pack(const float* v, float*) {
  Raw16 r;
  RD_UNROLL for (int i = 0; i < 4; ++i) r.w[i] = float_bits(v[i]);
  return r;
}
RD_DEV Raw16 pack(const double* v, double*) {
  Raw16 r;
  RD_UNROLL for (int i = 0; i < 2; ++i) double_hilo(v[i], r.w[2 * i + 1], r.w[2 * i]);
  return r;
}
template <typename H>
RD_DEV Raw16 pack(const float* v, H*) {
  Raw16 r;
  RD_UNROLL for (int i = 0; i < 4; ++i) {
    r.w[i] = static_cast<uint32_t>(half_bits(from_compute<H>(v[2 * i]))) |
             (static_cast<uint32_t>(half_bits(from_compute<H>(v[2 * i + 1]))) << 16);
  }
  return r;
}

// ------------------------------------------------------------------ global memory

RD_DEV Raw16 ldg16(const void* p) {
  RD_GLOBAL_READ(p, 16, 16);
#if defined(__CUDACC__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return {{v.x, v.y, v.z, v.w}};
#else
  Raw16 r;
  std::memcpy(r.w, p, 16);
  return r;
#endif
}

RD_DEV void stg16(void* p, const Raw16& r) {
  RD_GLOBAL_WRITE(p, 16, 16);
#if defined(__CUDACC__)
  *reinterpret_cast<uint4*>(p) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
#else
  std::memcpy(p, r.w, 16);
#endif
}

template <typename S>
RD_DEV compute_t<S> ldg_elem(const S* p) {
  RD_GLOBAL_READ(p, sizeof(S), sizeof(S));
#if defined(__CUDACC__)
  return to_compute(__ldg(p));
#else
  return to_compute(*p);
#endif
}

template <typename S>
RD_DEV void stg_elem(S* p, compute_t<S> v) {
  RD_GLOBAL_WRITE(p, sizeof(S), sizeof(S));
  *p = from_compute<S>(v);
}

// ------------------------------------------------------------------ shared memory

template <typename T>
RD_DEV T sm_ld(const T* p) {
  RD_SHARED_READ(p, sizeof(T), sizeof(T));
  return *p;
}

template <typename T>
RD_DEV void sm_st(T* p, T v) {
  RD_SHARED_WRITE(p, sizeof(T), sizeof(T));
  *p = v;
}

// N consecutive values at p, in 16-byte (or 8-byte) accesses where N * sizeof(T) allows;
// the caller guarantees that alignment.
template <int N, typename T>
constexpr int vec_bytes() {
  return (N * sizeof(T)) % 16 == 0 ? 16 : (N * sizeof(T)) % 8 == 0 ? 8 : static_cast<int>(sizeof(T));
}

template <int N, typename T>
RD_DEV void sm_load(const T* p, T* v) {
  constexpr int kVec = vec_bytes<N, T>();
  RD_SHARED_READ(p, N * sizeof(T), kVec);
#if defined(__CUDACC__)
  if constexpr (kVec == 16 && std::is_same<T, float>::value) {
    RD_UNROLL for (int i = 0; i < N / 4; ++i) {
      const float4 t = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
    }
  } else if constexpr (kVec == 16) {
    RD_UNROLL for (int i = 0; i < N / 2; ++i) {
      const double2 t = reinterpret_cast<const double2*>(p)[i];
      v[2 * i] = t.x; v[2 * i + 1] = t.y;
    }
  } else if constexpr (kVec == 8 && std::is_same<T, float>::value) {
    RD_UNROLL for (int i = 0; i < N / 2; ++i) {
      const float2 t = reinterpret_cast<const float2*>(p)[i];
      v[2 * i] = t.x; v[2 * i + 1] = t.y;
    }
  } else {
    RD_UNROLL for (int i = 0; i < N; ++i) v[i] = p[i];
  }
#else
  std::memcpy(v, p, N * sizeof(T));
#endif
}

template <int N, typename T>
RD_DEV void sm_store(T* p, const T* v) {
  constexpr int kVec = vec_bytes<N, T>();
  RD_SHARED_WRITE(p, N * sizeof(T), kVec);
#if defined(__CUDACC__)
  if constexpr (kVec == 16 && std::is_same<T, float>::value) {
    RD_UNROLL for (int i = 0; i < N / 4; ++i)
      reinterpret_cast<float4*>(p)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else if constexpr (kVec == 16) {
    RD_UNROLL for (int i = 0; i < N / 2; ++i)
      reinterpret_cast<double2*>(p)[i] = make_double2(v[2 * i], v[2 * i + 1]);
  } else if constexpr (kVec == 8 && std::is_same<T, float>::value) {
    RD_UNROLL for (int i = 0; i < N / 2; ++i)
      reinterpret_cast<float2*>(p)[i] = make_float2(v[2 * i], v[2 * i + 1]);
  } else {
    RD_UNROLL for (int i = 0; i < N; ++i) p[i] = v[i];
  }
#else
  std::memcpy(p, v, N * sizeof(T));
#endif
}

// ------------------------------------------------------------------ normals

RD_DEV void box_muller(uint32_t re, uint32_t ro, float& c, float& s) { box_muller_f32(re, ro, c, s); }

// float64 outputs: libm double math, like the CPU kernel's float64 path
RD_DEV void box_muller(uint32_t re, uint32_t ro, double& c, double& s) {
  const double u = unit_open_f64(re);
  const double angle = 2.0 * kPi * unit_halfopen_f64(ro);
  const double radius = sqrt(-2.0 * log(u));
  c = radius * cos(angle);
  s = radius * sin(angle);
}

// The 4 normals of Philox block j of `stream`: elements 4j .. 4j+3 of the stream.
template <typename T>
RD_DEV void normals4(PhiloxKey key, uint32_t stream, uint64_t j, T* n) {
  uint32_t r0, r1, r2, r3;
  philox4x32_10(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), stream, 0u, key, r0, r1,
                r2, r3);
  box_muller(r0, r1, n[0], n[1]);
  box_muller(r2, r3, n[2], n[3]);
}

// ------------------------------------------------------------------ patch transforms
// The DCT-II matrix C[k][n] = s_k cos(pi (2n + 1) k / (2P)) as compile-time constants, so
// that the unrolled transforms are FMAs with immediate operands: a matrix held in kernel
// parameters or constant memory is hoisted into registers by the compiler (P = 16: 256).

constexpr double ct_sqrt(double x) {  // Newton's iteration, converged to double precision
  double r = x > 1.0 ? x : 1.0;
  for (int i = 0; i < 64; ++i) r = 0.5 * (r + x / r);
  return r;
}

// cos(pi m / (2P)) for m >= 0: exact reduction to a quadrant, Taylor series on [0, pi/2)
constexpr double ct_cos_pi_frac(int m, int P) {
  m %= 4 * P;
  const int quadrant = m / P;
  const double x = kPi * (m % P) / (2.0 * P);
  double c = 1.0, s = x, tc = 1.0, ts = x;
  for (int i = 1; i < 16; ++i) {
    tc *= -x * x / ((2.0 * i - 1.0) * (2.0 * i));
    ts *= -x * x / ((2.0 * i) * (2.0 * i + 1.0));
    c += tc;
    s += ts;
  }
  return quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

constexpr double dct_entry(int P, int k, int n) {
  return (k == 0 ? ct_sqrt(1.0 / P) : ct_sqrt(2.0 / P)) * ct_cos_pi_frac((2 * n + 1) * k, P);
}

template <int P, int K, int N>
struct DctCoef {
  static constexpr double value = dct_entry(P, K, N);
};

template <int... I>
using Seq = std::integer_sequence<int, I...>;

// sum_n C[k][n] x[n], summed in the CPU kernel's order (n ascending)
template <int P, int K, typename T, int... N>
RD_DEV T dct_dot(const T* x, Seq<N...>) {
  T acc = static_cast<T>(DctCoef<P, K, 0>::value) * x[0];
  ((acc += static_cast<T>(DctCoef<P, K, N + 1>::value) * x[N + 1]), ...);
  return acc;
}

// sum_k C[k][n] x[k]
template <int P, int N, typename T, int... K>
RD_DEV T idct_dot(const T* x, Seq<K...>) {
  T acc = static_cast<T>(DctCoef<P, 0, N>::value) * x[0];
  ((acc += static_cast<T>(DctCoef<P, K + 1, N>::value) * x[K + 1]), ...);
  return acc;
}

template <int P, typename T, int... K>
RD_DEV void dct_all(const T* x, T* y, Seq<K...>) {
  ((y[K] = dct_dot<P, K>(x, std::make_integer_sequence<int, P - 1>{})), ...);
}

template <int P, typename T, int... N>
RD_DEV void idct_all(const T* x, T* y, Seq<N...>) {
  ((y[N] = idct_dot<P, N>(x, std::make_integer_sequence<int, P - 1>{})), ...);
}

// y = C x (DCT-II of P values)
template <int P, typename T>
RD_DEV void dct(const T* x, T* y) {
  dct_all<P>(x, y, std::make_integer_sequence<int, P>{});
}

// y = C^T x (DCT-III: the inverse)
template <int P, typename T>
RD_DEV void idct(const T* x, T* y) {
  idct_all<P>(x, y, std::make_integer_sequence<int, P>{});
}

// ------------------------------------------------------------------ kernel parameters

template <typename S>
struct InView {
  const S* data;
  int64_t sb, sc, sh, sw;
};

// n / d for 32-bit unsigned n and a divisor fixed per launch, as one multiply-high, a
// subtract, an add and two shifts (Granlund & Montgomery / Hacker's Delight 10-9): with
// l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1, t = mulhi(m, n),
// n / d = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0), exact for every n < 2^32 and
// d >= 1. The kernel's three divisions by per-launch sizes used to cost ~20 uniform
// instructions each, per thread and tile.
struct FastDiv {
  uint32_t d, m, s1, s2;
};

inline FastDiv make_fastdiv(uint32_t d) {
  uint32_t l = 0;
  while (l < 32 && (uint64_t{1} << l) < d) ++l;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1;
  return {d, static_cast<uint32_t>(m), l < 1 ? l : 1u, l > 0 ? l - 1 : 0u};
}

RD_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

RD_HD uint32_t fast_div(uint32_t n, const FastDiv& f) {
  const uint32_t t = mulhi_u32(f.m, n);
  return (t + ((n - t) >> f.s1)) >> f.s2;
}

// a / b rounded to nearest in the compute type (the CPU kernel's division of the block
// weight by s), in a few instructions: the float path is the correctly rounded division
// that -prec-div=false would otherwise make approximate.
RD_DEV float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
RD_DEV double div_rn(double a, double b) { return a / b; }

template <typename S, int P, Kind K>
struct TileParams {
  using T = compute_t<S>;
  int64_t C, H, W, tiles_x, tiles_y;
  FastDiv div_tiles_x, div_tiles_y, div_channels;
  InView<S> in[4];
  S* out;
  const double* tau;
  const double* tau_next;
  const double* sigma;
  const double* sigma_next;
  const double* noise_src;
  double noise_mul, white_mul, block_mul, alpha, s_noise, min_scale;
  PhiloxKey key;
  int32_t n_in;       // inputs read: 1, or 2 (Euler) / 4 (Heun) for a step
  int32_t step;       // kScale: factors A and B, second input y
  int32_t fast;       // every input allows aligned 16-byte row loads
  int32_t block_size;
  int32_t any_white;  // some sample may get white / block noise (sizes shared memory)
  int32_t any_block;
  int32_t white_direct;  // W % 4 == 0: phase 4 draws the white noise in registers
  int32_t vec_out;    // W % V == 0 and the output 16-byte aligned: 16-byte row stores
  int32_t inverse;    // kTransform: patch_idct
};

// Shared-memory regions, in elements of the compute type, each a multiple of 4 elements
// (16-byte aligned). The white noise reuses the block-noise source region (dead by then).
struct SmemLayout {
  int64_t x, y, f, g, h, total;
};

RD_HD int halo_cols(int s) { return (s - 1 + 3) & ~3; }  // s - 1 rounded up to whole Philox blocks

RD_HD SmemLayout smem_layout(Kind kind, int P, bool step, bool any_white, bool any_block, int s) {
  SmemLayout l{0, 0, 0, 0, 0, 0};
  int64_t off = 0;
  const int64_t tile = static_cast<int64_t>(kTileH) * kTileW;
  if (kind != Kind::kNoise) { l.x = off; off += tile; }
  if (kind == Kind::kScale && step) { l.y = off; off += tile; }
  if (kind == Kind::kScale) { l.f = off; off += (2 * P * P + 3) & ~3; }
  if (any_block) {
    const int64_t rows = kTileH + s - 1;
    l.g = off;
    off += rows * (halo_cols(s) + kTileW);
    l.h = off;
    off += rows * kTileW;
  } else if (any_white) {
    l.g = off;
    off += tile;
  }
  l.total = off;
  return l;
}

// The layout of a launch; the white noise has a region only when phase 3 draws it.
template <typename S, int P, Kind K>
RD_HD SmemLayout smem_layout(const TileParams<S, P, K>& t) {
  return smem_layout(K, P, t.step != 0, t.any_white != 0 && t.white_direct == 0, t.any_block != 0,
                     t.block_size);
}

// ------------------------------------------------------------------ the tile kernel

template <typename S, int P, Kind K>
struct TileKernel {
  using T = compute_t<S>;
  using Params = TileParams<S, P, K>;
  static constexpr int V = 16 / static_cast<int>(sizeof(S));  // elements per 16-byte access
  // columns per work item of phase 4: whole patches, whole 16-byte stores, whole Philox blocks
  static constexpr int UW = (P > 4 ? P : 4) > V ? (P > 4 ? P : 4) : V;
  static constexpr int kMainBlocks = kTileW / 4 + 1;  // Philox blocks touching a tile row
  static_assert(kTileW % UW == 0 && kTileH % P == 0 && UW % V == 0 && UW % P == 0, "tile shape");
  static_assert(P * P <= kThreads, "one thread per factor");

  const Params& p;
  T* X;   // [kTileH][kTileW] x, then its DCT coefficients, then the result
  T* Y;   // [kTileH][kTileW] y of a step
  T* F;   // [2][P][P] factors A (or a_tau) and B
  T* G;   // [kTileH + s - 1][HX + kTileW] block-noise source e2 with its halo; then white noise
  T* Hs;  // [kTileH + s - 1][kTileW] horizontal s-box sums of e2
  int64_t b, c, y0, x0, base;  // sample, channel, tile origin, plane offset
  int THv, TWv, TWr;           // valid rows / columns; columns rounded up to whole items
  int s, HY, HX, GW;           // block size, halo rows, halo columns, row pitch of G
  bool white, block;
  T white_w, block_w;          // weights of e and of each box-summed e2 row (block_w / s)
  T heun;                      // 0.5 sigma / sigma_next of a Heun step

  RD_DEV TileKernel(const Params& prm, int64_t tile, T* smem) : p(prm) {
    // 32-bit divisions (a 64-bit one costs ~100 instructions per thread): the tile index,
    // and so the plane index and the per-plane tile counts, are below 2^31 (grid limit)
    const uint32_t t32 = static_cast<uint32_t>(tile);
    const uint32_t tiles_x = static_cast<uint32_t>(p.tiles_x);
    const uint32_t tiles_y = static_cast<uint32_t>(p.tiles_y);
    const uint32_t rest = fast_div(t32, p.div_tiles_x);
    const uint32_t plane = fast_div(rest, p.div_tiles_y);
    const uint32_t channels = static_cast<uint32_t>(p.C);
    b = fast_div(plane, p.div_channels);
    c = plane - static_cast<uint32_t>(b) * channels;
    y0 = static_cast<int64_t>(rest - plane * tiles_y) * kTileH;
    x0 = static_cast<int64_t>(t32 - rest * tiles_x) * kTileW;
    base = static_cast<int64_t>(plane) * p.H * p.W;
    THv = static_cast<int>(min_of<int64_t>(kTileH, p.H - y0));
    TWv = static_cast<int>(min_of<int64_t>(kTileW, p.W - x0));
    TWr = (TWv + UW - 1) / UW * UW;
    s = p.block_size;
    HY = s - 1;
    HX = halo_cols(s);
    GW = HX + kTileW;
    const SmemLayout lay = smem_layout(p);
    X = smem + lay.x;
    Y = smem + lay.y;
    F = smem + lay.f;
    G = smem + lay.g;
    Hs = smem + lay.h;
    white = block = false;
    white_w = block_w = T(0);
    if constexpr (K != Kind::kTransform) {  // the transforms draw no noise
      double nw = p.noise_mul;
      if (p.noise_src != nullptr) nw *= load_param(p.noise_src);
      white_w = static_cast<T>(nw * p.white_mul);
      const T bw = static_cast<T>(nw * p.block_mul * p.alpha);
      white = p.any_white != 0 && white_w != T(0);
      block = p.any_block != 0 && bw != T(0);
      block_w = div_rn(bw, static_cast<T>(s));
    }
    heun = T(0);
    if (K == Kind::kScale && p.n_in == 4) {
      heun = static_cast<T>(0.5 * load_param(p.sigma) / load_param(p.sigma_next));
    }
  }

  RD_DEV double load_param(const double* a) const {
    RD_GLOBAL_READ(a + b, 8, 8);
#if defined(__CUDACC__)
    return __ldg(a + b);
#else
    return a[b];
#endif
  }

  // ---------------------------------------------------------------- phase 1

  RD_DEV void phase1(int tid) const {
    if constexpr (K == Kind::kScale) {
      if (tid < P * P) factors(tid);
    }
    if constexpr (K != Kind::kNoise) load_tile(tid);
    if (block) {
      gen_block_source(tid);
    }
  }

  RD_DEV void factors(int tid) const {
    const int k = tid / P, l = tid % P;
    const double tau = load_param(p.tau);
    if (p.step) {
      const double g = step_gamma(p.s_noise, load_param(p.sigma), load_param(p.sigma_next));
      const StepCoef sc = step_coef(k, l, P, tau, load_param(p.tau_next), g, p.min_scale);
      sm_st(F + tid, static_cast<T>(sc.A));
      sm_st(F + P * P + tid, static_cast<T>(sc.B));
    } else {
      sm_st(F + tid, static_cast<T>(blur_factor(k, l, P, tau, p.min_scale)));
    }
  }

  RD_DEV const S* row_ptr(const InView<S>& v, int r) const {
    return v.data + b * v.sb + c * v.sc + (y0 + r) * v.sh;
  }

  // Values of columns q*V .. q*V+V-1 of tile row r of input i, zero beyond the image.
  RD_DEV void load_scalar(int i, int r, int q, T* v) const {
    const InView<S>& in = p.in[i];
    const S* row = row_ptr(in, r);
    RD_UNROLL for (int e = 0; e < V; ++e) {
      const int col = q * V + e;
      v[e] = col < TWv ? ldg_elem(row + (x0 + col) * in.sw) : T(0);
    }
  }

  // The inputs' loads are unrolled for the number of inputs the call has (1 for the
  // transforms and relay_corrupt, 2 for an Euler step, 4 for Heun): one predicated copy
  // per possible input used to cost ~13 instructions per pixel in relay_corrupt.
  RD_DEV void load_tile(int tid) const {
    if constexpr (K == Kind::kScale) {
      if (p.n_in == 4) {
        load_tile_n<4>(tid);
      } else if (p.n_in == 2) {
        load_tile_n<2>(tid);
      } else {
        load_tile_n<1>(tid);
      }
    } else {
      load_tile_n<1>(tid);
    }
  }

  template <int N>
  RD_DEV void load_tile_n(int tid) const {
    constexpr int kVecRow = kTileW / V;
    constexpr int kIters = (kTileH * kVecRow + kThreads - 1) / kThreads;
    const int nvec = TWr / V;
    // each input's tile origin once (the per-row part below is one multiply)
    const S* origin[N];
    RD_UNROLL for (int i = 0; i < N; ++i) origin[i] = row_ptr(p.in[i], 0) + x0;
    // all 16-byte loads in flight before the first use
    Raw16 raw[kIters][N];
    bool full[kIters];
    RD_UNROLL for (int it = 0; it < kIters; ++it) {
      const int u = tid + it * kThreads, r = u / kVecRow, q = u % kVecRow;
      full[it] = p.fast && r < THv && q * V + V <= TWv;
      if (full[it]) {
        RD_UNROLL for (int i = 0; i < N; ++i) raw[it][i] = ldg16(origin[i] + r * p.in[i].sh + q * V);
      }
    }
    RD_UNROLL for (int it = 0; it < kIters; ++it) {
      const int u = tid + it * kThreads, r = u / kVecRow, q = u % kVecRow;
      if (r >= THv || q >= nvec) continue;
      T x[V], y[V], xp[V];
      RD_UNROLL for (int i = 0; i < N; ++i) {
        T v[V];
        if (full[it]) {
          unpack(raw[it][i], v, static_cast<S*>(nullptr));
        } else {
          load_scalar(i, r, q, v);
        }
        // y = sigma * d of a step: Euler x - D; Heun (x - D)/2 + (sigma/sigma_next)(x' - D')/2,
        // in the CPU kernel's order of operations
        RD_UNROLL for (int e = 0; e < V; ++e) {
          if (i == 0) x[e] = v[e];
          if (i == 1) y[e] = x[e] - v[e];
          if (i == 2) xp[e] = v[e];
          if (i == 3) y[e] = T(0.5) * y[e] + heun * (xp[e] - v[e]);
        }
      }
      sm_store<V>(X + r * kTileW + q * V, x);
      if constexpr (K == Kind::kScale && N >= 2) {  // a step has 2 or 4 inputs
        if (p.step) sm_store<V>(Y + r * kTileW + q * V, y);
      }
    }
  }

  // ---------------------------------------------------------------- noise generation

  // Normals of `stream` for columns [col0, col0 + n) of image rows ystart + r (mod H),
  // r < rows, into dst + r * pitch: one Philox block (4 normals) per work item, at most
  // `kb` blocks per row. Columns past the image edge (up to TWr) get the normals of the
  // next row's elements: defined values that no valid output uses.
  RD_DEV void gen_rows(int tid, uint32_t stream, int rows, int64_t ystart, int64_t col0, int n,
                       T* dst, int pitch, int kb) const {
    for (int item = tid; item < rows * kb; item += kThreads) {
      const int r = item / kb, k = item - r * kb;
      int64_t yy = ystart + r;
      if (yy < 0) yy += p.H;
      const int64_t seg = base + yy * p.W + col0;  // linear index of the row segment's start (>= 0)
      const int64_t j = (seg >> 2) + k;
      // position of the block's first element, 4 j - seg, in 32 bits
      const int lane0 = 4 * k - static_cast<int>(seg & 3);
      if (lane0 >= n) continue;
      T v[4];
      normals4(p.key, stream, static_cast<uint64_t>(j), v);
      T* out = dst + r * pitch;
      if (lane0 >= 0 && lane0 + 4 <= n && (reinterpret_cast<uintptr_t>(out + lane0) & 15) == 0) {
        sm_store<4>(out + lane0, v);
      } else {
        RD_UNROLL for (int e = 0; e < 4; ++e) {
          const int pos = lane0 + e;
          if (pos >= 0 && pos < n) sm_st(out + pos, v[e]);
        }
      }
    }
  }

  // e2 of image rows y0 - (s-1) .. y0 + THv - 1 (mod H) and columns x0 - (s-1) .. x0 + TWr - 1
  // (mod W) into G, column x0 at G column HX.
  RD_DEV void gen_block_source(int tid) const {
    const int rows = THv + HY;
    gen_rows(tid, kStreamBlock, rows, y0 - HY, x0, TWr, G + HX, GW, kMainBlocks);
    if (HY == 0) return;
    // nh halo columns x0-nh .. x0-1 (mod W): one contiguous run because nh <= W (s <= W);
    // HX of them (whole Philox blocks) when the image is that wide. The thread order is
    // reversed so that the few halo items go to threads with fewer main items.
    const int nh = HX <= p.W ? HX : HY;
    const int64_t hc = x0 >= nh ? x0 - nh : p.W - nh;
    const int kb = (p.W % 4 == 0 && nh == HX) ? HX / 4 : (nh + 6) / 4;
    gen_rows(kThreads - 1 - tid, kStreamBlock, rows, y0 - HY, hc, nh, G + HX - nh, GW, kb);
    // columns left of the halo are read (never used) by the box sums: keep them defined
    for (int i = tid; i < rows * (HX - nh); i += kThreads) {
      sm_st(G + (i / (HX - nh)) * GW + i % (HX - nh), T(0));
    }
  }

  // ---------------------------------------------------------------- phase 2

  RD_DEV void phase2(int tid) const {
    if constexpr (K == Kind::kScale) {
      constexpr int kLines = kTileW / P;
      for (int u = tid; u < THv * kLines; u += kThreads) {
        const int r = u / kLines, q = u % kLines;
        if (q * P >= TWr) continue;
        row_dct(X + r * kTileW + q * P);
        if (p.step) row_dct(Y + r * kTileW + q * P);
      }
    }
    if (block) {
      // the usual block sizes get their sums unrolled at compile time (the bounds below
      // depend on s only); any other s takes the general loop
      if (s == 4) {
        hbox<4>(tid);
      } else if (s == 8) {
        hbox<8>(tid);
      } else {
        hbox<0>(tid);
      }
    }
  }

  RD_DEV void row_dct(T* line) const {
    T v[P], o[P];
    sm_load<P>(line, v);
    dct<P>(v, o);
    sm_store<P>(line, o);
  }

  // Hs[gr][c + i] = sum_{b < s} G[gr][HX + c + i - b] for i < 4, b ascending (the CPU order);
  // SB: s when known at compile time (== s), else 0
  template <int SB>
  RD_DEV void hbox(int tid) const {
    constexpr int kGroups = kTileW / 4;
    const int s = SB > 0 ? SB : this->s;
    const int rows = THv + HY;
    const int chunks = SB > 0 ? halo_cols(SB) / 4 : HX / 4;
    for (int u = tid; u < rows * kGroups; u += kThreads) {
      const int gr = u / kGroups, col = (u % kGroups) * 4;
      if (col >= TWr) continue;
      const T* g = G + gr * GW + HX + col;
      T cur[4], h[4];
      sm_load<4>(g, cur);
      RD_UNROLL for (int i = 0; i < 4; ++i) {
        h[i] = cur[i];
        RD_UNROLL for (int j = i - 1; j >= 0; --j) {
          if (i - j < s) h[i] += cur[j];
        }
      }
      for (int k = 1; k <= chunks; ++k) {
        T prev[4];
        sm_load<4>(g - 4 * k, prev);
        RD_UNROLL for (int i = 0; i < 4; ++i) {
          RD_UNROLL for (int j = 3; j >= 0; --j) {
            if (i + 4 * k - j < s) h[i] += prev[j];
          }
        }
      }
      sm_store<4>(Hs + gr * kTileW + col, h);
    }
  }

  // ---------------------------------------------------------------- phase 3

  RD_DEV void phase3(int tid) const {
    if constexpr (K != Kind::kNoise) {
      for (int u = tid; u < (THv / P) * kTileW; u += kThreads) {
        const int col = u % kTileW, band = u / kTileW;
        if (col >= TWr) continue;
        T* top = X + band * P * kTileW + col;
        T x[P], o[P];
        RD_UNROLL for (int r = 0; r < P; ++r) x[r] = sm_ld(top + r * kTileW);
        if constexpr (K == Kind::kTransform) {
          if (p.inverse) {
            idct<P>(x, o);
          } else {
            dct<P>(x, o);
          }
        } else {
          scale_column(x, band, col, o);
        }
        RD_UNROLL for (int r = 0; r < P; ++r) sm_st(top + r * kTileW, o[r]);
      }
    }
    if (white && !p.white_direct) {
      gen_rows(tid, kStreamWhite, THv, y0, x0, TWr, G, kTileW, kMainBlocks);
    }
  }

  // Column `col` of patch band `band` holds row-DCT values: finish the DCT, scale
  // coefficient (k, l = col mod P) by A (+ B times the DCT of y), inverse DCT down the column.
  RD_DEV void scale_column(const T* x, int band, int col, T* o) const {
    const int l = col % P;
    T u[P];
    dct<P>(x, u);
    RD_UNROLL for (int k = 0; k < P; ++k) u[k] *= sm_ld(F + k * P + l);
    if (p.step) {
      const T* top = Y + band * P * kTileW + col;
      T y[P], v[P];
      RD_UNROLL for (int r = 0; r < P; ++r) y[r] = sm_ld(top + r * kTileW);
      dct<P>(y, v);
      RD_UNROLL for (int k = 0; k < P; ++k) u[k] += sm_ld(F + P * P + k * P + l) * v[k];
    }
    idct<P>(u, o);
  }

  // ---------------------------------------------------------------- phase 4

  RD_DEV void phase4(int tid) const {
    constexpr int kGroups = kTileW / UW;
    const int ngroups = TWr / UW;
    for (int u = tid; u < THv * kGroups; u += kThreads) {
      const int r = u / kGroups, g = u % kGroups;
      if (g >= ngroups) continue;
      const int col = g * UW;
      T v[UW];
      if constexpr (K == Kind::kNoise) {
        RD_UNROLL for (int i = 0; i < UW; ++i) v[i] = T(0);
      } else {
        T in[UW];
        sm_load<UW>(X + r * kTileW + col, in);
        RD_UNROLL for (int q = 0; q < UW / P; ++q) {
          if (K == Kind::kScale || p.inverse) {
            idct<P>(in + q * P, v + q * P);
          } else {
            dct<P>(in + q * P, v + q * P);
          }
        }
      }
      if (white || block) add_noise(r, col, v);
      S* dst = p.out + base + (y0 + r) * p.W + x0 + col;
      const int n = TWv - col;
      if (p.vec_out && n >= UW) {
        RD_UNROLL for (int k = 0; k < UW / V; ++k) {
          stg16(dst + k * V, pack(v + k * V, static_cast<S*>(nullptr)));
        }
      } else {
        RD_UNROLL for (int i = 0; i < UW; ++i) {
          if (i < n) stg_elem(dst + i, v[i]);
        }
      }
    }
  }

  // v += white_w e + sum_{a < s} block_w Hs[row - a]: the mixed noise of the CPU kernel
  RD_DEV void add_noise(int r, int col, T* v) const {
    T nz[UW];
    if (white) {
      T e[UW];
      if (p.white_direct) {
        // the group's columns are UW / 4 whole Philox blocks (make_params): drawn here, in
        // registers, instead of through phase 3's work items and shared memory
        const uint64_t j = static_cast<uint64_t>(base + (y0 + r) * p.W + x0 + col) >> 2;
        RD_UNROLL for (int q = 0; q < UW / 4; ++q) normals4(p.key, kStreamWhite, j + q, e + 4 * q);
      } else {
        sm_load<UW>(G + r * kTileW + col, e);
      }
      RD_UNROLL for (int i = 0; i < UW; ++i) nz[i] = white_w * e[i];
    } else {
      RD_UNROLL for (int i = 0; i < UW; ++i) nz[i] = T(0);
    }
    if (block) {
      if (s == 4) {
        add_vbox<4>(r, col, nz);
      } else {
        add_vbox<0>(r, col, nz);
      }
    }
    RD_UNROLL for (int i = 0; i < UW; ++i) v[i] += nz[i];
  }

  // nz += sum_{a < s} block_w Hs[row - a], a ascending; SB: s when known at compile time
  template <int SB>
  RD_DEV void add_vbox(int r, int col, T* nz) const {
    const int n = SB > 0 ? SB : s;
    for (int a = 0; a < n; ++a) {  // unrolled by the compiler when n is a constant
      T h[UW];
      sm_load<UW>(Hs + (r + HY - a) * kTileW + col, h);
      RD_UNROLL for (int i = 0; i < UW; ++i) nz[i] += block_w * h[i];
    }
  }
};

// ------------------------------------------------------------------ host side

// The kernel parameters of an op call: views, flags and the Philox key.
template <typename S, int P, Kind K>
TileParams<S, P, K> make_params(const OpArgs& a) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  TileParams<S, P, K> t;
  std::memset(static_cast<void*>(&t), 0, sizeof(t));
  t.C = a.C;
  t.H = a.H;
  t.W = a.W;
  t.tiles_x = (a.W + kTileW - 1) / kTileW;
  t.tiles_y = (a.H + kTileH - 1) / kTileH;
  // below 2^31 when the launch is possible (tile_count <= kMaxTiles); clamped so that an
  // impossible launch, which the launcher refuses, still builds its parameters
  const auto u32 = [](int64_t v) { return static_cast<uint32_t>(v < 1 ? 1 : v > 0x7fffffff ? 0x7fffffff : v); };
  t.div_tiles_x = make_fastdiv(u32(t.tiles_x));
  t.div_tiles_y = make_fastdiv(u32(t.tiles_y));
  t.div_channels = make_fastdiv(u32(a.C));
  const int64_t sizes[4] = {a.B, a.C, a.H, a.W};
  bool fast = true;
  for (int i = 0; i < a.n_in; ++i) {
    const ImageRef& r = a.in[i];
    t.in[i] = {static_cast<const S*>(r.data), r.stride[0], r.stride[1], r.stride[2], r.stride[3]};
    fast = fast && r.stride[3] == 1 && reinterpret_cast<uintptr_t>(r.data) % 16 == 0;
    for (int d = 0; d < 3; ++d) fast = fast && (sizes[d] == 1 || r.stride[d] % V == 0);
  }
  t.fast = fast ? 1 : 0;
  t.out = static_cast<S*>(a.out);
  t.vec_out = (a.W % V == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0) ? 1 : 0;
  t.tau = a.tau;
  t.tau_next = a.tau_next;
  t.sigma = a.sigma;
  t.sigma_next = a.sigma_next;
  t.noise_src = a.noise_src;
  t.noise_mul = a.noise_mul;
  t.white_mul = a.white_mul;
  t.block_mul = a.block_mul;
  t.alpha = a.alpha;
  t.s_noise = a.s_noise;
  t.min_scale = a.min_scale;
  t.key = philox_key(a.seed);
  t.n_in = a.n_in;
  t.step = a.step;
  t.block_size = a.block_size > 0 ? a.block_size : 1;
  const bool noise = a.noise_mul != 0.0;
  t.any_white = (noise && a.white_mul != 0.0) ? 1 : 0;
  t.any_block = (noise && a.block_mul != 0.0 && a.alpha != 0.0) ? 1 : 0;
  // with W % 4 == 0 every element index base + y W + x0 + col of a phase-4 group is a
  // multiple of 4 (x0, col are), so each 4 columns of the group are one whole Philox block
  t.white_direct = (t.any_white && a.W % 4 == 0) ? 1 : 0;
  t.inverse = a.inverse;
  return t;
}

template <typename S, int P, Kind K>
size_t smem_bytes(const TileParams<S, P, K>& t) {
  return static_cast<size_t>(smem_layout(t).total) * sizeof(compute_t<S>);
}

// Calls exec.run<S, P, K>(params, tiles, smem_bytes) for the op of `a`: the only place that
// lists the kernel instantiations (4 dtypes x (2 kinds x 4 patch sizes + noise) = 36).
template <typename S, int P, Kind K, class Exec>
typename Exec::Result run_kernel(const OpArgs& a, Exec& exec) {
  const TileParams<S, P, K> t = make_params<S, P, K>(a);
  return exec.template run<S, P, K>(t, tile_count(a.B * a.C, a.H, a.W), smem_bytes(t));
}

template <typename S, int P, class Exec>
typename Exec::Result run_patch(const OpArgs& a, Exec& exec) {
  if (a.kind == Kind::kTransform) return run_kernel<S, P, Kind::kTransform>(a, exec);
  return run_kernel<S, P, Kind::kScale>(a, exec);
}

template <typename S, class Exec>
typename Exec::Result run_dtype(const OpArgs& a, Exec& exec) {
  if (a.kind == Kind::kNoise) return run_kernel<S, 1, Kind::kNoise>(a, exec);
  switch (a.patch_size) {
    case 2: return run_patch<S, 2>(a, exec);
    case 4: return run_patch<S, 4>(a, exec);
    case 8: return run_patch<S, 8>(a, exec);
    case 16: return run_patch<S, 16>(a, exec);
    default: return exec.fail("patch_size must be 2, 4, 8 or 16");
  }
}

#if defined(__CUDACC__)

// Resident blocks per SM asked of ptxas (__launch_bounds__' second argument), an occupancy
// experiment knob set at build time (setup.py: RELAYDIFF_CUDA_MIN_BLOCKS=N). Unset, ptxas
// chooses: 58-64 registers for the float scale kernels, 4 blocks of 256 threads per SM;
// 5 gives 48 registers with 12-136 bytes of spills (docs/cuda.md).
#if defined(RELAYDIFF_CUDA_MIN_BLOCKS) && RELAYDIFF_CUDA_MIN_BLOCKS > 0
#define RD_LAUNCH_BOUNDS __launch_bounds__(kThreads, RELAYDIFF_CUDA_MIN_BLOCKS)
#else
#define RD_LAUNCH_BOUNDS __launch_bounds__(kThreads)
#endif

// One block per tile; the four phases exchange data through shared memory only.
template <typename S, int P, Kind K>
__global__ void RD_LAUNCH_BOUNDS tile_kernel(const __grid_constant__ TileParams<S, P, K> prm) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const TileKernel<S, P, K> k(prm, static_cast<int64_t>(blockIdx.x),
                              reinterpret_cast<compute_t<S>*>(smem_raw));
  k.phase1(tid);
  __syncthreads();
  if constexpr (K != Kind::kTransform) {  // phase 2 is empty for the transforms
    k.phase2(tid);
    __syncthreads();
  }
  k.phase3(tid);
  __syncthreads();
  k.phase4(tid);
}

struct CudaExec {
  using Result = cudaError_t;
  static constexpr size_t kDefaultSmem = 48 * 1024;  // more needs the kernel's opt-in
  cudaStream_t stream;

  Result fail(const char*) { return cudaErrorInvalidValue; }

  template <typename S, int P, Kind K>
  Result run(const TileParams<S, P, K>& prm, int64_t tiles, size_t smem) {
    if (tiles > kMaxTiles) return cudaErrorInvalidConfiguration;
    if (smem > kDefaultSmem) {
      const cudaError_t e = cudaFuncSetAttribute(
          tile_kernel<S, P, K>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    tile_kernel<S, P, K><<<static_cast<unsigned>(tiles), kThreads, smem, stream>>>(prm);
    return cudaSuccess;
  }
};

// The launches of one storage type; relay_kernels_<dtype>.cu each instantiate one, so
// that the 36 kernels compile in parallel.
template <typename S>
cudaError_t launch_typed(const OpArgs& a, cudaStream_t stream) {
  CudaExec exec{stream};
  return run_dtype<S>(a, exec);
}

cudaError_t launch_float32(const OpArgs& a, cudaStream_t stream);
cudaError_t launch_float64(const OpArgs& a, cudaStream_t stream);
cudaError_t launch_float16(const OpArgs& a, cudaStream_t stream);
cudaError_t launch_bfloat16(const OpArgs& a, cudaStream_t stream);

#endif  // __CUDACC__

template <class Exec>
typename Exec::Result dispatch(const OpArgs& a, Exec& exec) {
  switch (a.dtype) {
    case DType::kFloat32: return run_dtype<float>(a, exec);
    case DType::kFloat64: return run_dtype<double>(a, exec);
    case DType::kFloat16: return run_dtype<__half>(a, exec);
    case DType::kBFloat16: return run_dtype<__nv_bfloat16>(a, exec);
  }
  return exec.fail("unsupported dtype");
}

}  // namespace cuda
}  // namespace relaydiff
