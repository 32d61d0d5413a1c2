// The tile kernels for float64 storage (see relay_kernels.cuh).
#include "relay_kernels.cuh"

namespace relaydiff {
namespace cuda {

cudaError_t launch_float64(const OpArgs& a, cudaStream_t stream) { return launch_typed<double>(a, stream); }

}  // namespace cuda
}  // namespace relaydiff
