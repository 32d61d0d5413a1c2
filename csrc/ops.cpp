// The one place every relaydiff op schema is declared. Kernels register per backend:
// cpu/relay_cpu.cpp (CPU) and cuda/relay_cuda.cpp (CUDA, only in CUDA builds).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `from relaydiff import _C` loads this library, which runs the registrations below.
// The ops need no Python bindings of their own.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(relaydiff, m) {
  // x: [B, C, H, W]; H, W multiples of patch_size in {2, 4, 8, 16}. Output contiguous.
  m.def("patch_dct(Tensor x, int patch_size) -> Tensor");
  m.def("patch_idct(Tensor u, int patch_size) -> Tensor");
  // tau: [B] float64
  m.def("patch_blur(Tensor x, Tensor tau, int patch_size, float min_scale) -> Tensor");
  // like: [B, C, H, W], only its shape, dtype and device are used
  m.def("block_noise(Tensor like, int block_size, int seed) -> Tensor");
  m.def("mixed_noise(Tensor like, float alpha, int block_size, bool normalize, int seed) -> Tensor");
  // sigma, tau: [B] float64
  m.def(
      "relay_corrupt(Tensor x0, Tensor sigma, Tensor tau, int patch_size, float alpha, "
      "int block_size, float min_scale, bool normalize, int seed) -> Tensor");
  // x, denoised, x_prop, denoised_prop: [B, C, H, W]; sigma .. tau_next: [B] float64
  m.def(
      "relay_step(Tensor x, Tensor denoised, Tensor? x_prop, Tensor? denoised_prop, "
      "Tensor sigma, Tensor sigma_next, Tensor tau, Tensor tau_next, float s_noise, "
      "int patch_size, float alpha, int block_size, float min_scale, bool normalize, "
      "int seed) -> Tensor");
}
