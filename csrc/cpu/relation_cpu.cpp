// CPU implementation of the relation- and feature-based loss operators (rkd_forward, sp_forward,
// pkt_forward, cc_forward, at_forward). The drivers are the device-independent ones of relation_host.h;
// this file supplies the CPU backend: row functors under at::parallel_for, the RKD triplet pass vectorized
// with at::vec::Vectorized<double>, and attention transfer one sample per task.
//
// RKD triplet pass: the thread owning leg j walks every apex i and, vectorized over the other leg k, forms
// the angles of both sides from rows i and j of the Gram matrices (apexes with direct pairs, near-duplicate
// rows, in scalar code with rkd_numerator). Everything the gradient needs (T_ij, U_ij
// and row j of H) belongs to j alone, so no two threads ever write the same value and the result does not
// depend on the thread count. Work: N^3 angle entries, memory: a few N x N float64 matrices.
#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "fastkd/relation_host.h"
#include "fastkd/relation_ops.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using VecD = at::vec::Vectorized<double>;

// Legs are owned in fixed blocks of kLegBlock (independent of the thread count): the block walks the apexes
// i once, so rows i of the four N x N matrices are read from memory once per block rather than once per leg
// (at N = 1024 they no longer fit in the last-level cache).
constexpr int64_t kLegBlock = 16;

// Apex i, leg j, the other leg k over the whole row, for an apex with direct pairs on either side: scalar,
// the numerators by rkd_numerator and the gradient sums with the Gram route's s' (RkdTriplets).
template <bool kGrad>
double rkd_direct_apex(const RkdTriplets& a, int64_t i, int64_t j) {
  const int64_t n = a.n, ij = i * n + j;
  const double s_ij = a.s.inv_norm[ij], t_ij = a.t.inv_norm[ij], sg_ij = rkd_gram_inverse(a.s, ij);
  double loss = 0.0, t_sum = 0.0, u_sum = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t ik = i * n + k;
    const double s_ik = a.s.inv_norm[ik], t_ik = a.t.inv_norm[ik];
    if (s_ik == 0.0 && t_ik == 0.0) continue;  // k == i or a zero pair on both sides: no term
    double a_s, gamma;
    loss += rkd_angle_entry(rkd_numerator(a.s, n, i, j, k), s_ij * s_ik, rkd_numerator(a.t, n, i, j, k),
                            t_ij * t_ik, a_s, gamma, ClampUnit{});
    if (kGrad) {
      const double w = gamma * rkd_gram_inverse(a.s, ik);
      t_sum += w;
      u_sum += gamma * a_s;
      a.H[j * n + k] += w * sg_ij;
    }
  }
  if (kGrad) {
    a.T[ij] = t_sum;
    a.U[ij] = u_sum;
  }
  return loss;
}

