// CPU implementation of fastkd::fused_linear_kd_forward: the chunked driver of fused_linear_host.h with the
// CPU response and top-k kernels (kd_rows.h, topk_cpu.cpp), which write the logit gradient in place, and
// ATen GEMMs (MKL / oneDNN).
#include <torch/library.h>

#include "fastkd/fused_linear_host.h"
#include "kd_rows.h"

namespace fastkd {
namespace cpu {
namespace {

struct CpuFusedBackend {
  static void response(const KdCall& c, double count) { run_response(c, count); }
  static void topk(const TopkCall& c, double count) { run_topk_rows(c, count); }
  // acc += g^T h. Reduced-precision operands are widened chunk by chunk (O(chunk * (vocab + hidden))): the
  // CPU GEMMs have no float32 output for bfloat16 / float16 input.
  static void add_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h) {
    if (g.scalar_type() == acc.scalar_type()) acc.addmm_(g.t(), h);
    else acc.addmm_(g.t().to(acc.scalar_type()), h.to(acc.scalar_type()));
  }
};

Tensor6 fused_linear_kd_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& topk_values, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
    const std::optional<at::Tensor>& grad_rows, c10::string_view divergence, c10::ArrayRef<double> params,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    bool scale_by_temperature, bool values_are_logprobs, bool tail_bucket, int64_t chunk_size, bool grad_hidden,
    bool grad_weight, bool grad_bias) {
  const FusedLinearOptions o =
      fused_linear_options(divergence, params, temperature, soft_weight, hard_weight, ignore_index, reduction,
                           scale_by_temperature, values_are_logprobs, tail_bucket, chunk_size, grad_hidden,
                           grad_weight, grad_bias);
  return fused_linear_kd<CpuFusedBackend>(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                          teacher_bias, topk_values, topk_indices, labels, num_items, grad_rows, o);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fused_linear_kd_forward", &cpu::fused_linear_kd_forward_cpu);
}

}  // namespace fastkd
