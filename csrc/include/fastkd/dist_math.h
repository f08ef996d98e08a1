// DIST ("Knowledge Distillation from A Stronger Teacher", Huang et al., NeurIPS 2022) math, written once for
// the CPU and CUDA kernels.
//
// Notation: student / teacher logits z_s, z_t [N, C]; y = softmax(z / tau) per row (ys, yt).
//   a_ij = ys_ij - 1/C,  b_ij = yt_ij - 1/C     (a row of a softmax has mean exactly 1/C, so a and b are the
//                                                rows centered as torchdistill centers them)
// Rows (inter-class relation), per row i, from the sums sab = sum_j a b, saa = sum_j a^2, sbb = sum_j b^2:
//   rho_i = sab / (A B),  A = max(sqrt(saa), eps),  B = max(sqrt(sbb), eps)
// which is exactly how torch.nn.functional.cosine_similarity applies eps (torch 2.x, checked in 2.14: each norm
// is clamped at eps on its own; the backward differentiates the norm as ||x||, i.e. d||x||/dx = x / ||x||, even
// where the clamp is active, and 0 for a zero vector).
// Columns (intra-class relation), per class j, centered over the batch: alpha_ij = ys_ij - mys_j, beta_ij = yt_ij -
// myt_j (column means); from the float64 column sums of x = ys_ij - ys_0j and w = yt_ij - yt_0j (shifted by row
// 0's entry, so that the one-pass variance does not cancel catastrophically in a column whose values are all
// far from 0 relative to their spread, e.g. a class the softmax gives ~1e-13 everywhere): cx = sum_i x, cw,
// cxx, cww, cxw:  Sxx = cxx - cx^2 / N, Sww = cww - cw^2 / N, Sxw = cxw - cx cw / N,  kappa_j = Sxw / (A' B').
// The gradient sweep forms alpha and beta from y directly (y - 1/C would lose a tiny y's digits).
//   L = tau^2 (beta (1 - mean_i rho_i) + gamma (1 - mean_j kappa_j))
//
// Gradient. For cos = <x, w> / (X W): dcos/dx = u w - v x with u = 1 / (X W), v = <x, w> / (X^2 W ||x||)
// (v = 0 for ||x|| = 0), dcos/dw = u x - w' w with w' = <x, w> / (X W^2 ||w||). The centering backward is the
// identity here (the centered vectors already sum to 0 and u w - v x does too), so with
//   ru = beta u_i / N, rv = beta v_i / N, rw = beta w_i / N    (per row)
//   cu = gamma u'_j / C, cv = gamma v'_j / C, cw = gamma w'_j / C  (per column)
//   Gs_ij = ru b - rv a + cu beta_ij - cv alpha_ij  (= -dL/dys_ij / tau^2)
//   Gt_ij = ru a - rw b + cu alpha_ij - cw beta_ij  (= -dL/dyt_ij / tau^2)
// (a, b centered by 1/C, alpha, beta by the column means) and the softmax backward dL/dz = (1/tau) y (dL/dy - sum_k y_k dL/dy_k):
//   dL/dzs_ij = -tau ys_ij (Gs_ij - Ss_i),  Ss_i = sum_k ys_ik Gs_ik   (teacher alike).
// Ss_i needs the column coefficients, known only once every row's column sums are in: the gradient sweep
// forms ys * Gs and Ss in one pass over the row and subtracts ys * Ss in a second one (from cache).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/macros.h"

