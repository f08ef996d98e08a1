// CPU implementation of fastkd::dist_forward (DIST, dist_math.h), vectorized with at::vec (compiled once per
// instruction set, see cpu_common.h) and multithreaded with at::parallel_for.
//
// Phases (the logits are read from memory twice, the second time with the gradients written once; one
// exponential per entry and input in each of the two reads):
//   1. rows in K = min(16, N) fixed blocks (the partition does not depend on the thread count), one task per
//      block, a block's rows in groups of kGroupRows; per row of a group: sweep 1 the maxima, sweep 2 Z_s and
//      Z_t with the exponentials kept in the group's stage (the row is in L2 from sweep 1 on); then one sweep
//      over the group's stage, column vector by column vector: the centered softmaxes a, b, the rows' sums
//      (sab, saa, sbb) and the block's float64 column sums (ca, cb, caa, cbb, cab), those held in registers
//      across the group's rows (the column sums are read and written once per group, not once per row);
//   2. the columns: the K blocks' sums added in block order, then each column's cosine coefficients; the
//      rows' coefficients; the loss (sums over rows and columns in index order: bitwise reproducible);
//   3. (a gradient asked for) per row: sweep A forms y * G and sum_k y_k G_k into the gradient row (and y into
//      a per-task buffer), sweep B subtracts y * sum and scales by -tau (from cache).
// Every sum's order depends on the data's shape only: the same bits for any thread count.
// Memory besides the gradients: 5 K C + O(N) float64 values, and per task a stage of 2 kGroupRows C values.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
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
// Rows whose column sums one sweep adds (the stage: 2 kGroupRows C values, in L2 / L3).
constexpr int64_t kGroupRows = 8;
// Columns per step of phase 2's reduction over the blocks.
constexpr int64_t kColTile = 256;

// The entries of an accumulation-type vector as float64 vectors (exact): a float vector's low and high halves,
// a double vector itself. (Written with the ISA's conversion instructions: GCC 12 left the equivalent scalar
// loop unvectorized here, one conversion per entry.)
template <typename Acc>
using DoubleParts = std::array<Vec<double>, Vec<Acc>::size() / Vec<double>::size()>;

template <typename Acc>
inline DoubleParts<Acc> to_double(const Vec<Acc>& v) {
  if constexpr (std::is_same_v<Acc, double>) {
    return {v};
  } else {
    static_assert(std::is_same_v<Acc, float> && Vec<float>::size() == 2 * Vec<double>::size());
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 x = v;
    return {Vec<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(x))),
            Vec<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)))};
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 x = v;
    return {Vec<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(x))),
            Vec<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))};
#else
    constexpr int64_t H = Vec<double>::size();
    alignas(64) float f[2 * H];
    alignas(64) double d[2 * H];
    v.store(f);
    for (int64_t l = 0; l < 2 * H; ++l) d[l] = static_cast<double>(f[l]);
    return {Vec<double>::loadu(d), Vec<double>::loadu(d + H)};
#endif
  }
}

// Runs step(i, full) over the vectors of columns [begin, end) of a row of C1 full-vector columns (begin a multiple
// of the width W): the full ones with full = std::true_type, then the row's tail (std::false_type) where it
// falls in the range. A step's lane count is then a compile-time constant on the hot path.
template <int64_t W, typename Step>
inline void vector_steps(int64_t begin, int64_t end, int64_t C1, Step&& step) {
  const int64_t full_end = std::min(end, C1);
  for (int64_t i = begin; i < full_end; i += W) step(i, std::true_type{});
  if (full_end < end) step(full_end, std::false_type{});
}

