// CUDA kernels of fastkd::response_forward (the top-k kernel: topk_kernels.cuh). One block per row (grid-stride
// over rows), the same sweeps per row as the CPU kernels: row maxima, the sums that give the row's loss
// (plus, for the Psi family, the sums over the normalized distributions), gradients. The per-element and per-row
// math is kd_math.h (FASTKD_HOST_DEVICE), shared with the CPU kernels; block reductions are CUB's (fixed
// order: deterministic); all indexing is int64.
#pragma once

#include <cstdint>
#include <limits>

#include <algorithm>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <cub/block/block_reduce.cuh>

#include "fastkd/kd_host.h"
#include "fastkd/row_options.h"

namespace fastkd {
namespace cuda {

constexpr int kPack = 4;  // elements per vectorized load

template <typename X>
struct alignas(sizeof(X) * kPack) Pack {
  X v[kPack];
};

template <typename X>
__device__ __forceinline__ bool is_pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<X>) == 0;
}

// N accumulators reduced together (one CUB reduction per sweep).
template <typename Acc, int N>
struct Acc4 {
  Acc v[N];
};

template <typename Acc, int N>
struct SumOp {
  __device__ __forceinline__ Acc4<Acc, N> operator()(const Acc4<Acc, N>& x, const Acc4<Acc, N>& y) const {
    Acc4<Acc, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = x.v[k] + y.v[k];
    return r;
  }
};

template <typename Acc, int N>
struct MaxOp {
  __device__ __forceinline__ Acc4<Acc, N> operator()(const Acc4<Acc, N>& x, const Acc4<Acc, N>& y) const {
    Acc4<Acc, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = kd_nan_max(x.v[k], y.v[k]);
    return r;
  }
};

// Block-wide reduction of N values, result broadcast to every thread.
template <int kBlock, typename Acc, int N, typename Op>
__device__ __forceinline__ Acc4<Acc, N> block_reduce(Acc4<Acc, N> x, Op op) {
  using Reduce = cub::BlockReduce<Acc4<Acc, N>, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ Acc4<Acc, N> result;
  x = Reduce(tmp).Reduce(x, op);
  if (threadIdx.x == 0) result = x;
  __syncthreads();
  const Acc4<Acc, N> out = result;
  __syncthreads();  // tmp and result are reused by the next call
  return out;
}

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