template <bool kGrad>
void rkd_triplets_impl(const RkdTriplets& a) {
  constexpr int64_t W = VecD::size();
  const int64_t n = a.n;
  const int64_t blocks = (n + kLegBlock - 1) / kLegBlock;
  const auto clamp = [](const VecD& x) { return at::vec::clamp(x, VecD(-1.0), VecD(1.0)); };
  auto load = [](const double* p, int64_t count) { return count == W ? VecD::loadu(p) : VecD::loadu(p, count); };
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::array<VecD, kLegBlock> loss;
    std::array<double, kLegBlock> loss_direct;  // the apexes with direct pairs
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t j0 = b * kLegBlock, j1 = std::min(n, j0 + kLegBlock);
      for (int64_t j = j0; j < j1; ++j) {
        loss[j - j0] = VecD(0.0);
        loss_direct[j - j0] = 0.0;
        if (kGrad) std::fill(a.H + j * n, a.H + (j + 1) * n, 0.0);
      }
      for (int64_t i = 0; i < n; ++i) {
        const double* gs_i = a.s.gram + i * n;
        const double* gt_i = a.t.gram + i * n;
        const double* s_i = a.s.inv_norm + i * n;
        const double* t_i = a.t.inv_norm + i * n;
        const bool direct_apex = a.s.row_direct[i] > 0 || a.t.row_direct[i] > 0;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t ij = i * n + j;
          const double s_ij = s_i[j], t_ij = t_i[j];
          if (s_ij == 0.0 && t_ij == 0.0) {  // i == j, or a duplicate on both sides: every angle is 0 on both
            if (kGrad) a.T[ij] = a.U[ij] = 0.0;
            continue;
          }
          if (direct_apex) {  // rare: near-duplicate rows
            loss_direct[j - j0] += rkd_direct_apex<kGrad>(a, i, j);
            continue;
          }
          const double* gs_j = a.s.gram + j * n;
          const double* gt_j = a.t.gram + j * n;
          double* h_row = kGrad ? a.H + j * n : nullptr;
          const VecD gs_ij_ii(gs_i[j] - gs_i[i]), gt_ij_ii(gt_i[j] - gt_i[i]), vs_ij(s_ij), vt_ij(t_ij);
          VecD acc(0.0), t_acc(0.0), u_acc(0.0);
          for (int64_t k = 0; k < n; k += W) {
            const int64_t cnt = std::min<int64_t>(W, n - k);  // zero-filled lanes have s_ik = t_ik = 0: no term
            const VecD s_ik = load(s_i + k, cnt), t_ik = load(t_i + k, cnt);
            VecD a_s, gamma;
            acc += rkd_angle_entry((load(gs_j + k, cnt) - load(gs_i + k, cnt)) - gs_ij_ii, vs_ij * s_ik,
                                   (load(gt_j + k, cnt) - load(gt_i + k, cnt)) - gt_ij_ii, vt_ij * t_ik, a_s, gamma,
                                   clamp);
            if (kGrad) {
              const VecD w = gamma * s_ik;
              t_acc += w;
              u_acc += gamma * a_s;
              const VecD h = load(h_row + k, cnt) + w * vs_ij;
              if (cnt == W) h.store(h_row + k); else h.store(h_row + k, cnt);
            }
          }
          loss[j - j0] += acc;
          if (kGrad) {
            a.T[ij] = lane_sum<double>(t_acc);
            a.U[ij] = lane_sum<double>(u_acc);
          }
        }
      }
      for (int64_t j = j0; j < j1; ++j) a.loss_rows[j] = lane_sum<double>(loss[j - j0]) + loss_direct[j - j0];
    }
  });
}

