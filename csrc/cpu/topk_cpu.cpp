// CPU implementation of fastkd::topk_kd_forward: KD against a sparse (top-k) teacher.
//
// Per row (rows in parallel): the teacher's k kept entries give log p_k (kd_math.h: topk_teacher); the
// student's row is swept three times: its maximum and its sum of exponentials (with a tail bucket both over
// the entries outside the kept set, gap by gap between the sorted kept indices: the tail mass comes out
// exactly and in log space, no 1 - sum cancellation and no underflow), then the gradient of every entry,
// after which the k kept entries are overwritten with c * (q_k - p_k) (kd_math.h: topk_student and the
// per-entry terms). Teacher memory is O(rows * k). Per-row temperatures (row_options.h) scale each row; a
// temperature gradient adds one sum (of e b) to the reference set's sweep and the kept entries' terms.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "fastkd/kd_host.h"
#include "kd_rows.h"

namespace fastkd {
namespace cpu {
namespace {

// sum_{j in [lo, hi)} exp(b_j), b_j = (s_j - max_s) / T, vectorized and blocked; with Dots also
// sum e_j b_j (a temperature gradient's row dot, row_options.h: TopkDotSums::ref_eb), 0 where e_j is 0.
template <bool Dots, typename S, typename Acc>
std::array<double, 2> sum_exp(const S* s, int64_t lo, int64_t hi, const Vec<Acc>& max_s_v, const Vec<Acc>& inv_t_v) {
  constexpr int64_t W = Vec<Acc>::size();
  const int64_t full = lo + (hi - lo) / W * W;
  auto terms = [&](const Vec<Acc>& x) {
    const Vec<Acc> b = kd_shift(x, max_s_v, inv_t_v), e = fk_exp(b);
    if constexpr (Dots) return std::array<Vec<Acc>, 2>{e, fk_select_nonzero(e, e * b)};
    else return std::array<Vec<Acc>, 1>{e};
  };
  constexpr size_t N = Dots ? 2 : 1;
  const std::array<double, N> sums = blocked_sums<Acc, N>(lo, full, [&](int64_t i) { return terms(load<Acc>(s + i)); });
  std::array<double, 2> total{sums[0], Dots ? sums[N - 1] : 0.0};
  if (full < hi) {
    const auto t = terms(load_tail<Acc>(s + full, hi - full));
    total[0] += lane_sum<Acc>(t[0]);
    if constexpr (Dots) total[1] += lane_sum<Acc>(t[1]);
  }
  return total;
}

// max_{j in [lo, hi)} s_j folded into m, vectorized.
template <typename S, typename Acc>
void fold_max(const S* s, int64_t lo, int64_t hi, Vec<Acc>& m) {
  constexpr int64_t W = Vec<Acc>::size();
  const int64_t full = lo + (hi - lo) / W * W;
  for (int64_t i = lo; i < full; i += W) m = at::vec::maximum(m, load<Acc>(s + i));
  if (full < hi) m = at::vec::maximum(m, load_tail<Acc>(s + full, hi - full));
}

// Calls f(lo, hi) for each run of entries outside the kept set (between the sorted kept indices).
template <typename F>
void for_each_gap(const int64_t* idx, int64_t K, int64_t V, F&& f) {
  int64_t lo = 0;
  for (int64_t k = 0; k < K; ++k) {
    f(lo, idx[k]);
    lo = idx[k] + 1;
  }
  f(lo, V);
}

template <typename S, typename Acc>
void topk_rows(const TopkParams& p, double count, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<Acc>::size();
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t V = p.vocab, K = p.k;
  const int64_t V1 = V - V % W;
  const bool bucket = p.tail_bucket;
  const bool dots = p.row_grad_temperature != nullptr;  // the temperature gradient's row dots (row_options.h)
  auto* S_out = static_cast<S*>(p.grad_student);
  auto* row_soft = static_cast<Acc*>(p.row_soft);
  std::vector<double> b, log_p;  // per kept entry: shifted student logit, teacher log-probability
  std::vector<S> kept;           // the kept entries' gradients of a row

  for (int64_t r = begin; r < end; ++r) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const Acc* v = static_cast<const Acc*>(p.values) + r * K;
    const int64_t* idx = p.indices + r * K;
    S* gs = S_out ? S_out + r * V : nullptr;
    auto zero_row = [&] {
      row_soft[r] = Acc(0);
      if (dots) p.row_grad_temperature[r] = 0.0;
      if (gs) std::fill(gs, gs + V, S(0));
    };
    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      zero_row();
      continue;
    }
    // The row's temperature, weight and coefficients.
    const RowScalars rs = row_scalars(p, r, count);
    const double inv_t = rs.inv_s, coef = rs.coef * rs.inv_s;
    const Vec<Acc> inv_t_v(static_cast<Acc>(inv_t));

    // Maxima: the teacher's k values; the student over its reference set (outside the kept set with a
    // tail bucket, else the whole row) and over the kept entries.
    double max_v = -INFINITY, max_kept = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      max_v = kd_nan_max(max_v, static_cast<double>(v[k]));
      max_kept = kd_nan_max(max_kept, static_cast<double>(static_cast<Acc>(s[idx[k]])));
    }
    Vec<Acc> m0(neg_inf);
    if (bucket) for_each_gap(idx, K, V, [&](int64_t lo, int64_t hi) { fold_max<S, Acc>(s, lo, hi, m0); });
    else fold_max<S, Acc>(s, 0, V, m0);
    const Acc max_ref = lane_max<Acc>(m0);
    if (kd_row_empty<double>(kd_nan_max<double>(max_ref, max_kept), max_v)) {  // fully masked
      zero_row();
      continue;
    }

