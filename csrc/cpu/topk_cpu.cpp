// CPU implementation of fastkd::topk_kd_forward: KD against a sparse (top-k) teacher.
//
// Per row (rows in parallel): the teacher's k kept entries give log p_k (kd_math.h: topk_teacher); the
// student's full row is swept three times: its maximum, its Z (and, with a tail bucket, the mass outside
// the kept set, summed over the gaps between the sorted kept indices: exact, no 1 - sum cancellation),
// then the gradient c * q_j * (1 - p_tail / q_tail) for every entry, after which the k kept entries are
// overwritten with c * (q_j - p_k). Teacher memory is O(rows * k).
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

// sum_{j in [lo, hi)} exp((s_j - max_s) / T), vectorized and blocked.
template <typename S, typename Acc>
double sum_exp(const S* s, int64_t lo, int64_t hi, const Vec<Acc>& max_s_v, const Vec<Acc>& inv_t_v) {
  constexpr int64_t W = Vec<Acc>::size();
  const int64_t full = lo + (hi - lo) / W * W;
  double total = blocked_sums<Acc, 1>(lo, full, [&](int64_t i) {
    return std::array<Vec<Acc>, 1>{fk_exp(kd_shift(load<Acc>(s + i), max_s_v, inv_t_v))};
  })[0];
  if (full < hi) total += lane_sum<Acc>(fk_exp(kd_shift(load_tail<Acc>(s + full, hi - full), max_s_v, inv_t_v)));
  return total;
}

template <typename S, typename Acc>
void topk_rows(const TopkParams& p, double count, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<Acc>::size();
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t V = p.vocab, K = p.k;
  const int64_t V1 = V - V % W;
  const double inv_t = p.inv_temperature;
  const Vec<Acc> inv_t_v(static_cast<Acc>(inv_t));
  const double coef = p.loss_factor * inv_t / kd_denominator(p.reduction, count, V);
  auto* S_out = static_cast<S*>(p.grad_student);
  auto* row_soft = static_cast<Acc*>(p.row_soft);
  std::vector<S> kept;  // the kept entries' gradients of a row

  for (int64_t r = begin; r < end; ++r) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const Acc* v = static_cast<const Acc*>(p.values) + r * K;
    const int64_t* idx = p.indices + r * K;
    S* gs = S_out ? S_out + r * V : nullptr;
    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      row_soft[r] = Acc(0);
      if (gs) std::fill(gs, gs + V, S(0));
      continue;
    }

    // Teacher: k entries.
    double max_v = -INFINITY;
    for (int64_t k = 0; k < K; ++k) max_v = kd_nan_max(max_v, static_cast<double>(v[k]));
    const double scale = p.values_are_logprobs ? 1.0 : inv_t;
    double z_v = 0.0;
    for (int64_t k = 0; k < K; ++k) z_v += std::exp((static_cast<double>(v[k]) - max_v) * scale);
    const TopkTeacher tt = topk_teacher(max_v, z_v, p.values_are_logprobs, p.tail_bucket, inv_t);

    // Student: maximum, then Z (with a tail bucket: the mass outside the kept set, gap by gap).
    Vec<Acc> m0(neg_inf);
    for (int64_t i = 0; i < V1; i += W) m0 = at::vec::maximum(m0, load<Acc>(s + i));
    if (V1 < V) m0 = at::vec::maximum(m0, load_tail<Acc>(s + V1, V - V1));
    const Acc max_s = lane_max<Acc>(m0);
    const Vec<Acc> max_s_v(max_s);
    auto b_of = [&](int64_t j) { return (static_cast<double>(static_cast<Acc>(s[j])) - max_s) * inv_t; };
    double z_s = 0.0, z_tail = 0.0;
    if (p.tail_bucket) {
      int64_t lo = 0;
      for (int64_t k = 0; k < K; ++k) {
        z_tail += sum_exp<S, Acc>(s, lo, idx[k], max_s_v, inv_t_v);
        lo = idx[k] + 1;
      }
      z_tail += sum_exp<S, Acc>(s, lo, V, max_s_v, inv_t_v);
      double z_kept = 0.0;
      for (int64_t k = 0; k < K; ++k) z_kept += std::exp(b_of(idx[k]));
      z_s = z_tail + z_kept;
    } else {
      z_s = sum_exp<S, Acc>(s, 0, V, max_s_v, inv_t_v);
    }
    const double log_zs = std::log(z_s);

    // Row loss: sum_k p_k (log p_k - log q_k) [+ p_tail (log p_tail - log q_tail)].
    double kl = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double lp = static_cast<double>(v[k]) * tt.scale - tt.shift;
      const double pk = std::exp(lp);
      if (pk > 0.0) kl += pk * (lp - (b_of(idx[k]) - log_zs));
    }
    double tail_ratio = 0.0;  // p_tail / q_tail
    if (tt.p_tail > 0.0) {
      const double log_q_tail = std::log(z_tail) - log_zs;
      kl += tt.p_tail * (tt.log_tail - log_q_tail);
      tail_ratio = std::exp(tt.log_tail - log_q_tail);
    }
    row_soft[r] = static_cast<Acc>(p.loss_factor * kl);
    if (!gs) continue;

    // Gradient: c * q_j * (1 - p_tail / q_tail) everywhere, then c * (q_j - p_k) at the kept entries. The
    // kept values are computed first: the gradient may overwrite the student row in place (fused linear head).
    kept.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      const double lp = static_cast<double>(v[k]) * tt.scale - tt.shift;
      kept[k] = static_cast<S>(coef * (std::exp(b_of(idx[k]) - log_zs) - std::exp(lp)));
    }
    const Vec<Acc> dense_coef_v(static_cast<Acc>(coef * (1.0 - tail_ratio)));
    const Vec<Acc> log_zs_v(static_cast<Acc>(log_zs));
    for (int64_t i = 0; i < V1; i += W) {
      store<S>(gs + i, dense_coef_v * fk_exp(kd_shift(load<Acc>(s + i), max_s_v, inv_t_v) - log_zs_v));
    }
    if (V1 < V) {
      const int64_t n = V - V1;
      store_tail<S>(gs + V1, dense_coef_v * fk_exp(kd_shift(load_tail<Acc>(s + V1, n), max_s_v, inv_t_v) - log_zs_v), n);
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
  switch (c.student.scalar_type()) {
    case at::kDouble: run(double{}); break;
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected student dtype");
  }
}
}  // namespace CPU_CAPABILITY

namespace {

std::tuple<at::Tensor, at::Tensor> topk_kd_forward_cpu(const at::Tensor& student, const at::Tensor& values,
                                                       const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                       const std::optional<at::Tensor>& num_items, double temperature,
                                                       bool values_are_logprobs, bool tail_bucket, int64_t ignore_index,
                                                       c10::string_view reduction, bool scale_by_temperature,
                                                       bool grad_student) {
  TopkCall c = topk_prepare(student, values, indices, labels, num_items, temperature, values_are_logprobs, tail_bucket,
                            ignore_index, std::string_view(reduction.data(), reduction.size()), scale_by_temperature,
                            grad_student, alloc_grad);
  if (c.p.rows > 0) run_topk_rows(c, host_count(c.count, c.p.rows));
  return topk_outputs(c);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_kd_forward", &cpu::topk_kd_forward_cpu);
}

}  // namespace fastkd
