// CUDA entry points of fastkd::response_forward and fastkd::topk_kd_forward (kernels and the response
// launcher: kd_kernels.cuh). The JSD/TVD kernels are instantiated in kd_cuda_psi.cu, compiled in parallel.
#include <algorithm>
#include <limits>
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastkd/kd_host.h"
#include "kd_kernels.cuh"

namespace fastkd {
namespace cuda {
template void launch_response<Divergence::KL>(const KdCall&, cudaStream_t);
template void launch_response<Divergence::ReverseKL>(const KdCall&, cudaStream_t);
template void launch_response<Divergence::DKD>(const KdCall&, cudaStream_t);
}  // namespace cuda

// The CUDA version the kernels were compiled with (no driver call: works on machines without a GPU).
int cuda_compiled_version() { return CUDART_VERSION; }

namespace {

at::Tensor alloc_grad_cuda(at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> response_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, double temperature, double beta,
    double alpha, double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    bool scale_by_temperature, bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  KdCall c = kd_prepare(student, teacher, labels, num_items, std::string_view(divergence.data(), divergence.size()),
                        temperature, beta, alpha, soft_weight, hard_weight, ignore_index,
                        std::string_view(reduction.data(), reduction.size()), scale_by_temperature, grad_student,
                        grad_teacher, alloc_grad_cuda);
  const KdParams& p = c.p;
  if (p.rows > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    switch (p.divergence) {
      case Divergence::KL: cuda::launch_response<Divergence::KL>(c, stream); break;
      case Divergence::ReverseKL: cuda::launch_response<Divergence::ReverseKL>(c, stream); break;
      case Divergence::JSD: cuda::launch_response<Divergence::JSD>(c, stream); break;
      case Divergence::TVD: cuda::launch_response<Divergence::TVD>(c, stream); break;
      case Divergence::DKD: cuda::launch_response<Divergence::DKD>(c, stream); break;
    }
  }
  return kd_outputs(c);
}

std::tuple<at::Tensor, at::Tensor> topk_kd_forward_cuda(const at::Tensor& student, const at::Tensor& values,
                                                        const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                        const std::optional<at::Tensor>& num_items, double temperature,
                                                        bool values_are_logprobs, bool tail_bucket,
                                                        int64_t ignore_index, c10::string_view reduction,
                                                        bool scale_by_temperature, bool grad_student) {
  const c10::cuda::CUDAGuard guard(student.device());
  TopkCall c = topk_prepare(student, values, indices, labels, num_items, temperature, values_are_logprobs, tail_bucket,
                            ignore_index, std::string_view(reduction.data(), reduction.size()), scale_by_temperature,
                            grad_student, alloc_grad_cuda);
  const TopkParams& p = c.p;
  if (p.rows > 0) cuda::launch_topk(c, at::cuda::getCurrentCUDAStream());
  return topk_outputs(c);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("response_forward", &response_forward_cuda);
  m.impl("topk_kd_forward", &topk_kd_forward_cuda);
}

}  // namespace fastkd
