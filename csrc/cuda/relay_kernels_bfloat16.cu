// The tile kernels for bfloat16 storage (see relay_kernels.cuh).
#include "relay_kernels.cuh"

namespace relaydiff {
namespace cuda {

cudaError_t launch_bfloat16(const OpArgs& a, cudaStream_t stream) { return launch_typed<__nv_bfloat16>(a, stream); }

}  // namespace cuda
}  // namespace relaydiff
