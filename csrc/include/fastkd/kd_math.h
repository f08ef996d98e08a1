// Hinton knowledge-distillation math, written once for every device.
//
// Notation (one row of logits, temperature T):
//   a_j = (t_j - max_t) / T,  b_j = (s_j - max_s) / T          shifted, scaled logits
//   e_t = exp(a_j), e_s = exp(b_j)                              unnormalized softmax terms
//   Z_t = sum e_t, Z_s = sum e_s
//   p_j = e_t / Z_t  (teacher),   q_j = e_s / Z_s  (student)
//   KL(p || q) = sum_j p_j (log p_j - log q_j)
//              = (sum_j e_t (a_j - b_j)) / Z_t - log Z_t + log Z_s
// Computing from the shifted values keeps the subtraction a_j - b_j well conditioned even for
// |logits| ~ 1e4, and entries where the teacher has zero probability (masked -inf logits, or
// underflow) contribute exactly 0, never 0 * inf = NaN.
//
// Rules every kernel follows (the Python reference follows the same ones):
//   * a weight that is exactly 0 drops its term (fk_select_nonzero); a NaN weight does not, so a NaN or
//     +inf logit (which makes the row's maximum or shift NaN) makes the row's loss NaN;
//   * a row that is -inf in every entry of both sides (fully masked) contributes exactly 0 with a zero
//     gradient (kd_row_empty); a row that is -inf everywhere on one side only has no distribution: NaN.
//
// The functions are templates over the value type X so that the CPU kernels instantiate them with
// at::vec::Vectorized<float/double> and the CUDA kernels (and the CPU tails) with float/double.
// For vector types, the helpers fk_exp / fk_select_nonzero / fk_select_positive below are overloaded in the
// CPU kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/macros.h"

