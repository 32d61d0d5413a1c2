// relaydiff::cuda::launch: the kernel of an op call, by storage type. The kernels themselves
// are instantiated in relay_kernels_<dtype>.cu (one translation unit per type).
#include "relay_kernels.cuh"

namespace relaydiff {
namespace cuda {

cudaError_t launch(const OpArgs& a, cudaStream_t stream) {
  if (a.B * a.C * a.H * a.W == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_float32(a, stream);
    case DType::kFloat64: return launch_float64(a, stream);
    case DType::kFloat16: return launch_float16(a, stream);
    case DType::kBFloat16: return launch_bfloat16(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace relaydiff
