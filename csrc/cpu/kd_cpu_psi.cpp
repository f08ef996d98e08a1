// fastkd::response_forward on the CPU: the instantiations for the divergences of the Psi family (those that
// need the normalized distributions: generalized JSD, TVD, ...), compiled apart from kd_cpu.cpp so the two
// build in parallel.
#include "kd_rows.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
#define FASTKD_INSTANTIATE_psi(id) template void run_response_rows<Divergence::id>(const KdCall&, double);
#define FASTKD_INSTANTIATE_kl_type(id)
#define FASTKD_INSTANTIATE_decoupled(id)
#define FASTKD_DIV_INSTANTIATE(id, trait, family) FASTKD_INSTANTIATE_##family(id)
FASTKD_DIVERGENCES(FASTKD_DIV_INSTANTIATE)
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
