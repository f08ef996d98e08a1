// fastkd::response_forward on CUDA: the kernels of the divergences that need the normalized distributions
// (generalized JSD, TVD), compiled apart from kd_cuda.cu so the two build in parallel.
#include "kd_kernels.cuh"

namespace fastkd {
namespace cuda {
template void launch_response<Divergence::JSD>(const KdCall&, cudaStream_t);
template void launch_response<Divergence::TVD>(const KdCall&, cudaStream_t);
}  // namespace cuda
}  // namespace fastkd