struct CpuBackend {
  // f(i) for i in [0, count): rows in parallel, each row by one thread.
  template <typename F>
  static void rows(int64_t count, int64_t cost, const F& f) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cost, 1));
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }

  static void rkd_triplets(const RkdTriplets& a) {
    if (a.T) rkd_triplets_impl<true>(a); else rkd_triplets_impl<false>(a);
  }

  // PktRow vectorized over the pairs of a row (Vectorized<double>, Sleef's log); rows padded with K = -1.
  template <typename A>
  static void pkt_rows(const PktRow<A>& r) {
    constexpr int64_t W = VecD::size();
    const int64_t n = r.n, padded = (n + W - 1) / W * W;
    const double inv_nn = 1.0 / (static_cast<double>(n) * static_cast<double>(n));
    const auto log = [](const VecD& x) { return x.log(); };
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      std::vector<double> ks(padded, -1.0), kt(padded, -1.0), ds(padded), dt(padded);
      for (int64_t i = begin; i < end; ++i) {
        std::copy(r.K_s + i * n, r.K_s + (i + 1) * n, ks.begin());
        std::copy(r.K_t + i * n, r.K_t + (i + 1) * n, kt.begin());
        VecD sum_s(0.0), sum_t(0.0);
        for (int64_t j = 0; j < padded; j += W) {
          sum_s += (VecD::loadu(ks.data() + j) + VecD(1.0)) * VecD(0.5);
          sum_t += (VecD::loadu(kt.data() + j) + VecD(1.0)) * VecD(0.5);
        }
        const double half_inv_s = 0.5 / lane_sum<double>(sum_s), half_inv_t = 0.5 / lane_sum<double>(sum_t);
        const VecD hs(half_inv_s), ht(half_inv_t), eps(r.eps);
        VecD loss(0.0), dot_s(0.0), dot_t(0.0), ps, pt, lr, dps, dpt;
        for (int64_t j = 0; j < padded; j += W) {
          pkt_terms(VecD::loadu(ks.data() + j), VecD::loadu(kt.data() + j), hs, ht, eps, log, ps, pt, lr, dps, dpt);
          loss += pt * lr;
          dot_s += dps * ps;
          dot_t += dpt * pt;
          dps.store(ds.data() + j);
          dpt.store(dt.data() + j);
        }
        r.row_loss[i] = lane_sum<double>(loss) * inv_nn;
        const double cs = half_inv_s * inv_nn, ct = half_inv_t * inv_nn, sum_dot_s = lane_sum<double>(dot_s),
                     sum_dot_t = lane_sum<double>(dot_t);
        if (r.D_s) for (int64_t j = 0; j < n; ++j) r.D_s[i * n + j] = static_cast<A>((ds[j] - sum_dot_s) * cs);
        if (r.D_t) for (int64_t j = 0; j < n; ++j) r.D_t[i * n + j] = static_cast<A>((dt[j] - sum_dot_t) * ct);
      }
    });
  }

  // One sample per task: the channel sums of f^p over contiguous spatial rows (Vectorized, accumulated in
  // the compute type like torch's mean), the loss and dL/dA (AtSample, float64), then the input gradient.
  template <typename A>
  static void at_pass(const AtPass<A>& a) {
    using V = at::vec::Vectorized<A>;
    constexpr int64_t W = V::size();
    const int64_t S = a.spatial, S_vec = S - S % W;
    const double p = a.p;
    // f^p and p f^(p-1) as torch.pow computes them (x * x for p = 2; Sleef's pow otherwise)
    auto pow_p = [p](const V& x) { return p == 2.0 ? x * x : (p == 3.0 ? x * x * x : x.pow(V(static_cast<A>(p)))); };
    auto slope_p = [p](const V& x) {
      return p == 2.0 ? x + x : (p == 3.0 ? V(A(3)) * x * x : V(static_cast<A>(p)) * x.pow(V(static_cast<A>(p - 1.0))));
    };
    at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(S), coef(S);
      std::vector<double> map_s(S), map_t(S);
      auto channel_map = [&](const A* f, int64_t channels, double scale, double* m) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t c = 0; c < channels; ++c) {
          const A* x = f + c * S;
          int64_t s = 0;
          for (; s < S_vec; s += W) (V::loadu(acc.data() + s) + pow_p(V::loadu(x + s))).store(acc.data() + s);
          for (; s < S; ++s) acc[s] += at_pow(x[s], p);
        }
        for (int64_t s = 0; s < S; ++s) m[s] = static_cast<double>(acc[s]) * scale;
      };
      auto input_grad = [&](const A* f, int64_t channels, double scale, const double* dm, A* g) {
        for (int64_t s = 0; s < S; ++s) coef[s] = static_cast<A>(dm[s] * scale);
        for (int64_t c = 0; c < channels; ++c) {
          const A* x = f + c * S;
          A* y = g + c * S;
          int64_t s = 0;
          for (; s < S_vec; s += W) (V::loadu(coef.data() + s) * slope_p(V::loadu(x + s))).store(y + s);
          for (; s < S; ++s) y[s] = coef[s] * at_pow_slope(x[s], p);
        }
      };
      for (int64_t n = begin; n < end; ++n) {
        const A* f_s = a.f_s + n * a.channels_s * S;
        const A* f_t = a.f_t + n * a.channels_t * S;
        channel_map(f_s, a.channels_s, a.scale_s, map_s.data());
        channel_map(f_t, a.channels_t, a.scale_t, map_t.data());
        a.loss_rows[n] = a.sample(map_s.data(), map_t.data(), a.grad_s != nullptr, a.grad_t != nullptr);
        if (a.grad_s) input_grad(f_s, a.channels_s, a.scale_s, map_s.data(), a.grad_s + n * a.channels_s * S);
        if (a.grad_t) input_grad(f_t, a.channels_t, a.scale_t, map_t.data(), a.grad_t + n * a.channels_t * S);
      }
    });
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu

// Every relation op: its driver with the CPU backend (the drivers take the schema's arguments as they are).
#define FASTKD_CPU_RELATION_OP(op, Traits)                                                       \
  static_assert(std::is_same_v<decltype(op##_impl<cpu::CpuBackend>), relation_ops::Traits::Sig>, \
                #op "_impl: its signature differs from relation_ops.h's");                       \
  m.impl(relation_ops::Traits::name, &op##_impl<cpu::CpuBackend>);
TORCH_LIBRARY_IMPL(fastkd, CPU, m) { FASTKD_RELATION_OPS(FASTKD_CPU_RELATION_OP) }
#undef FASTKD_CPU_RELATION_OP

}  // namespace fastkd
