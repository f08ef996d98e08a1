// CUDA implementation of fastkd::cosine_forward (see cosine_math.h for the math, cosine_host.h for the checks).
// One block per row (a grid-stride loop over rows), 256 threads: sweep 1 accumulates <s, t>, ||s||^2, ||t||^2,
// the live-entry count and the student's maximum, reduced over the block in double by CUB (a fixed order: the
// same bits every run); sweep 2 (cross-entropy only) sum exp(s - max); sweep 3 writes the gradients. No atomics;
// int64 indexing throughout.
#include <cstdint>
#include <limits>
#include <type_traits>

#include <cub/block/block_reduce.cuh>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cosine_launch.cuh"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Sums4 {
  double st, ss, tt, live;
};
struct Sums4Add {
  __device__ __forceinline__ Sums4 operator()(const Sums4& a, const Sums4& b) const {
    return {a.st + b.st, a.ss + b.ss, a.tt + b.tt, a.live + b.live};
  }
};
struct NanMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return kd_nan_max(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return kd_nan_max(a, b); }
};

template <typename S, typename T, typename GS, typename GT, typename Acc>
__global__ void __launch_bounds__(kThreads) cosine_rows_kernel(CosineParams p) {
  using Reduce4 = cub::BlockReduce<Sums4, kThreads>;
  using ReduceD = cub::BlockReduce<double, kThreads>;
  using ReduceA = cub::BlockReduce<Acc, kThreads>;
  __shared__ union {
    typename Reduce4::TempStorage r4;
    typename ReduceD::TempStorage rd;
    typename ReduceA::TempStorage ra;
  } tmp;
  __shared__ double sh[6];  // cross, self_s, self_t, hard coefficient, lse, live
  const int64_t vocab = p.vocab;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const double row_scale = 1.0 / cosine_divisor(p.reduction, p.count, p.rows);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const S* s = static_cast<const S*>(p.student) + row * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_row_stride;
    GS* gs = p.grad_student ? static_cast<GS*>(p.grad_student) + row * p.grad_student_row_stride : nullptr;
    GT* gt = p.grad_teacher ? static_cast<GT*>(p.grad_teacher) + row * p.grad_teacher_row_stride : nullptr;
    Acc* row_soft = static_cast<Acc*>(p.row_soft) + row;
    Acc* row_hard = p.hard ? static_cast<Acc*>(p.row_hard) + row : nullptr;
    if (!kd_row_counted(p.labels, row, p.ignore_index)) {  // the same decision in every thread of the block
      if (threadIdx.x == 0) {
        *row_soft = Acc(0);
        if (row_hard) *row_hard = Acc(0);
      }
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
        if (gs) gs[j] = GS(0.0f);
        if (gt) gt[j] = GT(0.0f);
      }
      continue;
    }
    // sweep 1
    Acc st = 0, ss = 0, tt = 0, live = 0, mx = ninf;
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      Acc a = static_cast<Acc>(s[j]), b = static_cast<Acc>(t[j]);
      mx = kd_nan_max(mx, a);
      if (!cosine_drop_masked(a, b)) live += Acc(1);
      st += a * b;
      ss += a * a;
      tt += b * b;
    }
    const Sums4 total = Reduce4(tmp.r4).Reduce(Sums4{double(st), double(ss), double(tt), double(live)}, Sums4Add());
    __syncthreads();
    Acc max_s = ninf;
    if (p.hard) {
      max_s = ReduceA(tmp.ra).Reduce(mx, NanMax());
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const CosineRow r = cosine_row(total.st, total.ss, total.tt, total.live, p.eps);
      *row_soft = static_cast<Acc>(r.value);
      const double w = p.beta * row_scale;
      sh[0] = w * r.cross;
      sh[1] = w * r.self_s;
      sh[2] = w * r.self_t;
      sh[5] = total.live;
      sh[4] = static_cast<double>(max_s);  // broadcast the maximum for sweep 2
    }
    __syncthreads();
    const bool ce = p.hard && sh[5] != 0.0;
    if (ce) {
      const Acc m = static_cast<Acc>(sh[4]);
      Acc z = 0;
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) z += fk_exp(static_cast<Acc>(s[j]) - m);
      const double zt = ReduceD(tmp.rd).Sum(double(z));
      __syncthreads();
      if (threadIdx.x == 0) {
        const int64_t y = p.labels[row];
        const double lse = sh[4] + ::log(zt);
        *row_hard = static_cast<Acc>(lse - static_cast<double>(static_cast<Acc>(s[y])));
        sh[4] = lse;
        sh[3] = p.hard_weight * row_scale;
      }
      __syncthreads();
    } else if (row_hard != nullptr && threadIdx.x == 0) {
      *row_hard = Acc(0);
    }
    // sweep 3
    if (gs != nullptr || gt != nullptr) {
      const Acc cross = static_cast<Acc>(sh[0]), self_s = static_cast<Acc>(sh[1]), self_t = static_cast<Acc>(sh[2]);
      const Acc hw = ce ? static_cast<Acc>(sh[3]) : Acc(0), lse = ce ? static_cast<Acc>(sh[4]) : Acc(0);
      const int64_t y = ce ? p.labels[row] : -1;
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
        Acc a = static_cast<Acc>(s[j]), b = static_cast<Acc>(t[j]);
        const Acc a_raw = a;
        cosine_drop_masked(a, b);
        if (gs != nullptr) {
          Acc g = cross * b + self_s * a;
          if (ce) g += hw * fk_exp(a_raw - lse) - (j == y ? hw : Acc(0));
          gs[j] = static_cast<GS>(g);
        }
        if (gt != nullptr) gt[j] = static_cast<GT>(cross * a + self_t * b);
      }
    }
    __syncthreads();  // sh and tmp are reused by the next row
  }
}

template <typename X>
using GradOf = std::conditional_t<std::is_same_v<X, at::Half>, float, X>;

}  // namespace

void launch_cosine(const CosineParams& p, at::ScalarType student, at::ScalarType teacher, cudaStream_t stream) {
  if (p.rows == 0) return;
  const int64_t blocks = std::min<int64_t>(p.rows, int64_t(1) << 20);
  kd_dispatch_pair(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    cosine_rows_kernel<S, T, GradOf<S>, GradOf<T>, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& num_items, double beta, double hard_weight, double eps, int64_t ignore_index,
    c10::string_view reduction, bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  const auto alloc = [](at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); };
  CosineCall c = cosine_prepare(student, teacher, labels, num_items, beta, hard_weight, eps, ignore_index, reduction,
                                grad_student, grad_teacher, alloc);
  launch_cosine(c.p, c.student.scalar_type(), c.teacher.scalar_type(), at::cuda::getCurrentCUDAStream());
  return cosine_outputs(c);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("cosine_forward", &cuda::cosine_forward_cuda);
}

}  // namespace fastkd
