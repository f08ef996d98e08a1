// CPU implementation of fastkd::response_forward: Hinton KD, reverse KL, generalized JSD, TVD and
// decoupled KD and every other divergence of divergences.h, optionally fused with the student's hard-label cross-entropy, in one kernel family.
//
// Work split: rows in parallel (at::parallel_for), each row handled by one thread in sweeps:
//   1. row maxima of student and teacher (streams the row from memory; DKD leaves the target out),
//   2. Z_s, Z_t and, for KL-type divergences, sum e (a - b), which gives the row's divergence (the row is
//      now in L2 for vocabularies up to ~64k); Z of the student at temperature 1 for the cross-entropy,
//   3. the Psi family (divergences.h) only: the sums of phi, psi_q and psi_p over the normalized distributions (kd_math.h),
//   4. gradients, written once into fresh memory.
// The per-element formulas are the FASTKD_HOST_DEVICE templates of kd_math.h, the same ones the CUDA
// kernels use; here they are instantiated with Vectorized<acc>.
#include <torch/library.h>

#include "kd_rows.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
// The KL-type and decoupled divergences; the Psi family is instantiated in kd_cpu_psi.cpp.
#define FASTKD_INSTANTIATE_kl_type(id) template void run_response_rows<Divergence::id>(const KdCall&, double);
#define FASTKD_INSTANTIATE_decoupled(id) FASTKD_INSTANTIATE_kl_type(id)
#define FASTKD_INSTANTIATE_psi(id)
#define FASTKD_DIV_INSTANTIATE(id, trait, family) FASTKD_INSTANTIATE_##family(id)
FASTKD_DIVERGENCES(FASTKD_DIV_INSTANTIATE)

void run_response(const KdCall& c, double count) {
  dispatch_divergence(c.p.divergence, [&](auto tag) { run_response_rows<decltype(tag)::value>(c, count); });
}
}  // namespace CPU_CAPABILITY

namespace {

KdOutputs response_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, c10::ArrayRef<double> params,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    bool scale_by_temperature, bool grad_student, bool grad_teacher, const std::optional<at::Tensor>& row_temperature,
    const std::optional<at::Tensor>& row_weight, bool standardize, double standardize_eps, bool grad_temperature) {
  const LossConfig cfg = make_loss_config(to_view(divergence), params, temperature, scale_by_temperature, soft_weight,
                                          hard_weight, ignore_index, to_view(reduction), standardize,
                                          standardize_eps);
  const RowOptions ro{row_temperature, row_weight, standardize, standardize_eps, grad_temperature};
  KdCall c = kd_prepare(student, teacher, labels, num_items, cfg, grad_student, grad_teacher, alloc_grad, ro);
  if (c.p.rows > 0) run_response(c, host_count(c.count, c.p.rows));
  return kd_outputs(c, ro);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("response_forward", &cpu::response_forward_cpu);
}

}  // namespace fastkd
