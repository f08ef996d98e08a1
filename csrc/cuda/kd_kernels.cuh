// CUDA kernels of fastkd::kd_forward. One block per row (grid-stride over rows),
// three sweeps per row as in the CPU kernel: row maxima, the sums that give the row's KL, gradients.
// The per-element math is kd_math.h (FASTKD_HOST_DEVICE), shared with the CPU kernels; block
// reductions are CUB's (fixed order: deterministic); all indexing is int64.
#pragma once

#include <cstdint>
#include <limits>

#include <cub/block/block_reduce.cuh>

#include "fastkd/kd_params.h"

namespace fastkd {
namespace cuda {

constexpr int kPack = 4;  // elements per vectorized load/store

template <typename X>
struct alignas(sizeof(X) * kPack) Pack {
  X v[kPack];
};

template <typename X>
__device__ __forceinline__ bool is_pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<X>) == 0;
}

template <typename Acc>
struct Sums {
  Acc z_s, z_t, dot;
};

template <typename Acc>
struct SumsOp {
  __device__ __forceinline__ Sums<Acc> operator()(const Sums<Acc>& x, const Sums<Acc>& y) const {
    return {x.z_s + y.z_s, x.z_t + y.z_t, x.dot + y.dot};
  }
};

template <typename Acc>
struct Maxes {
  Acc s, t;
};

template <typename Acc>
struct MaxesOp {
  __device__ __forceinline__ Maxes<Acc> operator()(const Maxes<Acc>& x, const Maxes<Acc>& y) const {
    return {kd_nan_max(x.s, y.s), kd_nan_max(x.t, y.t)};
  }
};

// Calls f(i, s_i, t_i) for this thread's share of the row [0, V): packs of kPack when the row pointers
// allow it, then a scalar tail.
template <int kBlock, typename Acc, typename S, typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const S* s, const T* t, int64_t V, bool packed, F&& f) {
  int64_t start = 0;
  if (packed) {
    const int64_t n_packs = V / kPack;
    for (int64_t j = threadIdx.x; j < n_packs; j += kBlock) {
      const Pack<S> sp = reinterpret_cast<const Pack<S>*>(s)[j];
      const Pack<T> tp = reinterpret_cast<const Pack<T>*>(t)[j];
#pragma unroll
      for (int k = 0; k < kPack; ++k) f(j * kPack + k, static_cast<Acc>(sp.v[k]), static_cast<Acc>(tp.v[k]));
    }
    start = n_packs * kPack;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += kBlock) f(i, static_cast<Acc>(s[i]), static_cast<Acc>(t[i]));
}

template <typename S, typename T, typename Acc, int kBlock>
__global__ void __launch_bounds__(kBlock) kd_forward_kernel(KdParams p) {
  using MaxReduce = cub::BlockReduce<Maxes<Acc>, kBlock>;
  using SumReduce = cub::BlockReduce<Sums<Acc>, kBlock>;
  __shared__ union {
    typename MaxReduce::TempStorage max;
    typename SumReduce::TempStorage sum;
  } tmp;
  __shared__ Acc row_scalars[3];  // max_s, max_t (after sweep 1); z_s, z_t, dot reuse after sweep 2
  __shared__ Sums<Acc> row_sums;

  const int64_t V = p.vocab;
  const int64_t counted = p.counted_rows ? *p.counted_rows : p.rows;
  const Acc coef = static_cast<Acc>(kd_grad_coef(p, counted));
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  auto* row_loss = static_cast<Acc*>(p.row_loss);

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + r * p.teacher_row_stride;
    S* gs = p.grad_student ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gt = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;

    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      if (threadIdx.x == 0) row_loss[r] = Acc(0);
      for (int64_t i = threadIdx.x; i < V; i += kBlock) {
        if (gs) gs[i] = S(0);
        if (gt) gt[i] = T(0);
      }
      continue;
    }
    const bool packed = is_pack_aligned<S>(s) && is_pack_aligned<T>(t) && (!gs || is_pack_aligned<S>(gs)) &&
                        (!gt || is_pack_aligned<T>(gt));

    // Sweep 1: row maxima.
    Maxes<Acc> m{-std::numeric_limits<Acc>::infinity(), -std::numeric_limits<Acc>::infinity()};
    for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t, Acc sv, Acc tv) {
      m.s = kd_nan_max(m.s, sv);
      m.t = kd_nan_max(m.t, tv);
    });
    m = MaxReduce(tmp.max).Reduce(m, MaxesOp<Acc>());
    if (threadIdx.x == 0) {
      row_scalars[0] = m.s;
      row_scalars[1] = m.t;
    }
    __syncthreads();
    const Acc max_s = row_scalars[0], max_t = row_scalars[1];

    // Sweep 2: Z_s, Z_t, sum e_t (a - b).
    Sums<Acc> acc{Acc(0), Acc(0), Acc(0)};
    for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t, Acc sv, Acc tv) {
      const Acc a = kd_shift(tv, max_t, inv_t);
      const Acc b = kd_shift(sv, max_s, inv_t);
      const Acc et = fk_exp(a);
      acc.z_s += fk_exp(b);
      acc.z_t += et;
      acc.dot += kd_dot_term(et, a, b);
    });
    acc = SumReduce(tmp.sum).Reduce(acc, SumsOp<Acc>());
    if (threadIdx.x == 0) row_sums = acc;
    __syncthreads();
    const Sums<Acc> tot = row_sums;
    const Acc kl = kd_row_kl(tot.z_s, tot.z_t, tot.dot);
    if (threadIdx.x == 0) row_loss[r] = static_cast<Acc>(p.loss_factor) * kl;

    // Sweep 3: gradients.
    if (gs || gt) {
      const Acc log_zs = fk_log(tot.z_s), log_zt = fk_log(tot.z_t);
      for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t i, Acc sv, Acc tv) {
        const Acc a = kd_shift(tv, max_t, inv_t);
        const Acc b = kd_shift(sv, max_s, inv_t);
        if (gs) gs[i] = static_cast<S>(kd_grad_student(a, b, log_zt, log_zs, coef));
        if (gt) gt[i] = static_cast<T>(kd_grad_teacher(a, b, log_zt, log_zs, kl, coef));
      });
    }
    __syncthreads();  // shared scalars are rewritten by the next row
  }
}

}  // namespace cuda
}  // namespace fastkd
