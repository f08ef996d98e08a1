// The per-row kernel of fastkd::response_forward on the CPU (see kd_cpu.cpp for the sweeps), as a
// template over the divergence. It is instantiated in two translation units (kd_cpu.cpp: the KL-type
// divergences, kd_cpu_psi.cpp: the Psi family of divergences.h) so that the two compile in parallel.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>

#include "cpu_common.h"
#include "fastkd/kd_host.h"
#include "fastkd/row_options.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per instruction-set library

// Whether index x falls in [i, i + n).
inline bool in_chunk(int64_t x, int64_t i, int64_t n) {
  return static_cast<uint64_t>(x - i) < static_cast<uint64_t>(n);
}

template <Divergence D, typename S, typename T, typename Acc>
void response_rows(const KdParams& p, double count, int64_t begin, int64_t end) {
  using Trait = DivergenceTrait<D>;
  constexpr int64_t W = Vec<Acc>::size();
  constexpr bool kDkd = Trait::kFamily == Family::Decoupled;
  constexpr bool kKLType = Trait::kFamily == Family::KLType || kDkd;
  constexpr bool kSwap = Trait::kSwap;
  constexpr bool kPsi = Trait::kFamily == Family::Psi;
  constexpr int64_t kSumBlock = 64 * W;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t V = p.vocab;
  const int64_t V2 = V - V % (2 * W);  // sweeps 1-2 take two vectors at a time
  const int64_t V1 = V - V % W;        // full vectors of sweeps 3-4
  const bool hard = p.hard;
  // The row dots of the temperature gradient and of the standardization's (row_options.h).
  const bool dots = p.row_grad_temperature != nullptr || p.standardize;
  auto* S_out = static_cast<S*>(p.grad_student);
  auto* T_out = static_cast<T*>(p.grad_teacher);
  auto* row_soft = static_cast<Acc*>(p.row_soft);
  auto* row_hard = static_cast<Acc*>(p.row_hard);

  for (int64_t r = begin; r < end; ++r) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + r * p.teacher_row_stride;
    S* gs = S_out ? S_out + r * V : nullptr;
    T* gt = T_out ? T_out + r * V : nullptr;

    // A row that contributes nothing: not counted (label == ignore_index), or fully masked (see below).
    auto zero_row = [&] {
      row_soft[r] = Acc(0);
      if (hard) row_hard[r] = Acc(0);
      if (p.row_grad_temperature) p.row_grad_temperature[r] = 0.0;
      if (gs) std::fill(gs, gs + V, S(0));
      if (gt) std::fill(gt, gt + V, T(0));
    };
    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      zero_row();
      continue;
    }
    const int64_t y = p.labels ? p.labels[r] : -1;           // class target (CE, DKD)
    const int64_t excl = kDkd ? y : -1;      // DKD: sweeps 1-2 run over non-target classes
    auto masked = [&](const Vec<Acc>& v, int64_t i) { return in_chunk(excl, i, W) ? with_lane(v, excl - i, neg_inf) : v; };

    // Sweep 1: row maxima; with standardization also each side's sums of d = x - x0 and d^2 (x0: the row's first
    // entry), for its mean and std (row_standardization), in the same read of the row (DKD: the sums over every
    // entry, the maxima over the non-target ones).
    Vec<Acc> ms0(neg_inf), ms1(neg_inf), mt0(neg_inf), mt1(neg_inf);
    const bool stdz = p.standardize;
    std::array<double, 4> st_sums{};
    if (stdz) {
      const Acc s0 = static_cast<Acc>(s[0]), t0 = static_cast<Acc>(t[0]);
      const Vec<Acc> s0_v(s0), t0_v(t0);
      auto body = [&](int64_t i, int64_t n) {  // the tail is padded with x0: d = 0, and the maximum unchanged
        const Vec<Acc> sv = n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n, s0);
        const Vec<Acc> tv = n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n, t0);
        if constexpr (kDkd) {  // x0 may be the target's: the maxima's tail is padded with -inf
          ms0 = at::vec::maximum(ms0, masked(n == W ? sv : load_tail<Acc>(s + i, n), i));
          mt0 = at::vec::maximum(mt0, masked(n == W ? tv : load_tail<Acc>(t + i, n), i));
        } else {
          ms0 = at::vec::maximum(ms0, sv);
          mt0 = at::vec::maximum(mt0, tv);
        }
        const Vec<Acc> ds = sv - s0_v, dt = tv - t0_v;
        return std::array<Vec<Acc>, 4>{ds, ds * ds, dt, dt * dt};
      };
      st_sums = blocked_sums<Acc, 4>(0, V1, [&](int64_t i) { return body(i, W); });
      if (V1 < V) {
        const auto tail = body(V1, V - V1);
        for (int k = 0; k < 4; ++k) st_sums[k] += lane_sum<Acc>(tail[k]);
      }
    } else {
      for (int64_t i = 0; i < V2; i += 2 * W) {
        ms0 = at::vec::maximum(ms0, masked(load<Acc>(s + i), i));
        ms1 = at::vec::maximum(ms1, masked(load<Acc>(s + i + W), i + W));
        mt0 = at::vec::maximum(mt0, masked(load<Acc>(t + i), i));
        mt1 = at::vec::maximum(mt1, masked(load<Acc>(t + i + W), i + W));
      }
      for (int64_t i = V2; i < V; i += W) {
        ms0 = at::vec::maximum(ms0, masked(load_tail<Acc>(s + i, std::min(W, V - i)), i));
        mt0 = at::vec::maximum(mt0, masked(load_tail<Acc>(t + i, std::min(W, V - i)), i));
      }
    }
    const Acc max_s = lane_max<Acc>(at::vec::maximum(ms0, ms1));
    const Acc max_t = lane_max<Acc>(at::vec::maximum(mt0, mt1));
    // Fully masked (-inf in every entry of both sides; for DKD the target entries too): contributes 0.
    if (kd_row_empty(max_s, max_t) &&
        (!kDkd || kd_row_empty(static_cast<Acc>(s[y]), static_cast<Acc>(t[y])))) {
      zero_row();
      continue;
    }
    const Vec<Acc> max_s_v(max_s), max_t_v(max_t);

    // Standardization is affine with a positive scale: the shifted logits stay (x - max) * inv, inv = scale / T.
    RowStandardization st_s, st_t;
    if (stdz) {
      st_s = row_standardization(static_cast<Acc>(s[0]), st_sums[0], st_sums[1], V, p.standardize_eps);
      st_t = row_standardization(static_cast<Acc>(t[0]), st_sums[2], st_sums[3], V, p.standardize_eps);
    }
    const RowScalars rs = row_scalars(p, r, count, st_s.scale, st_t.scale);
    const Vec<Acc> inv_s_v(static_cast<Acc>(rs.inv_s)), inv_t_v(static_cast<Acc>(rs.inv_t));
    const bool z1_separate = hard && rs.inv_s != 1.0;  // at T = 1 the CE's Z is Z_s
    const Acc ce_coef = static_cast<Acc>(rs.ce_coef);
    // d(reduced loss) / d(student logit) = coef_s * d div / d b (+ the standardization's term), likewise the teacher
    const double coef_s = rs.coef * rs.inv_s, coef_t = rs.coef * rs.inv_t;
    const Vec<Acc> coef_v(static_cast<Acc>(coef_s)), coef_t_v(static_cast<Acc>(coef_t));

    // Sweep 2: Z_s, Z_t, the KL-type dot product, and Z of the student at T = 1 for the CE.
    // Hinton KD with only the student gradient asked for (and a full-precision gradient dtype) parks e_s
    // in the gradient row (its first touch happens here), so sweep 4 needs one exponential, not two.
    // The Psi family parks it the same way, for sweep 3 to read q = e_s / Z_s instead of another exponential.
    // Not when the gradient overwrites the student row in place (fastkd::fused_linear_kd_forward): parking
    // would clobber logits that sweeps 3-4 still read.
    // (With standardization sweep 4 also reads the student row, for its gradient term: in L2 by then.)
    const bool park = ((kKLType && !kSwap && !kDkd) || kPsi) && std::is_same_v<S, Acc> && gs != nullptr && gt == nullptr &&
                      !hard && p.grad_student != p.student;
    double z_s = 0.0, z_t = 0.0, dot = 0.0, z_1 = 0.0;
    KlDotSums kds;  // KL type and DKD: the sums of the row dots (row_options.h)
    constexpr bool kKlDots = kKLType;
    auto sweep2 = [&](const Vec<Acc>& sv, const Vec<Acc>& tv, Vec<Acc>& zs, Vec<Acc>& zt, Vec<Acc>& d, Vec<Acc>& z1,
                      std::array<Vec<Acc>, 4>& k4, S* park_at, int64_t n) {
      const Vec<Acc> a = kd_shift(tv, max_t_v, inv_t_v);
      const Vec<Acc> b = kd_shift(sv, max_s_v, inv_s_v);
      const Vec<Acc> et = fk_exp(a), es = fk_exp(b);
      if (park) {
        if (n == W) store<S>(park_at, es);
        else store_tail<S>(park_at, es, n);
      }
      zs += es;
      zt += et;
      if constexpr (kSwap) d += kd_dot_term(es, b, a);
      else if constexpr (kKLType) d += kd_dot_term(et, a, b);
      if (z1_separate) z1 += fk_exp(sv - max_s_v);
      if constexpr (kKlDots) {
        if (dots) {  // P = the teacher (KL(p || q)) or the student (KL(q || p))
          Vec<Acc> pp, pd, po, oo;
          if constexpr (kSwap) kl_dot_terms(es, et, b, a, pp, pd, po, oo);
          else kl_dot_terms(et, es, a, b, pp, pd, po, oo);
          k4[0] += pp;
          k4[1] += pd;
          k4[2] += po;
          k4[3] += oo;
        }
      }
    };
    auto flush_dots = [&](const std::array<Vec<Acc>, 4>& k4) {
      kds.pp += lane_sum<Acc>(k4[0]);
      kds.pd += lane_sum<Acc>(k4[1]);
      kds.po += lane_sum<Acc>(k4[2]);
      kds.oo += lane_sum<Acc>(k4[3]);
    };
    for (int64_t blk = 0; blk < V2; blk += kSumBlock) {
      const int64_t blk_end = std::min(V2, blk + kSumBlock);
      Vec<Acc> zs0(0), zs1(0), zt0(0), zt1(0), d0(0), d1(0), z10(0), z11(0);
      std::array<Vec<Acc>, 4> k4;
      k4.fill(Vec<Acc>(Acc(0)));
      for (int64_t i = blk; i < blk_end; i += 2 * W) {
        sweep2(masked(load<Acc>(s + i), i), masked(load<Acc>(t + i), i), zs0, zt0, d0, z10, k4, gs + i, W);
        sweep2(masked(load<Acc>(s + i + W), i + W), masked(load<Acc>(t + i + W), i + W), zs1, zt1, d1, z11, k4,
               gs + i + W, W);
      }
      if (dots) flush_dots(k4);
      z_s += lane_sum<Acc>(zs0 + zs1);
      z_t += lane_sum<Acc>(zt0 + zt1);
      dot += lane_sum<Acc>(d0 + d1);
      z_1 += lane_sum<Acc>(z10 + z11);
    }
    for (int64_t i = V2; i < V; i += W) {
      const int64_t n = std::min(W, V - i);
      Vec<Acc> zs(0), zt(0), d(0), z1(0);
      std::array<Vec<Acc>, 4> k4;
      k4.fill(Vec<Acc>(Acc(0)));
      sweep2(masked(load_tail<Acc>(s + i, n), i), masked(load_tail<Acc>(t + i, n), i), zs, zt, d, z1, k4, gs + i, n);
      if (dots) flush_dots(k4);
      z_s += lane_sum<Acc>(zs);
      z_t += lane_sum<Acc>(zt);
      dot += lane_sum<Acc>(d);
      z_1 += lane_sum<Acc>(z1);
    }
    const double log_zs = std::log(z_s), log_zt = std::log(z_t);
    const Vec<Acc> log_zs_v(static_cast<Acc>(log_zs)), log_zt_v(static_cast<Acc>(log_zt));
    const Vec<Acc> inv_zs_v(static_cast<Acc>(1.0 / z_s)), inv_zt_v(static_cast<Acc>(1.0 / z_t));

    // Hard-label cross-entropy at temperature 1: log Z_1 + max_s - s_y.
    double log_z1 = 0.0;
    if (hard) {
      log_z1 = z1_separate ? std::log(z_1) : log_zs;
      row_hard[r] = static_cast<Acc>(rs.weight * (log_z1 + static_cast<double>(max_s) -
                                                 static_cast<double>(static_cast<Acc>(s[y]))));
    }

    // Sweep 3 (the Psi family): sums over the normalized distributions.
    double sum_psi_p = 0.0, sum_psi_q = 0.0, divergence = 0.0;
    double d_s = 0.0, d_t = 0.0;  // the row dots (row_options.h)
    // qq may come in already computed (q_given: from the parked e_s).
    auto entry_terms = [&](const Vec<Acc>& sv, const Vec<Acc>& tv, Vec<Acc>& lp, Vec<Acc>& lq, Vec<Acc>& pp,
                         Vec<Acc>& qq, Vec<Acc>& psi_p, Vec<Acc>& psi_q, Vec<Acc>& phi, bool q_given = false) {
      const Vec<Acc> a = kd_shift(tv, max_t_v, inv_t_v);
      lp = a - log_zt_v;
      lq = kd_shift(sv, max_s_v, inv_s_v) - log_zs_v;
      if (q_given) {
        pp = fk_exp(a) * inv_zt_v;  // the same form as q = e_s / Z_s: ties (p == q) stay exact
      } else {
        pp = fk_exp(lp);
        qq = fk_exp(lq);
      }
      if constexpr (kPsi) Trait::terms(lp, lq, pp, qq, p.div, psi_p, psi_q, phi);
    };
    // With only the student gradient asked for (full-precision dtype), psi_q is parked in the gradient row
    // so that sweep 4 needs one exponential instead of two and a logarithm.
    const bool park_psi = kPsi && park;
    if constexpr (kPsi) {
      // The entry's sums: phi, psi_p, psi_q, and with the row dots (N = 7) also log p psi_p, p log p,
      // log q psi_q, q log q.
      auto body = [&](auto n_sums, int64_t i, int64_t n) {
        constexpr size_t N = decltype(n_sums)::value;
        Vec<Acc> lp, lq, pp, qq, psi_p, psi_q, phi;
        const Vec<Acc> sv = n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n);
        const Vec<Acc> tv = n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n);
        if (park_psi) qq = (n == W ? load<Acc>(gs + i) : load_tail<Acc>(gs + i, n, Acc(0))) * inv_zs_v;
        entry_terms(sv, tv, lp, lq, pp, qq, psi_p, psi_q, phi, park_psi);
        if (park_psi) {
          if (n == W) store<S>(gs + i, psi_q);
          else store_tail<S>(gs + i, psi_q, n);
        }
        if constexpr (N == 3) {
          return std::array<Vec<Acc>, 3>{phi, psi_p, psi_q};
        } else {
          std::array<Vec<Acc>, 7> x{phi, psi_p, psi_q, phi, phi, phi, phi};
          psi_dot_terms(lp, pp, psi_p, x[3], x[4]);
          psi_dot_terms(lq, qq, psi_q, x[5], x[6]);
          return x;
        }
      };
      auto gather = [&](auto n_sums) {
        constexpr size_t N = decltype(n_sums)::value;
        auto sums = blocked_sums<Acc, N>(0, V1, [&](int64_t i) { return body(n_sums, i, W); });
        if (V1 < V) {
          const auto tail = body(n_sums, V1, V - V1);
          for (size_t k = 0; k < N; ++k) sums[k] += lane_sum<Acc>(tail[k]);
        }
        divergence = sums[0];
        sum_psi_p = sums[1];
        sum_psi_q = sums[2];
        if constexpr (N == 7) {
          d_t = psi_row_dot(sums[3], sum_psi_p, sums[4]);
          d_s = psi_row_dot(sums[5], sum_psi_q, sums[6]);
        }
      };
      if (dots) gather(std::integral_constant<size_t, 7>{});
      else gather(std::integral_constant<size_t, 3>{});
    }

    // The row's soft loss, and the scalars of its gradient.
    DkdRow dkd{};
    if constexpr (kDkd) {
      dkd = dkd_row(z_s, z_t, dot, kd_shift(static_cast<Acc>(s[y]), max_s, static_cast<Acc>(rs.inv_s)),
                    kd_shift(static_cast<Acc>(t[y]), max_t, static_cast<Acc>(rs.inv_t)));
      divergence = p.div.param[0] * dkd.tckd + p.div.param[1] * dkd.nckd;
      if (dots) dkd_row_dots(kds, dkd, z_s, z_t, dot, p.div.param[0], p.div.param[1], d_s, d_t);
    } else if constexpr (kKlDots) {
      divergence = kSwap ? kd_row_kl(z_t, z_s, dot) : kd_row_kl(z_s, z_t, dot);
      if (dots) {
        if constexpr (kSwap) kl_row_dots(kds, z_s, z_t, dot, d_s, d_t);
        else kl_row_dots(kds, z_t, z_s, dot, d_t, d_s);
      }
    }
    row_soft[r] = static_cast<Acc>(rs.weight * rs.loss_factor * divergence);
    if (p.row_grad_temperature) {
      p.row_grad_temperature[r] = row_grad_temperature(rs, p.scale_by_temperature, divergence, d_s, d_t);
    }
    if (!gs && !gt) continue;

    // Sweep 4: gradients.
    // The standardization's gradient term: k * (x - mean) on each side (0 without standardization).
    const Acc k_s = static_cast<Acc>(stdz ? rs.coef * standardize_grad_factor(st_s, d_s, V) : 0.0);
    const Acc k_t = static_cast<Acc>(stdz ? rs.coef * standardize_grad_factor(st_t, d_t, V) : 0.0);
    const Acc mean_s = static_cast<Acc>(st_s.mean), mean_t = static_cast<Acc>(st_t.mean);
    const Vec<Acc> k_s_v(k_s), k_t_v(k_t), mean_s_v(mean_s), mean_t_v(mean_t);
    if (park && !kPsi) {
      auto chunk = [&](int64_t i, int64_t n) {
        const Vec<Acc> a = kd_shift(n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n), max_t_v, inv_t_v);
        const Vec<Acc> es = n == W ? load<Acc>(gs + i) : load_tail<Acc>(gs + i, n);
        Vec<Acc> g = kd_grad_student_from_es(es, inv_zs_v, a, log_zt_v, coef_v);
        if (stdz) g = g + k_s_v * ((n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n)) - mean_s_v);
        if (n == W) store<S>(gs + i, g);
        else store_tail<S>(gs + i, g, n);
      };
      for (int64_t i = 0; i < V1; i += W) chunk(i, W);
      if (V1 < V) chunk(V1, V - V1);
      continue;
    }
    // Per-divergence coefficients: student c_q * q - c_p * p, teacher p * (c * (log p - log q) - k) (KL type).
    // (Student and teacher scalars differ when standardized: each side's own scale.)
    auto grad_scalars = [&](double c) {
      return kDkd ? dkd_grad_scalars(dkd, p.div.param[0], p.div.param[1], c) : kl_grad_scalars(c, divergence);
    };
    const KlGradScalars gk_s = grad_scalars(coef_s), gk_t = grad_scalars(coef_t);
    // the student's gradient takes c_q, c_p (c_t, k_t for KL(q || p), where the roles swap), the teacher the others
    const KlGradScalars& gk_q = kSwap ? gk_t : gk_s;
    const KlGradScalars& gk_p = kSwap ? gk_s : gk_t;
    const Vec<Acc> cq_v(static_cast<Acc>(gk_q.c_q)), cp_v(static_cast<Acc>(gk_q.c_p)), ct_v(static_cast<Acc>(gk_p.c_t)),
        kt_v(static_cast<Acc>(gk_p.k_t));
    // DKD's target entries (with the standardization's term)
    const Acc gs_y = kDkd ? static_cast<Acc>(gk_s.student_target) + k_s * (static_cast<Acc>(s[y]) - mean_s) : Acc(0);
    const Acc gt_y = kDkd ? static_cast<Acc>(gk_t.teacher_target) + k_t * (static_cast<Acc>(t[y]) - mean_t) : Acc(0);
    const Vec<Acc> sum_psi_p_v(static_cast<Acc>(sum_psi_p)), sum_psi_q_v(static_cast<Acc>(sum_psi_q));
    const Vec<Acc> log_z1_v(static_cast<Acc>(log_z1)), ce_coef_v(ce_coef);
    auto grad_chunk = [&](int64_t i, int64_t n) {
      const Vec<Acc> sv = n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n);
      auto load_t = [&] { return n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n); };
      Vec<Acc> g_s, g_t, tv;
      if constexpr (kPsi) {
        if (park_psi) {
          const Vec<Acc> qq = fk_exp(kd_shift(sv, max_s_v, inv_s_v) - log_zs_v);
          g_s = psi_grad(n == W ? load<Acc>(gs + i) : load_tail<Acc>(gs + i, n, Acc(0)), qq, sum_psi_q_v, coef_v);
        } else {
          Vec<Acc> lp, lq, pp, qq, psi_p, psi_q, phi;
          tv = load_t();
          entry_terms(sv, tv, lp, lq, pp, qq, psi_p, psi_q, phi);
          g_s = psi_grad(psi_q, qq, sum_psi_q_v, coef_v);
          g_t = psi_grad(psi_p, pp, sum_psi_p_v, coef_t_v);
        }
      } else {
        tv = load_t();
        const Vec<Acc> a = kd_shift(tv, max_t_v, inv_t_v);
        const Vec<Acc> b = kd_shift(sv, max_s_v, inv_s_v);
        if constexpr (kSwap) {  // KL(q || p): the roles of the two sides swap
          if (gs) g_s = kd_grad_teacher2(b, a, log_zs_v, log_zt_v, ct_v, kt_v);
          if (gt) g_t = kd_grad_student2(b, a, log_zs_v, log_zt_v, cq_v, cp_v);
        } else {
          if (gs) g_s = kd_grad_student2(a, b, log_zt_v, log_zs_v, cq_v, cp_v);
          if (gt) g_t = kd_grad_teacher2(a, b, log_zt_v, log_zs_v, ct_v, kt_v);
        }
      }
      if (stdz) {
        g_s = g_s + k_s_v * (sv - mean_s_v);
        if (gt) g_t = g_t + k_t_v * (tv - mean_t_v);
      }
      if (gs) {
        if (hard) g_s = g_s + ce_coef_v * fk_exp(sv - max_s_v - log_z1_v);
        if (in_chunk(y, i, n) && (hard || kDkd)) {
          store_fixed<S>(gs + i, g_s, n, y - i, [&](Acc g) {
            if constexpr (kDkd) g = gs_y;
            return hard ? g - ce_coef : g;
          });
        } else if (n == W) {
          store<S>(gs + i, g_s);
        } else {
          store_tail<S>(gs + i, g_s, n);
        }
      }
      if (gt) {
        if (kDkd && in_chunk(y, i, n)) store_fixed<T>(gt + i, g_t, n, y - i, [&](Acc) { return gt_y; });
        else if (n == W) store<T>(gt + i, g_t);
        else store_tail<T>(gt + i, g_t, n);
      }
    };
    for (int64_t i = 0; i < V1; i += W) grad_chunk(i, W);
    if (V1 < V) grad_chunk(V1, V - V1);
  }
}

// Runs response_rows<D> over every row, for the (student, teacher) dtypes of the call.
template <Divergence D>
void run_response_rows(const KdCall& c, double count) {
  const KdParams& p = c.p;
  // About 8k elements per task: enough to amortize a thread wake-up, small enough that vision-size
  // batches ([256, 100]) already use every thread.
  const int64_t grain = std::max<int64_t>(1, 8192 / p.vocab);
  kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { response_rows<D, S, T, Acc>(p, count, b, e); });
  });
}

// The rows of a KdCall, through the divergence registry.
void run_response(const KdCall& c, double count);

// fastkd::topk_kd_forward's rows (topk_cpu.cpp).
void run_topk_rows(const TopkCall& c, double count);

// Instantiated once per divergence, in kd_cpu.cpp (KL type, decoupled) and kd_cpu_psi.cpp (Psi family).
#define FASTKD_DIV_EXTERN(id, trait, family) extern template void run_response_rows<Divergence::id>(const KdCall&, double);
FASTKD_DIVERGENCES(FASTKD_DIV_EXTERN)
#undef FASTKD_DIV_EXTERN

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
