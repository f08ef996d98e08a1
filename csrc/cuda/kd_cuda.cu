// CUDA launch code for fastkd::kd_forward and fastkd::scale_grad_ (kernels: kd_kernels.cuh).
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

int cuda_runtime_version() {
  int v = 0;
  C10_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

namespace {

int64_t grid_for_rows(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::numeric_limits<int32_t>::max()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& labels,
                                                               double temperature, int64_t ignore_index,
                                                               c10::string_view reduction, bool scale_by_temperature,
                                                               bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  KdCall c = kd_prepare(student, teacher, labels, temperature, ignore_index,
                        std::string_view(reduction.data(), reduction.size()), scale_by_temperature, grad_student,
                        grad_teacher);
  const KdParams& p = c.p;
  if (p.rows > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(grid_for_rows(p.rows)));
    kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
      using S = decltype(s_tag);
      using T = decltype(t_tag);
      using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
      if (p.vocab <= 2048) {
        cuda::kd_forward_kernel<S, T, Acc, 128><<<grid, 128, 0, stream>>>(p);
      } else {
        cuda::kd_forward_kernel<S, T, Acc, 512><<<grid, 512, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return kd_outputs(c);
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "fastkd: argument 'grad': expected a contiguous 2-D tensor");
  TORCH_CHECK(scale.numel() == 1 || (scale.dim() == 1 && scale.size(0) == grad.size(0)),
              "fastkd: argument 'scale': expected a scalar or one value per row, got shape ", scale.sizes());
  TORCH_CHECK(scale.device() == grad.device(), "fastkd: argument 'scale': expected device ", grad.device(), ", got ",
              scale.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = grad.size(0), V = grad.size(1);
  const bool per_row = scale.numel() != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor sc = scale.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    cuda::scale_grad_kernel<scalar_t, Acc><<<static_cast<unsigned>(grid_for_rows(rows)), 256, 0, stream>>>(
        grad.data_ptr<scalar_t>(), sc.const_data_ptr<Acc>(), rows, V, per_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_forward", &kd_forward_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace fastkd