template <Divergence D, typename S, typename T, typename Acc, int kBlock>
__global__ void __launch_bounds__(kBlock) response_kernel(KdParams p) {
  using Trait = DivergenceTrait<D>;
  constexpr bool kDkd = Trait::kFamily == Family::Decoupled;
  constexpr bool kKLType = Trait::kFamily == Family::KLType || kDkd;
  constexpr bool kSwap = Trait::kSwap;
  constexpr bool kPsi = Trait::kFamily == Family::Psi;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t V = p.vocab;
  const double count = kd_count(p.count, p.rows);
  // The row dots of the temperature gradient and of the standardization's (row_options.h).
  constexpr bool kKlDots = kKLType;  // the KL sums (DKD: over the non-target classes)
  const bool dots = p.row_grad_temperature != nullptr || p.standardize;
  auto* row_soft = static_cast<Acc*>(p.row_soft);
  auto* row_hard = static_cast<Acc*>(p.row_hard);

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + r * p.teacher_row_stride;
    S* gs = p.grad_student ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gt = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;

    // A row that contributes nothing: not counted (label == ignore_index), or fully masked (see below).
    auto zero_row = [&] {
      if (threadIdx.x == 0) {
        row_soft[r] = Acc(0);
        if (p.hard) row_hard[r] = Acc(0);
        if (p.row_grad_temperature) p.row_grad_temperature[r] = 0.0;
      }
      for (int64_t i = threadIdx.x; i < V; i += kBlock) {
        if (gs) gs[i] = S(0);
        if (gt) gt[i] = T(0);
      }
    };
    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      zero_row();
      continue;
    }
    const int64_t y = p.labels ? p.labels[r] : -1;
    const int64_t excl = kDkd ? y : -1;
    const bool packed = is_pack_aligned<S>(s) && is_pack_aligned<T>(t);

    // Sweep 1: row maxima (DKD: over the non-target classes).
    Acc4<Acc, 2> m{{neg_inf, neg_inf}};
    for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t i, Acc sv, Acc tv) {
      if (i == excl) return;
      m.v[0] = kd_nan_max(m.v[0], sv);
      m.v[1] = kd_nan_max(m.v[1], tv);
    });
    m = block_reduce<kBlock>(m, MaxOp<Acc, 2>());
    const Acc max_s = m.v[0], max_t = m.v[1];
    // Fully masked (-inf in every entry of both sides; for DKD the target entries too): contributes 0. The
    // test is uniform over the block (the maxima are broadcast), so the whole block skips the row.
    if (kd_row_empty(max_s, max_t) &&
        (!kDkd || kd_row_empty(static_cast<Acc>(s[y]), static_cast<Acc>(t[y])))) {
      zero_row();
      continue;
    }

    // Standardization: each side's row mean and std, then the row's scalars (uniform over the block).
    RowStandardization st_s, st_t;
    if (p.standardize) {
      const double s0 = static_cast<Acc>(s[0]), t0 = static_cast<Acc>(t[0]);
      Acc4<double, 4> m4{{0.0, 0.0, 0.0, 0.0}};
      for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t, Acc sv, Acc tv) {
        const double ds = static_cast<double>(sv) - s0, dt = static_cast<double>(tv) - t0;
        m4.v[0] += ds;
        m4.v[1] += ds * ds;
        m4.v[2] += dt;
        m4.v[3] += dt * dt;
      });
      m4 = block_reduce<kBlock>(m4, SumOp<double, 4>());
      st_s = row_standardization(s0, m4.v[0], m4.v[1], V, p.standardize_eps);
      st_t = row_standardization(t0, m4.v[2], m4.v[3], V, p.standardize_eps);
    }
    const RowScalars rs = row_scalars(p, r, count, st_s.scale, st_t.scale);
    const Acc inv_s = static_cast<Acc>(rs.inv_s), inv_t = static_cast<Acc>(rs.inv_t);
    const bool z1_separate = p.hard && rs.inv_s != 1.0;  // at T = 1 the CE's Z is Z_s
    const Acc ce_coef = static_cast<Acc>(rs.ce_coef);
    const double coef_s = rs.coef * rs.inv_s, coef_t = rs.coef * rs.inv_t;

    // Sweep 2: Z_s, Z_t, the KL-type dot product, Z of the student at T = 1 (CE), and the KL-type row dots' sums.
    Acc4<Acc, 4> z{{Acc(0), Acc(0), Acc(0), Acc(0)}};
    Acc4<Acc, 4> k4{{Acc(0), Acc(0), Acc(0), Acc(0)}};
    for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t i, Acc sv, Acc tv) {
      if (i == excl) return;
      const Acc a = kd_shift(tv, max_t, inv_t);
      const Acc b = kd_shift(sv, max_s, inv_s);
      const Acc et = fk_exp(a), es = fk_exp(b);
      z.v[0] += es;
      z.v[1] += et;
      if constexpr (kSwap) z.v[2] += kd_dot_term(es, b, a);
      else if constexpr (kKLType) z.v[2] += kd_dot_term(et, a, b);
      if (z1_separate) z.v[3] += fk_exp(sv - max_s);
      if constexpr (kKlDots) {
        if (dots) {  // P = the teacher (KL(p || q)) or the student (KL(q || p))
          Acc pp, pd, po, oo;
          if constexpr (kSwap) kl_dot_terms(es, et, b, a, pp, pd, po, oo);
          else kl_dot_terms(et, es, a, b, pp, pd, po, oo);
          k4.v[0] += pp;
          k4.v[1] += pd;
          k4.v[2] += po;
          k4.v[3] += oo;
        }
      }
    });
    z = block_reduce<kBlock>(z, SumOp<Acc, 4>());
    if (kKlDots && dots) k4 = block_reduce<kBlock>(k4, SumOp<Acc, 4>());
    const double z_s = z.v[0], z_t = z.v[1], dot = z.v[2];
    const double log_zs_d = ::log(z_s), log_zt_d = ::log(z_t);
    const Acc log_zs = static_cast<Acc>(log_zs_d), log_zt = static_cast<Acc>(log_zt_d);
    const double log_z1_d = z1_separate ? ::log(static_cast<double>(z.v[3])) : log_zs_d;
    const Acc log_z1 = static_cast<Acc>(log_z1_d);
    if (p.hard && threadIdx.x == 0) {
      row_hard[r] = static_cast<Acc>(rs.weight * (log_z1_d + static_cast<double>(max_s) -
                                                 static_cast<double>(static_cast<Acc>(s[y]))));
    }

    // Sweep 3 (the Psi family): sums over the normalized distributions.
    auto entry_terms = [&](Acc sv, Acc tv, Acc& lp, Acc& lq, Acc& pp, Acc& qq, Acc& psi_p, Acc& psi_q, Acc& phi) {
      lp = kd_shift(tv, max_t, inv_t) - log_zt;
      lq = kd_shift(sv, max_s, inv_s) - log_zs;
      pp = fk_exp(lp);
      qq = fk_exp(lq);
      if constexpr (kPsi) Trait::terms(lp, lq, pp, qq, p.div, psi_p, psi_q, phi);
    };
    double divergence = 0.0, sum_psi_p = 0.0, sum_psi_q = 0.0;
    double d_s = 0.0, d_t = 0.0;  // the row dots (row_options.h)
    if constexpr (kPsi) {
      // with the row dots also sum log p psi_p, sum p log p, sum log q psi_q, sum q log q
      Acc4<Acc, 7> acc{{Acc(0), Acc(0), Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)}};
      for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t, Acc sv, Acc tv) {
        Acc lp, lq, pp, qq, psi_p, psi_q, phi;
        entry_terms(sv, tv, lp, lq, pp, qq, psi_p, psi_q, phi);
        acc.v[0] += phi;
        acc.v[1] += psi_p;
        acc.v[2] += psi_q;
        if (dots) {
          Acc x_psi, w_x;
          psi_dot_terms(lp, pp, psi_p, x_psi, w_x);
          acc.v[3] += x_psi;
          acc.v[4] += w_x;
          psi_dot_terms(lq, qq, psi_q, x_psi, w_x);
          acc.v[5] += x_psi;
          acc.v[6] += w_x;
        }
      });
      acc = block_reduce<kBlock>(acc, SumOp<Acc, 7>());
      divergence = acc.v[0];
      sum_psi_p = acc.v[1];
      sum_psi_q = acc.v[2];
      if (dots) {
        d_t = psi_row_dot(acc.v[3], sum_psi_p, acc.v[4]);
        d_s = psi_row_dot(acc.v[5], sum_psi_q, acc.v[6]);
      }
    }

    DkdRow dkd{};
    const KlDotSums kds{k4.v[0], k4.v[1], k4.v[2], k4.v[3]};
    if constexpr (kDkd) {
      dkd = dkd_row(z_s, z_t, dot, kd_shift(static_cast<Acc>(s[y]), max_s, inv_s),
                    kd_shift(static_cast<Acc>(t[y]), max_t, inv_t));
      divergence = p.div.param[0] * dkd.tckd + p.div.param[1] * dkd.nckd;
      if (dots) dkd_row_dots(kds, dkd, z_s, z_t, dot, p.div.param[0], p.div.param[1], d_s, d_t);
    } else if constexpr (kKlDots) {
      divergence = kSwap ? kd_row_kl(z_t, z_s, dot) : kd_row_kl(z_s, z_t, dot);
      if (dots) {
        if constexpr (kSwap) kl_row_dots(kds, z_s, z_t, dot, d_s, d_t);
        else kl_row_dots(kds, z_t, z_s, dot, d_t, d_s);
      }
    }
    if (threadIdx.x == 0) {
      row_soft[r] = static_cast<Acc>(rs.weight * rs.loss_factor * divergence);
      if (p.row_grad_temperature) {
        p.row_grad_temperature[r] = row_grad_temperature(rs, p.scale_by_temperature, divergence, d_s, d_t);
      }
    }

    // Sweep 4: gradients. Each thread reads an entry before writing its gradient, so the gradient may
    // overwrite the student row in place (fused linear head); the barrier keeps the reads of s[y] above
    // ahead of any write.
    __syncthreads();
    if (gs || gt) {
      // (Student and teacher scalars differ when standardized: each side's own scale.)
      auto grad_scalars = [&](double c) {
        return kDkd ? dkd_grad_scalars(dkd, p.div.param[0], p.div.param[1], c) : kl_grad_scalars(c, divergence);
      };
      const KlGradScalars gk_s = grad_scalars(coef_s), gk_t = grad_scalars(coef_t);
      // the student's gradient takes c_q, c_p (c_t, k_t for KL(q || p), where the roles swap), the teacher the others
      const KlGradScalars& gk_q = kSwap ? gk_t : gk_s;
      const KlGradScalars& gk_p = kSwap ? gk_s : gk_t;
      const Acc cq = static_cast<Acc>(gk_q.c_q), cp = static_cast<Acc>(gk_q.c_p), ct = static_cast<Acc>(gk_p.c_t),
                kt = static_cast<Acc>(gk_p.k_t);
      const Acc gs_y = static_cast<Acc>(gk_s.student_target), gt_y = static_cast<Acc>(gk_t.teacher_target);
      const Acc c_s = static_cast<Acc>(coef_s), c_t = static_cast<Acc>(coef_t);
      const Acc spp = static_cast<Acc>(sum_psi_p), spq = static_cast<Acc>(sum_psi_q);
      // the standardization's gradient term k * (x - mean) on each side (0 without standardization)
      const Acc k_s = static_cast<Acc>(p.standardize ? rs.coef * standardize_grad_factor(st_s, d_s, V) : 0.0);
      const Acc k_t = static_cast<Acc>(p.standardize ? rs.coef * standardize_grad_factor(st_t, d_t, V) : 0.0);
      const Acc mean_s = static_cast<Acc>(st_s.mean), mean_t = static_cast<Acc>(st_t.mean);
      for_each_in_row<kBlock, Acc>(s, t, V, packed, [&](int64_t i, Acc sv, Acc tv) {
        Acc g_s = 0, g_t = 0;
        if constexpr (kPsi) {
          Acc lp, lq, pp, qq, psi_p, psi_q, phi;
          entry_terms(sv, tv, lp, lq, pp, qq, psi_p, psi_q, phi);
          g_s = psi_grad(psi_q, qq, spq, c_s);
          g_t = psi_grad(psi_p, pp, spp, c_t);
        } else {
          const Acc a = kd_shift(tv, max_t, inv_t);
          const Acc b = kd_shift(sv, max_s, inv_s);
          if constexpr (kSwap) {
            g_s = kd_grad_teacher2(b, a, log_zs, log_zt, ct, kt);
            g_t = kd_grad_student2(b, a, log_zs, log_zt, cq, cp);
          } else {
            g_s = kd_grad_student2(a, b, log_zt, log_zs, cq, cp);
            g_t = kd_grad_teacher2(a, b, log_zt, log_zs, ct, kt);
          }
        }
        if constexpr (kDkd) {
          if (i == y) {
            g_s = gs_y;
            g_t = gt_y;
          }
        }
        if (p.standardize) {
          g_s += k_s * (sv - mean_s);
          g_t += k_t * (tv - mean_t);
        }
        if (p.hard) g_s += ce_coef * (fk_exp(sv - max_s - log_z1) - (i == y ? Acc(1) : Acc(0)));
        if (gs) gs[i] = static_cast<S>(g_s);
        if (gt) gt[i] = static_cast<T>(g_t);
      });
    }
    __syncthreads();  // the next row reuses the shared reduction storage
  }
}

