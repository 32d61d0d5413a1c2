// CPU kernels of every relaydiff op (schemas in ../ops.cpp).
//
// Layout of the work: an image is B*C planes of H x W. A plane is walked top-down in
// bands of p rows (one row of patches). For each band the kernel loads the input rows
// once (any strides, any dtype), does the patch DCT / scaling / inverse DCT in a few
// small scratch rows that stay in cache, adds the noise rows it generates itself, and
// writes the output rows once: one pass over main memory.
//
// Noise: Philox4x32-10 keyed by the seed and counted by the element's linear index in the
// logical [B, C, H, W] order (philox.h), so results do not depend on strides or threads.
// Block noise needs the box sum of the rows above; a band keeps a ring of the last
// `block_size` horizontally box-summed rows, primed with the rows above its first one.
//
// Parallelism: at::parallel_for over (plane, chunk of bands) so that a few large planes
// still use every thread. Hot loops are plain loops over contiguous float rows that the
// compiler vectorizes; the noise generator is compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at load time (GCC target_clones), never -march=native.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/philox.h"
#include "../common/relay_math.h"
#include "multiversion.h"
#include "patch_rows.h"
#include "philox_cpu.h"
#include "vec.h"

namespace relaydiff {
namespace {

// ------------------------------------------------------------------ normals

constexpr int64_t kBatchBlocks = 256;  // Philox blocks per batch: 1024 normals

// Box-Muller of the four words of nb Philox blocks: out[4i .. 4i+3] = the cos/sin normals
// of (r0[i], r1[i]) and of (r2[i], r3[i]) (the stream layout of philox.h).
RD_MULTIVERSION void box_muller_blocks_f32(const uint32_t* __restrict r0,
                                           const uint32_t* __restrict r1,
                                           const uint32_t* __restrict r2,
                                           const uint32_t* __restrict r3, int64_t nb,
                                           float* __restrict out) {
  for (int64_t i = 0; i < nb; ++i) {
    float a, b, c, d;
    box_muller_f32(r0[i], r1[i], a, b);
    box_muller_f32(r2[i], r3[i], c, d);
    out[4 * i] = a;
    out[4 * i + 1] = b;
    out[4 * i + 2] = c;
    out[4 * i + 3] = d;
  }
}

void box_muller_blocks_f64(const uint32_t* r0, const uint32_t* r1, const uint32_t* r2,
                           const uint32_t* r3, int64_t nb, double* out) {
  auto pair = [](uint32_t re, uint32_t ro, double* o) {
    const double radius = std::sqrt(-2.0 * std::log(unit_open_f64(re)));
    const double angle = 2.0 * kPi * unit_halfopen_f64(ro);
    o[0] = radius * std::cos(angle);
    o[1] = radius * std::sin(angle);
  };
  for (int64_t i = 0; i < nb; ++i) {
    pair(r0[i], r1[i], out + 4 * i);
    pair(r2[i], r3[i], out + 4 * i + 2);
  }
}

// Normals of linear indices [start, start + n) of `stream`: float32 polynomials (as on
// CUDA) for float outputs, libm double math for float64 outputs.
template <typename T>
class NormalGen {
 public:
  NormalGen() : r_(4 * kBatchBlocks), buf_(4 * kBatchBlocks) {}

  void fill(PhiloxKey key, uint32_t stream, int64_t start, int64_t n, T* out) {
    if (n <= 0) return;
    const int64_t first = start >> 2, last = (start + n - 1) >> 2;
    uint32_t* r = r_.data();
    for (int64_t jb = first; jb <= last; jb += kBatchBlocks) {
      const int64_t nb = std::min(kBatchBlocks, last - jb + 1);
      philox_blocks(key, stream, static_cast<uint64_t>(jb), nb, r, r + kBatchBlocks,
                    r + 2 * kBatchBlocks, r + 3 * kBatchBlocks);
      // whole batches inside [start, start + n) go straight to out; edges through buf_
      const int64_t lo = std::max(start, 4 * jb), hi = std::min(start + n, 4 * (jb + nb));
      const bool direct = lo == 4 * jb && hi == 4 * (jb + nb);
      T* dst = direct ? out + (lo - start) : buf_.data();
      if constexpr (std::is_same_v<T, double>) {
        box_muller_blocks_f64(r, r + kBatchBlocks, r + 2 * kBatchBlocks, r + 3 * kBatchBlocks, nb, dst);
      } else {
        box_muller_blocks_f32(r, r + kBatchBlocks, r + 2 * kBatchBlocks, r + 3 * kBatchBlocks, nb, dst);
      }
      if (!direct) std::memcpy(out + (lo - start), buf_.data() + (lo - 4 * jb), sizeof(T) * (hi - lo));
    }
  }

