// The math of the relation- and feature-based losses (RKD, SP, PKT, CC, AT), written once for the CPU and
// CUDA kernels.
//
// Every relation loss is computed from Gram matrices G = X X^T (a GEMM, done by ATen: MKL / cuBLAS) plus
// elementwise work over the N x N pairs (and, for the RKD angle, the N x N x N triplets), and its feature
// gradient is one more GEMM: dL/dX = (D + D^T) X with D = dL/dG. The work over pairs is split into "row
// functors": small structs whose operator()(i) handles row i of an N x N matrix (or one sample of a feature
// map). The CPU runs them with at::parallel_for, the GPU with one thread per row (relation_host.h); reductions
// over rows are done by a functor run on a single row, in a fixed order, so results are bitwise reproducible
// on every device and for every thread count. Nothing of size N x N x D or N x N x N is ever allocated.
//
// Notation: h(r) = SmoothL1 with beta 1 = c (r - c / 2) with c = clamp(r, -1, 1), and h'(r) = c.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/macros.h"

namespace fastkd {

// F.normalize's and pdist's clamps (RepDistiller / torchdistill / mdistiller use these eps values).
constexpr double kNormalizeEps = 1e-12;
constexpr double kPdistEps = 1e-12;

// clamp that propagates NaN (as torch.clamp and SmoothL1 do); at::vec::clamp has an overload for vectors.
template <typename X>
FASTKD_HOST_DEVICE X fk_clamp(X x, X lo, X hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// SmoothL1 (beta 1) of r = a - b: returns h(r), writes h'(r). Branch-free, so it also runs on vectors.
template <typename X, typename Clamp>
FASTKD_HOST_DEVICE X smooth_l1(X r, X& slope, Clamp clamp) {
  slope = clamp(r);
  return slope * (r - X(0.5) * slope);
}

struct ClampUnit {  // clamp to [-1, 1] (scalar code)
  FASTKD_HOST_DEVICE double operator()(double x) const { return fk_clamp(x, -1.0, 1.0); }
};

FASTKD_HOST_DEVICE double smooth_l1(double r, double& slope) { return smooth_l1(r, slope, ClampUnit{}); }

// ----------------------------------------------------------------------------------------------------------
// RKD (Park et al. 2019), RepDistiller formulation. The Gram matrix G is that of the centered features C
// (translation invariant); the differences v_ij = x_j - x_i come from the raw features X (float64), where
// near-duplicate rows keep every digit of their difference (Sterbenz).
// Pair (i, j): q_ij = ||v_ij||^2 = g_i + g_j - 2 G_ij where the Gram matrix resolves it; "direct" pairs, those
// with q <= kappa (g_i + g_j) (kappa: rkd_direct_kappa), are pairs the Gram matrix cannot resolve to float64
// accuracy: for them *every* quantity comes from the differences: q, the angle numerators of every triplet
// with a direct leg, and the gradient with respect to v_ij (RkdDirectGradRow). Exact duplicates give q = 0
// ("zero pairs", whose normalized difference vector is the zero vector).
// Distance: d_ij = sqrt(max(q, 1e-12)) (i != j), d_ii = 0. Angle: e_ij = v_ij / max(sqrt(q), 1e-12),
// a_ijk = <e_ij, e_ik> = P^(i)_jk * s_ij * s_ik with the numerator P^(i)_jk = <v_ij, v_ik>, from the Gram
// matrix G_jk - G_ik - (G_ij - G_ii) when both legs are resolved, and the inverse norms
// s_ij = 1 / max(sqrt(q_ij), 1e-12), set to 0 for i == j and for zero pairs (a_ijk = 0 there, as in the
// reference).
// ----------------------------------------------------------------------------------------------------------

// The Gram identity's rounding error on q_ij is at most about 2 D u (g_i + g_j) (u = 2^-53): pairs with
// q > kappa (g_i + g_j) get q and the angle numerators to ~2 D u / kappa relative accuracy; the rest are
// direct. For a float32 result kappa = D 2^-26 (~2^-26, below float32's rounding); real batches rarely have
// such pairs (duplicates, near duplicates), so the direct work is small. A float64 result must be exact to
// float64 rounding: kappa = 1/4, every pair closer than half the rows' norms goes direct (~8 D u for the rest;
// a pair 100x closer than the spread had a 1e-12 relative error through the Gram route). That costs O(N D) per
// such pair in the triplet pass: float64 (the oracle / gradcheck dtype) trades speed for exactness.
FASTKD_HOST_DEVICE double rkd_direct_kappa(int64_t dim, bool float64_result) {
  if (float64_result) return 0.25;
  const double kappa = static_cast<double>(dim) * 1.4901161193847656e-08;  // D 2^-26
  return kappa < 0.25 ? kappa : 0.25;
}

// Inverse norm of the difference vector of a pair (0 on the diagonal and for zero pairs).
FASTKD_HOST_DEVICE double rkd_inverse_norm(double q, bool diagonal) {
  if (diagonal || q == 0.0) return 0.0;
  const double n = ::sqrt(q);
  return 1.0 / (n < kNormalizeEps ? kNormalizeEps : n);
}

// One angle entry (apex i, legs j, k) of both sides from its numerators: the student's angle a_s, the
// SmoothL1 value h and its slope gamma = h'(a_s - a_t). Instantiated with double and at::vec::Vectorized<double>.
//   num_*: P^(i)_jk;   scale_* = s_ij * s_ik
template <typename X, typename Clamp>
FASTKD_HOST_DEVICE X rkd_angle_entry(X num_s, X scale_s, X num_t, X scale_t, X& a_s, X& gamma, Clamp clamp) {
  a_s = num_s * scale_s;
  const X a_t = num_t * scale_t;
  return smooth_l1(a_s - a_t, gamma, clamp);
}

// <x_j - x_i, x_k - x_i> from the raw rows (the direct angle numerator; the squared distance for k = j).
FASTKD_HOST_DEVICE double rkd_direct_dot(const double* feat, int64_t dim, int64_t i, int64_t j, int64_t k) {
  const double* xi = feat + i * dim;
  const double* xj = feat + j * dim;
  const double* xk = feat + k * dim;
  double s = 0.0;
  for (int64_t d = 0; d < dim; ++d) s += (xj[d] - xi[d]) * (xk[d] - xi[d]);
  return s;
}

// Pointers of one side. Matrices are N x N, row-major, float64 (direct: uint8).
struct RkdSide {
  const double* gram = nullptr;   // G of the centered features (symmetrized)
  const double* feat = nullptr;   // X, [N, D] float64 (raw): the direct differences
  int64_t dim = 0;
  double* q = nullptr;            // squared distances
  double* dist = nullptr;         // d_ij (distance term), 0 on the diagonal
  double* inv_norm = nullptr;     // s_ij (angle term)
  double* row_sum = nullptr;      // [N]: sum_j d_ij
  unsigned char* direct = nullptr;  // [N, N]: 1 for a direct pair (never on the diagonal)
  int64_t* row_direct = nullptr;    // [N]: direct pairs in row i
  bool float64_result = false;      // the loss is float64: the direct threshold of float64 (rkd_direct_kappa)
};

// The angle numerator P^(i)_jk of one side: from the Gram matrix when both legs are resolved, else direct.
FASTKD_HOST_DEVICE double rkd_numerator(const RkdSide& a, int64_t n, int64_t i, int64_t j, int64_t k) {
  if (a.direct[i * n + j] || a.direct[i * n + k]) return rkd_direct_dot(a.feat, a.dim, i, j, k);
  const double* G = a.gram;
  return (G[j * n + k] - G[i * n + k]) - (G[i * n + j] - G[i * n + i]);
}

// The inverse norm the Gram route of the gradient uses: s_ij for resolved pairs, 0 for direct ones (their
// terms are RkdDirectGradRow's).
FASTKD_HOST_DEVICE double rkd_gram_inverse(const RkdSide& a, int64_t ij) { return a.direct[ij] ? 0.0 : a.inv_norm[ij]; }

// Pairs of row i: q (direct where the Gram matrix cannot resolve the pair), d, s, and sum_j d_ij.
struct RkdPairsRow {
  RkdSide side;
  int64_t n;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const double* G = side.gram;
    const double kappa = rkd_direct_kappa(side.dim, side.float64_result);
    const double gi = G[i * n + i];
    double sum = 0.0;
    int64_t direct_count = 0;
    for (int64_t j = 0; j < n; ++j) {
      double q = 0.0;
      bool direct = false;
      if (j != i) {
        const double gj = G[j * n + j];
        q = gi + gj - 2.0 * G[i * n + j];
        direct = q <= kappa * (gi + gj);
        // recompute: sum (x_j - x_i)^2, symmetric in (i, j)
        if (direct) q = rkd_direct_dot(side.feat, side.dim, i < j ? i : j, i < j ? j : i, i < j ? j : i);
      }
      side.q[i * n + j] = q;
      side.direct[i * n + j] = direct ? 1 : 0;
      direct_count += direct ? 1 : 0;
      const double d = j == i ? 0.0 : ::sqrt(q < kPdistEps ? kPdistEps : q);
      if (side.dist) side.dist[i * n + j] = d;
      if (side.inv_norm) side.inv_norm[i * n + j] = rkd_inverse_norm(q, j == i);
      sum += d;
    }
    side.row_direct[i] = direct_count;
    if (side.row_sum) side.row_sum[i] = sum;
  }
};

// Sum of `count` values in index order (run on one row: the fixed-order reduction of per-row partials).
struct SumInOrder {
  const double* values;
  int64_t count;
  double scale;
  double* out;
  FASTKD_HOST_DEVICE void operator()(int64_t) const {
    double s = 0.0;
    for (int64_t i = 0; i < count; ++i) s += values[i];
    *out = s * scale;
  }
};

// RKD distance term, row i, step 1: the normalized distances d_ij / m in place (stored, so that equal
// distances on both sides cancel exactly: a fused multiply-add would not round both products alike).
// means = {m_s, m_t} (already divided by N (N - 1)).
struct RkdNormalizeRow {
  double* dist_s;
  double* dist_t;
  const double* means;
  int64_t n;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    for (int64_t j = 0; j < n; ++j) {
      dist_s[i * n + j] /= means[0];
      dist_t[i * n + j] /= means[1];
    }
  }
};

