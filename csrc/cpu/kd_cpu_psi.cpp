// fastkd::response_forward on the CPU: the instantiations for the divergences that need the normalized
// distributions (generalized JSD, TVD), compiled apart from kd_cpu.cpp so the two build in parallel.
#include "kd_rows.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
template void run_response_rows<Divergence::JSD>(const KdCall&, double);
template void run_response_rows<Divergence::TVD>(const KdCall&, double);
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
