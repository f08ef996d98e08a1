// CUDA implementation of the relation- and feature-based loss operators (rkd_forward, sp_forward,
// pkt_forward, cc_forward, at_forward). The drivers are relation_host.h's, shared with the CPU; the GEMMs are
// cuBLAS through ATen. This file supplies the GPU backend: every row functor of relation_math.h runs as one
// thread per row, and the RKD triplet pass as two kernels over the N^3 angle entries, one thread per output
// value (no atomics: bitwise reproducible):
//   legs kernel:  thread (i, j) sums over k: the loss, T_ij = sum_k h' s_ik, U_ij = sum_k h' a_ijk
//   apex kernel:  thread (j, k) sums over the apex i: H_jk = sum_i h' s_ij s_ik
// Both evaluate the same rkd_angle_entry as the CPU's vectorized pass. Indexing is int64 throughout.
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastkd/relation_host.h"
#include "fastkd/relation_ops.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 16;  // 16 x 16 threads per block in the triplet kernels

template <typename F>
__global__ void rows_kernel(F f, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) f(i);
}

// Thread (i, j): apex i, leg j; x indexes j so that a warp reads G[k][j] = G[j][k] contiguously.
// Numerators by rkd_numerator (the Gram matrix unless a leg is a direct pair), gradient sums with s'.
__global__ void rkd_legs_kernel(RkdTriplets a, double* loss_ij) {
  const int64_t n = a.n;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (i >= n || j >= n) return;
  const int64_t ij = i * n + j;
  const double s_ij = a.s.inv_norm[ij], t_ij = a.t.inv_norm[ij];
  double loss = 0.0, t_sum = 0.0, u_sum = 0.0;
  if (s_ij != 0.0 || t_ij != 0.0) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t ik = i * n + k;
      const double s_ik = a.s.inv_norm[ik], t_ik = a.t.inv_norm[ik];
      double a_s, gamma;
      loss += rkd_angle_entry(rkd_numerator(a.s, n, i, j, k), s_ij * s_ik, rkd_numerator(a.t, n, i, j, k),
                              t_ij * t_ik, a_s, gamma, ClampUnit{});
      t_sum += gamma * rkd_gram_inverse(a.s, ik);
      u_sum += gamma * a_s;
    }
  }
  loss_ij[ij] = loss;
  if (a.T) {
    a.T[ij] = t_sum;
    a.U[ij] = u_sum;
  }
}

// Thread (j, k): legs j, k; x indexes k (contiguous rows G[i][k]).
__global__ void rkd_apex_kernel(RkdTriplets a) {
  const int64_t n = a.n;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (j >= n || k >= n) return;
  double h = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ij = i * n + j, ik = i * n + k;
    const double sg_ij = rkd_gram_inverse(a.s, ij), sg_ik = rkd_gram_inverse(a.s, ik);
    if (sg_ij == 0.0 || sg_ik == 0.0) continue;  // no Gram-route term
    double a_s, gamma;
    rkd_angle_entry(rkd_numerator(a.s, n, i, j, k), a.s.inv_norm[ij] * a.s.inv_norm[ik],
                    rkd_numerator(a.t, n, i, j, k), a.t.inv_norm[ij] * a.t.inv_norm[ik], a_s, gamma, ClampUnit{});
    h += gamma * sg_ij * sg_ik;
  }
  a.H[j * n + k] = h;
}

struct ColumnSum {  // out[j] = sum_i m[i][j]
  const double* m;
  int64_t n;
  double* out;
  FASTKD_HOST_DEVICE void operator()(int64_t j) const {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += m[i * n + j];
    out[j] = s;
  }
};

struct CudaBackend {
  template <typename F>
  static void rows(int64_t count, int64_t /*cost*/, const F& f) {
    if (count == 0) return;
    const int64_t blocks = (count + kThreads - 1) / kThreads;
    rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(f, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void rkd_triplets(const RkdTriplets& a) {
    const int64_t n = a.n;
    const unsigned tiles = static_cast<unsigned>((n + kTile - 1) / kTile);
    const dim3 grid(tiles, tiles), block(kTile, kTile);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor loss_ij = at::empty({n, n}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
    rkd_legs_kernel<<<grid, block, 0, stream>>>(a, loss_ij.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.H) {
      rkd_apex_kernel<<<grid, block, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    rows(n, n, ColumnSum{loss_ij.data_ptr<double>(), n, a.loss_rows});  // loss_rows[j] = sum_{i, k}
  }

  template <typename A>
  static void pkt_rows(const PktRow<A>& r) {
    rows(r.n, 8 * r.n, r);
  }

  template <typename A>
  static void at_pass(const AtPass<A>& a) {
    const int64_t S = a.spatial;
    auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
    at::Tensor map_s = at::empty({a.n, S}, f64), map_t = at::empty({a.n, S}, f64);
    rows(a.n * S, a.channels_s, AtMapElem<A>{a.f_s, a.channels_s, S, a.p, a.scale_s, map_s.data_ptr<double>()});
    rows(a.n * S, a.channels_t, AtMapElem<A>{a.f_t, a.channels_t, S, a.p, a.scale_t, map_t.data_ptr<double>()});
    rows(a.n, S, AtSampleRow{a.sample, map_s.data_ptr<double>(), map_t.data_ptr<double>(), a.grad_s != nullptr,
                             a.grad_t != nullptr, a.loss_rows});
    if (a.grad_s) {
      rows(a.n * a.channels_s * S, 1,
           AtGradElem<A>{a.f_s, map_s.data_ptr<double>(), a.channels_s, S, a.p, a.scale_s, a.grad_s});
    }
    if (a.grad_t) {
      rows(a.n * a.channels_t * S, 1,
           AtGradElem<A>{a.f_t, map_t.data_ptr<double>(), a.channels_t, S, a.p, a.scale_t, a.grad_t});
    }
  }
};

// An op's CUDA kernel: its driver (the schema's arguments as they are) on the student's device.
template <auto Impl, typename Sig>
struct OnStudentDevice;
template <auto Impl, typename R, typename... Args>
struct OnStudentDevice<Impl, R(const at::Tensor&, Args...)> {
  static R call(const at::Tensor& student, Args... args) {
    const c10::cuda::CUDAGuard guard(student.device());
    return Impl(student, args...);
  }
};

}  // namespace
}  // namespace cuda

// Every relation op: its driver with the CUDA backend, on the student's device.
#define FASTKD_CUDA_RELATION_OP(op, Traits)                                                        \
  static_assert(std::is_same_v<decltype(op##_impl<cuda::CudaBackend>), relation_ops::Traits::Sig>, \
                #op "_impl: its signature differs from relation_ops.h's");                         \
  m.impl(relation_ops::Traits::name,                                                               \
         &cuda::OnStudentDevice<&op##_impl<cuda::CudaBackend>, relation_ops::Traits::Sig>::call);
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { FASTKD_RELATION_OPS(FASTKD_CUDA_RELATION_OP) }
#undef FASTKD_CUDA_RELATION_OP

}  // namespace fastkd