// Step 2, row i: sum_j h(r_ij) with r_ij = d_ij / m_s - t_ij / m_t, and sum_j h'(r_ij) d_ij / m_s (for the
// gradient through the student's mean).
struct RkdDistanceRow {
  const double* dist_s;  // normalized
  const double* dist_t;  // normalized
  int64_t n;
  double* row_loss;
  double* row_rho;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    double loss = 0.0, rho = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      double slope;
      loss += smooth_l1(dist_s[i * n + j] - dist_t[i * n + j], slope);
      rho += slope * dist_s[i * n + j];
    }
    row_loss[i] = loss;
    row_rho[i] = rho;
  }
};

// Distance term's Gram-space gradient, row i: M_ij += weight * 4 (delta_ij sum_k W_ik - W_ij) with
// W_ij = [q_ij >= eps] (h'_ij - rho) / (2 N^2 m d_ij) (the pdist clamp blocks the gradient below eps) and
// rho = sum_kl h'_kl d_kl / (m N (N - 1)) (through the mean). dL/dC = M C. With the normalized distances
// u = d / m: W_ij = (h'_ij - rho) / (2 N^2 m^2 u_ij), rho = rho_sum / (N (N - 1)).
// Direct pairs are left out (RkdDirectGradRow adds W_ij (x_i - x_j) for them).
struct RkdDistanceGradRow {
  const double* q_s;
  const double* dist_s;  // normalized
  const double* dist_t;  // normalized
  const double* means;
  const double* rho_sum;
  const unsigned char* direct;  // null: every pair through M
  int64_t n;
  double weight;
  double* M;
  // W_ij (without the direct test)
  FASTKD_HOST_DEVICE double pair_weight(int64_t ij) const {
    const double nn = static_cast<double>(n), m = means[0];
    const double rho = *rho_sum / (nn * (nn - 1.0));
    const double c = weight * 2.0 / (nn * nn * m * m);
    double slope;
    smooth_l1(dist_s[ij] - dist_t[ij], slope);
    return q_s[ij] >= kPdistEps ? c * (slope - rho) / dist_s[ij] : 0.0;
  }
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    double diag = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ij = i * n + j;
      if (j == i || (direct && direct[ij])) continue;
      const double w = pair_weight(ij);
      M[ij] -= w;
      diag += w;
    }
    M[i * n + i] += diag;
  }
};

