// The device-independent drivers of the relation- and feature-based loss operators (fastkd::rkd_forward,
// sp_forward, pkt_forward, cc_forward, at_forward): argument checks, GEMMs through ATen (MKL / cuBLAS),
// buffers, and the sequence of row functors of relation_math.h. The CPU and CUDA libraries instantiate them
// with a backend that supplies
//   B::rows(count, cost, f)     run f(i) for i in [0, count) (cost: rough work per row, for the CPU's grain)
//   B::rkd_triplets(args)       the RKD angle pass over the N^3 triplets (see RkdTriplets)
//   B::pkt_rows(row)            the PKT row functor over every row (the CPU vectorizes it)
//   B::at_pass(args)            attention transfer over the feature maps (see AtPass)
// Every reduction is a row functor in a fixed order: results are reproducible bit for bit.
#pragma once

#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>

#include "fastkd/kd_host.h"
#include "fastkd/relation_math.h"

namespace fastkd {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Arguments of the RKD angle pass. For every triplet (apex i, legs j, k) it evaluates rkd_angle_entry and
// produces: loss_rows[j] = sum_{i,k} h (rows indexed by the leg j), and, when T is not null,
// T_ij = sum_k h'_ijk s_ik, U_ij = sum_k h'_ijk a_ijk, H_jk = sum_i h'_ijk s_ij s_ik.
// The numerators P^(i)_jk come from rkd_numerator where a row i has direct pairs (row_direct[i] > 0), and the
// gradient sums use rkd_gram_inverse (s' = 0 for direct pairs: their terms are RkdDirectGradRow's):
// T_ij = sum_k h'_ijk s'_ik, H_jk = sum_i h'_ijk s'_ij s'_ik.
struct RkdTriplets {
  int64_t n;
  RkdSide s, t;
  double* loss_rows;  // [N]
  double* T;          // [N, N] or null (no gradient)
  double* U;
  double* H;
};

// Arguments of the attention-transfer pass: f [N, C, S] (contiguous, compute type A), per sample the
// attention map A = scale * sum_c f^p, then AtSample; loss_rows[n] the per-sample loss; grad_* [N, C, S] or null.
template <typename A>
struct AtPass {
  int64_t n, spatial, channels_s, channels_t;
  double p;
  AtSample sample;
  double scale_s, scale_t;  // 1 / C ("code") or 1 ("paper")
  const A* f_s;
  const A* f_t;
  double* loss_rows;
  A* grad_s;
  A* grad_t;
};

inline at::ScalarType relation_compute_type(const at::Tensor& s, const at::Tensor& t) {
  return (s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_relation_args(const at::Tensor& student, const at::Tensor& teacher, int64_t dims, const char* what) {
  auto check = [&](const at::Tensor& x, const char* name) {
    FASTKD_CHECK_ARG(x.dim() == dims, name, "expected a ", dims, "-D ", what, " tensor, got ", x.dim(), "-D");
    FASTKD_CHECK_ARG(is_kd_dtype(x.scalar_type()), name, "expected float32, float16, bfloat16 or float64, got ",
                     x.scalar_type());
    for (int64_t d = 1; d < dims; ++d) FASTKD_CHECK_ARG(x.size(d) > 0, name, "dimension ", d, " must not be empty");
  };
  check(student, "student");
  check(teacher, "teacher");
  FASTKD_CHECK_ARG(teacher.size(0) == student.size(0), "teacher", "batch size ", teacher.size(0),
                   " differs from the student's ", student.size(0));
  FASTKD_CHECK_ARG(teacher.device() == student.device(), "teacher", "expected the student's device ",
                   student.device(), ", got ", teacher.device());
}

inline at::Tensor relation_loss_like(const at::Tensor& s, const at::Tensor& t) {
  return at::zeros({}, s.options().dtype(c10::promoteTypes(s.scalar_type(), t.scalar_type())));
}

// The dtype of an input's gradient output: float32 for float16 / bfloat16 inputs. The op computes the gradient
// for an upstream gradient of 1; autograd (csrc/relation_autograd.cpp) multiplies it by the real upstream
// gradient (a loss scale of up to 2^16, or 1 / accumulation steps) in float32 and rounds to the input dtype once,
// so that no value underflows or overflows in float16 / bfloat16 on the way.
inline at::ScalarType relation_grad_type(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline at::Tensor no_grad_output(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(relation_grad_type(x)));
}

inline at::Tensor zero_grad_output(const at::Tensor& x) {
  return at::zeros(x.sizes(), x.options().dtype(relation_grad_type(x)));
}

inline at::Tensor contiguous_as(const at::Tensor& x, at::ScalarType type) { return x.to(type).contiguous(); }

// dL/dX = (D + D^T) X for a loss of G = X X^T with dL/dG = D.
inline at::Tensor gram_input_grad(const at::Tensor& D, const at::Tensor& X) { return at::matmul(D.add(D.t()), X); }

template <typename A>
struct ColumnMean {  // column d of X [N, D]: the mean over rows, in double, rounded to A
  const A* X;
  int64_t n, dim;
  A* out;
  FASTKD_HOST_DEVICE void operator()(int64_t d) const {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(X[i * dim + d]);
    out[d] = static_cast<A>(s / static_cast<double>(n));
  }
};

// ------------------------------------------------------------------------------------------------------------
// RKD
// ------------------------------------------------------------------------------------------------------------

// x [N, D] -> (x - mean over rows), all in float64 (x converted exactly): for a common offset much larger than
// the spread the subtraction is exact (Sterbenz), and it never rounds by more than float64's unit roundoff.
// Only the Gram matrix is formed from these; differences of rows come from x itself (RkdSide::feat).
template <class B>
at::Tensor rkd_centered(const at::Tensor& x64) {
  at::Tensor mean = at::empty({x64.size(1)}, x64.options());
  B::rows(x64.size(1), x64.size(0),
          ColumnMean<double>{x64.data_ptr<double>(), x64.size(0), x64.size(1), mean.data_ptr<double>()});
  return x64.sub(mean).contiguous();
}

// The Gram matrix, made exactly symmetric (the GEMM need not round G_ij and G_ji alike).
inline at::Tensor symmetric_gram(const at::Tensor& c) {
  at::Tensor g = at::matmul(c, c.t());
  return g.add(g.t()).mul(0.5).contiguous();
}

template <class B>
Tensor4 rkd_forward_impl(const at::Tensor& student, const at::Tensor& teacher, double distance_weight,
                         double angle_weight, bool grad_student) {
  check_relation_args(student, teacher, 2, "[N, D] feature");
  FASTKD_CHECK_ARG(std::isfinite(distance_weight) && distance_weight >= 0, "distance_weight",
                   "expected a finite value >= 0, got ", distance_weight);
  FASTKD_CHECK_ARG(std::isfinite(angle_weight) && angle_weight >= 0, "angle_weight",
                   "expected a finite value >= 0, got ", angle_weight);
  const int64_t n = student.size(0);
  at::Tensor loss = relation_loss_like(student, teacher);
  at::Tensor part_d = relation_loss_like(student, teacher), part_a = relation_loss_like(student, teacher);
  at::Tensor grad = no_grad_output(student);
  // N < 2: no pairs (the reference's mean over no distances is NaN; fastkd defines the loss as 0).
  if (n < 2 || (distance_weight == 0 && angle_weight == 0)) {
    if (grad_student) grad = zero_grad_output(student);
    return {loss, part_d, part_a, grad};
  }

  const bool with_d = distance_weight > 0, with_a = angle_weight > 0;
  const double nn = static_cast<double>(n);
  at::Tensor x_s = contiguous_as(student, at::kDouble), x_t = contiguous_as(teacher, at::kDouble);
  at::Tensor c_s = rkd_centered<B>(x_s), c_t = rkd_centered<B>(x_t);
  at::Tensor gram_s = symmetric_gram(c_s), gram_t = symmetric_gram(c_t);
  c_t = at::Tensor();
  auto f64 = c_s.options();
  auto square = [&] { return at::empty({n, n}, f64); };
  at::Tensor q_s = square(), q_t = square();
  at::Tensor dist_s = with_d ? square() : at::Tensor(), dist_t = with_d ? square() : at::Tensor();
  at::Tensor inv_s = with_a ? square() : at::Tensor(), inv_t = with_a ? square() : at::Tensor();
  at::Tensor rows_s = at::empty({n}, f64), rows_t = at::empty({n}, f64), rows_a = at::empty({n}, f64),
             rows_b = at::empty({n}, f64);
  // scalars: 0 m_s, 1 m_t, 2 distance term, 3 sum h' d, 4 angle term
  at::Tensor scal = at::zeros({5}, f64);
  double* sc = scal.data_ptr<double>();
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; };

  // direct-pair masks and per-row counts (relation_math.h, RKD)
  at::Tensor direct_s = at::empty({n, n}, f64.dtype(at::kByte)), direct_t = at::empty_like(direct_s);
  at::Tensor count_s = at::empty({n}, f64.dtype(at::kLong)), count_t = at::empty_like(count_s);
  auto pairs = [&](const at::Tensor& gram, const at::Tensor& x, const at::Tensor& q, const at::Tensor& dist,
                   const at::Tensor& inv, const at::Tensor& rows, const at::Tensor& direct, const at::Tensor& count) {
    RkdSide side{gram.data_ptr<double>(), x.data_ptr<double>(), x.size(1), q.data_ptr<double>(), ptr(dist), ptr(inv),
                 rows.data_ptr<double>(), direct.data_ptr<unsigned char>(), count.data_ptr<int64_t>()};
    side.float64_result = loss.scalar_type() == at::kDouble;
    B::rows(n, n, RkdPairsRow{side, n});
    return side;
  };
  const RkdSide side_s = pairs(gram_s, x_s, q_s, dist_s, inv_s, rows_s, direct_s, count_s);
  const RkdSide side_t = pairs(gram_t, x_t, q_t, dist_t, inv_t, rows_t, direct_t, count_t);

  if (with_d) {
    const double inv_pairs = 1.0 / (nn * (nn - 1.0));
    B::rows(1, n, SumInOrder{rows_s.data_ptr<double>(), n, inv_pairs, sc + 0});
    B::rows(1, n, SumInOrder{rows_t.data_ptr<double>(), n, inv_pairs, sc + 1});
    B::rows(n, n, RkdNormalizeRow{ptr(dist_s), ptr(dist_t), sc, n});
    B::rows(n, n, RkdDistanceRow{ptr(dist_s), ptr(dist_t), n, rows_a.data_ptr<double>(), rows_b.data_ptr<double>()});
    B::rows(1, n, SumInOrder{rows_a.data_ptr<double>(), n, 1.0 / (nn * nn), sc + 2});
    B::rows(1, n, SumInOrder{rows_b.data_ptr<double>(), n, 1.0, sc + 3});
  }
  at::Tensor T, U, H;
  if (with_a) {
    if (grad_student) {
      T = square();
      U = square();
      H = square();
    }
    B::rkd_triplets(RkdTriplets{n, side_s, side_t, rows_a.data_ptr<double>(), ptr(T), ptr(U), ptr(H)});
    B::rows(1, n, SumInOrder{rows_a.data_ptr<double>(), n, 1.0 / (nn * nn * nn), sc + 4});
  }
  const at::ScalarType out = loss.scalar_type();
  part_d = scal[2].to(out, /*non_blocking=*/false, /*copy=*/true);
  part_a = scal[4].to(out, /*non_blocking=*/false, /*copy=*/true);
  loss = scal[2].mul(distance_weight).add(scal[4].mul(angle_weight)).to(out);
  if (!grad_student) return {loss, part_d, part_a, grad};

  at::Tensor M = at::zeros({n, n}, f64);
  const RkdDistanceGradRow distance{q_s.data_ptr<double>(), ptr(dist_s), ptr(dist_t), sc, sc + 3,
                                    side_s.direct, n, with_d ? distance_weight : 0.0, M.data_ptr<double>()};
  if (with_d) B::rows(n, n, distance);
  if (with_a) {
    B::rows(n, n, RkdAngleRRow{side_s, n, ptr(T), ptr(U)});
    B::rows(n, n, RkdAngleGradRow{ptr(H), ptr(T), ptr(U), n, angle_weight * 2.0 / (nn * nn * nn), M.data_ptr<double>()});
  }
  at::Tensor dc = at::matmul(M, c_s).contiguous();
  // the terms of direct pairs, from the differences (only rows that have some do any work)
  if (count_s.sum().item<int64_t>() > 0) {  // one sync: most batches have no direct pair
    at::Tensor scratch = at::empty_like(x_s);
    B::rows(n, n, RkdDirectGradRow{side_s, side_t, n, with_a ? angle_weight * 2.0 / (nn * nn * nn) : 0.0, distance,
                                   dc.data_ptr<double>(), scratch.data_ptr<double>()});
  }
  // The centering's Jacobian leaves dL/dC unchanged: L is translation invariant, so the rows of dL/dC sum to 0.
  grad = dc.to(relation_grad_type(student));
  return {loss, part_d, part_a, grad};
}

// ------------------------------------------------------------------------------------------------------------
// SP, PKT, CC: Gram matrices in the compute type A (float32, or float64 when an input is float64)
// ------------------------------------------------------------------------------------------------------------
inline double relation_divisor(std::string_view reduction, int64_t n) {
  if (reduction == "batchmean") return static_cast<double>(n) * static_cast<double>(n);
  TORCH_CHECK(reduction == "sum", "fastkd: argument 'reduction': expected 'batchmean' or 'sum', got '", reduction,
              "'");
  return 1.0;
}

// The outputs of an empty batch (loss 0, zero gradients); the kernels replace them otherwise.
struct RelationOutputs {
  at::Tensor loss, grad_s, grad_t;
  RelationOutputs(const at::Tensor& s, const at::Tensor& t, bool gs, bool gt)
      : loss(relation_loss_like(s, t)),
        grad_s(gs && s.size(0) == 0 ? zero_grad_output(s) : no_grad_output(s)),
        grad_t(gt && t.size(0) == 0 ? zero_grad_output(t) : no_grad_output(t)) {}
  Tensor3 tuple() const { return {loss, grad_s, grad_t}; }
};

template <typename A>
A* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

template <class B>
Tensor3 sp_forward_impl(const at::Tensor& student, const at::Tensor& teacher, std::string_view reduction, bool grad_s,
                        bool grad_t) {
  check_relation_args(student, teacher, 2, "[N, D] feature");
  const int64_t n = student.size(0);
  const double div = relation_divisor(reduction, n);
  RelationOutputs out(student, teacher, grad_s, grad_t);
  if (n == 0) return out.tuple();
  const at::ScalarType type = relation_compute_type(student, teacher);
  at::Tensor x_s = contiguous_as(student, type), x_t = contiguous_as(teacher, type);
  at::Tensor G_s = at::matmul(x_s, x_s.t()).contiguous(), G_t = at::matmul(x_t, x_t.t()).contiguous();
  at::Tensor D_s = grad_s ? at::empty_like(G_s) : at::Tensor(), D_t = grad_t ? at::empty_like(G_t) : at::Tensor();
  at::Tensor rows = at::empty({n}, x_s.options().dtype(at::kDouble)), total = at::empty({}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(type, "sp_forward", [&] {
    B::rows(n, 4 * n, SpRow<scalar_t>{G_s.data_ptr<scalar_t>(), G_t.data_ptr<scalar_t>(), n, 1.0 / div,
                                      rows.data_ptr<double>(), data_or_null<scalar_t>(D_s), data_or_null<scalar_t>(D_t)});
  });
  B::rows(1, n, SumInOrder{rows.data_ptr<double>(), n, 1.0 / div, total.data_ptr<double>()});
  out.loss = total.to(out.loss.scalar_type());
  if (grad_s) out.grad_s = gram_input_grad(D_s, x_s).to(relation_grad_type(student));
  if (grad_t) out.grad_t = gram_input_grad(D_t, x_t).to(relation_grad_type(teacher));
  return out.tuple();
}

template <class B>
Tensor3 pkt_forward_impl(const at::Tensor& student, const at::Tensor& teacher, double eps, bool grad_s, bool grad_t) {
  check_relation_args(student, teacher, 2, "[N, D] feature");
  FASTKD_CHECK_ARG(std::isfinite(eps) && eps > 0, "eps", "expected a finite value > 0, got ", eps);
  const int64_t n = student.size(0);
  RelationOutputs out(student, teacher, grad_s, grad_t);
  if (n == 0) return out.tuple();
  const at::ScalarType type = relation_compute_type(student, teacher);
  at::Tensor x_s = contiguous_as(student, type), x_t = contiguous_as(teacher, type);
  auto f64 = x_s.options().dtype(at::kDouble);
  at::Tensor norm_s = at::empty({n}, f64), norm_t = at::empty({n}, f64), inv_s = at::empty({n}, f64),
             inv_t = at::empty({n}, f64);
  at::Tensor rows = at::empty({n}, f64), total = at::empty({}, f64);
  AT_DISPATCH_FLOATING_TYPES(type, "pkt_forward", [&] {
    using A = scalar_t;
    // G, then the cosine matrix K in a copy (the gradient needs G itself)
    auto cosine = [&](const at::Tensor& x, const at::Tensor& norm, const at::Tensor& inv, at::Tensor& gram) {
      B::rows(n, x.size(1), PktNormRow<A>{x.data_ptr<A>(), x.size(1), eps, norm.data_ptr<double>(),
                                          inv.data_ptr<double>()});
      gram = at::matmul(x, x.t()).contiguous();
      at::Tensor K = gram.clone();
      B::rows(n, n, PktCosineRow<A>{K.data_ptr<A>(), inv.data_ptr<double>(), n});
      return K;
    };
    at::Tensor G_s, G_t;
    at::Tensor K_s = cosine(x_s, norm_s, inv_s, G_s), K_t = cosine(x_t, norm_t, inv_t, G_t);
    at::Tensor D_s = grad_s ? at::empty_like(K_s) : at::Tensor(), D_t = grad_t ? at::empty_like(K_t) : at::Tensor();
    B::pkt_rows(PktRow<A>{K_s.data_ptr<A>(), K_t.data_ptr<A>(), n, eps, rows.data_ptr<double>(),
                          data_or_null<A>(D_s), data_or_null<A>(D_t)});
    B::rows(1, n, SumInOrder{rows.data_ptr<double>(), n, 1.0, total.data_ptr<double>()});
    auto input_grad = [&](const at::Tensor& D, const at::Tensor& G, const at::Tensor& x, const at::Tensor& norm,
                          const at::Tensor& inv) {
      at::Tensor M = at::empty_like(D);
      B::rows(n, 2 * n, PktGradMatrixRow<A>{D.data_ptr<A>(), G.data_ptr<A>(), norm.data_ptr<double>(),
                                            inv.data_ptr<double>(), n, M.data_ptr<A>()});
      return at::matmul(M, x);
    };
    if (grad_s) out.grad_s = input_grad(D_s, G_s, x_s, norm_s, inv_s).to(relation_grad_type(student));
    if (grad_t) out.grad_t = input_grad(D_t, G_t, x_t, norm_t, inv_t).to(relation_grad_type(teacher));
  });
  out.loss = total.to(out.loss.scalar_type());
  return out.tuple();
}

template <class B>
Tensor3 cc_forward_impl(const at::Tensor& student, const at::Tensor& teacher, std::string_view kernel, double gamma,
                        int64_t max_p, std::string_view reduction, bool grad_s, bool grad_t) {
  check_relation_args(student, teacher, 2, "[N, D] feature");
  TORCH_CHECK(kernel == "gaussian" || kernel == "bilinear",
              "fastkd: argument 'kernel': expected 'gaussian' or 'bilinear', got '", kernel, "'");
  FASTKD_CHECK_ARG(std::isfinite(gamma) && gamma > 0, "gamma", "expected a finite value > 0, got ", gamma);
  FASTKD_CHECK_ARG(max_p >= 1, "max_p", "expected an integer >= 1, got ", max_p);
  const int64_t n = student.size(0);
  const double div = relation_divisor(reduction, n);
  RelationOutputs out(student, teacher, grad_s, grad_t);
  if (n == 0) return out.tuple();
  const at::ScalarType type = relation_compute_type(student, teacher);
  const CcKernel k{kernel == "gaussian", max_p, 2.0 * gamma, std::exp(-2.0 * gamma)};
  at::Tensor x_s = contiguous_as(student, type), x_t = contiguous_as(teacher, type);
  at::Tensor G_s = at::matmul(x_s, x_s.t()).contiguous(), G_t = at::matmul(x_t, x_t.t()).contiguous();
  at::Tensor E = at::empty_like(G_s);
  at::Tensor D_s = grad_s ? at::empty_like(G_s) : at::Tensor(), D_t = grad_t ? at::empty_like(G_t) : at::Tensor();
  auto f64 = x_s.options().dtype(at::kDouble);
  at::Tensor rows = at::empty({n}, f64), scal = at::empty({2}, f64);  // {||E||^2 -> ||E||, loss}
  AT_DISPATCH_FLOATING_TYPES(type, "cc_forward", [&] {
    using A = scalar_t;
    B::rows(n, 4 * n, CcRow<A>{G_s.data_ptr<A>(), G_t.data_ptr<A>(), n, k, E.data_ptr<A>(), rows.data_ptr<double>()});
    B::rows(1, n, CcNorm{rows.data_ptr<double>(), n, 1.0 / div, scal.data_ptr<double>()});
    if (grad_s || grad_t) {
      B::rows(n, 4 * n, CcGradRow<A>{G_s.data_ptr<A>(), G_t.data_ptr<A>(), E.data_ptr<A>(), scal.data_ptr<double>(),
                                     n, k, 1.0 / div, data_or_null<A>(D_s), data_or_null<A>(D_t)});
    }
  });
  out.loss = scal[1].to(out.loss.scalar_type());
  if (grad_s) out.grad_s = gram_input_grad(D_s, x_s).to(relation_grad_type(student));
  if (grad_t) out.grad_t = gram_input_grad(D_t, x_t).to(relation_grad_type(teacher));
  return out.tuple();
}

// ------------------------------------------------------------------------------------------------------------
// AT: student [N, C_s, S], teacher [N, C_t, S] (pooled and flattened by the Python layer)
// ------------------------------------------------------------------------------------------------------------
template <class B>
Tensor3 at_forward_impl(const at::Tensor& student, const at::Tensor& teacher, double p, std::string_view mode,
                        bool grad_s, bool grad_t) {
  check_relation_args(student, teacher, 3, "[N, C, S] feature-map");
  FASTKD_CHECK_ARG(teacher.size(2) == student.size(2), "teacher", "spatial size ", teacher.size(2),
                   " differs from the student's ", student.size(2));
  FASTKD_CHECK_ARG(std::isfinite(p) && p > 0, "p", "expected a finite value > 0, got ", p);
  TORCH_CHECK(mode == "code" || mode == "paper", "fastkd: argument 'mode': expected 'code' or 'paper', got '", mode,
              "'");
  const int64_t n = student.size(0), spatial = student.size(2);
  RelationOutputs out(student, teacher, grad_s, grad_t);
  if (n == 0) return out.tuple();
  const bool paper = mode == "paper";
  const at::ScalarType type = relation_compute_type(student, teacher);
  at::Tensor x_s = contiguous_as(student, type), x_t = contiguous_as(teacher, type);
  auto f64 = x_s.options().dtype(at::kDouble);
  at::Tensor rows = at::empty({n}, f64), total = at::empty({}, f64);
  at::Tensor g_s = grad_s ? at::empty_like(x_s) : at::Tensor(), g_t = grad_t ? at::empty_like(x_t) : at::Tensor();
  const double inv_count = paper ? 1.0 / n : 1.0 / (static_cast<double>(n) * static_cast<double>(spatial));
  AT_DISPATCH_FLOATING_TYPES(type, "at_forward", [&] {
    using A = scalar_t;
    B::at_pass(AtPass<A>{n, spatial, x_s.size(1), x_t.size(1), p, AtSample{spatial, paper, inv_count},
                         paper ? 1.0 : 1.0 / x_s.size(1), paper ? 1.0 : 1.0 / x_t.size(1), x_s.data_ptr<A>(),
                         x_t.data_ptr<A>(), rows.data_ptr<double>(), data_or_null<A>(g_s), data_or_null<A>(g_t)});
  });
  B::rows(1, n, SumInOrder{rows.data_ptr<double>(), n, 1.0, total.data_ptr<double>()});
  out.loss = total.to(out.loss.scalar_type());
  if (grad_s) out.grad_s = g_s.to(relation_grad_type(student));
  if (grad_t) out.grad_t = g_t.to(relation_grad_type(teacher));
  return out.tuple();
}

}  // namespace fastkd
