// The tile kernels for float16 storage (see relay_kernels.cuh).
#include "relay_kernels.cuh"

namespace relaydiff {
namespace cuda {

cudaError_t launch_float16(const OpArgs& a, cudaStream_t stream) { return launch_typed<__half>(a, stream); }

}  // namespace cuda
}  // namespace relaydiff