// Angle term's Gram-space gradient, step 1 (row = apex i): from T_ij = sum_k gamma_ijk s'_ik and
// U_ij = sum_k gamma_ijk a_ijk (the triplet pass; s' = rkd_gram_inverse), R_ij = s'_ij T_ij + beta_ij with
// beta_ij = -[||v_ij|| >= eps] U_ij s_ij^2 (the gradient through the norm of v_ij; 0 for direct pairs).
// R and beta overwrite T and U.
struct RkdAngleRRow {
  RkdSide side;  // student
  int64_t n;
  double* T;  // in: T, out: R
  double* U;  // in: U, out: beta
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ij = i * n + j;
      const double s = rkd_gram_inverse(side, ij);
      const double beta = ::sqrt(side.q[ij]) >= kNormalizeEps ? -U[ij] * s * s : 0.0;
      T[ij] = s * T[ij] + beta;
      U[ij] = beta;
    }
  }
};

// Angle term, step 2 (row j): M_jk += weight * 2 (H_jk - R_jk - R_kj + delta_jk (sum_i R_ji + sum_i beta_ij)),
// scaled by 1 / N^3 (the mean over the triplets; H, R, beta were accumulated without it).
struct RkdAngleGradRow {
  const double* H;
  const double* R;
  const double* beta;
  int64_t n;
  double weight;  // already includes 2 / N^3
  double* M;
  FASTKD_HOST_DEVICE void operator()(int64_t j) const {
    double diag = 0.0;
    for (int64_t i = 0; i < n; ++i) diag += R[j * n + i] + beta[i * n + j];
    for (int64_t k = 0; k < n; ++k) {
      double v = H[j * n + k] - R[j * n + k] - R[k * n + j];
      if (k == j) v += diag;
      M[j * n + k] += weight * v;
    }
  }
};

