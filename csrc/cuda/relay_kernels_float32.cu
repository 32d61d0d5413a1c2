// The tile kernels for float32 storage (see relay_kernels.cuh).
#include "relay_kernels.cuh"

namespace relaydiff {
namespace cuda {

cudaError_t launch_float32(const OpArgs& a, cudaStream_t stream) { return launch_typed<float>(a, stream); }

}  // namespace cuda
}  // namespace relaydiff
