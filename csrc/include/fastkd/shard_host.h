// The per-entry phases of a response divergence over one vocabulary range (a tensor-parallel rank's shard of
// the logits), shared by the CPU and CUDA implementations of
//   fastkd::response_shard_terms: per row, sum_j phi(p_j, q_j) and sum_j psi_q(j) over the range;
//   fastkd::response_shard_grad:  per row, row_coef * (psi_q(j) - q_j * sum_psi_q), the gradient with respect
//                                 to the range's tempered student logits.
// The statistics phase (the rows' maxima and sums of exponentials) and the reductions across ranges between
// the phases are the caller's (fastkd/distributed.py: all-reduces); the per-entry math is the divergence's
// trait (divergences.h), the one the single-range kernels use, in the same coordinates: log p_j =
// (t_j - shift_t) / T - log_zt, log q_j = (s_j - shift_s) / T - log_zs, with T the row's temperature (one for
// every row, or one per row). With `dots` the terms phase also gives the range's parts of the temperature
// gradient's row dots (row_options.h, psi_row_dot with x = log p, log q): the sums are additive across ranges.
#pragma once

#include <string_view>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "fastkd/kd_host.h"

namespace fastkd {

// The divergence, its parameters and the temperature come from the LossConfig (make_loss_config), the one
// builder of every response op's configuration.
struct ShardParams : LossConfig {
  const void* student = nullptr;  // [rows, width], unit stride along the width
  const void* teacher = nullptr;  // [rows, width], unit stride along the width
  const void* stats = nullptr;    // [rows, 4] contiguous: shift_s, shift_t, log_zs, log_zt
  const void* row_coef = nullptr;   // grad: [rows], the weight of each row's divergence times 1 / T
  const void* sum_psi_q = nullptr;  // grad: [rows], over the whole vocabulary
  // terms: [rows, 2] (sum phi, sum psi_q), with dots [rows, kShardDotSums] (+ sum psi_p, sum log p psi_p,
  // sum p log p, sum log q psi_q, sum q log q); grad: [rows, width]
  void* out = nullptr;
  const double* row_temperature = nullptr;  // [rows] float64 or nullptr (inv_temperature for every row)
  bool dots = false;
  int64_t rows = 0;
  int64_t width = 0;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
};

constexpr int64_t kShardDotSums = 7;

// A row's 1 / T.
FASTKD_HOST_DEVICE double shard_inv_temperature(const ShardParams& p, int64_t r) {
  return p.row_temperature ? 1.0 / p.row_temperature[r] : p.inv_temperature;
}

struct ShardCall {
  at::Tensor student, teacher, stats, row_coef, sum_psi_q, out, row_temperature;
  ShardParams p;
};

// Checks the arguments (the computation dtype is the inputs' float32 or float64, the same for every tensor)
// and allocates the output: [rows, 2] sums ([rows, kShardDotSums] with dots), or the [rows, width] gradient when
// `grad`. row_temperature: [rows] per-row temperatures (any float dtype), or none.
inline ShardCall shard_prepare(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                               const std::optional<at::Tensor>& row_coef, const std::optional<at::Tensor>& sum_psi_q,
                               c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
                               bool grad, const std::optional<at::Tensor>& row_temperature = std::nullopt,
                               bool dots = false) {
  FASTKD_CHECK_ARG(parse_divergence(to_view(divergence)) != Divergence::DKD, "divergence",
                   "a vocabulary range has no class target: 'dkd' does not run here");
  const LossConfig cfg = make_loss_config(to_view(divergence), params, temperature, false, 1.0, 0.0, -100, "sum");
  const at::ScalarType dtype = student.scalar_type();
  FASTKD_CHECK_ARG(student.dim() == 2 && (dtype == at::kFloat || dtype == at::kDouble), "student",
                   "expected a 2-D float32 or float64 tensor, got ", student.dim(), "-D ", dtype);
  FASTKD_CHECK_ARG(teacher.sizes() == student.sizes() && teacher.scalar_type() == dtype &&
                       teacher.device() == student.device(),
                   "teacher", "expected the student's shape, dtype and device");
  const int64_t rows = student.size(0), width = student.size(1);
  FASTKD_CHECK_ARG(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 4 && stats.scalar_type() == dtype &&
                       stats.device() == student.device(),
                   "stats", "expected a [", rows, ", 4] tensor of the student's dtype and device, got ", stats.sizes());
  ShardCall c;
  c.student = student.stride(1) == 1 ? student : student.contiguous();
  c.teacher = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  c.stats = stats.contiguous();
  if (grad) {
    for (const auto* t : {&row_coef, &sum_psi_q}) {
      FASTKD_CHECK_ARG(t->has_value() && (*t)->dim() == 1 && (*t)->size(0) == rows && (*t)->scalar_type() == dtype &&
                           (*t)->device() == student.device(),
                       t == &row_coef ? "row_coef" : "sum_psi_q", "expected a [", rows,
                       "] tensor of the student's dtype and device");
    }
    c.row_coef = row_coef->contiguous();
    c.sum_psi_q = sum_psi_q->contiguous();
  }
  if (row_temperature.has_value()) {
    c.row_temperature = prepare_row_values(*row_temperature, "temperature", rows, student.device(), true);
  }
  const int64_t n_sums = dots ? kShardDotSums : 2;
  c.out = at::empty(grad ? at::IntArrayRef{rows, width} : at::IntArrayRef{rows, n_sums}, student.options());
  ShardParams& p = c.p;
  static_cast<LossConfig&>(p) = cfg;
  p.student = c.student.data_ptr();
  p.teacher = c.teacher.data_ptr();
  p.stats = c.stats.data_ptr();
  p.row_coef = grad ? c.row_coef.data_ptr() : nullptr;
  p.sum_psi_q = grad ? c.sum_psi_q.data_ptr() : nullptr;
  p.out = c.out.data_ptr();
  p.row_temperature = c.row_temperature.defined() ? c.row_temperature.data_ptr<double>() : nullptr;
  p.dots = dots && !grad;
  p.rows = rows;
  p.width = width;
  p.student_row_stride = c.student.stride(0);
  p.teacher_row_stride = c.teacher.stride(0);
  return c;
}

// Calls f(std::integral_constant<Divergence, D>{}, Acc{}) for the call's divergence (every family but the
// decoupled one, which shard_prepare refuses) and its float32 / float64 computation type.
template <typename F>
void dispatch_shard(const ShardCall& c, F&& f) {
  dispatch_divergence(c.p.divergence, [&](auto tag) {
    if constexpr (DivergenceTrait<decltype(tag)::value>::kFamily != Family::Decoupled) {
      if (c.student.scalar_type() == at::kDouble) f(tag, double{});
      else f(tag, float{});
    }
  });
}

}  // namespace fastkd
