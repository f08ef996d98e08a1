// CUDA launch code for fastkd::kd_forward (kernels: kd_kernels.cuh).
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

// The CUDA version the kernels were compiled with (no driver call: works on machines without a GPU).
int cuda_compiled_version() { return CUDART_VERSION; }

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
                        grad_teacher, [](at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); });
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

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_forward", &kd_forward_cuda);
}

}  // namespace fastkd
