// CUDA implementations of the relaydiff ops (schemas in ../ops.cpp): argument checks,
// output allocation, device guard and current stream around one launch of the tile
// kernel (relay_kernels.cu, compiled without torch headers).
//
// Values of sigma / tau (finite, positive) are not checked here: that needs their values on
// the host, a device synchronisation per call. The Python wrappers check them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "relay_launch.h"

namespace relaydiff {
namespace {

namespace rc = relaydiff::cuda;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " is on ", t.device(),
              " but the op runs on CUDA: all tensor arguments must be on one CUDA device");
}

rc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return rc::DType::kFloat32;
    case at::kDouble: return rc::DType::kFloat64;
    case at::kHalf: return rc::DType::kFloat16;
    case at::kBFloat16: return rc::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

rc::ImageRef image_ref(const at::Tensor& t) {
  return {t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

rc::Shape shape_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

// The op's image x on CUDA, and the grid it needs within the launch limit. Runs first, so
// that a CPU x is named as such; the op's own check (checks.h, shared with the CPU glue)
// follows and puts every other tensor argument on x's device.
void check_input(const at::Tensor& x, const char* name) {
  check_image(x, name);
  check_cuda(x, name);
  TORCH_CHECK(rc::tile_count(x.size(0) * x.size(1), x.size(2), x.size(3)) <= rc::kMaxTiles, name,
              " is too large for one launch: ", shape(x.sizes()));
}

// A per-sample [B] argument (already checked) as a contiguous float64 tensor on the images'
// device (no sync).
at::Tensor per_sample(const at::Tensor& v) { return v.to(at::kDouble).contiguous(); }

at::Tensor new_output(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

void run(const rc::OpArgs& a) {
  C10_CUDA_CHECK(rc::launch(a, c10::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patch_transform_cuda(const at::Tensor& x, int64_t patch_size, bool inverse) {
  const char* name = inverse ? "u" : "x";
  check_input(x, name);
  check_transform_args(x, patch_size, name);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output(x);
  run(rc::transform_args(dtype_of(x), shape_of(x), image_ref(x), out.data_ptr(),
                         static_cast<int>(patch_size), inverse));
  return out;
}

at::Tensor patch_dct_cuda(const at::Tensor& x, int64_t patch_size) {
  return patch_transform_cuda(x, patch_size, false);
}

at::Tensor patch_idct_cuda(const at::Tensor& u, int64_t patch_size) {
  return patch_transform_cuda(u, patch_size, true);
}

at::Tensor patch_blur_cuda(const at::Tensor& x, const at::Tensor& tau, int64_t patch_size,
                           double min_scale) {
  check_input(x, "x");
  check_blur_args(x, tau, patch_size, min_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor t = per_sample(tau);
  at::Tensor out = new_output(x);
  run(rc::blur_args(dtype_of(x), shape_of(x), image_ref(x), out.data_ptr(), t.data_ptr<double>(),
                    static_cast<int>(patch_size), min_scale));
  return out;
}

at::Tensor block_noise_cuda(const at::Tensor& like, int64_t block_size, int64_t seed) {
  check_input(like, "like");
  check_block_noise_args(like, block_size, seed);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = new_output(like);
  run(rc::block_noise_args(dtype_of(like), shape_of(like), out.data_ptr(),
                           static_cast<int>(block_size), static_cast<uint64_t>(seed)));
  return out;
}

at::Tensor mixed_noise_cuda(const at::Tensor& like, double alpha, int64_t block_size,
                            bool normalize, int64_t seed) {
  check_input(like, "like");
  check_mixed_noise_args(like, alpha, block_size, seed);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = new_output(like);
  run(rc::mixed_noise_args(dtype_of(like), shape_of(like), out.data_ptr(), alpha,
                           static_cast<int>(block_size), normalize, static_cast<uint64_t>(seed)));
  return out;
}

at::Tensor relay_corrupt_cuda(const at::Tensor& x0, const at::Tensor& sigma, const at::Tensor& tau,
                              int64_t patch_size, double alpha, int64_t block_size,
                              double min_scale, bool normalize, int64_t seed) {
  check_input(x0, "x0");
  check_corrupt_args(x0, sigma, tau, patch_size, alpha, block_size, min_scale, seed);
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Tensor sig = per_sample(sigma);
  const at::Tensor t = per_sample(tau);
  at::Tensor out = new_output(x0);
  run(rc::corrupt_args(dtype_of(x0), shape_of(x0), image_ref(x0), out.data_ptr(),
                       sig.data_ptr<double>(), t.data_ptr<double>(), static_cast<int>(patch_size),
                       alpha, static_cast<int>(block_size), min_scale, normalize,
                       static_cast<uint64_t>(seed)));
  return out;
}

at::Tensor relay_step_cuda(const at::Tensor& x, const at::Tensor& denoised,
                           const std::optional<at::Tensor>& x_prop,
                           const std::optional<at::Tensor>& denoised_prop, const at::Tensor& sigma,
                           const at::Tensor& sigma_next, const at::Tensor& tau,
                           const at::Tensor& tau_next, double s_noise, int64_t patch_size,
                           double alpha, int64_t block_size, double min_scale, bool normalize,
                           int64_t seed) {
  check_input(x, "x");
  const bool heun = check_step_args(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau,
                                    tau_next, s_noise, patch_size, alpha, block_size, min_scale,
                                    seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sig = per_sample(sigma);
  const at::Tensor sig_n = per_sample(sigma_next);
  const at::Tensor t = per_sample(tau);
  const at::Tensor t_n = per_sample(tau_next);
  const rc::ImageRef xp = heun ? image_ref(*x_prop) : rc::ImageRef{};
  const rc::ImageRef dp = heun ? image_ref(*denoised_prop) : rc::ImageRef{};
  at::Tensor out = new_output(x);
  run(rc::step_args(dtype_of(x), shape_of(x), image_ref(x), image_ref(denoised),
                    heun ? &xp : nullptr, heun ? &dp : nullptr, out.data_ptr(),
                    sig.data_ptr<double>(), sig_n.data_ptr<double>(), t.data_ptr<double>(),
                    t_n.data_ptr<double>(), s_noise, static_cast<int>(patch_size), alpha,
                    static_cast<int>(block_size), min_scale, normalize,
                    static_cast<uint64_t>(seed)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(relaydiff, CUDA, m) {
  m.impl("patch_dct", &patch_dct_cuda);
  m.impl("patch_idct", &patch_idct_cuda);
  m.impl("patch_blur", &patch_blur_cuda);
  m.impl("block_noise", &block_noise_cuda);
  m.impl("mixed_noise", &mixed_noise_cuda);
  m.impl("relay_corrupt", &relay_corrupt_cuda);
  m.impl("relay_step", &relay_step_cuda);
}

}  // namespace relaydiff