 private:
  std::vector<uint32_t> r_;
  std::vector<T> buf_;
};

// Mixed / block noise of one plane, generated top-down a few rows at a time: the rows of
// a call are consecutive in the plane, so each stream is one counter range (one fill).
template <typename T>
class NoiseRows {
 public:
  NoiseRows(int64_t H, int64_t W, int block_size, int max_rows)
      : H_(H), W_(W), s_(block_size), ring_(block_size * W), g_(max_rows * W) {}

  // rows = white_w e + block_w Block_s(e2), starting at row y0.
  void begin(PhiloxKey key, int64_t plane, int64_t y0, T white_w, T block_w) {
    key_ = key;
    base_ = plane * H_ * W_;
    white_w_ = white_w;
    block_w_ = block_w;
    if (block_w_ != T(0)) {
      for (int64_t r = y0 - s_ + 1; r < y0; ++r) {  // the rows above, wrapping around
        const int64_t rr = ((r % H_) + H_) % H_;
        gen_.fill(key_, kStreamBlock, base_ + rr * W_, W_, g_.data());
        hbox(g_.data(), slot(r));
      }
    }
  }

  // Rows [y, y + n) into out[n][W]; calls must follow each other down the plane, n <= max_rows.
  void rows(int64_t y, int n, T* __restrict out) {
    const int64_t count = n * W_;
    if (white_w_ != T(0)) {
      gen_.fill(key_, kStreamWhite, base_ + y * W_, count, out);
      vec_scale(out, white_w_, count);
    } else {
      std::fill(out, out + count, T(0));
    }
    if (block_w_ == T(0)) return;
    gen_.fill(key_, kStreamBlock, base_ + y * W_, count, g_.data());
    // Block_s(e2)[r] = (1/s) sum_{a < s} hbox(r - a), summed in row order (a = s-1 .. 0)
    // so that the bits do not depend on where a thread's chunk started
    const T w = block_w_ / static_cast<T>(s_);
    for (int i = 0; i < n; ++i) {
      const int64_t r = y + i;
      hbox(g_.data() + i * W_, slot(r));
      for (int a = s_ - 1; a >= 0; --a) vec_axpy(out + i * W_, ring_.data() + slot(r - a) * W_, w, W_);
    }
  }

 private:
  int64_t slot(int64_t r) const { return ((r % s_) + s_) % s_; }

  // ring[k] <- the horizontal circular box sum of row g: h[x] = sum_{b < s} g[(x - b) mod W]
  void hbox(const T* __restrict g, int64_t k) {
    T* __restrict h = ring_.data() + k * W_;
    std::copy(g, g + W_, h);
    for (int b = 1; b < s_; ++b) {
      for (int64_t x = 0; x < b; ++x) h[x] += g[x - b + W_];
      vec_add(h + b, g, W_ - b);
    }
  }