namespace fastkd {

// ---- scalar primitives (vector overloads live next to the vectorized kernels) ----
FASTKD_HOST_DEVICE float fk_exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
FASTKD_HOST_DEVICE double fk_exp(double x) { return ::exp(x); }
FASTKD_HOST_DEVICE float fk_log(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return std::log(x);
#endif
}
FASTKD_HOST_DEVICE double fk_log(double x) { return ::log(x); }
// log(x) for the probability-like x of the JSD terms (0 < x <= 1 where it matters). The CPU overload for
// float vectors is a range-reduced polynomial that is exact to about an ulp for normal x and returns a
// finite value for 0 and denormals (callers drop those lanes); scalars use the library log.
FASTKD_HOST_DEVICE float fk_log_prob(float x) { return fk_log(x); }
FASTKD_HOST_DEVICE double fk_log_prob(double x) { return fk_log(x); }
// `cond != 0 ? value : 0`: a term whose weight `cond` is exactly 0 contributes 0 even where `value` is
// NaN (0 * log 0); a NaN weight keeps its (NaN) value, so NaN propagates instead of being dropped.
FASTKD_HOST_DEVICE float fk_select_nonzero(float cond, float value) { return cond != 0.f ? value : 0.f; }
FASTKD_HOST_DEVICE double fk_select_nonzero(double cond, double value) { return cond != 0.0 ? value : 0.0; }
// expm1(x) = exp(x) - 1 without cancellation near 0.
FASTKD_HOST_DEVICE float fk_expm1(float x) {
#if defined(__CUDA_ARCH__)
  return ::expm1f(x);
#else
  return std::expm1(x);
#endif
}
FASTKD_HOST_DEVICE double fk_expm1(double x) { return ::expm1(x); }
// `cond == 0 ? if_zero : otherwise` and `x is finite ? if_finite : otherwise` (NaN is neither zero nor
// finite), for the branches of a divergence's per-entry terms.
FASTKD_HOST_DEVICE float fk_where_zero(float cond, float if_zero, float otherwise) {
  return cond == 0.f ? if_zero : otherwise;
}
FASTKD_HOST_DEVICE double fk_where_zero(double cond, double if_zero, double otherwise) {
  return cond == 0.0 ? if_zero : otherwise;
}
FASTKD_HOST_DEVICE float fk_where_nan(float x, float if_nan, float otherwise) { return x != x ? if_nan : otherwise; }
FASTKD_HOST_DEVICE double fk_where_nan(double x, double if_nan, double otherwise) {
  return x != x ? if_nan : otherwise;
}
// `|x| <= bound ? if_small : otherwise` (NaN is not small).
FASTKD_HOST_DEVICE float fk_where_small(float x, float bound, float if_small, float otherwise) {
  return (x <= bound && x >= -bound) ? if_small : otherwise;
}
FASTKD_HOST_DEVICE double fk_where_small(double x, double bound, double if_small, double otherwise) {
  return (x <= bound && x >= -bound) ? if_small : otherwise;
}
FASTKD_HOST_DEVICE float fk_where_finite(float x, float if_finite, float otherwise) {
  return x - x == 0.f ? if_finite : otherwise;
}
FASTKD_HOST_DEVICE double fk_where_finite(double x, double if_finite, double otherwise) {
  return x - x == 0.0 ? if_finite : otherwise;
}
// `cond > 0 ? value : 0` (a sign test: NaN gives 0).
FASTKD_HOST_DEVICE float fk_select_positive(float cond, float value) { return cond > 0.f ? value : 0.f; }
FASTKD_HOST_DEVICE double fk_select_positive(double cond, double value) { return cond > 0.0 ? value : 0.0; }

// Maximum that propagates NaN (so a NaN logit poisons its row, as in eager PyTorch).
template <typename A>
FASTKD_HOST_DEVICE A kd_nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// The origin a row's logits are shifted by: its maximum, or 0 when the maximum is -inf (every entry -inf:
// then every shifted entry is -inf and has no mass, instead of -inf - (-inf) = NaN).
template <typename A>
FASTKD_HOST_DEVICE A kd_origin(A row_max) {
  return row_max == -static_cast<A>(INFINITY) ? A(0) : row_max;
}

// Whether a row is fully masked: -inf in every entry of both sides (both maxima -inf). It contributes 0.
template <typename A>
FASTKD_HOST_DEVICE bool kd_row_empty(A max_s, A max_t) {
  return max_s == -static_cast<A>(INFINITY) && max_t == -static_cast<A>(INFINITY);
}

// ---- per-element terms ----

// Shifted, temperature-scaled logit: (x - row_max) / T.
template <typename X>
FASTKD_HOST_DEVICE X kd_shift(X x, X row_max, X inv_temperature) {
  return (x - row_max) * inv_temperature;
}

// Contribution of one vocabulary entry to sum_j e_t (a_j - b_j): zero where the teacher has no mass.
template <typename X>
FASTKD_HOST_DEVICE X kd_dot_term(X e_t, X a, X b) {
  return fk_select_nonzero(e_t, e_t * (a - b));
}

// Student gradient of a KL-type row from its two distributions: c_q * q_j - c_p * p_j, with
// log q_j = b - log Z_s and log p_j = a - log Z_t. Hinton KD: c_q = c_p = coef (coef * (q_j - p_j)).
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_student2(X a, X b, X log_zt, X log_zs, X c_q, X c_p) {
  return c_q * fk_exp(b - log_zs) - c_p * fk_exp(a - log_zt);
}

template <typename X>
FASTKD_HOST_DEVICE X kd_grad_student(X a, X b, X log_zt, X log_zs, X coef) {
  return kd_grad_student2(a, b, log_zt, log_zs, coef, coef);
}

// The same from e_s = exp(b) already at hand: coef * (e_s / Z_s - p_j).
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_student_from_es(X e_s, X inv_zs, X a, X log_zt, X coef) {
  return coef * (e_s * inv_zs - fk_exp(a - log_zt));
}

// Teacher gradient of a KL-type row: p_j * (c * (log p_j - log q_j) - k); zero where p_j is 0.
// Hinton KD: c = coef, k = coef * KL, i.e. coef * p_j * (log p_j - log q_j - KL).
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_teacher2(X a, X b, X log_zt, X log_zs, X c, X k) {
  const X log_p = a - log_zt;
  const X p = fk_exp(log_p);
  return fk_select_nonzero(p, p * (c * (log_p - (b - log_zs)) - k));
}

template <typename X>
FASTKD_HOST_DEVICE X kd_grad_teacher(X a, X b, X log_zt, X log_zs, X kl, X coef) {
  return kd_grad_teacher2(a, b, log_zt, log_zs, coef, coef * kl);
}

// ---- divergences of the form sum_j phi(p_j, q_j) (the Psi family of divergences.h) ----
//
// A row loss of the form L = sum_j phi(p_j, q_j) has, through the softmaxes, the gradients
//   dL/db_j = psi_q(j) - q_j * sum_k psi_q(k),   psi_q = q * dphi/dq
//   dL/da_j = psi_p(j) - p_j * sum_k psi_p(k),   psi_p = p * dphi/dp
// so one sweep gathers sum phi, sum psi_q, sum psi_p and the next writes the gradients.
// Gradient of such a row: c * (psi(j) - w_j * sum_psi), w = q (student) or p (teacher).
template <typename X>
FASTKD_HOST_DEVICE X psi_grad(X psi, X w, X sum_psi, X c) {
  return c * (psi - w * sum_psi);
}

// ---- per-row results ----

// KL(p || q) of one row from its three sums.
template <typename A>
FASTKD_HOST_DEVICE A kd_row_kl(A z_s, A z_t, A dot) {
  return dot / z_t - fk_log(z_t) + fk_log(z_s);
}

// Reductions, in the order of the schema string values.
enum class Reduction : int32_t { None = 0, Sum = 1, Mean = 2, BatchMean = 3 };

// log(exp(x) + exp(y)) for row-level scalars; -inf when both are -inf.
FASTKD_HOST_DEVICE double kd_logaddexp(double x, double y) {
  const double m = x > y ? x : y;
  if (m == -INFINITY) return m;
  return m + ::log1p(::exp(-(x > y ? x - y : y - x)));
}

// Number that the summed soft (divergence) row losses are divided by; the gradient carries the same
// factor. `count` is the number of counted rows, or the user's num_items_in_batch.
FASTKD_HOST_DEVICE double kd_denominator(Reduction reduction, double count, int64_t vocab) {
  double d = 1.0;
  if (reduction == Reduction::BatchMean) d = count;
  if (reduction == Reduction::Mean) d = count * static_cast<double>(vocab);
  return d > 0.0 ? d : 1.0;  // all rows ignored (or none): loss 0, gradient 0, never NaN
}

// The same for the hard-label cross-entropy: 'mean' is per counted row (nn.CrossEntropyLoss 'mean').
FASTKD_HOST_DEVICE double ce_denominator(Reduction reduction, double count) {
  const double d = (reduction == Reduction::BatchMean || reduction == Reduction::Mean) ? count : 1.0;
  return d > 0.0 ? d : 1.0;
}

// Whether a row takes part in the loss (labels may be absent).
FASTKD_HOST_DEVICE bool kd_row_counted(const int64_t* labels, int64_t row, int64_t ignore_index) {
  return labels == nullptr || labels[row] != ignore_index;
}

// ---- per-row scalars of decoupled KD (DKD), from log-sum-exps only ----
//
// Sweeps give, over the non-target classes j != y, the maxima m_s, m_t of the raw logits and, with the
// logit multipliers inv_s, inv_t (1 / T, or scale / T when standardized: row_options.h),
// a_j = (t_j - m_t) inv_t and b_j = (s_j - m_s) inv_s, Z_s = sum e^b, Z_t = sum e^a and dot = sum e^a (a - b);
// b_y, a_y are the target's shifted logits in the same coordinates. Then (LSE = log-sum-exp, shifted)
//   LSE_s = logaddexp(log Z_s, b_y),  log q_y = b_y - LSE_s,  log(1 - q_y) = log Z_s - LSE_s   (likewise p)
//   TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y]),  NCKD = KL(p^ || q^) = dot / Z_t - log Z_t + log Z_s
// with no log of a probability and no cancellation: finite for any finite logits.
struct DkdRow {
  double tckd, nckd;
  double p_y, q_y;        // target probabilities
  double g;               // d TCKD / d logit(p_y) = log(p_y / q_y) - log((1 - p_y) / (1 - q_y))
  double h;               // g p_y (1 - p_y) = d TCKD / d a_y (0 where p_y (1 - p_y) is 0)
  double log_zs, log_zt;  // log of the non-target sums (shifted by the non-target maxima)
  double b_y, a_y;        // the target's shifted logits
};

FASTKD_HOST_DEVICE DkdRow dkd_row(double z_s, double z_t, double dot, double b_y, double a_y) {
  DkdRow r;
  r.log_zs = ::log(z_s);
  r.log_zt = ::log(z_t);
  r.b_y = b_y;
  r.a_y = a_y;
  const double lse_s = kd_logaddexp(r.log_zs, b_y), lse_t = kd_logaddexp(r.log_zt, a_y);
  const double lqy = b_y - lse_s, lqn = r.log_zs - lse_s;
  const double lpy = a_y - lse_t, lpn = r.log_zt - lse_t;
  r.p_y = ::exp(lpy);
  r.q_y = ::exp(lqy);
  const double p_n = ::exp(lpn);  // 1 - p_y, without the cancellation where p_y is near 1
  r.tckd = fk_select_nonzero(r.p_y, r.p_y * (lpy - lqy)) + fk_select_nonzero(p_n, p_n * (lpn - lqn));
  r.nckd = dot / z_t - r.log_zt + r.log_zs;
  r.g = (lpy - lqy) - (lpn - lqn);
  const double w = r.p_y * p_n;
  r.h = fk_select_nonzero(w, r.g * w);
  return r;
}

// ---- per-row scalars of the sparse (top-k) teacher ----
// The teacher's kept log-probabilities: log p_k = (v_k - max_v) / T - log Z_v for logits, or, for
// log-probabilities used as given, v_k - LSE(v) (renormalize) or v_k itself (tail bucket, where
// p_tail = 1 - sum exp(v_k) = -expm1(LSE(v)) keeps its own bucket).
struct TopkTeacher {
  double shift;     // log p_k = v_k * scale - shift
  double scale;     // 1 / T for logits, 1 for log-probabilities
  double log_tail;  // log p_tail (bucket), -inf when no tail bucket or no missing mass
  double p_tail;
};

// origin_v = kd_origin(max of the values), z_v = sum_k exp((v_k - origin_v) * scale). NaN values propagate.
FASTKD_HOST_DEVICE TopkTeacher topk_teacher(double origin_v, double z_v, bool logprobs, bool bucket, double inv_t) {
  TopkTeacher r;
  r.scale = logprobs ? 1.0 : inv_t;
  const double lse = origin_v * r.scale + ::log(z_v);  // LSE(v * scale); -inf when every value is -inf
  r.p_tail = 0.0;
  r.log_tail = -INFINITY;
  if (bucket) {
    // The values already are log-probabilities; if they sum past 1 (rounding in a cached low-precision
    // teacher) they are renormalized and the tail is empty. (`lse <= 0` is false for NaN: it propagates.)
    r.shift = lse <= 0.0 ? 0.0 : lse;
    if (lse < 0.0) {
      r.p_tail = -::expm1(lse);
      r.log_tail = ::log(r.p_tail);
    }
  } else {
    r.shift = lse;
  }
  return r;
}

FASTKD_HOST_DEVICE double topk_log_p(const TopkTeacher& tt, double v) { return v * tt.scale - tt.shift; }

// The student's side of a top-k row. Its logits are shifted by `origin`, the maximum over a reference set:
// the entries outside the kept set with a tail bucket, else every entry; log_z_ref = log sum_ref
// exp((s_j - origin) / T) (>= 0 unless the set is all -inf) and, with a bucket, lse_kept = log sum_k
// exp(b_k), b_k = (s_k - origin) / T. Everything is in log space: the tail mass q_tail may be far below the
// floating-point range (a logit gap of 100 at T = 1) without turning the loss into inf - inf.
struct TopkStudent {
  double log_zs;      // log Z_s in the shifted coordinates: log q_j = (s_j - origin) / T - log_zs
  double log_q_tail;  // log of the student's mass outside the kept set (bucket only)
  double dense;       // d loss / d b_j = c * dense * exp((s_j - origin) / T) for j outside the kept set
};

FASTKD_HOST_DEVICE TopkStudent topk_student(double log_z_ref, double lse_kept, bool bucket, double p_tail) {
  TopkStudent r;
  r.log_zs = bucket ? kd_logaddexp(log_z_ref, lse_kept) : log_z_ref;
  r.log_q_tail = bucket ? log_z_ref - r.log_zs : 0.0;
  // q_j - p_tail * q_j / q_tail = e_j * (1 / Z_s - p_tail / z_ref). An empty reference set (all -inf) has
  // e_j = 0 everywhere: its dense gradient is 0 (not 0 * inf).
  if (log_z_ref == -INFINITY) r.dense = 0.0;
  else r.dense = ::exp(-r.log_zs) - (bucket ? p_tail * ::exp(-log_z_ref) : 0.0);
  return r;
}

// A kept entry's loss term p_k (log p_k - log q_k) (0 where p_k is 0) and gradient c (q_k - p_k).
FASTKD_HOST_DEVICE double topk_kept_term(double log_p, double log_q) {
  const double p = ::exp(log_p);
  return fk_select_nonzero(p, p * (log_p - log_q));
}
FASTKD_HOST_DEVICE double topk_kept_grad(double c, double log_p, double log_q) {
  return c * (::exp(log_q) - ::exp(log_p));
}
// The tail bucket's term p_tail (log p_tail - log q_tail); 0 without a tail.
FASTKD_HOST_DEVICE double topk_tail_term(const TopkTeacher& tt, const TopkStudent& st) {
  return fk_select_nonzero(tt.p_tail, tt.p_tail * (tt.log_tail - st.log_q_tail));
}

}  // namespace fastkd
