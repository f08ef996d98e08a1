// Per-row options of the response kernels, written once for the CPU and CUDA kernels: a temperature per row
// (and its exact gradient, for a learnable temperature: CTKD, AAAI 2023), a weight per row, and logit
// standardization (LSKD, CVPR 2024).
//
// With b = s * inv_s and a = t * inv_t (inv = 1 / T, or scale / T when standardized) a row's soft loss is
// L = f(T) div(a, b), f = T^2 or 1. Its temperature gradient needs only the two row dots
//   D_s = sum_j b_j d div / d b_j,   D_t = sum_j a_j d div / d a_j
// (shift-invariant: every divergence's gradient sums to 0 over the row), dL/dT = f'(T) div - f(T) / T (D_s + D_t),
// and the kernels get both from sums of the sweeps that precede the gradient sweep (kl_row_dots, dkd_row_dots,
// psi_row_dot), so that the standardization's own gradient term (standardize_grad_factor) is written in that same
// sweep.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/kd_math.h"
#include "fastkd/kd_params.h"

namespace fastkd {

// Mean, unbiased standard deviation and scale = 1 / (eps + std) (torchdistill LogitStdKDLoss: (z - mean) /
// (eps + std), eps 1e-7 by default) of a row of n >= 2 entries, from the sums of
// d = x - x0 and d^2 (x0: the row's first entry, which keeps the sums well conditioned).
struct RowStandardization {
  double mean = 0.0, std = 0.0, scale = 1.0;
};

FASTKD_HOST_DEVICE RowStandardization row_standardization(double x0, double sum_d, double sum_d2, int64_t n,
                                                          double eps) {
  RowStandardization r;
  const double mean_d = sum_d / static_cast<double>(n);
  const double var = (sum_d2 - sum_d * mean_d) / static_cast<double>(n - 1);
  r.mean = x0 + mean_d;
  r.std = ::sqrt(var < 0.0 ? 0.0 : var);  // rounding below 0 is 0; NaN stays NaN
  r.scale = 1.0 / (eps + r.std);
  return r;
}

// With z = (x - mean) * scale, d(row loss)/dx_k = coef * (inv * d div/d b_k + factor * (x_k - mean)), D the side's
// row dot and factor = -scale * D / ((n - 1) std) (the term through the std; the mean's term is 0, as the
// gradient sums to 0). A constant row (std 0) gets no such term (torch's autograd of std gives NaN there).
FASTKD_HOST_DEVICE double standardize_grad_factor(const RowStandardization& st, double d, int64_t n) {
  return st.std > 0.0 ? -st.scale * d / (static_cast<double>(n - 1) * st.std) : 0.0;
}

// What one row of the response kernels uses of the per-row options.
struct RowScalars {
  double temperature = 1.0;
  double inv_s = 1.0, inv_t = 1.0;  // logit multipliers of the student and the teacher: scale / T
  double loss_factor = 1.0;         // T^2 or 1
  double weight = 1.0;              // the row's weight
  double coef = 0.0;                // d(reduced loss) / d(row divergence)
  double ce_coef = 0.0;             // d(reduced loss) / d(row cross-entropy)
};

// The row's scalars; `count` is the divisor of the reduction, scale_s / scale_t the standardization scales
// (1 without). RowParams: KdParams or TopkParams (the top-k kernel uses the soft part's scalars).
template <class RowParams>
FASTKD_HOST_DEVICE RowScalars row_scalars(const RowParams& p, int64_t r, double count, double scale_s = 1.0,
                                          double scale_t = 1.0) {
  RowScalars rs;
  const double inv = p.row_temperature ? 1.0 / p.row_temperature[r] : p.inv_temperature;
  rs.temperature = p.row_temperature ? p.row_temperature[r] : 1.0 / p.inv_temperature;
  rs.inv_s = scale_s * inv;
  rs.inv_t = scale_t * inv;
  rs.loss_factor = !p.scale_by_temperature ? 1.0 : p.row_temperature ? rs.temperature * rs.temperature : p.loss_factor;
  rs.weight = p.row_weight ? p.row_weight[r] : 1.0;
  rs.coef = p.soft_weight * rs.loss_factor * rs.weight / kd_denominator(p.reduction, count, p.vocab);
  rs.ce_coef = p.hard ? p.hard_weight * rs.weight / ce_denominator(p.reduction, count) : 0.0;
  return rs;
}

// d(reduced loss) / d(row temperature) from the row's divergence and its two row dots.
FASTKD_HOST_DEVICE double row_grad_temperature(const RowScalars& rs, bool squared, double div, double d_s,
                                               double d_t) {
  const double base = rs.coef / rs.loss_factor;  // soft_weight * weight / denominator
  const double df = squared ? 2.0 * rs.temperature : 0.0;
  return base * (df * div - rs.loss_factor / rs.temperature * (d_s + d_t));
}

// The sums a KL-type row's dots come from. KL(P || O) (P the teacher, or the student for the reverse KL), with
// the shifted, scaled logits x_P, x_O and e = exp(x) of the statistics sweep:
//   pp = sum e_P x_P,  pd = sum e_P x_P (x_P - x_O),  po = sum e_P x_O,  oo = sum e_O x_O,
// and the sweep's own z_P, z_O and dot = sum e_P (x_P - x_O). Then
//   D_P = Cov_P(x_P, x_P - x_O) = pd / z_P - (pp / z_P)(dot / z_P),   D_O = E_O[x_O] - E_P[x_O] = oo / z_O - po / z_P.
struct KlDotSums {
  double pp = 0.0, pd = 0.0, po = 0.0, oo = 0.0;
};

FASTKD_HOST_DEVICE void kl_row_dots(const KlDotSums& k, double z_p, double z_o, double dot, double& d_p, double& d_o) {
  d_p = k.pd / z_p - (k.pp / z_p) * (dot / z_p);
  d_o = k.oo / z_o - k.po / z_p;
}

// A DKD row (kd_math.h dkd_row; gradients divergences.h dkd_grad_scalars), alpha TCKD + beta NCKD, whose sweeps
// gather the KL sums above over the non-target classes (P = the teacher's p^, O = the student's q^). With
// d div / d b_j = (beta + alpha (p_y - q_y)) q^_j - beta p^_j (j != y), alpha (q_y - p_y) at y, and
// d div / d a_j = beta p^_j (log p^_j - log q^_j - NCKD) - alpha h p^_j (j != y), alpha h at y (h = DkdRow::h):
//   D_s = beta (E_q^[b] - E_p^[b]) + alpha (p_y - q_y) (E_q^[b] - b_y),
//   D_t = beta Cov_p^(a, a - b) + alpha h (a_y - E_p^[a])
// (the NCKD parts are kl_row_dots'; a target term whose weight is 0 is 0, also where b_y or a_y is -inf).
FASTKD_HOST_DEVICE void dkd_row_dots(const KlDotSums& k, const DkdRow& r, double z_s, double z_t, double dot,
                                     double alpha, double beta, double& d_s, double& d_t) {
  double d_p = 0.0, d_o = 0.0;
  kl_row_dots(k, z_t, z_s, dot, d_p, d_o);
  const double dq = r.p_y - r.q_y;
  d_s = beta * d_o + fk_select_nonzero(dq, alpha * dq * (k.oo / z_s - r.b_y));
  d_t = beta * d_p + fk_select_nonzero(r.h, alpha * r.h * (r.a_y - k.pp / z_t));
}

// The entry terms of those sums (a term whose weight e is 0 is 0, also where x is -inf).
template <typename X>
FASTKD_HOST_DEVICE void kl_dot_terms(X e_p, X e_o, X x_p, X x_o, X& pp, X& pd, X& po, X& oo) {
  pp = fk_select_nonzero(e_p, e_p * x_p);
  pd = fk_select_nonzero(e_p, e_p * x_p * (x_p - x_o));
  po = fk_select_nonzero(e_p, e_p * x_o);
  oo = fk_select_nonzero(e_o, e_o * x_o);
}

// A Psi-family row (d div / d x_j = psi_j - w_j sum psi, w = q or p): D = sum x psi - (sum psi)(sum w x), from the
// sweep's sums with x = log w (log q or log p: any shift of x gives the same D).
FASTKD_HOST_DEVICE double psi_row_dot(double sum_x_psi, double sum_psi, double sum_w_x) {
  return sum_x_psi - sum_psi * sum_w_x;
}

// ---- the top-k teacher's row (kd_math.h: TopkTeacher, TopkStudent) ----
// D = sum_k p_k (log p_k - log q_k) [+ p_tail (log p_tail - log q_tail)] over the kept entries K (and the tail
// bucket), q = softmax(b) over the whole row. With the student's shifted logits b (any shift: the gradient sums to
// 0 over the row), d D / d b_j = q_j - p_j on K and q_j (1 - p_tail / q_tail) outside K (q_j without a bucket), so
//   D_s = sum_j b_j dD/db_j = w_ref * sum_ref e b / z_ref + [bucket] sum_K q_k b_k - sum_K p_k b_k,
// where `ref` is the student's reference set (the entries outside K with a bucket, every entry without one),
// z_ref = sum_ref e, e = exp(b), and w_ref = q_tail - p_tail with a bucket, 1 without. The teacher depends on T only
// through logits (values_are_logprobs: D_t = 0): a = v / T, p = softmax over K, dD/da_k = p_k (x_k - D) with
// x = log p - log q, so D_t = Cov_p(a, x) = sum_K p_k log p_k x_k - (sum_K p_k log p_k) D (a = log p + a constant).
struct TopkDotSums {
  double ref_eb = 0.0;  // sum_ref e_j b_j
  double qb = 0.0;      // sum_K q_k b_k
  double pb = 0.0;      // sum_K p_k b_k
  double pl = 0.0;      // sum_K p_k log p_k
  double plx = 0.0;     // sum_K p_k log p_k (log p_k - log q_k)
};

// The kept entry k's terms of those sums, from log p_k, b_k and log q_k = b_k - log Z_s (a term whose weight
// p_k or q_k is 0 is 0, also where b_k or log p_k is -inf).
FASTKD_HOST_DEVICE void topk_dot_terms(double log_p, double b, double log_q, TopkDotSums& k) {
  const double p = ::exp(log_p), q = ::exp(log_q);
  k.qb += fk_select_nonzero(q, q * b);
  k.pb += fk_select_nonzero(p, p * b);
  k.pl += fk_select_nonzero(p, p * log_p);
  k.plx += fk_select_nonzero(p, p * log_p * (log_p - log_q));
}

// The row's two dots. `div`: the row's D (the tail term included); z_ref as above (an empty reference set, z_ref
// 0, has no mass there and adds nothing, as its dense gradient is 0).
FASTKD_HOST_DEVICE void topk_row_dots(const TopkDotSums& k, double z_ref, const TopkTeacher& tt, const TopkStudent& st,
                                      bool bucket, bool logprobs, double div, double& d_s, double& d_t) {
  const double w_ref = bucket ? ::exp(st.log_q_tail) - tt.p_tail : 1.0;
  d_s = (z_ref > 0.0 ? w_ref * (k.ref_eb / z_ref) : 0.0) + (bucket ? k.qb : 0.0) - k.pb;
  d_t = logprobs ? 0.0 : k.plx - k.pl * div;
}

// Entry terms of a Psi row's dot sums: x psi and w x, 0 where the weight is 0.
template <typename X>
FASTKD_HOST_DEVICE void psi_dot_terms(X x, X w, X psi, X& x_psi, X& w_x) {
  x_psi = fk_select_nonzero(psi, x * psi);
  w_x = fk_select_nonzero(w, w * x);
}

}  // namespace fastkd