// The gradient terms of direct student pairs, from the differences (the Gram route, dL/dC = M C, would lose
// their digits: its coefficients grow like 1 / ||v_ij|| and multiply rows of size ||c||).
// Per apex i, dL/dv_ij = sum_k W^(i)_jk v_ik with W^(i)_jk = c s_ij gamma_ijk s_ik + delta_jk beta_ij
// (c = 2 weight / N^3) and dL/dx_j += dL/dv_ij, dL/dx_i -= dL/dv_ij. The Gram route carries the entries
// with both legs resolved; this functor the others: the whole row j of a direct leg (dL/dv_ij, with
// e_ij's clamp: dL/dv_ij = dL/de_ij / 1e-12 below it, the reference's ~1e12-scale gradient of duplicates)
// and, for a resolved leg j, the entry k = m of each direct leg m. Also the distance term of direct pairs.
// Row r (the owner: deterministic, no two rows write the same output) of dL/dX [N, D] float64.
// O(N D) per direct pair and row it touches.
struct RkdDirectGradRow {
  RkdSide s;               // student (q, inv_norm, direct, row_direct, feat)
  RkdSide t;               // teacher (gram, feat, inv_norm, direct): its angles
  int64_t n;
  double angle_coef;       // 2 angle_weight / N^3 (0: no angle term)
  RkdDistanceGradRow distance;  // its pair_weight (M unused); weight 0: no distance term
  double* grad;
  double* scratch;  // [N, D]: row r's work space

  // gamma_ijk and the student's a_ijk, numerators by rkd_numerator
  FASTKD_HOST_DEVICE double gamma(int64_t i, int64_t j, int64_t k, double& a_s) const {
    const double num_s = rkd_numerator(s, n, i, j, k), num_t = rkd_numerator(t, n, i, j, k);
    double g;
    rkd_angle_entry(num_s, s.inv_norm[i * n + j] * s.inv_norm[i * n + k], num_t,
                    t.inv_norm[i * n + j] * t.inv_norm[i * n + k], a_s, g, ClampUnit{});
    return g;
  }
  // out += sign * dL/dv_im for the direct pair (i, m), in the reference's order (F.normalize's backward):
  // g = dL/de_im / c = sum_k gamma_imk e_ik with e = v / max(||v||, eps) (divisions), then
  // dL/dv_im = c (g - e_im <e_im, g>) / ||v_im||, or c g / eps below the clamp. g is summed apart (in tmp,
  // [D]) so that its cancellation against the projection (exact when the legs are collinear) is not mixed
  // with the other terms of out.
  FASTKD_HOST_DEVICE void add_leg(int64_t i, int64_t m, double sign, double* out, double* tmp) const {
    const int64_t dim = s.dim;
    const double r_im = ::sqrt(s.q[i * n + m]);
    const bool clamped = r_im < kNormalizeEps;  // e = v / 1e-12: de/dv = I / 1e-12
    const double n_im = clamped ? kNormalizeEps : r_im;
    const double* xi = s.feat + i * dim;
    const double* xm = s.feat + m * dim;
    for (int64_t d = 0; d < dim; ++d) tmp[d] = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      if (k == i || s.inv_norm[i * n + k] == 0.0) continue;  // e_ik = 0
      double a_s;
      const double g = gamma(i, m, k, a_s);
      if (g == 0.0) continue;
      const double r_ik = ::sqrt(s.q[i * n + k]), n_ik = r_ik < kNormalizeEps ? kNormalizeEps : r_ik;
      const double* xk = s.feat + k * dim;
      for (int64_t d = 0; d < dim; ++d) tmp[d] += g * ((xk[d] - xi[d]) / n_ik);
    }
    double proj = 0.0;
    if (!clamped) {
      for (int64_t d = 0; d < dim; ++d) proj += ((xm[d] - xi[d]) / n_im) * tmp[d];
    }
    const double c = sign * angle_coef;
    for (int64_t d = 0; d < dim; ++d) out[d] += c * ((tmp[d] - ((xm[d] - xi[d]) / n_im) * proj) / n_im);
  }
  // W^(i)_jm for a resolved leg j and the direct leg m (multiplies v_im)
  FASTKD_HOST_DEVICE double partner(int64_t i, int64_t j, int64_t m) const {
    double a_s;
    return angle_coef * s.inv_norm[i * n + j] * gamma(i, j, m, a_s) * s.inv_norm[i * n + m];
  }
  FASTKD_HOST_DEVICE void operator()(int64_t r) const {
    const int64_t dim = s.dim;
    double* out = grad + r * dim;
    double* tmp = scratch + r * dim;
    const double* xr = s.feat + r * dim;
    if (distance.weight != 0.0 && s.row_direct[r] > 0) {  // dL/dx_r += W_ro (x_r - x_o)
      for (int64_t o = 0; o < n; ++o) {
        if (!s.direct[r * n + o]) continue;
        const double w = distance.pair_weight(r * n + o);
        const double* xo = s.feat + o * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] += w * (xr[d] - xo[d]);
      }
    }
    if (angle_coef == 0.0) return;
    for (int64_t i = 0; i < n; ++i) {
      if (s.row_direct[i] == 0) continue;
      const double* xi = s.feat + i * dim;
      for (int64_t m = 0; m < n; ++m) {
        const int64_t im = i * n + m;
        if (!s.direct[im]) continue;
        const double* xm = s.feat + m * dim;
        if (r == m) add_leg(i, m, 1.0, out, tmp);
        if (r == i) {
          add_leg(i, m, -1.0, out, tmp);
          if (s.inv_norm[im] == 0.0) continue;  // a zero pair: v_im = 0
          double w = 0.0;  // - sum over the resolved legs j of W^(i)_jm v_im
          for (int64_t j = 0; j < n; ++j) {
            if (j != i && !s.direct[i * n + j]) w += partner(i, j, m);
          }
          for (int64_t d = 0; d < dim; ++d) out[d] -= w * (xm[d] - xi[d]);
        } else if (r != m && !s.direct[i * n + r] && s.inv_norm[im] != 0.0) {
          const double w = partner(i, r, m);
          for (int64_t d = 0; d < dim; ++d) out[d] += w * (xm[d] - xi[d]);
        }
      }
    }
  }
};

