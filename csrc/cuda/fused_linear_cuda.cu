// CUDA implementation of fastkd::fused_linear_kd_forward: the chunked driver of fused_linear_host.h with the
// CUDA response and top-k kernels (kd_kernels.cuh, topk_kernels.cuh), which write the logit gradient in place,
// and cuBLAS GEMMs through ATen, all on the current stream.
#include <atomic>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastkd/fused_linear_host.h"
#include "cosine_launch.cuh"
#include "kd_kernels.cuh"
#include "topk_kernels.cuh"

namespace fastkd {
namespace {

struct CudaFusedBackend {
  static void response(const KdCall& c, double) { cuda::launch_response_any(c, at::cuda::getCurrentCUDAStream()); }
  static void topk(const TopkCall& c, double) { cuda::launch_topk_rows(c, at::cuda::getCurrentCUDAStream()); }
  static void cosine(const CosineParams& p, at::ScalarType s, at::ScalarType t) {
    cuda::launch_cosine(p, s, t, at::cuda::getCurrentCUDAStream());
  }
  // cuBLAS multiplies bfloat16 / float16 operands with a float32 output: the weight stays as it is.
  static constexpr bool kWidenWeight = false;
  // out = x @ w^T (+ b) with x, w narrower than out: reduced-precision operands through cuBLAS with a float32
  // output (aten::mm.dtype_out; widened chunk by chunk where this torch rejects that form); float32 operands
  // of a float64 call in float32, then widened (as the response kernels read a float32 student).
  static void linear_wide(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    const bool reduced = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
    static std::atomic<bool> widen{false};
    if (reduced && out.scalar_type() == at::kFloat && !widen.load()) {
      try {
        at::mm_out(out, x, w.t(), at::kFloat);
        if (b.has_value()) out.add_(*b);
        return;
      } catch (const c10::Error&) {
        widen = true;
      }
    }
    if (reduced) {
      const at::ScalarType o = out.scalar_type();
      at::mm_out(out, x.to(o), w.t().to(o));
      if (b.has_value()) out.add_(*b);
      return;
    }
    out.copy_(b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t()));
  }
  // acc += g^T h in float32. bfloat16 / float16 operands go through cuBLAS with a float32 output
  // (aten::addmm.dtype_out); where this torch rejects that form, they are widened chunk by chunk instead.
  static void add_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& h) {
    if (g.scalar_type() == acc.scalar_type()) {
      acc.addmm_(g.t(), h);
      return;
    }
    static std::atomic<bool> widen{false};
    if (!widen.load()) {
      try {
        at::addmm_out(acc, acc, g.t(), h, acc.scalar_type());
        return;
      } catch (const c10::Error&) {
        widen = true;
      }
    }
    acc.addmm_(g.t().to(acc.scalar_type()), h.to(acc.scalar_type()));
  }
};

Tensor7 fused_linear_kd_forward_cuda(
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
  const c10::cuda::CUDAGuard guard(hidden.device());
  const FusedLinearOptions o = fused_linear_options(
      divergence, params, temperature, soft_weight, hard_weight, ignore_index, reduction, scale_by_temperature,
      values_are_logprobs, tail_bucket, chunk_size, student_logit_scale, student_softcap, teacher_logit_scale,
      teacher_softcap, grad_hidden, grad_weight, grad_bias, standardize, standardize_eps);
  return fused_linear_kd<CudaFusedBackend>(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                           teacher_bias, topk_values, topk_indices, labels, num_items, grad_rows,
                                          row_weight, o, row_temperature, grad_temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("fused_linear_kd_forward", &fused_linear_kd_forward_cuda);
}

}  // namespace fastkd