    // Teacher: log p_k.
    const double origin_v = kd_origin(max_v), scale = p.values_are_logprobs ? 1.0 : inv_t;
    double z_v = 0.0;
    for (int64_t k = 0; k < K; ++k) z_v += std::exp((static_cast<double>(v[k]) - origin_v) * scale);
    const TopkTeacher tt = topk_teacher(origin_v, z_v, p.values_are_logprobs, bucket, inv_t);

    // Student: the reference set's sum (and, for the temperature gradient, its sum of e b), the kept entries'
    // log-sum-exp, then log Z_s and log q_tail.
    const Acc origin = kd_origin(max_ref);
    const Vec<Acc> origin_v_s(origin);
    double z_ref = 0.0;
    TopkDotSums kds;
    auto add_ref = [&](int64_t lo, int64_t hi) {
      const std::array<double, 2> t = dots ? sum_exp<true, S, Acc>(s, lo, hi, origin_v_s, inv_t_v)
                                           : sum_exp<false, S, Acc>(s, lo, hi, origin_v_s, inv_t_v);
      z_ref += t[0];
      kds.ref_eb += t[1];
    };
    if (bucket) for_each_gap(idx, K, V, add_ref);
    else add_ref(0, V);
    b.resize(K);
    log_p.resize(K);
    double max_b = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      b[k] = (static_cast<double>(static_cast<Acc>(s[idx[k]])) - origin) * inv_t;
      log_p[k] = topk_log_p(tt, static_cast<double>(v[k]));
      max_b = kd_nan_max(max_b, b[k]);
    }
    double lse_kept = -INFINITY;
    if (bucket) {
      double z_kept = 0.0;
      for (int64_t k = 0; k < K; ++k) z_kept += std::exp(b[k] - kd_origin(max_b));
      lse_kept = kd_origin(max_b) + std::log(z_kept);
    }
    const TopkStudent st = topk_student(std::log(z_ref), lse_kept, bucket, tt.p_tail);

    // Row loss: sum_k p_k (log p_k - log q_k) [+ p_tail (log p_tail - log q_tail)].
    double kl = topk_tail_term(tt, st);
    for (int64_t k = 0; k < K; ++k) kl += topk_kept_term(log_p[k], b[k] - st.log_zs);
    row_soft[r] = static_cast<Acc>(rs.weight * rs.loss_factor * kl);
    if (dots) {
      for (int64_t k = 0; k < K; ++k) topk_dot_terms(log_p[k], b[k], b[k] - st.log_zs, kds);
      double d_s = 0.0, d_t = 0.0;
      topk_row_dots(kds, z_ref, tt, st, bucket, p.values_are_logprobs, kl, d_s, d_t);
      p.row_grad_temperature[r] = row_grad_temperature(rs, p.scale_by_temperature, kl, d_s, d_t);
    }
    if (!gs) continue;

    // Gradient: c * dense * e_j everywhere, then c * (q_k - p_k) at the kept entries. The kept values are
    // computed first: the gradient may overwrite the student row in place (fused linear head).
    kept.resize(K);
    for (int64_t k = 0; k < K; ++k) kept[k] = static_cast<S>(topk_kept_grad(coef, log_p[k], b[k] - st.log_zs));
    const Vec<Acc> dense_v(static_cast<Acc>(coef * st.dense));
    for (int64_t i = 0; i < V1; i += W) {
      store<S>(gs + i, dense_v * fk_exp(kd_shift(load<Acc>(s + i), origin_v_s, inv_t_v)));
    }
    if (V1 < V) {
      const int64_t n = V - V1;
      store_tail<S>(gs + V1, dense_v * fk_exp(kd_shift(load_tail<Acc>(s + V1, n), origin_v_s, inv_t_v)), n);
    }
    for (int64_t k = 0; k < K; ++k) gs[idx[k]] = kept[k];
  }
}

}  // namespace

inline namespace CPU_CAPABILITY {
// Runs topk_rows over every row of the call (declared in kd_rows.h; the fused linear head uses it too).
void run_topk_rows(const TopkCall& c, double count) {
  const TopkParams& p = c.p;
  const int64_t grain = std::max<int64_t>(1, 8192 / p.vocab);
  auto run = [&](auto s_tag) {
    using S = decltype(s_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { topk_rows<S, Acc>(p, count, b, e); });
  };
  kd_dispatch_student(c.student.scalar_type(), run);
}
}  // namespace CPU_CAPABILITY

namespace {

TopkOutputs topk_kd_forward_cpu(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                                double temperature, bool values_are_logprobs, bool tail_bucket, int64_t ignore_index,
                                c10::string_view reduction, bool scale_by_temperature, bool grad_student,
                                const std::optional<at::Tensor>& row_weight,
                                const std::optional<at::Tensor>& row_temperature, bool grad_temperature) {
  const LossConfig cfg = make_topk_config(temperature, scale_by_temperature, ignore_index, to_view(reduction));
  TopkCall c = topk_prepare(student, values, indices, labels, num_items, cfg, values_are_logprobs, tail_bucket,
                            grad_student, alloc_grad, row_weight, row_temperature, grad_temperature);
  if (c.p.rows > 0) run_topk_rows(c, host_count(c.count, c.p.rows));
  return topk_outputs(c);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_kd_forward", &cpu::topk_kd_forward_cpu);
}

}  // namespace fastkd
