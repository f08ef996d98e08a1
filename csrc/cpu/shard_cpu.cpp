// CPU implementation of fastkd::response_shard_terms and fastkd::response_shard_grad (shard_host.h): the
// per-entry phases of a divergence over one vocabulary range, rows in parallel, entries vectorized with the
// divergence's trait (the math of the single-range kernels).
#include <array>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "fastkd/shard_host.h"

namespace fastkd {
namespace cpu {
namespace {

template <Divergence D, typename Acc>
void shard_rows(const ShardParams& p, bool grad, int64_t begin, int64_t end) {
  using Trait = DivergenceTrait<D>;
  constexpr int64_t W = Vec<Acc>::size();
  const int64_t V = p.width, V1 = V - V % W;
  const Vec<Acc> inv_t(static_cast<Acc>(p.inv_temperature));
  for (int64_t r = begin; r < end; ++r) {
    const Acc* s = static_cast<const Acc*>(p.student) + r * p.student_row_stride;
    const Acc* t = static_cast<const Acc*>(p.teacher) + r * p.teacher_row_stride;
    const Acc* st = static_cast<const Acc*>(p.stats) + 4 * r;
    const Vec<Acc> shift_s(st[0]), shift_t(st[1]), log_zs(st[2]), log_zt(st[3]);
    // the entries [i, i + n): psi_q, phi and q (lanes past n are -inf on both sides: no mass, terms 0)
    auto entry = [&](int64_t i, int64_t n, Vec<Acc>& psi_q, Vec<Acc>& phi, Vec<Acc>& q) {
      const Vec<Acc> sv = n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n);
      const Vec<Acc> tv = n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n);
      const Vec<Acc> log_q = kd_shift(sv, shift_s, inv_t) - log_zs, log_p = kd_shift(tv, shift_t, inv_t) - log_zt;
      q = fk_exp(log_q);
      Vec<Acc> psi_p;
      Trait::terms(log_p, log_q, fk_exp(log_p), q, p.div, psi_p, psi_q, phi);
    };
    if (grad) {
      Acc* g = static_cast<Acc*>(p.out) + r * V;
      const Vec<Acc> coef(static_cast<const Acc*>(p.row_coef)[r]), sum_q(static_cast<const Acc*>(p.sum_psi_q)[r]);
      for (int64_t i = 0; i < V; i += W) {
        const int64_t n = std::min(W, V - i);
        Vec<Acc> psi_q, phi, q;
        entry(i, n, psi_q, phi, q);
        const Vec<Acc> gv = psi_grad(psi_q, q, sum_q, coef);
        if (n == W) store<Acc>(g + i, gv);
        else store_tail<Acc>(g + i, gv, n);
      }
      continue;
    }
    auto sums = blocked_sums<Acc, 2>(0, V1, [&](int64_t i) {
      Vec<Acc> psi_q, phi, q;
      entry(i, W, psi_q, phi, q);
      return std::array<Vec<Acc>, 2>{phi, psi_q};
    });
    if (V1 < V) {
      Vec<Acc> psi_q, phi, q;
      entry(V1, V - V1, psi_q, phi, q);
      sums[0] += lane_sum<Acc>(phi);
      sums[1] += lane_sum<Acc>(psi_q);
    }
    Acc* out = static_cast<Acc*>(p.out) + 2 * r;
    out[0] = static_cast<Acc>(sums[0]);
    out[1] = static_cast<Acc>(sums[1]);
  }
}

at::Tensor run(ShardCall c, bool grad) {
  const ShardParams& p = c.p;
  if (p.rows == 0) return c.out;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.width));
  dispatch_shard(c, [&](auto tag, auto acc_tag) {
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) {
      shard_rows<decltype(tag)::value, decltype(acc_tag)>(p, grad, b, e);
    });
  });
  return c.out;
}

at::Tensor response_shard_terms_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                    c10::string_view divergence, c10::ArrayRef<double> params, double temperature) {
  return run(shard_prepare(student, teacher, stats, std::nullopt, std::nullopt, divergence, params, temperature, false),
             false);
}

at::Tensor response_shard_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                   const at::Tensor& row_coef, const at::Tensor& sum_psi_q, c10::string_view divergence,
                                   c10::ArrayRef<double> params, double temperature) {
  return run(shard_prepare(student, teacher, stats, row_coef, sum_psi_q, divergence, params, temperature, true), true);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("response_shard_terms", &cpu::response_shard_terms_cpu);
  m.impl("response_shard_grad", &cpu::response_shard_grad_cpu);
}

}  // namespace fastkd
