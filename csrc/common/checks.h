// Argument checks shared by the CPU and CUDA glue. The Python wrappers check the same
// things first with friendlier messages; these guard direct torch.ops.relaydiff calls.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

namespace relaydiff {

// Numbers and shapes in error messages are formatted here (std::to_string, snprintf), never
// by std::ostream: an extension built by a toolchain that links its own copy of libstdc++
// into it (seen on a GPU machine's /opt/gcc) crashes when it formats a number through a
// stream whose locale came from the process's other copy (a segfault in num_put, where
// strings print fine). TORCH_CHECK streams its arguments, so they are strings only.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.15g", v);
  if (std::strtod(buf, nullptr) != v) std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline void check_image(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be a 4-D tensor [B, C, H, W]; got ", num(x.dim()), "-D ",
              shape(x.sizes()));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16; got ", dt);
}

inline void check_patch(const at::Tensor& x, int64_t p, const char* name) {
  TORCH_CHECK(p == 2 || p == 4 || p == 8 || p == 16, "patch_size must be 2, 4, 8 or 16; got ", num(p));
  TORCH_CHECK(x.size(2) % p == 0 && x.size(3) % p == 0, name,
              ": H and W must be multiples of patch_size=", num(p), "; got shape ", shape(x.sizes()));
}

inline void check_block(const at::Tensor& x, int64_t s) {
  TORCH_CHECK(s >= 1 && s <= 16, "block_size must be in [1, 16]; got ", num(s));
  TORCH_CHECK(x.numel() == 0 || (s <= x.size(2) && s <= x.size(3)), "block_size=", num(s),
              " is larger than the image ", shape(x.sizes()));
}

inline void check_seed(int64_t seed) {
  TORCH_CHECK(seed >= 0, "seed must be non-negative; got ", num(seed));
}

inline void check_per_sample(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), name, " must have shape [B] = [", num(x.size(0)),
              "]; got ", shape(v.sizes()));
  TORCH_CHECK(v.is_floating_point(), name, " must be a floating tensor; got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), name, " is on ", v.device(), " but the images are on ",
              x.device());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_image(t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have shape ", shape(x.sizes()), "; got ", shape(t.sizes()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(),
              "; got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_noise_args(const at::Tensor& like, double alpha, int64_t block_size, int64_t seed) {
  check_block(like, block_size);
  check_seed(seed);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0.0, "alpha must be finite and non-negative; got ",
              num(alpha));
}

// The images of relay_step besides x: denoised, and x_prop / denoised_prop (the Heun
// correction: both or neither), each like x. Returns whether it is a Heun step.
inline bool check_step_images(const at::Tensor& x, const at::Tensor& denoised,
                              const std::optional<at::Tensor>& x_prop,
                              const std::optional<at::Tensor>& denoised_prop) {
  check_like(denoised, x, "denoised");
  const bool heun = x_prop.has_value();
  TORCH_CHECK(heun == denoised_prop.has_value(),
              "x_prop and denoised_prop must be given together or both be None");
  if (heun) {
    check_like(*x_prop, x, "x_prop");
    check_like(*denoised_prop, x, "denoised_prop");
  }
  return heun;
}

inline void check_unit(double v, const char* name, bool closed_top) {
  TORCH_CHECK(v >= 0.0 && (closed_top ? v <= 1.0 : v < 1.0), name, " must be in [0, 1",
              closed_top ? "]" : ")", "; got ", num(v));
}

// ------------------------------------------------------------------ one check per op
// Everything the CPU and the CUDA glue check of an op's arguments before they touch data:
// both call these, so they cannot drift apart. Every tensor argument must be on x's device
// (CUDA glue additionally requires x on CUDA, see relay_cuda.cpp). The values of sigma / tau
// are checked only on the CPU (it needs them on the host anyway).

inline void check_transform_args(const at::Tensor& x, int64_t patch_size, const char* name) {
  check_image(x, name);
  check_patch(x, patch_size, name);
}

inline void check_blur_args(const at::Tensor& x, const at::Tensor& tau, int64_t patch_size,
                            double min_scale) {
  check_transform_args(x, patch_size, "x");
  check_per_sample(tau, x, "tau");
  check_unit(min_scale, "min_scale", false);
}

inline void check_block_noise_args(const at::Tensor& like, int64_t block_size, int64_t seed) {
  check_image(like, "like");
  check_noise_args(like, 0.0, block_size, seed);
}

inline void check_mixed_noise_args(const at::Tensor& like, double alpha, int64_t block_size,
                                   int64_t seed) {
  check_image(like, "like");
  check_noise_args(like, alpha, block_size, seed);
}

inline void check_corrupt_args(const at::Tensor& x0, const at::Tensor& sigma,
                               const at::Tensor& tau, int64_t patch_size, double alpha,
                               int64_t block_size, double min_scale, int64_t seed) {
  check_transform_args(x0, patch_size, "x0");
  check_per_sample(sigma, x0, "sigma");
  check_per_sample(tau, x0, "tau");
  check_unit(min_scale, "min_scale", false);
  check_noise_args(x0, alpha, block_size, seed);
}

// Returns whether it is a Heun step (x_prop and denoised_prop given).
inline bool check_step_args(const at::Tensor& x, const at::Tensor& denoised,
                            const std::optional<at::Tensor>& x_prop,
                            const std::optional<at::Tensor>& denoised_prop,
                            const at::Tensor& sigma, const at::Tensor& sigma_next,
                            const at::Tensor& tau, const at::Tensor& tau_next, double s_noise,
                            int64_t patch_size, double alpha, int64_t block_size,
                            double min_scale, int64_t seed) {
  check_transform_args(x, patch_size, "x");
  const bool heun = check_step_images(x, denoised, x_prop, denoised_prop);
  check_per_sample(sigma, x, "sigma");
  check_per_sample(sigma_next, x, "sigma_next");
  check_per_sample(tau, x, "tau");
  check_per_sample(tau_next, x, "tau_next");
  check_unit(s_noise, "s_noise", true);
  check_unit(min_scale, "min_scale", false);
  check_noise_args(x, alpha, block_size, seed);
  return heun;
}

}  // namespace relaydiff