// E = x / max(||x||, eps) - y / max(||y||, eps) over one row (F.normalize on both sides), its squared norm
// and the backward of the normalization: for dL/dx̂ = c E, dL/dx = c (E - x̂ <E, x̂>) / ||x|| (the clamp
// blocks the second term below eps); for y the same with -c. Shared by SP (rows of G) and AT (maps).
// Divisions (as F.normalize), not products with the inverse: a fused multiply-add would not round the two
// sides alike, and equal inputs must give exactly E = 0.
struct NormalizedDiff {
  double nx, ny;          // max(||x||, eps), max(||y||, eps)
  double proj_x, proj_y;  // <E, x̂>, <E, ŷ> (0 where the clamp is active)
  double sq;              // ||E||^2
  template <typename A, typename B>
  FASTKD_HOST_DEVICE NormalizedDiff(const A* x, const B* y, int64_t len) {
    double sx = 0.0, sy = 0.0;
    for (int64_t j = 0; j < len; ++j) {
      sx += static_cast<double>(x[j]) * x[j];
      sy += static_cast<double>(y[j]) * y[j];
    }
    const double rx = ::sqrt(sx), ry = ::sqrt(sy);
    nx = rx < kNormalizeEps ? kNormalizeEps : rx;
    ny = ry < kNormalizeEps ? kNormalizeEps : ry;
    double dx = 0.0, dy = 0.0;
    sq = 0.0;
    for (int64_t j = 0; j < len; ++j) {
      const double hx = x[j] / nx, hy = y[j] / ny, e = hx - hy;
      sq += e * e;
      dx += e * hx;
      dy += e * hy;
    }
    proj_x = rx >= kNormalizeEps ? dx : 0.0;
    proj_y = ry >= kNormalizeEps ? dy : 0.0;
  }
  // dL/dx_j and dL/dy_j for dL/dx̂ = c E (dL/dŷ = -c E)
  FASTKD_HOST_DEVICE double grad_x(double x, double y, double c) const {
    const double hx = x / nx, e = hx - y / ny;
    return c * (e - hx * proj_x) / nx;
  }
  FASTKD_HOST_DEVICE double grad_y(double x, double y, double c) const {
    const double hy = y / ny, e = x / nx - hy;
    return -c * (e - hy * proj_y) / ny;
  }
};