template <typename S, typename T, typename Acc>
double dist_rows(const DistParams& p) {
  constexpr int64_t W = Vec<Acc>::size();
  constexpr int64_t kSumBlock = 64 * W;
  using V = Vec<Acc>;
  using VD = Vec<double>;
  constexpr int64_t WD = VD::size(), H = W / WD;  // a V as H float64 vectors
  const int64_t N = p.rows, C = p.cols;
  const int64_t C1 = C - C % W;
  // Per-column arrays and staged rows are padded to whole vectors (Cp columns), the padding holding zeros (or
  // exp(-inf) = 0): a column sweep loads whole vectors everywhere.
  const int64_t Cp = C1 < C ? C1 + W : C;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const V inv_t_v(static_cast<Acc>(p.inv_tau));
  const V inv_c_v(static_cast<Acc>(1.0 / static_cast<double>(C)));
  const V one_v(Acc(1)), zero_v(Acc(0));

  // per row
  std::vector<Acc> max_s(N), max_t(N), inv_zs(N), inv_zt(N), ru(N), rv(N), rw(N);
  std::vector<double> r_sab(N), r_saa(N), r_sbb(N);
  // per block and column: ca, cb, caa, cbb, cab ([K][5][Cp]; each block's first group writes them)
  const int64_t K = std::min<int64_t>(kDistBlocks, N);
  const std::unique_ptr<double[]> col_sums(new double[static_cast<size_t>(K * 5 * Cp)]);

  auto row_s = [&](int64_t r) { return static_cast<const S*>(p.student) + r * p.student_row_stride; };
  auto row_t = [&](int64_t r) { return static_cast<const T*>(p.teacher) + r * p.teacher_row_stride; };
  // Entries i .. i + W of a row (the tail: missing lanes -inf, no mass).
  auto ld = [&](const auto* x, int64_t i, auto full) {
    if constexpr (decltype(full)::value) return load<Acc>(x + i);
    else return load_tail<Acc>(x + i, C - i);
  };
  // The centered entries a = y - 1/C (dist_centered), 0 in a tail's missing lanes.
  auto centered = [&](const V& y, int64_t i, auto full) {
    const V a = dist_centered(y, one_v, inv_c_v);
    if constexpr (decltype(full)::value) return a;
    else return V::set(zero_v, a, C - i);
  };

  // Sweeps 1 and 2 of row r: its maxima and 1 / Z; the exponentials go to es, et (Cp entries each, 0 in the
  // padding). The softmax entry is then y = e * (1 / Z), as sweep A below computes it again.
  auto row_norm = [&](int64_t r, Acc* __restrict es, Acc* __restrict et) {
    const S* s = row_s(r);
    const T* t = row_t(r);
    V ms(neg_inf), mt(neg_inf);
    vector_steps<W>(0, C, C1, [&](int64_t i, auto full) {
      ms = at::vec::maximum(ms, ld(s, i, full));
      mt = at::vec::maximum(mt, ld(t, i, full));
    });
    const Acc mx_s = lane_max<Acc>(ms), mx_t = lane_max<Acc>(mt);  // -inf or NaN: no softmax, NaN as in torch
    max_s[r] = mx_s;
    max_t[r] = mx_t;
    const V mxs(mx_s), mxt(mx_t);
    const std::array<double, 2> z = blocked_sums<Acc, 2>(0, C1, [&](int64_t i) {
      const V e_s = fk_exp(kd_shift(load<Acc>(s + i), mxs, inv_t_v));
      const V e_t = fk_exp(kd_shift(load<Acc>(t + i), mxt, inv_t_v));
      e_s.store(es + i);
      e_t.store(et + i);
      return std::array<V, 2>{e_s, e_t};
    });
    double zs = z[0], zt = z[1];
    if (C1 < C) {
      const V e_s = fk_exp(kd_shift(ld(s, C1, std::false_type{}), mxs, inv_t_v));
      const V e_t = fk_exp(kd_shift(ld(t, C1, std::false_type{}), mxt, inv_t_v));
      e_s.store(es + C1);
      e_t.store(et + C1);
      zs += lane_sum<Acc>(e_s);
      zt += lane_sum<Acc>(e_t);
    }
    inv_zs[r] = static_cast<Acc>(1.0 / zs);
    inv_zt[r] = static_cast<Acc>(1.0 / zt);
  };

  // The column shifts: row 0's softmax entries (dist_math.h), 0 in the padding.
  std::vector<Acc> sh_s(Cp), sh_t(Cp);
  row_norm(0, sh_s.data(), sh_t.data());
  for (int64_t i = 0; i < Cp; i += W) {
    (V::loadu(sh_s.data() + i) * V(inv_zs[0])).store(sh_s.data() + i);
    (V::loadu(sh_t.data() + i) * V(inv_zt[0])).store(sh_t.data() + i);
  }

  // ---- phase 1 ----
  // The staged rows g0 .. g0 + nr of a block: their row sums, and the block's column sums cs (written when
  // `first`, else added to), column vector by column vector.
  auto group_sums = [&](int64_t g0, int64_t nr, const Acc* es, const Acc* et, double* __restrict cs, bool first) {
    const Acc* shs = sh_s.data();
    const Acc* sht = sh_t.data();
    const Acc* izs = inv_zs.data() + g0;
    const Acc* izt = inv_zt.data() + g0;
    std::array<V, kGroupRows> vab, vaa, vbb;
    for (int64_t blk = 0; blk < C; blk += kSumBlock) {
      vab.fill(zero_v);
      vaa.fill(zero_v);
      vbb.fill(zero_v);
      vector_steps<W>(blk, std::min(C, blk + kSumBlock), C1, [&](int64_t i, auto full) {
        // the five column sums of these W columns as float64 vectors, acc[q][h] (q: ca, cb, caa, cbb, cab)
        std::array<std::array<VD, H>, 5> acc;
        for (int64_t q = 0; q < 5; ++q) {
          for (int64_t h = 0; h < H; ++h) acc[q][h] = first ? VD(0.0) : VD::loadu(cs + q * Cp + i + h * WD);
        }
        const DoubleParts<Acc> shift_s = to_double<Acc>(V::loadu(shs + i));
        const DoubleParts<Acc> shift_t = to_double<Acc>(V::loadu(sht + i));
        for (int64_t rr = 0; rr < nr; ++rr) {
          const V ys = V::loadu(es + rr * Cp + i) * V(izs[rr]);
          const V yt = V::loadu(et + rr * Cp + i) * V(izt[rr]);
          const V a = centered(ys, i, full), b = centered(yt, i, full);
          vab[rr] = at::vec::fmadd(a, b, vab[rr]);
          vaa[rr] = at::vec::fmadd(a, a, vaa[rr]);
          vbb[rr] = at::vec::fmadd(b, b, vbb[rr]);
          const DoubleParts<Acc> ds = to_double<Acc>(ys), dt = to_double<Acc>(yt);
          for (int64_t h = 0; h < H; ++h) {
            const VD x = ds[h] - shift_s[h], w = dt[h] - shift_t[h];
            acc[0][h] += x;
            acc[1][h] += w;
            acc[2][h] = at::vec::fmadd(x, x, acc[2][h]);
            acc[3][h] = at::vec::fmadd(w, w, acc[3][h]);
            acc[4][h] = at::vec::fmadd(x, w, acc[4][h]);
          }
        }
        for (int64_t q = 0; q < 5; ++q) {
          for (int64_t h = 0; h < H; ++h) acc[q][h].store(cs + q * Cp + i + h * WD);
        }
      });
      for (int64_t rr = 0; rr < nr; ++rr) {
        r_sab[g0 + rr] += lane_sum<Acc>(vab[rr]);
        r_saa[g0 + rr] += lane_sum<Acc>(vaa[rr]);
        r_sbb[g0 + rr] += lane_sum<Acc>(vbb[rr]);
      }
    }
  };
  at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
    std::vector<Acc> stage(static_cast<size_t>(2 * kGroupRows * Cp));
    Acc* es = stage.data();
    Acc* et = es + kGroupRows * Cp;
    for (int64_t k = kb; k < ke; ++k) {
      double* cs = col_sums.get() + k * 5 * Cp;
      const int64_t r0 = k * N / K, r1 = (k + 1) * N / K;
      for (int64_t g0 = r0; g0 < r1; g0 += kGroupRows) {
        const int64_t nr = std::min(kGroupRows, r1 - g0);
        for (int64_t rr = 0; rr < nr; ++rr) row_norm(g0 + rr, es + rr * Cp, et + rr * Cp);
        group_sums(g0, nr, es, et, cs, g0 == r0);
      }
    }
  });

  // ---- phase 2: columns, rows, loss ----
  // per column, 0 in the padding
  std::vector<Acc> c_ma(Cp), c_mb(Cp), c_u(Cp), c_v(Cp), c_w(Cp);
  std::vector<double> kappa(C);
  const double col_scale = dist_col_scale(p), row_scale = dist_row_scale(p);
  at::parallel_for(0, (C + kColTile - 1) / kColTile, 8, [&](int64_t tb, int64_t te) {
    for (int64_t j0 = tb * kColTile; j0 < std::min(C, te * kColTile); j0 += kColTile) {
      const int64_t nj = std::min(kColTile, C - j0);
      double sum[5][kColTile];
      for (int64_t q = 0; q < 5; ++q) std::copy_n(col_sums.get() + q * Cp + j0, nj, sum[q]);
      for (int64_t k = 1; k < K; ++k) {
        for (int64_t q = 0; q < 5; ++q) {
          const double* blk = col_sums.get() + (k * 5 + q) * Cp + j0;
          for (int64_t l = 0; l < nj; ++l) sum[q][l] += blk[l];
        }
      }
      for (int64_t l = 0; l < nj; ++l) {
        const int64_t j = j0 + l;
        const DistColumn col = dist_column(sum[0][l], sum[1][l], sum[2][l], sum[3][l], sum[4][l], sh_s[j], sh_t[j], N);
        const DistCos cs = dist_cos(col.sab, col.saa, col.sbb, p.eps);
        kappa[j] = cs.cos;
        c_ma[j] = static_cast<Acc>(col.mean_s);
        c_mb[j] = static_cast<Acc>(col.mean_t);
        c_u[j] = static_cast<Acc>(col_scale * cs.u);
        c_v[j] = static_cast<Acc>(col_scale * cs.v);
        c_w[j] = static_cast<Acc>(col_scale * cs.w);
      }
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
  const Acc neg_tau = static_cast<Acc>(-p.tau);
  // The rows rb .. re, for the gradients asked for (kS: the student's, kT: the teacher's).
  auto grad_rows = [&](int64_t rb, int64_t re, auto want_s, auto want_t) {
    constexpr bool kS = decltype(want_s)::value, kT = decltype(want_t)::value;
    std::vector<Acc> ys_buf(kS ? Cp : 0), yt_buf(kT ? Cp : 0);
    Acc* __restrict ybs = ys_buf.data();
    Acc* __restrict ybt = yt_buf.data();
    const Acc* cma = c_ma.data();
    const Acc* cmb = c_mb.data();
    const Acc* cu = c_u.data();
    const Acc* cv = c_v.data();
    const Acc* cw = c_w.data();
    for (int64_t r = rb; r < re; ++r) {
      const S* s = row_s(r);
      const T* t = row_t(r);
      Acc* __restrict gs = kS ? GS + r * C : nullptr;
      Acc* __restrict gt = kT ? GT + r * C : nullptr;
      const V mxs(max_s[r]), mxt(max_t[r]), izs(inv_zs[r]), izt(inv_zt[r]);
      const V ru_v(ru[r]), rv_v(rv[r]), rw_v(rw[r]);
      // One side's entries i .. i + W of sweep A: y * G into the gradient row and into the sum, y into the buffer.
      auto emit = [&](Acc* g, Acc* buf, const V& y, const V& yg, V& sum, int64_t i, auto full) {
        sum += yg;
        y.store(buf + i);
        if constexpr (decltype(full)::value) yg.store(g + i);
        else store_tail<Acc>(g + i, yg, C - i);
      };
      double ss = 0.0, st = 0.0;
      // sweep A
      for (int64_t blk = 0; blk < C; blk += kSumBlock) {
        V vs(zero_v), vt(zero_v);
        vector_steps<W>(blk, std::min(C, blk + kSumBlock), C1, [&](int64_t i, auto full) {
          const V ys = fk_exp(kd_shift(ld(s, i, full), mxs, inv_t_v)) * izs;
          const V yt = fk_exp(kd_shift(ld(t, i, full), mxt, inv_t_v)) * izt;
          const V a = centered(ys, i, full), b = centered(yt, i, full);
          const V cu_v = V::loadu(cu + i);
          const V alpha = ys - V::loadu(cma + i), beta = yt - V::loadu(cmb + i);
          if constexpr (kS) {
            const V g = dist_student_g(a, b, alpha, beta, ru_v, rv_v, cu_v, V::loadu(cv + i));
            emit(gs, ybs, ys, ys * g, vs, i, full);
          }
          if constexpr (kT) {
            const V g = dist_teacher_g(a, b, alpha, beta, ru_v, rw_v, cu_v, V::loadu(cw + i));
            emit(gt, ybt, yt, yt * g, vt, i, full);
          }
        });
        ss += lane_sum<Acc>(vs);
        st += lane_sum<Acc>(vt);
      }
      // sweep B: grad = -tau (y G - y sum)
      auto finish = [&](Acc* __restrict g, const Acc* __restrict y, double sum) {
        const V sum_v(static_cast<Acc>(sum)), neg_tau_v(neg_tau);
        int64_t i = 0;
        for (; i < C1; i += W) (neg_tau_v * (V::loadu(g + i) - V::loadu(y + i) * sum_v)).store(g + i);
        for (; i < C; ++i) g[i] = neg_tau * (g[i] - y[i] * static_cast<Acc>(sum));
      };
      if constexpr (kS) finish(gs, ybs, ss);
      if constexpr (kT) finish(gt, ybt, st);
    }
  };
  at::parallel_for(0, N, 1, [&](int64_t rb, int64_t re) {
    if (GS && GT) grad_rows(rb, re, std::true_type{}, std::true_type{});
    else if (GS) grad_rows(rb, re, std::true_type{}, std::false_type{});
    else grad_rows(rb, re, std::false_type{}, std::true_type{});
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