  int64_t H_, W_;
  int s_;
  PhiloxKey key_{0, 0};
  int64_t base_ = 0;
  T white_w_ = 0, block_w_ = 0;
  std::vector<T> ring_, g_;
  NormalGen<T> gen_;
};

// ------------------------------------------------------------------ patch transforms

template <int P>
struct DctMatrix {
  double c[P][P];  // c[k][n] = s_k cos(pi (2n + 1) k / (2P))
  DctMatrix() {
    for (int k = 0; k < P; ++k)
      for (int n = 0; n < P; ++n)
        c[k][n] = (k == 0 ? std::sqrt(1.0 / P) : std::sqrt(2.0 / P)) *
                  std::cos(kPi * (2 * n + 1) * k / (2.0 * P));
  }
};

// m[i][j] in compute precision: the forward (C) or inverse (C^T) matrix.
template <int P, typename T>
struct TransformMatrix {
  T m[P][P];
  TransformMatrix(bool inverse) {
    static const DctMatrix<P> d;
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) m[i][j] = static_cast<T>(inverse ? d.c[j][i] : d.c[i][j]);
  }
};

// A band is P rows of W values, row r at in + r * W. out = M X M^T for every patch X.
template <int P, typename T>
void transform_band(const TransformMatrix<P, T>& M, const T* __restrict in, T* __restrict tmp,
                    T* __restrict out, int64_t W) {
  // along each row: tmp[r][qP + i] = sum_j M[i][j] in[r][qP + j]
  // down the columns: out[i][x] = sum_r M[i][r] tmp[r][x]
  if constexpr (std::is_same_v<T, float>) {
    patch_rows_f32(P, &M.m[0][0], in, tmp, W, P);   // one call per band: small W is call-bound
    patch_cols_f32(P, &M.m[0][0], tmp, out, W);
  } else {
    for (int r = 0; r < P; ++r) patch_rows_scalar<P, T>(&M.m[0][0], in + r * W, tmp + r * W, 0, W);
    for (int i = 0; i < P; ++i) {
      T* dst = out + i * W;
      vec_set_scaled(dst, tmp, M.m[i][0], W);
      for (int r = 1; r < P; ++r) vec_axpy(dst, tmp + r * W, M.m[i][r], W);
    }
  }
}

// ------------------------------------------------------------------ memory access

template <typename S>
struct ImageView {  // [B, C, H, W] with any strides
  const S* data;
  int64_t sb, sc, sh, sw;
  explicit ImageView(const at::Tensor& t)
      : data(t.data_ptr<S>()), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  const S* row(int64_t b, int64_t c, int64_t y) const { return data + b * sb + c * sc + y * sh; }
};

template <typename S, typename T>
void load_row(const S* __restrict src, int64_t sw, int64_t W, T* __restrict dst) {
  if (sw == 1) {
    for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x]);
  } else {
    for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x * sw]);
  }
}

template <typename S, typename T>
void store_row(const T* __restrict src, int64_t W, S* __restrict dst) {
  for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<S>(src[x]);
}

// How to cut `planes` planes of `units` bands each into work items for the thread pool.
struct Split {
  int64_t chunks, per;
};

Split split_work(int64_t planes, int64_t units, int64_t min_units) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t chunks = 1;
  if (planes < want && units > min_units) {
    chunks = std::min((want + planes - 1) / planes, units / min_units);
    chunks = std::max<int64_t>(chunks, 1);
  }
  const int64_t per = (units + chunks - 1) / chunks;
  return {(units + per - 1) / per, per};
}

// Calls fn(worker, b, c, u0, u1) for every chunk [u0, u1) of units of every plane, with
// one worker (scratch buffers) per thread range.
template <typename MakeWorker, typename Fn>
void for_each_chunk(int64_t B, int64_t C, int64_t units, int64_t min_units, MakeWorker make,
                    Fn fn) {
  const Split sp = split_work(B * C, units, min_units);
  at::parallel_for(0, B * C * sp.chunks, 1, [&](int64_t lo, int64_t hi) {
    auto worker = make();
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t plane = i / sp.chunks, k = i % sp.chunks;
      const int64_t u0 = k * sp.per, u1 = std::min(units, u0 + sp.per);
      fn(worker, plane / C, plane % C, u0, u1);
    }
  });
}

template <typename T>
using CT = std::conditional_t<std::is_same_v<T, double>, double, float>;  // compute type

