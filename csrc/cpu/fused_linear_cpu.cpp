// CPU implementation of fastkd::fused_linear_kd_forward: the chunked driver of fused_linear_host.h with the
// CPU response and top-k kernels (kd_rows.h, topk_cpu.cpp), which write the logit gradient in place, and
// ATen GEMMs (MKL / oneDNN).
#include <torch/library.h>

#include "fastkd/fused_linear_host.h"
#include "cosine_rows.h"
#include "kd_rows.h"

namespace fastkd {
namespace cpu {
namespace {

struct CpuFusedBackend {
  static void response(const KdCall& c, double count) { run_response(c, count); }
  static void topk(const TopkCall& c, double count) { run_topk_rows(c, count); }
  static void cosine(const CosineParams& p, at::ScalarType s, at::ScalarType t) { run_cosine(p, s, t); }
  // The CPU GEMMs have no float32 output for bfloat16 / float16 input: such a weight is widened once per
  // call, and every GEMM runs in float32 (float64 for float64 input).
  static constexpr bool kWidenWeight = true;
  static void linear_wide(at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
    TORCH_INTERNAL_ASSERT(false, "fastkd: the CPU fused head widens its weights");
  }
  // acc += g^T h, all three in the accumulation dtype.
  static void add_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h) { acc.addmm_(g.t(), h); }
};

Tensor7 fused_linear_kd_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& topk_values, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
    const std::optional<at::Tensor>& grad_rows, c10::string_view divergence, c10::ArrayRef<double> params,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    bool scale_by_temperature, bool values_are_logprobs, bool tail_bucket, int64_t chunk_size,
    double student_logit_scale, double student_softcap, double teacher_logit_scale, double teacher_softcap,
    bool grad_hidden, bool grad_weight, bool grad_bias, const std::optional<at::Tensor>& row_weight, bool standardize,
    double standardize_eps, const std::optional<at::Tensor>& row_temperature, bool grad_temperature) {
  const FusedLinearOptions o = fused_linear_options(
      divergence, params, temperature, soft_weight, hard_weight, ignore_index, reduction, scale_by_temperature,
      values_are_logprobs, tail_bucket, chunk_size, student_logit_scale, student_softcap, teacher_logit_scale,
      teacher_softcap, grad_hidden, grad_weight, grad_bias, standardize, standardize_eps);
  return fused_linear_kd<CpuFusedBackend>(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                          teacher_bias, topk_values, topk_indices, labels, num_items, grad_rows,
                                          row_weight, o, row_temperature, grad_temperature);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fused_linear_kd_forward", &cpu::fused_linear_kd_forward_cpu);
}

}  // namespace fastkd
