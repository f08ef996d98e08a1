// CPU implementation of fastkd::response_shard_terms and fastkd::response_shard_grad (shard_host.h): the
// per-entry phases of a divergence over one vocabulary range, rows in parallel, entries vectorized with the
// divergence's trait (the math of the single-range kernels), with a temperature per row where given.
#include <array>
#include <type_traits>

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
  for (int64_t r = begin; r < end; ++r) {
    const Acc* s = static_cast<const Acc*>(p.student) + r * p.student_row_stride;
    const Acc* t = static_cast<const Acc*>(p.teacher) + r * p.teacher_row_stride;
    const Acc* st = static_cast<const Acc*>(p.stats) + 4 * r;
    const Vec<Acc> inv_t(static_cast<Acc>(shard_inv_temperature(p, r)));
    const Vec<Acc> shift_s(st[0]), shift_t(st[1]), log_zs(st[2]), log_zt(st[3]);
    // the entries [i, i + n): log p, log q, p, q, psi_p, psi_q and phi (lanes past n are -inf on both sides: no
    // mass, terms 0)
    struct Entry {
      Vec<Acc> log_p, log_q, p, q, psi_p, psi_q, phi;
    };
    auto entry = [&](int64_t i, int64_t n) {
      Entry e;
      const Vec<Acc> sv = n == W ? load<Acc>(s + i) : load_tail<Acc>(s + i, n);
      const Vec<Acc> tv = n == W ? load<Acc>(t + i) : load_tail<Acc>(t + i, n);
      e.log_q = kd_shift(sv, shift_s, inv_t) - log_zs;
      e.log_p = kd_shift(tv, shift_t, inv_t) - log_zt;
      e.q = fk_exp(e.log_q);
      e.p = fk_exp(e.log_p);
      Trait::terms(e.log_p, e.log_q, e.p, e.q, p.div, e.psi_p, e.psi_q, e.phi);
      return e;
    };
    if (grad) {
      Acc* g = static_cast<Acc*>(p.out) + r * V;
      const Vec<Acc> coef(static_cast<const Acc*>(p.row_coef)[r]), sum_q(static_cast<const Acc*>(p.sum_psi_q)[r]);
      for (int64_t i = 0; i < V; i += W) {
        const int64_t n = std::min(W, V - i);
        const Entry e = entry(i, n);
        const Vec<Acc> gv = psi_grad(e.psi_q, e.q, sum_q, coef);
        if (n == W) store<Acc>(g + i, gv);
        else store_tail<Acc>(g + i, gv, n);
      }
      continue;
    }
    // sum phi, sum psi_q, and with the row dots (N = kShardDotSums) sum psi_p, log p psi_p, p log p, log q psi_q,
    // q log q (shard_host.h)
    auto gather = [&](auto n_sums) {
      constexpr size_t N = decltype(n_sums)::value;
      auto body = [&](int64_t i, int64_t n) {
        const Entry e = entry(i, n);
        std::array<Vec<Acc>, N> x;
        x[0] = e.phi;
        x[1] = e.psi_q;
        if constexpr (N == kShardDotSums) {
          x[2] = e.psi_p;
          psi_dot_terms(e.log_p, e.p, e.psi_p, x[3], x[4]);
          psi_dot_terms(e.log_q, e.q, e.psi_q, x[5], x[6]);
        }
        return x;
      };
      auto sums = blocked_sums<Acc, N>(0, V1, [&](int64_t i) { return body(i, W); });
      if (V1 < V) {
        const auto tail = body(V1, V - V1);
        for (size_t k = 0; k < N; ++k) sums[k] += lane_sum<Acc>(tail[k]);
      }
      Acc* out = static_cast<Acc*>(p.out) + static_cast<int64_t>(N) * r;
      for (size_t k = 0; k < N; ++k) out[k] = static_cast<Acc>(sums[k]);
    };
    if (p.dots) gather(std::integral_constant<size_t, kShardDotSums>{});
    else gather(std::integral_constant<size_t, 2>{});
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
                                    c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
                                    const std::optional<at::Tensor>& row_temperature, bool dots) {
  return run(shard_prepare(student, teacher, stats, std::nullopt, std::nullopt, divergence, params, temperature, false,
                           row_temperature, dots),
             false);
}

at::Tensor response_shard_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                   const at::Tensor& row_coef, const at::Tensor& sum_psi_q, c10::string_view divergence,
                                   c10::ArrayRef<double> params, double temperature,
                                   const std::optional<at::Tensor>& row_temperature) {
  return run(shard_prepare(student, teacher, stats, row_coef, sum_psi_q, divergence, params, temperature, true,
                           row_temperature),
             true);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("response_shard_terms", &cpu::response_shard_terms_cpu);
  m.impl("response_shard_grad", &cpu::response_shard_grad_cpu);
}

}  // namespace fastkd
