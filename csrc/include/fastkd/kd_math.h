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
// The functions are templates over the value type X so that the CPU kernels instantiate them with
// at::vec::Vectorized<float/double> and the CUDA kernels (and the CPU tails) with float/double.
// For vector types, the helpers fk_exp / fk_select_positive below are overloaded in the CPU kernel.
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
// `cond > 0 ? value : 0`, written so that a NaN `value` is dropped when cond is 0.
FASTKD_HOST_DEVICE float fk_select_positive(float cond, float value) { return cond > 0.f ? value : 0.f; }
FASTKD_HOST_DEVICE double fk_select_positive(double cond, double value) { return cond > 0.0 ? value : 0.0; }

// Maximum that propagates NaN (so a NaN logit poisons its row, as in eager PyTorch).
template <typename A>
FASTKD_HOST_DEVICE A kd_nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
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
  return fk_select_positive(e_t, e_t * (a - b));
}

// d loss / d s_j for one entry, given log q_j = b - log Z_s and log p_j = a - log Z_t:
//   coef * (q_j - p_j), coef = (T^2 if scaled else 1) / T * reduction scale.
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_student(X a, X b, X log_zt, X log_zs, X coef) {
  return coef * (fk_exp(b - log_zs) - fk_exp(a - log_zt));
}

// The same from e_s = exp(b) already at hand: coef * (e_s / Z_s - p_j).
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_student_from_es(X e_s, X inv_zs, X a, X log_zt, X coef) {
  return coef * (e_s * inv_zs - fk_exp(a - log_zt));
}

// d loss / d t_j for one entry: coef * p_j * (log p_j - log q_j - KL); zero where p_j is 0.
template <typename X>
FASTKD_HOST_DEVICE X kd_grad_teacher(X a, X b, X log_zt, X log_zs, X kl, X coef) {
  const X log_p = a - log_zt;
  const X p = fk_exp(log_p);
  return fk_select_positive(p, coef * p * (log_p - (b - log_zs) - kl));
}

// ---- per-row results ----

// KL(p || q) of one row from its three sums.
template <typename A>
FASTKD_HOST_DEVICE A kd_row_kl(A z_s, A z_t, A dot) {
  return dot / z_t - fk_log(z_t) + fk_log(z_s);
}

// Reductions, in the order of the schema string values.
enum class Reduction : int32_t { None = 0, Sum = 1, Mean = 2, BatchMean = 3 };

// Scalars every kernel needs to turn a row's KL into its loss and gradient.
struct KdScalars {
  double inv_temperature;  // 1 / T
  double loss_factor;      // T^2 when scale_by_temperature, else 1
};

// Number that the summed row losses are divided by (the gradient carries the same factor).
FASTKD_HOST_DEVICE double kd_denominator(Reduction reduction, int64_t counted_rows, int64_t vocab) {
  double d = 1.0;
  if (reduction == Reduction::BatchMean) d = static_cast<double>(counted_rows);
  if (reduction == Reduction::Mean) d = static_cast<double>(counted_rows) * static_cast<double>(vocab);
  return d > 0.0 ? d : 1.0;  // all rows ignored (or none): loss 0, gradient 0, never NaN
}

// Whether a row takes part in the loss (labels may be absent).
FASTKD_HOST_DEVICE bool kd_row_counted(const int64_t* labels, int64_t row, int64_t ignore_index) {
  return labels == nullptr || labels[row] != ignore_index;
}

}  // namespace fastkd