// Calls f(std::integral_constant<int, P>{}) for the runtime patch size p.
template <typename F>
void dispatch_patch(int64_t p, F&& f) {
  switch (p) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "patch_size must be 2, 4, 8 or 16; got ", num(p));
  }
}

at::Tensor new_output(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

std::vector<double> per_sample_values(const at::Tensor& v, const char* name, bool positive) {
  const at::Tensor d = v.to(at::kDouble).contiguous();
  std::vector<double> out(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  for (double a : out) {
    TORCH_CHECK(std::isfinite(a) && (positive ? a > 0.0 : a >= 0.0), name, " must be finite and ",
                positive ? "positive" : "non-negative", "; got ", num(a));
  }
  return out;
}

// Factor rows of a P x P table f(k, l): row k is f(k, x mod P) for x in [0, W).
template <int P, typename T, typename F>
void factor_rows(int64_t W, T* rows, F f) {
  T table[P][P];
  for (int k = 0; k < P; ++k)
    for (int l = 0; l < P; ++l) table[k][l] = static_cast<T>(f(k, l));
  for (int k = 0; k < P; ++k)
    for (int64_t x = 0; x < W; ++x) rows[k * W + x] = table[k][x % P];
}

// ------------------------------------------------------------------ band pipeline

// Scratch of one thread: a few bands of P x W values.
template <int P, typename T>
struct BandScratch {
  int64_t W;
  std::vector<T> x, y, u, tmp, fa, fb, noise;
  BandScratch(int64_t W_, int64_t H, int block_size)
      : W(W_), x(P * W_), y(P * W_), u(P * W_), tmp(P * W_), fa(P * W_), fb(P * W_),
        noise(P * W_), rows(H, W_, block_size, P) {}
  NoiseRows<T> rows;
};

// What a band does: out = IDCT(fa * DCT(x) [+ fb * DCT(y)]) [+ noise], or the plain DCT/IDCT.
enum class BandOp { kDct, kIdct, kScale, kScale2 };

template <int P, typename S, typename T>
struct BandPipeline {
  BandOp op;
  ImageView<S> in;
  S* out;
  int64_t C, H, W;
  const TransformMatrix<P, T>* fwd;
  const TransformMatrix<P, T>* inv;

  // Loads band rows [y0, y0 + P) of plane (b, c) into s.x (and s.y via `load_y`), transforms,
  // then adds `noise_w` times the noise rows and stores.
  template <typename LoadY>
  void band(BandScratch<P, T>& s, int64_t b, int64_t c, int64_t y0, LoadY load_y,
            bool with_noise) const {
    for (int r = 0; r < P; ++r) load_row(in.row(b, c, y0 + r), in.sw, W, s.x.data() + r * W);
    T* result = s.u.data();
    switch (op) {
      case BandOp::kDct:
        transform_band<P, T>(*fwd, s.x.data(), s.tmp.data(), result, W);
        break;
      case BandOp::kIdct:
        transform_band<P, T>(*inv, s.x.data(), s.tmp.data(), result, W);
        break;
      case BandOp::kScale:
      case BandOp::kScale2: {
        T* u = s.u.data();
        transform_band<P, T>(*fwd, s.x.data(), s.tmp.data(), u, W);
        vec_mul(u, s.fa.data(), P * W);
        if (op == BandOp::kScale2) {
          load_y(s, b, c, y0);  // reads s.x (still x): before the next transform writes it
          // reuse x as the destination of DCT(y): x is no longer needed
          transform_band<P, T>(*fwd, s.y.data(), s.tmp.data(), s.x.data(), W);
          vec_fma(u, s.fb.data(), s.x.data(), P * W);
        }
        transform_band<P, T>(*inv, u, s.tmp.data(), s.x.data(), W);
        result = s.x.data();
        break;
      }
    }
    if (with_noise) {
      s.rows.rows(y0, P, s.noise.data());
      vec_add(result, s.noise.data(), P * W);
    }
    for (int r = 0; r < P; ++r) store_row(result + r * W, W, out + ((b * C + c) * H + y0 + r) * W);
  }
};

// ------------------------------------------------------------------ ops

template <int P, typename S>
at::Tensor run_transform(const at::Tensor& x, bool inverse) {
  using T = CT<S>;
  at::Tensor out = new_output(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (out.numel() == 0) return out;
  const TransformMatrix<P, T> fwd(false), inv(true);
  BandPipeline<P, S, T> pipe{inverse ? BandOp::kIdct : BandOp::kDct, ImageView<S>(x),
                             out.data_ptr<S>(), C, H, W, &fwd, &inv};
  auto no_y = [](BandScratch<P, T>&, int64_t, int64_t, int64_t) {};
  for_each_chunk(
      B, C, H / P, std::max<int64_t>(1, 32 / P), [&] { return BandScratch<P, T>(W, H, 1); },
      [&](BandScratch<P, T>& s, int64_t b, int64_t c, int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) pipe.band(s, b, c, u * P, no_y, false);
      });
  return out;
}

at::Tensor patch_transform_cpu(const at::Tensor& x, int64_t patch_size, bool inverse) {
  check_transform_args(x, patch_size, inverse ? "u" : "x");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_dct", [&] {
    dispatch_patch(patch_size, [&](auto pc) {
      out = run_transform<decltype(pc)::value, scalar_t>(x, inverse);
    });
  });
  return out;
}