// ----------------------------------------------------------------------------------------------------------
// SP (Tung & Mori 2019): Ĝ = row-normalized G (F.normalize, dim 1), L = sum (Ĝ_s - Ĝ_t)^2 / div.
// Row i writes dL/dG_s and dL/dG_t for row i (each side only when asked).
// ----------------------------------------------------------------------------------------------------------
template <typename A>
struct SpRow {
  const A* G_s;
  const A* G_t;
  int64_t n;
  double inv_div;
  double* row_loss;
  A* D_s;  // may be null
  A* D_t;  // may be null
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const A* gs = G_s + i * n;
    const A* gt = G_t + i * n;
    const NormalizedDiff nd(gs, gt, n);
    row_loss[i] = nd.sq;
    const double c = 2.0 * inv_div;  // dL/dĜ_s = 2 E / div
    for (int64_t j = 0; j < n; ++j) {
      if (D_s) D_s[i * n + j] = static_cast<A>(nd.grad_x(gs[j], gt[j], c));
      if (D_t) D_t[i * n + j] = static_cast<A>(nd.grad_y(gs[j], gt[j], c));
    }
  }
};

// ----------------------------------------------------------------------------------------------------------
// PKT (Passalis & Tefas 2018): x̂ = x / (||x|| + eps) (NaN entries -> 0), K = X̂ X̂^T, S = (K + 1) / 2,
// P = S / rowsum(S), L = mean_ij P_t log((P_t + eps) / (P_s + eps)).
// ----------------------------------------------------------------------------------------------------------
// Everything is done on G = X X^T (no normalized copy of X): with r_i = 1 / (||x_i|| + eps),
// K_ij = r_i r_j G_ij. The reference's NaN -> 0 masking of x̂ zeroes a whole row exactly when ||x_i|| is not
// finite (x / inf = 0, inf / inf = NaN -> 0): such rows get K = 0 here too (flag: r_i = -1).
template <typename A>
struct PktNormRow {  // row i of X: ||x_i|| and r_i
  const A* X;
  int64_t dim;
  double eps;
  double* norm;
  double* inv;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const A* x = X + i * dim;
    double ss = 0.0;
    for (int64_t d = 0; d < dim; ++d) ss += static_cast<double>(x[d]) * x[d];
    const double nrm = ::sqrt(ss);
    norm[i] = nrm;
    inv[i] = (nrm - nrm == 0.0) ? 1.0 / (nrm + eps) : -1.0;  // nrm - nrm is NaN for inf and NaN
  }
};

template <typename A>
struct PktCosineRow {  // row i: K_ij = r_i r_j G_ij in place (0 where a row is masked)
  A* G;
  const double* inv;
  int64_t n;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    for (int64_t j = 0; j < n; ++j) {
      const bool masked = inv[i] < 0.0 || inv[j] < 0.0;
      G[i * n + j] = masked ? A(0) : static_cast<A>(inv[i] * inv[j] * static_cast<double>(G[i * n + j]));
    }
  }
};

// The per-pair terms of PKT for one row (instantiated with double and, on the CPU, Vectorized<double>):
// P_s = (K_s + 1) / 2 / sigma_s, P_t likewise, lr = log((P_t + eps) / (P_s + eps)), and the two factors of
// the gradient, dP_s = -P_t / (P_s + eps) and dP_t = lr + P_t / (P_t + eps) (both before the 1 / N^2).
// Rows padded with K = -1 give P = 0 and contribute nothing.
template <typename X, typename Log>
FASTKD_HOST_DEVICE void pkt_terms(X ks, X kt, X half_inv_s, X half_inv_t, X eps, Log log, X& ps, X& pt, X& lr,
                                  X& dps, X& dpt) {
  ps = (ks + X(1.0)) * half_inv_s;
  pt = (kt + X(1.0)) * half_inv_t;
  lr = log((pt + eps) / (ps + eps));
  dps = X(0.0) - pt / (ps + eps);
  dpt = lr + pt / (pt + eps);
}

struct ScalarLog {
  FASTKD_HOST_DEVICE double operator()(double x) const { return ::log(x); }
};

template <typename A>
struct PktRow {  // row i of K_s, K_t: the loss terms and dL/dK for each side asked for
  const A* K_s;
  const A* K_t;
  int64_t n;
  double eps;
  double* row_loss;
  A* D_s;
  A* D_t;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const A* ks = K_s + i * n;
    const A* kt = K_t + i * n;
    double sum_s = 0.0, sum_t = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      sum_s += (ks[j] + 1.0) * 0.5;
      sum_t += (kt[j] + 1.0) * 0.5;
    }
    const double hs = 0.5 / sum_s, ht = 0.5 / sum_t;
    const double inv_nn = 1.0 / (static_cast<double>(n) * static_cast<double>(n));
    double loss = 0.0, dot_s = 0.0, dot_t = 0.0, ps, pt, lr, dps, dpt;
    for (int64_t j = 0; j < n; ++j) {
      pkt_terms<double>(ks[j], kt[j], hs, ht, eps, ScalarLog{}, ps, pt, lr, dps, dpt);
      loss += pt * lr;
      dot_s += dps * ps;
      dot_t += dpt * pt;
    }
    row_loss[i] = loss * inv_nn;
    // dL/dS_ij = (dP_ij - sum_k dP_ik P_ik) / sigma_i;  dL/dK = dL/dS / 2
    for (int64_t j = 0; j < n; ++j) {
      pkt_terms<double>(ks[j], kt[j], hs, ht, eps, ScalarLog{}, ps, pt, lr, dps, dpt);
      if (D_s) D_s[i * n + j] = static_cast<A>((dps - dot_s) * hs * inv_nn);
      if (D_t) D_t[i * n + j] = static_cast<A>((dpt - dot_t) * ht * inv_nn);
    }
  }
};

