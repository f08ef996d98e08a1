// Cosine distillation math (Liger-Kernel's LigerFusedLinearCosineSimilarityLoss), written once for every device.
//
// One row of raw logits s (student), t (teacher), vocabulary V:
//   cos(s, t) = <s, t> / (max(||s||, eps) * max(||t||, eps))          (torch.nn.functional.cosine_similarity)
//   row value = 1 - cos(s, t)                                          (the loss weights it by beta)
// from three sums of one sweep, S_st = <s, t>, S_ss = ||s||^2, S_tt = ||t||^2. The gradients, in a second sweep:
//   d(1 - cos)/ds_j = -t_j / (Ns Nt) + [||s|| >= eps] cos * s_j / S_ss      (Ns = max(||s||, eps), Nt likewise)
//   d(1 - cos)/dt_j = -s_j / (Ns Nt) + [||t|| >= eps] cos * t_j / S_tt
// i.e. g_s = cross * t + self_s * s and g_t = cross * s + self_t * t with per-row coefficients (CosineRow).
// Optional hard-label cross-entropy of the student at temperature 1: lse(s) - s_y, gradient softmax(s) - onehot(y).
//
// Special values (the rules of every fastkd response loss):
//   * an entry that is -inf in both student and teacher (a masked / padded token) is left out of the vectors: it
//     adds nothing to the sums and gets a zero gradient (cosine_drop_masked);
//   * a row whose every entry is -inf on both sides (fully masked) contributes exactly 0, gradient 0;
//   * NaN, +inf, or -inf on one side only make the row's value NaN (inf / inf), never a finite number.
// The per-row scalars are computed in double from sums accumulated in float32 blocks flushed into double (CPU) or
// reduced in double (CUDA); the per-entry terms in the accumulation type (float32, or float64 for float64 input).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/macros.h"

namespace fastkd {

// Per-row result and gradient coefficients of 1 - cos (unweighted: the caller multiplies by beta / divisor).
struct CosineRow {
  double value;   // 1 - cos(s, t); 0 for a fully masked row
  double cross;   // coefficient of the other side's entry in both gradients: -1 / (Ns Nt)
  double self_s;  // coefficient of s_j in d/ds: cos / S_ss (0 when ||s|| < eps: the clamp's derivative is 0)
  double self_t;  // coefficient of t_j in d/dt
};

// max(n, eps) with NaN kept (a NaN norm is not < eps).
FASTKD_HOST_DEVICE double cosine_clamp_norm(double n, double eps) { return n < eps ? eps : n; }

// The row's value and coefficients from its sums; `live` = number of entries not -inf on both sides.
FASTKD_HOST_DEVICE CosineRow cosine_row(double st, double ss, double tt, double live, double eps) {
  CosineRow r{0.0, 0.0, 0.0, 0.0};
  if (live == 0.0) return r;  // fully masked row: no vectors, contributes 0
  const double ns = ::sqrt(ss), nt = ::sqrt(tt);
  const double inv = 1.0 / (cosine_clamp_norm(ns, eps) * cosine_clamp_norm(nt, eps));
  const double c = st * inv;
  r.value = 1.0 - c;
  r.cross = -inv;
  r.self_s = ns < eps ? 0.0 : c / ss;
  r.self_t = nt < eps ? 0.0 : c / tt;
  return r;
}

// Scalar form of the entry mask: both sides -inf -> both read as 0 (left out of the sums and of the gradients).
// The CPU kernel overloads it for at::vec::Vectorized (cosine_cpu.cpp).
template <typename A>
FASTKD_HOST_DEVICE bool cosine_drop_masked(A& s, A& t) {
  const bool masked = s == -INFINITY && t == -INFINITY;
  if (masked) {
    s = A(0);
    t = A(0);
  }
  return masked;
}

// The hard-label cross-entropy of one row from its maximum and sum of exp(s - max): lse - s_y.
FASTKD_HOST_DEVICE double cosine_ce_value(double max_s, double sum_exp, double s_y) {
  return max_s + ::log(sum_exp) - s_y;
}

}  // namespace fastkd
