// CPU implementation of fastkd::dist_forward (DIST, dist_math.h), vectorized with at::vec (compiled once per
// instruction set, see cpu_common.h) and multithreaded with at::parallel_for.
//
// Phases (the logits are read from memory twice, the second time with the gradients written once):
//   1. rows in K = min(16, N) fixed blocks (the partition does not depend on the thread count), one task per
//      block; per row: sweep 1 the maxima, sweep 2 Z_s and Z_t, sweep 3 the centered softmaxes a, b with the
//      row's sums (sab, saa, sbb) and the block's float64 column sums (ca, cb, caa, cbb, cab) (the row is in L2
//      from sweep 1 on);
//   2. the columns: the K blocks' sums added in block order, then each column's cosine coefficients; the
//      rows' coefficients; the loss (sums over rows and columns in index order: bitwise reproducible);
//   3. (a gradient asked for) per row: sweep A forms y * G and sum_k y_k G_k into the gradient row (and y into
//      a per-task buffer), sweep B subtracts y * sum and scales by -tau (from cache).
// Memory besides the gradients: 5 K C + O(N) float64 values.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "fastkd/dist_host.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kDistBlocks = 16;

// The float64 column sums of one row's entries x = ys - shift_s, w = yt - shift_t (n of them). A fixed
// count for the compiler to vectorize (float -> double conversions and double FMAs).
template <int64_t N, typename Acc>
inline void add_columns(const Acc* __restrict a, const Acc* __restrict b, const Acc* __restrict sa,
                        const Acc* __restrict sb, double* __restrict ca, double* __restrict cb, double* __restrict caa,
                        double* __restrict cbb, double* __restrict cab) {
#pragma GCC unroll 16
  for (int64_t l = 0; l < N; ++l) {
    const double x = static_cast<double>(a[l]) - static_cast<double>(sa[l]);
    const double y = static_cast<double>(b[l]) - static_cast<double>(sb[l]);
    ca[l] += x;
    cb[l] += y;
    caa[l] += x * x;
    cbb[l] += y * y;
    cab[l] += x * y;
  }
}

template <typename Acc>
inline void add_columns_n(const Acc* a, const Acc* b, const Acc* sa, const Acc* sb, int64_t n, double* ca, double* cb,
                          double* caa, double* cbb, double* cab) {
  for (int64_t l = 0; l < n; ++l) {
    const double x = static_cast<double>(a[l]) - static_cast<double>(sa[l]);
    const double y = static_cast<double>(b[l]) - static_cast<double>(sb[l]);
    ca[l] += x;
    cb[l] += y;
    caa[l] += x * x;
    cbb[l] += y * y;
    cab[l] += x * y;
  }
}