// The input gradient as one GEMM, dL/dX = M X: with sym = dL/dK + dL/dK^T, dL/dx̂ = sym diag(r) X and
// dL/dx_i = r_i dL/dx̂_i - x_i <x_i, dL/dx̂_i> r_i^2 / ||x_i||, where <x_i, dL/dx̂_i> = sum_j sym_ij r_j G_ij.
// So M_ij = r_i sym_ij r_j - delta_ij r_i^2 / ||x_i|| sum_k sym_ik r_k G_ik (the last term 0 at x_i = 0,
// where the norm's one-sided derivative vanishes; masked rows get no gradient).
template <typename A>
struct PktGradMatrixRow {
  const A* D;       // dL/dK
  const A* gram;    // G (raw, not the cosine matrix)
  const double* norm;
  const double* inv;
  int64_t n;
  A* M;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const double r_i = inv[i];
    double proj = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double r_j = inv[j];
      const bool masked = r_i < 0.0 || r_j < 0.0;
      const double sym = masked ? 0.0 : static_cast<double>(D[i * n + j]) + static_cast<double>(D[j * n + i]);
      proj += masked ? 0.0 : sym * r_j * static_cast<double>(gram[i * n + j]);
      M[i * n + j] = static_cast<A>(masked ? 0.0 : r_i * sym * r_j);
    }
    if (r_i > 0.0 && norm[i] > 0.0) M[i * n + i] = static_cast<A>(M[i * n + i] - r_i * r_i / norm[i] * proj);
  }
};

// ----------------------------------------------------------------------------------------------------------
// CC (Peng et al. 2019), torchdistill CCKDLoss: C = G (bilinear) or the order-P Taylor expansion of the
// Gaussian RBF, exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! G^p; L = ||C_s - C_t||_F / div.
// ----------------------------------------------------------------------------------------------------------
struct CcKernel {
  bool gaussian;
  int64_t max_p;
  double two_gamma, scale;  // scale = exp(-2 gamma)
  // exp(-2 gamma) folded into the coefficients, so that the value ends with an addition: C_s - C_t is then
  // exactly 0 for equal inputs whatever multiply-adds the compiler fuses.
  FASTKD_HOST_DEVICE double value(double g) const {
    if (!gaussian) return g;
    double sum = scale, coef = scale, power = 1.0;
    for (int64_t p = 1; p <= max_p; ++p) {
      coef *= two_gamma / static_cast<double>(p);
      power *= g;
      sum += coef * power;
    }
    return sum;
  }
  FASTKD_HOST_DEVICE double slope(double g) const {  // dC/dG
    if (!gaussian) return 1.0;
    double sum = 0.0, coef = 1.0, power = 1.0;  // power = g^(p-1)
    for (int64_t p = 1; p <= max_p; ++p) {
      coef *= two_gamma / static_cast<double>(p);
      sum += coef * static_cast<double>(p) * power;
      power *= g;
    }
    return sum * scale;
  }
};

template <typename A>
struct CcRow {  // row i: E = C_s - C_t (kept for the gradient) and sum_j E_ij^2
  const A* G_s;
  const A* G_t;
  int64_t n;
  CcKernel kernel;
  A* E;
  double* row_sq;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    double sq = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double e = kernel.value(G_s[i * n + j]) - kernel.value(G_t[i * n + j]);
      E[i * n + j] = static_cast<A>(e);
      sq += e * e;
    }
    row_sq[i] = sq;
  }
};

struct CcNorm {  // out = {||E||_F, ||E||_F / div} from the per-row sums of squares
  const double* row_sq;
  int64_t n;
  double inv_div;
  double* out;
  FASTKD_HOST_DEVICE void operator()(int64_t) const {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += row_sq[i];
    out[0] = ::sqrt(s);
    out[1] = out[0] * inv_div;
  }
};