// Whether x is one of the n sorted values idx[0..n).
__device__ __forceinline__ bool sorted_contains(const int64_t* idx, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (idx[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo < n && idx[lo] == x;
}

inline unsigned grid_for_rows(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, std::numeric_limits<int32_t>::max())));
}

// Launches response_kernel<D> for the (student, teacher) dtypes of the call on `stream`.
template <Divergence D>
void launch_response(const KdCall& c, cudaStream_t stream) {
  const KdParams& p = c.p;
  const dim3 grid(grid_for_rows(p.rows));
  kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    if (p.vocab <= 2048) {
      response_kernel<D, S, T, Acc, 128><<<grid, 128, 0, stream>>>(p);
    } else {
      response_kernel<D, S, T, Acc, 512><<<grid, 512, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Instantiated once per divergence, in kd_cuda.cu (KL type, decoupled) and kd_cuda_psi.cu (Psi family).
#define FASTKD_DIV_EXTERN(id, trait, family) extern template void launch_response<Divergence::id>(const KdCall&, cudaStream_t);
FASTKD_DIVERGENCES(FASTKD_DIV_EXTERN)
#undef FASTKD_DIV_EXTERN

// The rows of a KdCall on `stream`, through the divergence registry.
inline void launch_response_any(const KdCall& c, cudaStream_t stream) {
  dispatch_divergence(c.p.divergence, [&](auto tag) { launch_response<decltype(tag)::value>(c, stream); });
}

}  // namespace cuda
}  // namespace fastkd
