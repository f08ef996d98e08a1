// CUDA entry points of fastkd::response_forward and fastkd::topk_kd_forward (kernels and the response
// launcher: kd_kernels.cuh; the top-k kernel: topk_kernels.cuh). The Psi family are instantiated in
// kd_cuda_psi.cu, compiled in parallel.
#include <algorithm>
#include <limits>
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastkd/kd_host.h"
#include "kd_kernels.cuh"
#include "topk_kernels.cuh"

namespace fastkd {
namespace cuda {
// The KL-type and decoupled divergences; the Psi family is instantiated in kd_cuda_psi.cu.
#define FASTKD_INSTANTIATE_kl_type(id) template void launch_response<Divergence::id>(const KdCall&, cudaStream_t);
#define FASTKD_INSTANTIATE_decoupled(id) FASTKD_INSTANTIATE_kl_type(id)
#define FASTKD_INSTANTIATE_psi(id)
#define FASTKD_DIV_INSTANTIATE(id, trait, family) FASTKD_INSTANTIATE_##family(id)
FASTKD_DIVERGENCES(FASTKD_DIV_INSTANTIATE)
}  // namespace cuda

// The CUDA version the kernels were compiled with (no driver call: works on machines without a GPU).
int cuda_compiled_version() { return CUDART_VERSION; }

namespace {

at::Tensor alloc_grad_cuda(at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); }

KdOutputs response_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, c10::ArrayRef<double> params,
    double temperature, double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    bool scale_by_temperature, bool grad_student, bool grad_teacher, const std::optional<at::Tensor>& row_temperature,
    const std::optional<at::Tensor>& row_weight, bool standardize, double standardize_eps, bool grad_temperature) {
  const c10::cuda::CUDAGuard guard(student.device());
  const LossConfig cfg = make_loss_config(to_view(divergence), params, temperature, scale_by_temperature, soft_weight,
                                          hard_weight, ignore_index, to_view(reduction), standardize,
                                          standardize_eps);
  const RowOptions ro{row_temperature, row_weight, standardize, standardize_eps, grad_temperature};
  KdCall c = kd_prepare(student, teacher, labels, num_items, cfg, grad_student, grad_teacher, alloc_grad_cuda, ro);
  if (c.p.rows > 0) cuda::launch_response_any(c, at::cuda::getCurrentCUDAStream());
  return kd_outputs(c, ro);
}

TopkOutputs topk_kd_forward_cuda(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                 const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                                 double temperature, bool values_are_logprobs, bool tail_bucket, int64_t ignore_index,
                                 c10::string_view reduction, bool scale_by_temperature, bool grad_student,
                                 const std::optional<at::Tensor>& row_weight,
                                 const std::optional<at::Tensor>& row_temperature, bool grad_temperature) {
  const c10::cuda::CUDAGuard guard(student.device());
  const LossConfig cfg = make_topk_config(temperature, scale_by_temperature, ignore_index, to_view(reduction));
  TopkCall c = topk_prepare(student, values, indices, labels, num_items, cfg, values_are_logprobs, tail_bucket,
                            grad_student, alloc_grad_cuda, row_weight, row_temperature, grad_temperature);
  const TopkParams& p = c.p;
  if (p.rows > 0) cuda::launch_topk_rows(c, at::cuda::getCurrentCUDAStream());
  return topk_outputs(c);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("response_forward", &response_forward_cuda);
  m.impl("topk_kd_forward", &topk_kd_forward_cuda);
}

}  // namespace fastkd
