// fastkd::response_forward on CUDA: the kernels of the divergences of the Psi family (those that need the
// normalized distributions: generalized JSD, TVD, ...), compiled apart from kd_cuda.cu so the two build in
// parallel.
#include "kd_kernels.cuh"

namespace fastkd {
namespace cuda {
#define FASTKD_INSTANTIATE_psi(id) template void launch_response<Divergence::id>(const KdCall&, cudaStream_t);
#define FASTKD_INSTANTIATE_kl_type(id)
#define FASTKD_INSTANTIATE_decoupled(id)
#define FASTKD_DIV_INSTANTIATE(id, trait, family) FASTKD_INSTANTIATE_##family(id)
FASTKD_DIVERGENCES(FASTKD_DIV_INSTANTIATE)
}  // namespace cuda
}  // namespace fastkd
