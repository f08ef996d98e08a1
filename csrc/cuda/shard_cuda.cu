// CUDA implementation of fastkd::response_shard_terms and fastkd::response_shard_grad (shard_host.h): one
// block per row (grid-stride), the divergence's trait per entry, CUB block sums (fixed order: deterministic),
// int64 indexing; a temperature per row where given.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastkd/shard_host.h"
#include "kd_kernels.cuh"

namespace fastkd {
namespace cuda {
namespace {

template <Divergence D, typename Acc, int kBlock>
__global__ void __launch_bounds__(kBlock) shard_kernel(ShardParams p, bool grad) {
  using Trait = DivergenceTrait<D>;
  const int64_t V = p.width;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const Acc* s = static_cast<const Acc*>(p.student) + r * p.student_row_stride;
    const Acc* t = static_cast<const Acc*>(p.teacher) + r * p.teacher_row_stride;
    const Acc* st = static_cast<const Acc*>(p.stats) + 4 * r;
    const Acc inv_t = static_cast<Acc>(shard_inv_temperature(p, r));
    // entry i: log p, log q, p, q, psi_p, psi_q, phi
    auto entry = [&](int64_t i, Acc& log_p, Acc& log_q, Acc& pp, Acc& q, Acc& psi_p, Acc& psi_q, Acc& phi) {
      log_q = kd_shift(s[i], st[0], inv_t) - st[2];
      log_p = kd_shift(t[i], st[1], inv_t) - st[3];
      q = fk_exp(log_q);
      pp = fk_exp(log_p);
      Trait::terms(log_p, log_q, pp, q, p.div, psi_p, psi_q, phi);
    };
    if (grad) {
      Acc* g = static_cast<Acc*>(p.out) + r * V;
      const Acc coef = static_cast<const Acc*>(p.row_coef)[r], sum_q = static_cast<const Acc*>(p.sum_psi_q)[r];
      for (int64_t i = threadIdx.x; i < V; i += kBlock) {
        Acc log_p, log_q, pp, q, psi_p, psi_q, phi;
        entry(i, log_p, log_q, pp, q, psi_p, psi_q, phi);
        g[i] = psi_grad(psi_q, q, sum_q, coef);
      }
      continue;
    }
    // sum phi, sum psi_q, and with the row dots sum psi_p, log p psi_p, p log p, log q psi_q, q log q
    // (shard_host.h; uniform over the block)
    Acc4<Acc, kShardDotSums> acc;
#pragma unroll
    for (int k = 0; k < kShardDotSums; ++k) acc.v[k] = Acc(0);
    for (int64_t i = threadIdx.x; i < V; i += kBlock) {
      Acc log_p, log_q, pp, q, psi_p, psi_q, phi;
      entry(i, log_p, log_q, pp, q, psi_p, psi_q, phi);
      acc.v[0] += phi;
      acc.v[1] += psi_q;
      if (p.dots) {
        Acc x_psi, w_x;
        acc.v[2] += psi_p;
        psi_dot_terms(log_p, pp, psi_p, x_psi, w_x);
        acc.v[3] += x_psi;
        acc.v[4] += w_x;
        psi_dot_terms(log_q, q, psi_q, x_psi, w_x);
        acc.v[5] += x_psi;
        acc.v[6] += w_x;
      }
    }
    acc = block_reduce<kBlock>(acc, SumOp<Acc, kShardDotSums>());
    if (threadIdx.x == 0) {
      const int64_t n = p.dots ? kShardDotSums : 2;
      for (int64_t k = 0; k < n; ++k) static_cast<Acc*>(p.out)[n * r + k] = acc.v[k];
    }
  }
}

at::Tensor run(ShardCall c, bool grad) {
  const ShardParams& p = c.p;
  if (p.rows == 0) return c.out;
  const c10::cuda::CUDAGuard guard(c.student.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_shard(c, [&](auto tag, auto acc_tag) {
    shard_kernel<decltype(tag)::value, decltype(acc_tag), 256><<<grid_for_rows(p.rows), 256, 0, stream>>>(p, grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

at::Tensor response_shard_terms_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                     c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
                                     const std::optional<at::Tensor>& row_temperature, bool dots) {
  return run(shard_prepare(student, teacher, stats, std::nullopt, std::nullopt, divergence, params, temperature, false,
                           row_temperature, dots),
             false);
}

at::Tensor response_shard_grad_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                    const at::Tensor& row_coef, const at::Tensor& sum_psi_q, c10::string_view divergence,
                                    c10::ArrayRef<double> params, double temperature,
                                    const std::optional<at::Tensor>& row_temperature) {
  return run(shard_prepare(student, teacher, stats, row_coef, sum_psi_q, divergence, params, temperature, true,
                           row_temperature),
             true);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("response_shard_terms", &cuda::response_shard_terms_cuda);
  m.impl("response_shard_grad", &cuda::response_shard_grad_cuda);
}

}  // namespace fastkd