at::Tensor patch_dct_cpu(const at::Tensor& x, int64_t patch_size) {
  return patch_transform_cpu(x, patch_size, false);
}

at::Tensor patch_idct_cpu(const at::Tensor& u, int64_t patch_size) {
  return patch_transform_cpu(u, patch_size, true);
}

// Everything below the transforms: blur, corrupt and step differ only in their factors,
// the optional second input y and the noise weights.
struct ScaleSpec {
  std::vector<double> tau, tau_next, gamma;   // per sample; tau_next/gamma only for steps
  std::vector<double> noise_w;                // per sample: weight of the mixed noise n
  double min_scale = 0.0;
  double alpha = 0.0;
  bool normalize = true;
  int block_size = 1;
  uint64_t seed = 0;
  bool step = false;

  void set_noise(double alpha_, bool normalize_, int64_t block_size_, int64_t seed_) {
    alpha = alpha_;
    normalize = normalize_;
    block_size = static_cast<int>(block_size_);
    seed = static_cast<uint64_t>(seed_);
  }
};

struct NoSecondInput {
  template <int P, typename T>
  void operator()(BandScratch<P, T>&, int64_t, int64_t, int64_t) const {}
};

// Loads y = sigma * d of a relay step into s.y: Euler x - D; Heun
// (x - D)/2 + (sigma / sigma_next)(x' - D')/2.
template <typename S>
// x itself is not read again: s.x still holds the band's x rows when this runs.
struct StepInput {
  ImageView<S> den, xp, dp;
  bool heun;
  int64_t W;
  const std::vector<double>* sig;
  const std::vector<double>* sig_n;

  template <int P, typename T>
  void operator()(BandScratch<P, T>& s, int64_t b, int64_t c, int64_t y0) const {
    T* tmp = s.tmp.data();  // free until the next transform
    for (int r = 0; r < P; ++r) {
      T* yr = s.y.data() + r * W;
      const T* xr = s.x.data() + r * W;
      load_row(den.row(b, c, y0 + r), den.sw, W, tmp);
      for (int64_t i = 0; i < W; ++i) yr[i] = xr[i] - tmp[i];
      if (heun) {
        const T h = static_cast<T>(0.5 * (*sig)[b] / (*sig_n)[b]);
        T* t2 = tmp + W;
        load_row(xp.row(b, c, y0 + r), xp.sw, W, tmp);
        load_row(dp.row(b, c, y0 + r), dp.sw, W, t2);
        for (int64_t i = 0; i < W; ++i) yr[i] = T(0.5) * yr[i] + h * (tmp[i] - t2[i]);
      }
    }
  }
};

