// Host-side interface of the CUDA kernels: one plain struct describes an op call.
//
// No torch and no device code here, so that the torch glue (relay_cuda.cpp), the kernels
// (relay_kernels.cu) and the CPU emulator of the kernels (tests/cuda_emu) share one
// description of every call. Every op is one launch of one tile kernel (relay_kernels.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

namespace relaydiff {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// kTransform: patch_dct / patch_idct. kScale: patch_blur, relay_corrupt, relay_step
// (IDCT(A DCT(x) [+ B DCT(y)]) [+ noise]). kNoise: block_noise, mixed_noise.
enum class Kind : int32_t { kTransform = 0, kScale = 1, kNoise = 2 };

// A [B, C, H, W] image: data pointer and element strides.
struct ImageRef {
  const void* data;
  int64_t stride[4];
};

// Noise of sample b: with nw = noise_mul * (noise_src ? noise_src[b] : 1), the white field
// is weighted by nw * white_mul and the block field by (nw * block_mul) * alpha: the CPU
// kernel's order of operations. A zero weight skips that field (no random numbers drawn).
struct OpArgs {
  Kind kind;
  DType dtype;
  int32_t patch_size;  // 2, 4, 8, 16 (ignored by kNoise)
  int32_t block_size;  // 1..16 (noise)
  int64_t B, C, H, W;
  ImageRef in[4];      // kScale step: x, denoised[, x_prop, denoised_prop]; else in[0]
  int32_t n_in;        // 1 (transform/blur/corrupt), 2 (Euler step), 4 (Heun step)
  int32_t inverse;     // kTransform: 1 for patch_idct
  int32_t step;        // kScale: 1 for relay_step (factors A and B, second input y)
  int32_t reserved;
  void* out;           // contiguous [B, C, H, W], dtype `dtype`
  // per-sample float64 [B] device arrays (null where unused)
  const double* tau;
  const double* tau_next;
  const double* sigma;
  const double* sigma_next;
  const double* noise_src;
  double noise_mul;
  double white_mul;
  double block_mul;
  double alpha;
  double s_noise;
  double min_scale;
  uint64_t seed;
};

// Tile geometry shared by the launcher, the glue's size check and the docs.
constexpr int kThreads = 256;
constexpr int kTileH = 32;
constexpr int kTileW = 64;
constexpr int64_t kMaxTiles = 2147483647;  // gridDim.x limit

inline int64_t tile_count(int64_t planes, int64_t H, int64_t W) {
  return planes * ((H + kTileH - 1) / kTileH) * ((W + kTileW - 1) / kTileW);
}

// Launches the kernel of `a` on `stream` (asynchronous). Returns an error of the launch
// configuration (shared-memory attribute, grid too large); kernel launch errors are left
// for the caller's cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch(const OpArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------ one OpArgs per op
// The op schemas of csrc/ops.cpp as OpArgs, in the CPU kernel's conventions (noise weights
// computed in the same order). Arguments are already checked by the caller.

struct Shape {
  int64_t B, C, H, W;
};

// 1 / sqrt(1 + alpha^2) of the normalized mixed noise (SPEC 3)
inline double noise_norm(double alpha, bool normalize) {
  return normalize ? 1.0 / std::sqrt(1.0 + alpha * alpha) : 1.0;
}

inline OpArgs base_args(Kind kind, DType dtype, Shape s, void* out) {
  OpArgs a{};
  a.kind = kind;
  a.dtype = dtype;
  a.patch_size = 1;
  a.block_size = 1;
  a.B = s.B;
  a.C = s.C;
  a.H = s.H;
  a.W = s.W;
  a.out = out;
  return a;
}

inline OpArgs transform_args(DType dtype, Shape s, ImageRef x, void* out, int patch_size,
                             bool inverse) {
  OpArgs a = base_args(Kind::kTransform, dtype, s, out);
  a.patch_size = patch_size;
  a.in[0] = x;
  a.n_in = 1;
  a.inverse = inverse ? 1 : 0;
  return a;
}

inline OpArgs blur_args(DType dtype, Shape s, ImageRef x, void* out, const double* tau,
                        int patch_size, double min_scale) {
  OpArgs a = base_args(Kind::kScale, dtype, s, out);
  a.patch_size = patch_size;
  a.in[0] = x;
  a.n_in = 1;
  a.tau = tau;
  a.min_scale = min_scale;
  return a;
}

// Mixed noise weights: white inv_norm, block inv_norm * alpha (times the per-sample nw).
inline void set_noise(OpArgs& a, double alpha, int block_size, bool normalize, uint64_t seed) {
  const double inv = noise_norm(alpha, normalize);
  a.white_mul = inv;
  a.block_mul = inv;
  a.alpha = alpha;
  a.block_size = block_size;
  a.seed = seed;
}

inline OpArgs block_noise_args(DType dtype, Shape s, void* out, int block_size, uint64_t seed) {
  OpArgs a = base_args(Kind::kNoise, dtype, s, out);
  a.noise_mul = 1.0;
  a.white_mul = 0.0;
  a.block_mul = 1.0;
  a.alpha = 1.0;
  a.block_size = block_size;
  a.seed = seed;
  return a;
}

inline OpArgs mixed_noise_args(DType dtype, Shape s, void* out, double alpha, int block_size,
                               bool normalize, uint64_t seed) {
  OpArgs a = base_args(Kind::kNoise, dtype, s, out);
  a.noise_mul = 1.0;
  set_noise(a, alpha, block_size, normalize, seed);
  return a;
}

// Blur_tau(x0) + sigma * n
inline OpArgs corrupt_args(DType dtype, Shape s, ImageRef x0, void* out, const double* sigma,
                           const double* tau, int patch_size, double alpha, int block_size,
                           double min_scale, bool normalize, uint64_t seed) {
  OpArgs a = blur_args(dtype, s, x0, out, tau, patch_size, min_scale);
  a.noise_src = sigma;
  a.noise_mul = 1.0;
  set_noise(a, alpha, block_size, normalize, seed);
  return a;
}

// IDCT(A DCT(x) + B DCT(y)) + s_noise * sigma_next * n; Heun when x_prop is given
inline OpArgs step_args(DType dtype, Shape s, ImageRef x, ImageRef denoised, const ImageRef* x_prop,
                        const ImageRef* denoised_prop, void* out, const double* sigma,
                        const double* sigma_next, const double* tau, const double* tau_next,
                        double s_noise, int patch_size, double alpha, int block_size,
                        double min_scale, bool normalize, uint64_t seed) {
  OpArgs a = blur_args(dtype, s, x, out, tau, patch_size, min_scale);
  a.step = 1;
  a.in[1] = denoised;
  a.n_in = 2;
  if (x_prop != nullptr && denoised_prop != nullptr) {
    a.in[2] = *x_prop;
    a.in[3] = *denoised_prop;
    a.n_in = 4;
  }
  a.sigma = sigma;
  a.sigma_next = sigma_next;
  a.tau_next = tau_next;
  a.s_noise = s_noise;
  a.noise_src = sigma_next;
  a.noise_mul = s_noise;
  set_noise(a, alpha, block_size, normalize, seed);
  return a;
}

}  // namespace cuda
}  // namespace relaydiff