namespace fastkd {

// The eps-clamped norm of a vector from its sum of squares (negative rounding residue of a one-pass
// variance read as 0).
FASTKD_HOST_DEVICE double dist_norm(double sum_sq) { return sum_sq > 0.0 ? sqrt(sum_sq) : 0.0; }

// Coefficients of one cosine similarity (a row of the batch, or a column): value and the derivative factors.
struct DistCos {
  double cos;  // <x, w> / (X W)
  double u;    // 1 / (X W)
  double v;    // <x, w> / (X^2 W ||x||), 0 when ||x|| = 0
  double w;    // <x, w> / (X W^2 ||w||), 0 when ||w|| = 0
};

FASTKD_HOST_DEVICE DistCos dist_cos(double sxw, double sxx, double sww, double eps) {
  const double nx = dist_norm(sxx), nw = dist_norm(sww);
  // max(norm, eps) as torch's clamp_min: a NaN norm stays NaN
  const double X = (nx >= eps || nx != nx) ? nx : eps, W = (nw >= eps || nw != nw) ? nw : eps;
  DistCos c;
  c.u = 1.0 / (X * W);
  c.cos = sxw * c.u;
  c.v = nx > 0.0 ? c.cos / (X * nx) : 0.0;
  c.w = nw > 0.0 ? c.cos / (W * nw) : 0.0;
  return c;
}

// a * b rounded on its own, never fused into a following add (the compilers contract a * b + c into an fma by
// default): with N = 1 (and duplicated rows in pairs) the centered column sums below then come out exactly 0, as
// the eager composition's do, instead of an fma's rounding residue that 1 / eps^2 would magnify.
FASTKD_HOST_DEVICE double dist_mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double p = a * b;
  return p;
#endif
}

// Column j's means of ys, yt and centered sums, from its sums over the N rows of x = ys - shift_s, w = yt - shift_t.
struct DistColumn {
  double mean_s, mean_t, saa, sbb, sab;
};

FASTKD_HOST_DEVICE DistColumn dist_column(double cx, double cw, double cxx, double cww, double cxw, double shift_s,
                                          double shift_t, int64_t n) {
  const double inv_n = 1.0 / static_cast<double>(n);
  const double mx = cx * inv_n, mw = cw * inv_n;
  DistColumn c;
  c.mean_s = shift_s + mx;
  c.mean_t = shift_t + mw;
  c.saa = cxx - dist_mul_rn(cx, mx);
  c.sbb = cww - dist_mul_rn(cw, mw);
  c.sab = cxw - dist_mul_rn(cx, mw);
  return c;
}

// The centered softmax entry y - 1/C, with y = exp((z - max) / tau) / Z; every sweep computes it the same way
// (same operations, same rounding), so a value recomputed in the gradient sweep is the one the statistics saw.
template <typename X>
FASTKD_HOST_DEVICE X dist_centered(X e, X inv_z, X inv_c) {
  return e * inv_z - inv_c;
}

// -dL/dy / tau^2 of one entry (the Gs / Gt of the header), given the row's and the column's coefficients.
// a, b: the entries centered by 1/C; alpha, beta: centered by the column means.
template <typename X>
FASTKD_HOST_DEVICE X dist_student_g(X a, X b, X alpha, X beta, X ru, X rv, X cu, X cv) {
  return ru * b - rv * a + cu * beta - cv * alpha;
}

template <typename X>
FASTKD_HOST_DEVICE X dist_teacher_g(X a, X b, X alpha, X beta, X ru, X rw, X cu, X cw) {
  return ru * a - rw * b + cu * alpha - cw * beta;
}

// Everything the kernels see: pointers, sizes, strides and scalars (dist_host.h fills it).
struct DistParams {
  int64_t rows, cols;
  int64_t student_row_stride, teacher_row_stride;  // unit column stride
  const void* student;
  const void* teacher;
  void* grad_student;  // [rows, cols] contiguous, or null
  void* grad_teacher;
  double beta, gamma, tau, inv_tau, eps;
};

// Per-row / per-column coefficient scales: the gradient of the whole loss for an upstream gradient of 1.
FASTKD_HOST_DEVICE double dist_row_scale(const DistParams& p) { return p.beta / static_cast<double>(p.rows); }
FASTKD_HOST_DEVICE double dist_col_scale(const DistParams& p) { return p.gamma / static_cast<double>(p.cols); }

// The loss from the sums of rho over the rows and of kappa over the columns.
FASTKD_HOST_DEVICE double dist_loss_value(const DistParams& p, double sum_rho, double sum_kappa) {
  const double inter = 1.0 - sum_rho / static_cast<double>(p.rows);
  const double intra = 1.0 - sum_kappa / static_cast<double>(p.cols);
  return p.tau * p.tau * (p.beta * inter + p.gamma * intra);
}

}  // namespace fastkd