template <typename A>
struct CcGradRow {  // row i of dL/dG for each side asked: ±E / (nu div) * C'(G) (0 when nu = 0)
  const A* G_s;
  const A* G_t;
  const A* E;
  const double* nu;  // ||E||_F
  int64_t n;
  CcKernel kernel;
  double inv_div;
  A* D_s;
  A* D_t;
  FASTKD_HOST_DEVICE void operator()(int64_t i) const {
    const double c = *nu > 0.0 ? inv_div / *nu : 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ij = i * n + j;
      const double e = c * E[ij];
      if (D_s) D_s[ij] = static_cast<A>(e * kernel.slope(G_s[ij]));
      if (D_t) D_t[ij] = static_cast<A>(-e * kernel.slope(G_t[ij]));
    }
  }
};

// ----------------------------------------------------------------------------------------------------------
// AT (Zagoruyko & Komodakis 2017): per sample n, A_s = (1/C or 1) sum_c f_cs^p, Â = A / max(||A||, eps),
// E = Â_s - Â_t; "code": L = sum E^2 / (N S); "paper": L = sum_n ||E_n|| / N.
// ----------------------------------------------------------------------------------------------------------

// f^p as torch.pow, with the p = 2 fast path; and its derivative p f^(p-1).
template <typename A>
FASTKD_HOST_DEVICE A at_pow(A f, double p) {
  if (p == 2.0) return f * f;
  if (p == 3.0) return f * f * f;
  return static_cast<A>(::pow(static_cast<double>(f), p));
}
template <typename A>
FASTKD_HOST_DEVICE A at_pow_slope(A f, double p) {
  if (p == 2.0) return f + f;
  if (p == 3.0) return A(3) * f * f;
  return static_cast<A>(p * ::pow(static_cast<double>(f), p - 1.0));
}

// Given A_s, A_t of sample n ([S] each), the loss term and, in place, dL/dA for each side asked for.
struct AtSample {
  int64_t spatial;
  bool paper;
  double inv_count;  // code: 1 / (N S); paper: 1 / N
  template <typename A>
  FASTKD_HOST_DEVICE double operator()(A* a_s, A* a_t, bool grad_s, bool grad_t) const {
    const NormalizedDiff nd(a_s, a_t, spatial);
    const double enorm = ::sqrt(nd.sq);
    const double loss = paper ? enorm * inv_count : nd.sq * inv_count;
    // dL/dÂ_s = c E with c = 2 / (N S) (code) or 1 / (||E_n|| N) (paper; 0 where E_n = 0)
    const double c = paper ? (enorm > 0.0 ? inv_count / enorm : 0.0) : 2.0 * inv_count;
    if (!grad_s && !grad_t) return loss;
    for (int64_t s = 0; s < spatial; ++s) {
      const double x = a_s[s], y = a_t[s];
      if (grad_s) a_s[s] = static_cast<A>(nd.grad_x(x, y, c));
      if (grad_t) a_t[s] = static_cast<A>(nd.grad_y(x, y, c));
    }
    return loss;
  }
};

// The same in three parallel steps (used by the GPU): the attention maps, one thread per (sample, position)...
template <typename A>
struct AtMapElem {
  const A* f;
  int64_t channels, spatial;
  double p, scale;
  double* map;  // [N, S]
  FASTKD_HOST_DEVICE void operator()(int64_t idx) const {
    const int64_t n = idx / spatial, s = idx - n * spatial;
    const A* x = f + n * channels * spatial + s;
    double acc = 0.0;
    for (int64_t c = 0; c < channels; ++c) acc += static_cast<double>(at_pow(x[c * spatial], p));
    map[idx] = acc * scale;
  }
};

// ... the per-sample loss and dL/dA (in place), one thread per sample ...
struct AtSampleRow {
  AtSample sample;
  double* map_s;
  double* map_t;
  bool grad_s, grad_t;
  double* loss_rows;
  FASTKD_HOST_DEVICE void operator()(int64_t n) const {
    loss_rows[n] = sample(map_s + n * sample.spatial, map_t + n * sample.spatial, grad_s, grad_t);
  }
};

// ... and the input gradient, one thread per element: dL/df_ncs = dL/dA_ns * scale * p f^(p-1).
template <typename A>
struct AtGradElem {
  const A* f;
  const double* dmap;  // [N, S]
  int64_t channels, spatial;
  double p, scale;
  A* grad;
  FASTKD_HOST_DEVICE void operator()(int64_t idx) const {
    const int64_t s = idx % spatial, n = idx / (channels * spatial);
    grad[idx] = static_cast<A>(dmap[n * spatial + s] * scale * static_cast<double>(at_pow_slope(f[idx], p)));
  }
};

}  // namespace fastkd