template <typename S, typename T, typename Acc>
double dist_rows(const DistParams& p) {
  constexpr int64_t W = Vec<Acc>::size();
  constexpr int64_t kSumBlock = 64 * W;
  using V = Vec<Acc>;
  const int64_t N = p.rows, C = p.cols;
  const int64_t C1 = C - C % W;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const V inv_t_v(static_cast<Acc>(p.inv_tau));
  const V inv_c_v(static_cast<Acc>(1.0 / static_cast<double>(C)));
  const V zero_v(Acc(0));

  // per row
  std::vector<Acc> max_s(N), max_t(N), inv_zs(N), inv_zt(N), ru(N), rv(N), rw(N);
  std::vector<double> r_sab(N), r_saa(N), r_sbb(N);
  // per block and column: ca, cb, caa, cbb, cab
  const int64_t K = std::min<int64_t>(kDistBlocks, N);
  std::vector<double> col_sums(static_cast<size_t>(K * 5 * C));

  auto row_s = [&](int64_t r) { return static_cast<const S*>(p.student) + r * p.student_row_stride; };
  auto row_t = [&](int64_t r) { return static_cast<const T*>(p.teacher) + r * p.teacher_row_stride; };
  // Entries i .. i + W of a row (n < W: the tail, missing lanes -inf: no mass).
  auto ld_s = [&](const S* s, int64_t i, int64_t n) { return n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n); };
  auto ld_t = [&](const T* t, int64_t i, int64_t n) { return n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n); };
  // The centered softmax entries a, b (dist_centered), 0 in missing lanes.
  // The softmax entries ys, yt (0 in missing lanes) and a = ys - 1/C, b = yt - 1/C (dist_centered; 0 there too).
  auto centered = [&](const S* s, const T* t, int64_t r, int64_t i, int64_t n, V& ys, V& yt, V& a, V& b) {
    ys = fk_exp(kd_shift(ld_s(s, i, n), V(max_s[r]), inv_t_v)) * V(inv_zs[r]);
    yt = fk_exp(kd_shift(ld_t(t, i, n), V(max_t[r]), inv_t_v)) * V(inv_zt[r]);
    a = dist_centered(ys, V(Acc(1)), inv_c_v);
    b = dist_centered(yt, V(Acc(1)), inv_c_v);
    if (n < W) {
      a = V::set(zero_v, a, n);
      b = V::set(zero_v, b, n);
    }
  };

  // Sweeps 1 and 2 of row r: its maxima and 1 / Z.
  auto row_norm = [&](int64_t r) {
    const S* s = row_s(r);
    const T* t = row_t(r);
    V ms(neg_inf), mt(neg_inf);
    for (int64_t i = 0; i < C; i += W) {
      const int64_t n = std::min(W, C - i);
      ms = at::vec::maximum(ms, ld_s(s, i, n));
      mt = at::vec::maximum(mt, ld_t(t, i, n));
    }
    max_s[r] = lane_max<Acc>(ms);  // -inf or NaN: the row has no softmax, NaN as in torch
    max_t[r] = lane_max<Acc>(mt);
    const V mxs(max_s[r]), mxt(max_t[r]);
    const std::array<double, 2> z = blocked_sums<Acc, 2>(0, C1, [&](int64_t i) {
      return std::array<V, 2>{fk_exp(kd_shift(load<Acc>(s + i), mxs, inv_t_v)),
                              fk_exp(kd_shift(load<Acc>(t + i), mxt, inv_t_v))};
    });
    double zs = z[0], zt = z[1];
    if (C1 < C) {
      zs += lane_sum<Acc>(fk_exp(kd_shift(ld_s(s, C1, C - C1), mxs, inv_t_v)));
      zt += lane_sum<Acc>(fk_exp(kd_shift(ld_t(t, C1, C - C1), mxt, inv_t_v)));
    }
    inv_zs[r] = static_cast<Acc>(1.0 / zs);
    inv_zt[r] = static_cast<Acc>(1.0 / zt);
  };

  // The column shifts: row 0's softmax entries (dist_math.h).
  std::vector<Acc> sh_s(C), sh_t(C);
  row_norm(0);
  for (int64_t i = 0; i < C; i += W) {
    const int64_t n = std::min(W, C - i);
    V ys, yt, a, b;
    centered(row_s(0), row_t(0), 0, i, n, ys, yt, a, b);
    store_tail<Acc>(sh_s.data() + i, ys, n);
    store_tail<Acc>(sh_t.data() + i, yt, n);
  }

  // ---- phase 1 ----
  at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      double* ca = col_sums.data() + k * 5 * C;
      double* cb = ca + C;
      double* caa = cb + C;
      double* cbb = caa + C;
      double* cab = cbb + C;
      std::fill(ca, ca + 5 * C, 0.0);
      const int64_t r0 = k * N / K, r1 = (k + 1) * N / K;
      for (int64_t r = r0; r < r1; ++r) {
        row_norm(r);
        const S* s = row_s(r);
        const T* t = row_t(r);
        // sweep 3: the row's sums, and the block's column sums
        double sab = 0.0, saa = 0.0, sbb = 0.0;
        for (int64_t blk = 0; blk < C; blk += kSumBlock) {
          const int64_t blk_end = std::min(C, blk + kSumBlock);
          V vab(Acc(0)), vaa(Acc(0)), vbb(Acc(0));
          auto step = [&](int64_t i, auto full) {
            constexpr bool kFull = decltype(full)::value;
            const int64_t n = kFull ? W : C - i;
            V ys, yt, a, b;
            centered(s, t, r, i, n, ys, yt, a, b);
            vab = at::vec::fmadd(a, b, vab);
            vaa = at::vec::fmadd(a, a, vaa);
            vbb = at::vec::fmadd(b, b, vbb);
            alignas(64) Acc abuf[W], bbuf[W];
            ys.store(abuf);
            yt.store(bbuf);
            if constexpr (kFull) {
              add_columns<W>(abuf, bbuf, sh_s.data() + i, sh_t.data() + i, ca + i, cb + i, caa + i, cbb + i, cab + i);
            } else {
              add_columns_n(abuf, bbuf, sh_s.data() + i, sh_t.data() + i, n, ca + i, cb + i, caa + i, cbb + i,
                            cab + i);
            }
          };
          const int64_t full_end = std::min(blk_end, C1);
          for (int64_t i = blk; i < full_end; i += W) step(i, std::true_type{});
          if (full_end < blk_end) step(full_end, std::false_type{});
          sab += lane_sum<Acc>(vab);
          saa += lane_sum<Acc>(vaa);
          sbb += lane_sum<Acc>(vbb);
        }
        r_sab[r] = sab;
        r_saa[r] = saa;
        r_sbb[r] = sbb;
      }
    }
  });

  // ---- phase 2: columns, rows, loss ----
  std::vector<Acc> c_ma(C), c_mb(C), c_u(C), c_v(C), c_w(C);
  std::vector<double> kappa(C);
  const double col_scale = dist_col_scale(p), row_scale = dist_row_scale(p);
  at::parallel_for(0, C, 2048, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      std::array<double, 5> sum{};
      for (int64_t k = 0; k < K; ++k) {
        const double* blk = col_sums.data() + k * 5 * C;
        for (int q = 0; q < 5; ++q) sum[q] += blk[q * C + j];
      }
      const DistColumn col = dist_column(sum[0], sum[1], sum[2], sum[3], sum[4], sh_s[j], sh_t[j], N);
      const DistCos cs = dist_cos(col.sab, col.saa, col.sbb, p.eps);
      kappa[j] = cs.cos;
      c_ma[j] = static_cast<Acc>(col.mean_s);
      c_mb[j] = static_cast<Acc>(col.mean_t);
      c_u[j] = static_cast<Acc>(col_scale * cs.u);
      c_v[j] = static_cast<Acc>(col_scale * cs.v);
      c_w[j] = static_cast<Acc>(col_scale * cs.w);
    }
  });
  double sum_rho = 0.0, sum_kappa = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    const DistCos cs = dist_cos(r_sab[r], r_saa[r], r_sbb[r], p.eps);
    sum_rho += cs.cos;
    ru[r] = static_cast<Acc>(row_scale * cs.u);
    rv[r] = static_cast<Acc>(row_scale * cs.v);
    rw[r] = static_cast<Acc>(row_scale * cs.w);
  }
  for (int64_t j = 0; j < C; ++j) sum_kappa += kappa[j];
  const double loss = dist_loss_value(p, sum_rho, sum_kappa);

  // ---- phase 3: gradients ----
  Acc* GS = static_cast<Acc*>(p.grad_student);
  Acc* GT = static_cast<Acc*>(p.grad_teacher);
  if (GS == nullptr && GT == nullptr) return loss;
  const V neg_tau_v(static_cast<Acc>(-p.tau));
  auto ld_col = [&](const std::vector<Acc>& x, int64_t i, int64_t n) {
    return n == W ? V::loadu(x.data() + i) : load_tail<Acc>(x.data() + i, n, Acc(0));
  };
  at::parallel_for(0, N, 1, [&](int64_t rb, int64_t re) {
    std::vector<Acc> ys_buf(GS ? C : 0), yt_buf(GT ? C : 0);
    for (int64_t r = rb; r < re; ++r) {
      const S* s = row_s(r);
      const T* t = row_t(r);
      Acc* gs = GS ? GS + r * C : nullptr;
      Acc* gt = GT ? GT + r * C : nullptr;
      const V ru_v(ru[r]), rv_v(rv[r]), rw_v(rw[r]);
      double ss = 0.0, st = 0.0;
      // sweep A: y * G into the gradient rows, y into the buffers, the sums of y * G
      for (int64_t blk = 0; blk < C; blk += kSumBlock) {
        const int64_t blk_end = std::min(C, blk + kSumBlock);
        V vs(Acc(0)), vt(Acc(0));
        for (int64_t i = blk; i < blk_end; i += W) {
          const int64_t n = std::min(W, C - i);
          V ys, yt, a, b;
          centered(s, t, r, i, n, ys, yt, a, b);
          const V cu = ld_col(c_u, i, n);
          const V alpha = ys - ld_col(c_ma, i, n), beta = yt - ld_col(c_mb, i, n);
          if (gs) {
            const V y = ys;
            const V yg = y * dist_student_g(a, b, alpha, beta, ru_v, rv_v, cu, ld_col(c_v, i, n));
            vs += yg;
            if (n == W) {
              yg.store(gs + i);
              y.store(ys_buf.data() + i);
            } else {
              store_tail<Acc>(gs + i, yg, n);
              store_tail<Acc>(ys_buf.data() + i, y, n);
            }
          }
          if (gt) {
            const V y = yt;
            const V yg = y * dist_teacher_g(a, b, alpha, beta, ru_v, rw_v, cu, ld_col(c_w, i, n));
            vt += yg;
            if (n == W) {
              yg.store(gt + i);
              y.store(yt_buf.data() + i);
            } else {
              store_tail<Acc>(gt + i, yg, n);
              store_tail<Acc>(yt_buf.data() + i, y, n);
            }
          }
        }
        ss += lane_sum<Acc>(vs);
        st += lane_sum<Acc>(vt);
      }
      // sweep B: grad = -tau (y G - y sum)
      auto finish = [&](Acc* g, const Acc* y, double sum) {
        const V sum_v(static_cast<Acc>(sum));
        int64_t i = 0;
        for (; i < C1; i += W) {
          (neg_tau_v * (V::loadu(g + i) - V::loadu(y + i) * sum_v)).store(g + i);
        }
        for (; i < C; ++i) g[i] = static_cast<Acc>(-p.tau) * (g[i] - y[i] * static_cast<Acc>(sum));
      };
      if (gs) finish(gs, ys_buf.data(), ss);
      if (gt) finish(gt, yt_buf.data(), st);
    }
  });
  return loss;
}

}  // namespace
}  // namespace CPU_CAPABILITY

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                double beta, double gamma, double tau, double eps,
                                                                bool grad_student, bool grad_teacher) {
  DistCall c = dist_prepare(student, teacher, beta, gamma, tau, eps, grad_student, grad_teacher, alloc_grad);
  if (!dist_has_work(c)) return dist_outputs(c, at::Tensor());
  double loss = 0.0;
  kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    loss = dist_rows<S, T, Acc>(c.p);
  });
  return dist_outputs(c, at::scalar_tensor(loss, c.student.options().dtype(at::kDouble)));
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl(DistOp::name, &cpu::dist_forward_cpu); }

}  // namespace fastkd