template <int P, typename S, typename LoadY>
at::Tensor run_scaled(const at::Tensor& x, const ScaleSpec& spec, LoadY load_y) {
  using T = CT<S>;
  at::Tensor out = new_output(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (out.numel() == 0) return out;
  const TransformMatrix<P, T> fwd(false), inv(true);
  BandPipeline<P, S, T> pipe{spec.step ? BandOp::kScale2 : BandOp::kScale, ImageView<S>(x),
                             out.data_ptr<S>(), C, H, W, &fwd, &inv};
  const double inv_norm = spec.normalize ? 1.0 / std::sqrt(1.0 + spec.alpha * spec.alpha) : 1.0;
  const PhiloxKey key = philox_key(spec.seed);
  for_each_chunk(
      B, C, H / P, std::max<int64_t>(1, 32 / P),
      [&] { return BandScratch<P, T>(W, H, spec.block_size); },
      [&](BandScratch<P, T>& s, int64_t b, int64_t c, int64_t u0, int64_t u1) {
        if (spec.step) {
          const double g = spec.gamma[b], t = spec.tau[b], tn = spec.tau_next[b];
          factor_rows<P, T>(W, s.fa.data(), [&](int k, int l) {
            return step_coef(k, l, P, t, tn, g, spec.min_scale).A;
          });
          factor_rows<P, T>(W, s.fb.data(), [&](int k, int l) {
            return step_coef(k, l, P, t, tn, g, spec.min_scale).B;
          });
        } else {
          const double t = spec.tau[b];
          factor_rows<P, T>(W, s.fa.data(),
                            [&](int k, int l) { return blur_factor(k, l, P, t, spec.min_scale); });
        }
        const double nw = spec.noise_w.empty() ? 0.0 : spec.noise_w[b];
        const bool with_noise = nw != 0.0;
        if (with_noise) {
          s.rows.begin(key, b * C + c, u0 * P, static_cast<T>(nw * inv_norm),
                       static_cast<T>(nw * inv_norm * spec.alpha));
        }
        for (int64_t u = u0; u < u1; ++u) pipe.band(s, b, c, u * P, load_y, with_noise);
      });
  return out;
}

at::Tensor patch_blur_cpu(const at::Tensor& x, const at::Tensor& tau, int64_t patch_size,
                          double min_scale) {
  check_blur_args(x, tau, patch_size, min_scale);
  ScaleSpec spec;
  spec.tau = per_sample_values(tau, "tau", false);
  spec.min_scale = min_scale;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_blur", [&] {
    dispatch_patch(patch_size, [&](auto pc) {
      out = run_scaled<decltype(pc)::value, scalar_t>(x, spec, NoSecondInput{});
    });
  });
  return out;
}

at::Tensor relay_corrupt_cpu(const at::Tensor& x0, const at::Tensor& sigma, const at::Tensor& tau,
                             int64_t patch_size, double alpha, int64_t block_size,
                             double min_scale, bool normalize, int64_t seed) {
  check_corrupt_args(x0, sigma, tau, patch_size, alpha, block_size, min_scale, seed);
  ScaleSpec spec;
  spec.tau = per_sample_values(tau, "tau", false);
  spec.noise_w = per_sample_values(sigma, "sigma", false);
  spec.min_scale = min_scale;
  spec.set_noise(alpha, normalize, block_size, seed);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "relay_corrupt", [&] {
    dispatch_patch(patch_size, [&](auto pc) {
      out = run_scaled<decltype(pc)::value, scalar_t>(x0, spec, NoSecondInput{});
    });
  });
  return out;
}

