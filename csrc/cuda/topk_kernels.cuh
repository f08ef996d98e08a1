// CUDA kernel of fastkd::topk_kd_forward (and of the fused linear head's top-k teacher): one block per row
// (grid-stride over rows), the sweeps of the CPU kernel (topk_cpu.cpp) with the math of kd_math.h and
// row_options.h (FASTKD_HOST_DEVICE, shared with it): the maxima, the reference set's sum of exponentials (and of
// e b, for a temperature gradient), the kept entries' terms, then the gradient. Per-row temperatures and weights
// come from row_scalars; CUB block reductions (fixed order: deterministic); int64 indexing.
// Its block reductions and sorted_contains are kd_kernels.cuh's.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/cuda/CUDAException.h>

#include "fastkd/kd_host.h"
#include "fastkd/row_options.h"
#include "kd_kernels.cuh"

namespace fastkd {
namespace cuda {

template <typename S, typename Acc, int kBlock>
__global__ void __launch_bounds__(kBlock) topk_rows_kernel(TopkParams p) {
  const int64_t V = p.vocab, K = p.k;
  const double count = kd_count(p.count, p.rows);
  const bool bucket = p.tail_bucket;
  const bool dots = p.row_grad_temperature != nullptr;  // the temperature gradient's row dots (row_options.h)
  auto* row_soft = static_cast<Acc*>(p.row_soft);

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const Acc* v = static_cast<const Acc*>(p.values) + r * K;
    const int64_t* idx = p.indices + r * K;
    S* gs = p.grad_student ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    auto zero_row = [&] {
      if (threadIdx.x == 0) {
        row_soft[r] = Acc(0);
        if (dots) p.row_grad_temperature[r] = 0.0;
      }
      if (gs) for (int64_t i = threadIdx.x; i < V; i += kBlock) gs[i] = S(0);
    };
    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      zero_row();
      __syncthreads();
      continue;
    }
    // The row's temperature, weight and coefficients.
    const RowScalars rs = row_scalars(p, r, count);
    const double inv_t = rs.inv_s, coef = rs.coef * rs.inv_s;
    const Acc inv_t_acc = static_cast<Acc>(inv_t);
    const double scale = p.values_are_logprobs ? 1.0 : inv_t;
    // Entry i is in the student's reference set: outside the kept set with a tail bucket, else any entry.
    auto in_ref = [&](int64_t i) { return !bucket || !sorted_contains(idx, K, i); };
    auto student_at = [&](int64_t j) { return static_cast<double>(static_cast<Acc>(s[j])); };
    // Maxima: the student over its reference set and over the kept entries, the teacher's k values.
    Acc4<double, 3> m{{-INFINITY, -INFINITY, -INFINITY}};
    for (int64_t i = threadIdx.x; i < V; i += kBlock) {
      if (in_ref(i)) m.v[0] = kd_nan_max(m.v[0], student_at(i));
    }
    for (int64_t k = threadIdx.x; k < K; k += kBlock) {
      m.v[1] = kd_nan_max(m.v[1], student_at(idx[k]));
      m.v[2] = kd_nan_max(m.v[2], static_cast<double>(v[k]));
    }
    m = block_reduce<kBlock>(m, MaxOp<double, 3>());
    if (kd_row_empty(kd_nan_max(m.v[0], m.v[1]), m.v[2])) {  // fully masked: uniform over the block
      zero_row();
      __syncthreads();
      continue;
    }
    const Acc origin = static_cast<Acc>(kd_origin(m.v[0]));
    const double origin_v = kd_origin(m.v[2]);
    auto b_of = [&](int64_t j) { return (student_at(j) - static_cast<double>(origin)) * inv_t; };
    // The reference set's sums of e and e b, the teacher's Z.
    Acc4<double, 3> z{{0.0, 0.0, 0.0}};
    Acc z_ref_part = 0, eb_part = 0;
    for (int64_t i = threadIdx.x; i < V; i += kBlock) {
      if (!in_ref(i)) continue;
      const Acc b = kd_shift(static_cast<Acc>(s[i]), origin, inv_t_acc), e = fk_exp(b);
      z_ref_part += e;
      if (dots) eb_part += fk_select_nonzero(e, e * b);
    }
    z.v[0] = z_ref_part;
    z.v[2] = eb_part;
    for (int64_t k = threadIdx.x; k < K; k += kBlock) {
      z.v[1] += ::exp((static_cast<double>(v[k]) - origin_v) * scale);
    }
    z = block_reduce<kBlock>(z, SumOp<double, 3>());
    Acc4<double, 1> mb{{-INFINITY}};
    for (int64_t k = threadIdx.x; k < K; k += kBlock) mb.v[0] = kd_nan_max(mb.v[0], b_of(idx[k]));
    mb = block_reduce<kBlock>(mb, MaxOp<double, 1>());
    const double b_origin = kd_origin(mb.v[0]);
    const TopkTeacher tt = topk_teacher(origin_v, z.v[1], p.values_are_logprobs, bucket, inv_t);
    // The kept entries' sum of exp(b_k) (their log-sum-exp: bucket only), then the row loss over them and the
    // kept entries' terms of the row dots.
    Acc4<double, 1> z_kept{{0.0}};
    for (int64_t k = threadIdx.x; k < K; k += kBlock) z_kept.v[0] += ::exp(b_of(idx[k]) - b_origin);
    z_kept = block_reduce<kBlock>(z_kept, SumOp<double, 1>());
    const double lse_kept = bucket ? b_origin + ::log(z_kept.v[0]) : -INFINITY;
    const TopkStudent st = topk_student(::log(z.v[0]), lse_kept, bucket, tt.p_tail);
    Acc4<double, 5> row{{0.0, 0.0, 0.0, 0.0, 0.0}};
    for (int64_t k = threadIdx.x; k < K; k += kBlock) {
      const double log_p = topk_log_p(tt, static_cast<double>(v[k])), b = b_of(idx[k]);
      row.v[0] += topk_kept_term(log_p, b - st.log_zs);
      if (dots) {
        TopkDotSums t;
        topk_dot_terms(log_p, b, b - st.log_zs, t);
        row.v[1] += t.qb;
        row.v[2] += t.pb;
        row.v[3] += t.pl;
        row.v[4] += t.plx;
      }
    }
    row = block_reduce<kBlock>(row, SumOp<double, 5>());
    if (threadIdx.x == 0) {
      const double kl = row.v[0] + topk_tail_term(tt, st);
      row_soft[r] = static_cast<Acc>(rs.weight * rs.loss_factor * kl);
      if (dots) {
        TopkDotSums kds;
        kds.ref_eb = z.v[2];
        kds.qb = row.v[1];
        kds.pb = row.v[2];
        kds.pl = row.v[3];
        kds.plx = row.v[4];
        double d_s = 0.0, d_t = 0.0;
        topk_row_dots(kds, z.v[0], tt, st, bucket, p.values_are_logprobs, kl, d_s, d_t);
        p.row_grad_temperature[r] = row_grad_temperature(rs, p.scale_by_temperature, kl, d_s, d_t);
      }
    }
    if (gs) {
      const Acc dense = static_cast<Acc>(coef * st.dense);
      // In place (the gradient overwrites the student row), the kept entries are left for the second loop,
      // which still reads their logits.
      const bool in_place = static_cast<const void*>(gs) == static_cast<const void*>(s);
      __syncthreads();  // every read of s above happens before any write
      for (int64_t i = threadIdx.x; i < V; i += kBlock) {
        if (in_place && sorted_contains(idx, K, i)) continue;
        gs[i] = static_cast<S>(dense * fk_exp(kd_shift(static_cast<Acc>(s[i]), origin, inv_t_acc)));
      }
      __syncthreads();  // the kept entries are overwritten after the dense write
      for (int64_t k = threadIdx.x; k < K; k += kBlock) {
        const double g = topk_kept_grad(coef, topk_log_p(tt, static_cast<double>(v[k])), b_of(idx[k]) - st.log_zs);
        gs[idx[k]] = static_cast<S>(g);
      }
    }
    __syncthreads();
  }
}

// Launches topk_rows_kernel for the student dtype of the call on `stream`.
inline void launch_topk_rows(const TopkCall& c, cudaStream_t stream) {
  const dim3 grid(grid_for_rows(c.p.rows));
  auto run = [&](auto s_tag) {
    using S = decltype(s_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    topk_rows_kernel<S, Acc, 512><<<grid, 512, 0, stream>>>(c.p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  kd_dispatch_student(c.student.scalar_type(), run);
}

}  // namespace cuda
}  // namespace fastkd