at::Tensor relay_step_cpu(const at::Tensor& x, const at::Tensor& denoised,
                          const std::optional<at::Tensor>& x_prop,
                          const std::optional<at::Tensor>& denoised_prop, const at::Tensor& sigma,
                          const at::Tensor& sigma_next, const at::Tensor& tau,
                          const at::Tensor& tau_next, double s_noise, int64_t patch_size,
                          double alpha, int64_t block_size, double min_scale, bool normalize,
                          int64_t seed) {
  const bool heun = check_step_args(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau,
                                    tau_next, s_noise, patch_size, alpha, block_size, min_scale,
                                    seed);

  ScaleSpec spec;
  spec.step = true;
  const std::vector<double> sig = per_sample_values(sigma, "sigma", true);
  const std::vector<double> sig_n = per_sample_values(sigma_next, "sigma_next", heun);
  spec.tau = per_sample_values(tau, "tau", false);
  spec.tau_next = per_sample_values(tau_next, "tau_next", false);
  for (size_t b = 0; b < sig.size(); ++b) {
    spec.gamma.push_back(step_gamma(s_noise, sig[b], sig_n[b]));
    spec.noise_w.push_back(s_noise * sig_n[b]);
  }
  spec.min_scale = min_scale;
  spec.set_noise(alpha, normalize, block_size, seed);

  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relay_step", [&] {
    const StepInput<scalar_t> load_y{ImageView<scalar_t>(denoised),
                                     ImageView<scalar_t>(heun ? *x_prop : x),
                                     ImageView<scalar_t>(heun ? *denoised_prop : x),
                                     heun, x.size(3), &sig, &sig_n};
    dispatch_patch(patch_size, [&](auto pc) {
      out = run_scaled<decltype(pc)::value, scalar_t>(x, spec, load_y);
    });
  });
  return out;
}

// Noise only: rows of one plane, no transform. Chunks are runs of rows.
template <typename S>
at::Tensor run_noise(const at::Tensor& like, double white_w, double block_w, int block_size,
                     uint64_t seed) {
  using T = CT<S>;
  at::Tensor out = new_output(like);
  const int64_t B = like.size(0), C = like.size(1), H = like.size(2), W = like.size(3);
  if (out.numel() == 0) return out;
  S* o = out.data_ptr<S>();
  const PhiloxKey key = philox_key(seed);
  // rows per call: enough normals per fill to amortise the calls on narrow images
  const int band = static_cast<int>(std::min<int64_t>(H, std::max<int64_t>(4, 2048 / std::max<int64_t>(W, 1))));
  struct Worker {
    NoiseRows<T> rows;
    std::vector<T> buf;
  };
  for_each_chunk(
      B, C, H, 32,
      [&] { return Worker{NoiseRows<T>(H, W, block_size, band), std::vector<T>(band * W)}; },
      [&](Worker& w, int64_t b, int64_t c, int64_t y0, int64_t y1) {
        w.rows.begin(key, b * C + c, y0, static_cast<T>(white_w), static_cast<T>(block_w));
        for (int64_t y = y0; y < y1; y += band) {
          const int n = static_cast<int>(std::min<int64_t>(band, y1 - y));
          w.rows.rows(y, n, w.buf.data());
          store_row(w.buf.data(), n * W, o + ((b * C + c) * H + y) * W);
        }
      });
  return out;
}

at::Tensor block_noise_cpu(const at::Tensor& like, int64_t block_size, int64_t seed) {
  check_block_noise_args(like, block_size, seed);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "block_noise", [&] {
    out = run_noise<scalar_t>(like, 0.0, 1.0, static_cast<int>(block_size), seed);
  });
  return out;
}

at::Tensor mixed_noise_cpu(const at::Tensor& like, double alpha, int64_t block_size,
                           bool normalize, int64_t seed) {
  check_mixed_noise_args(like, alpha, block_size, seed);
  const double inv_norm = normalize ? 1.0 / std::sqrt(1.0 + alpha * alpha) : 1.0;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "mixed_noise", [&] {
    out = run_noise<scalar_t>(like, inv_norm, inv_norm * alpha, static_cast<int>(block_size), seed);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(relaydiff, CPU, m) {
  m.impl("patch_dct", &patch_dct_cpu);
  m.impl("patch_idct", &patch_idct_cpu);
  m.impl("patch_blur", &patch_blur_cpu);
  m.impl("block_noise", &block_noise_cpu);
  m.impl("mixed_noise", &mixed_noise_cpu);
  m.impl("relay_corrupt", &relay_corrupt_cpu);
  m.impl("relay_step", &relay_step_cpu);
}

}  // namespace relaydiff
