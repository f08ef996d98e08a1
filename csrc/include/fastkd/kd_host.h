// ATen-side code shared by the CPU and CUDA implementations of the response-loss operators
// (fastkd::response_forward, fastkd::topk_kd_forward): argument checks, output allocation, dtype dispatch
// and the final (deterministic) reduction over rows. Header-only so that the per-ISA CPU libraries and the
// CUDA library each carry the same definitions.
#pragma once

#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

// Per-operator headers, not <ATen/ATen.h>: it declares every operator and costs ~15 s of compile time
// in each translation unit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Dispatch.h>

#include "fastkd/kd_params.h"
#include "fastkd/row_options.h"

namespace fastkd {

#define FASTKD_CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, "fastkd: argument '", name, "': ", __VA_ARGS__)

inline std::string_view to_view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

inline Reduction parse_reduction(std::string_view r) {
  if (r == "none") return Reduction::None;
  if (r == "sum") return Reduction::Sum;
  if (r == "mean") return Reduction::Mean;
  if (r == "batchmean") return Reduction::BatchMean;
  TORCH_CHECK(false, "fastkd: argument 'reduction': expected one of 'batchmean', 'sum', 'mean', 'none', got '", r,
              "'");
}

// The divergence named `d` (a schema string of FASTKD_DIVERGENCES).
inline Divergence parse_divergence(std::string_view d) {
#define FASTKD_DIV_PARSE(id, trait, family) \
  if (d == trait::kName) return Divergence::id;
  FASTKD_DIVERGENCES(FASTKD_DIV_PARSE)
#undef FASTKD_DIV_PARSE
  std::string names;
#define FASTKD_DIV_NAME(id, trait, family) names += std::string(names.empty() ? "'" : ", '") + trait::kName + "'";
  FASTKD_DIVERGENCES(FASTKD_DIV_NAME)
#undef FASTKD_DIV_NAME
  TORCH_CHECK_VALUE(false, "fastkd: argument 'divergence': expected one of ", names, ", got '", d, "'");
}

inline const char* divergence_name(Divergence d) {
  const char* name = "";
  dispatch_divergence(d, [&](auto tag) { name = DivergenceTrait<decltype(tag)::value>::kName; });
  return name;
}

// The parameters of divergence d, in registry order: as many as it declares, each finite and in its range
// (ValueError naming the parameter).
inline void check_divergence_params(Divergence d, c10::ArrayRef<double> params) {
  dispatch_divergence(d, [&](auto tag) {
    using Trait = DivergenceTrait<decltype(tag)::value>;
    std::string names;
    for (int i = 0; i < Trait::kNumParams; ++i) names += std::string(i ? ", " : "") + Trait::kParams[i].name;
    TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == Trait::kNumParams, "fastkd: divergence '",
                      Trait::kName, "' takes ", Trait::kNumParams, " parameter(s) (", names, "), got ",
                      params.size());
    for (int i = 0; i < Trait::kNumParams; ++i) {
      const ParamSpec& s = Trait::kParams[i];
      const double x = params[i];
      const bool above = s.lo_open ? x > s.lo : x >= s.lo;
      const bool below = s.hi_open ? x < s.hi : x <= s.hi;
      if (std::isfinite(x) && above && below) continue;
      // the wording of fastkd/_validation.py check_real: one rule, one message
      std::ostringstream range;
      if (std::isfinite(s.lo) && std::isfinite(s.hi)) {
        range << " and in " << (s.lo_open ? "(" : "[") << s.lo << ", " << s.hi << (s.hi_open ? ")" : "]");
      } else if (std::isfinite(s.lo)) {
        range << " and " << (s.lo_open ? "> " : ">= ") << s.lo;
      } else if (std::isfinite(s.hi)) {
        range << " and " << (s.hi_open ? "< " : "<= ") << s.hi;
      }
      TORCH_CHECK_VALUE(false, "fastkd: argument '", s.name, "': ", s.name, " must be finite", range.str(),
                        " for divergence '", Trait::kName, "', got ", x);
    }
  });
}

inline bool is_kd_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The (student, teacher) element-type pairs the kernels are compiled for: equal types, and an fp32
// student with a reduced-precision teacher (a bf16/fp16 teacher distilling into an fp32 student). Other
// mixes run in a common type: fp64 if either side is fp64, else fp32 (see kd_compute_types).
inline std::pair<at::ScalarType, at::ScalarType> kd_compute_types(at::ScalarType s, at::ScalarType t) {
  if (s == at::kDouble || t == at::kDouble) return {at::kDouble, at::kDouble};
  if (s == t || (s == at::kFloat && (t == at::kHalf || t == at::kBFloat16))) return {s, t};
  return {at::kFloat, at::kFloat};
}

// Calls f(S{}, T{}) with the C++ element types of a pair that kd_compute_types returns.
template <typename F>
void kd_dispatch_pair(at::ScalarType s, at::ScalarType t, F&& f) {
  if (s == at::kDouble && t == at::kDouble) return f(double{}, double{});
  if (s == at::kFloat && t == at::kFloat) return f(float{}, float{});
  if (s == at::kHalf && t == at::kHalf) return f(at::Half{}, at::Half{});
  if (s == at::kBFloat16 && t == at::kBFloat16) return f(at::BFloat16{}, at::BFloat16{});
  if (s == at::kFloat && t == at::kHalf) return f(float{}, at::Half{});
  if (s == at::kFloat && t == at::kBFloat16) return f(float{}, at::BFloat16{});
  TORCH_INTERNAL_ASSERT(false, "fastkd: no kernel for student ", s, " with teacher ", t);
}

// Calls f(S{}) with the C++ element type of a student dtype (the top-k kernels, whose teacher values are in the
// accumulation type).
template <typename F>
void kd_dispatch_student(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "fastkd: no kernel for student ", s);
  }
}

inline void check_logits_arg(const at::Tensor& x, const char* name) {
  FASTKD_CHECK_ARG(x.dim() == 2, name, "expected a 2-D [rows, vocab] tensor, got ", x.dim(), "-D");
  FASTKD_CHECK_ARG(is_kd_dtype(x.scalar_type()), name, "expected float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
}

inline at::Tensor rows_with_unit_stride(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor y = x.to(dtype);
  return y.stride(1) == 1 ? y : y.contiguous();
}

// Labels: int64 [rows] on the device, or undefined.
inline at::Tensor prepare_labels(const std::optional<at::Tensor>& labels, const at::Tensor& like, int64_t rows) {
  if (!labels.has_value()) return {};
  const at::Tensor& l = *labels;
  FASTKD_CHECK_ARG(l.device() == like.device(), "labels", "expected device ", like.device(), ", got ", l.device());
  FASTKD_CHECK_ARG(!at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
                       l.scalar_type() != at::kBool,
                   "labels", "expected an integer tensor, got ", l.scalar_type());
  FASTKD_CHECK_ARG(l.dim() == 1 && l.size(0) == rows, "labels", "expected shape [", rows, "], got ", l.sizes());
  return l.scalar_type() == at::kLong && l.is_contiguous() ? l : l.to(at::kLong).contiguous();
}

// Labels used as class targets (cross-entropy, DKD): every counted one must index the vocabulary. A
// ValueError, as for the Python-side checks. On CUDA this costs one host sync (the alternative, a
// device-side assert, would poison the context); on the CPU it is one pass over the labels.
// The temperature range every op accepts (fastkd/_validation.py has the same): the kernels compute in float32,
// where 1/T and T^2 must be finite, nonzero normal numbers.
inline void check_temperature_arg(double temperature) {
  constexpr double kMin = 0x1p-63, kMax = 0x1p63;
  FASTKD_CHECK_ARG(temperature >= kMin && temperature <= kMax, "temperature",
                   "expected a finite value in [2**-63, 2**63] (1/T and T^2 must stay normal float32 numbers), got ",
                   temperature);
}

// `name`: the user-facing argument ('labels', or 'target' for DKD).
inline void check_targets_in_range(const at::Tensor& labels, int64_t ignore_index, int64_t vocab,
                                   const char* name = "labels") {
  if (labels.numel() == 0) return;
  int64_t bad_value = 0;
  bool bad = false;
  if (labels.is_cpu()) {
    const int64_t* l = labels.const_data_ptr<int64_t>();
    for (int64_t i = 0, n = labels.numel(); i < n && !bad; ++i) {
      if (l[i] != ignore_index && (l[i] < 0 || l[i] >= vocab)) {
        bad = true;
        bad_value = l[i];
      }
    }
  } else {
    const at::Tensor mask = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
    if ((bad = mask.any().item<bool>())) bad_value = labels.masked_select(mask)[0].item<int64_t>();
  }
  TORCH_CHECK_VALUE(!bad, "fastkd: argument '", name, "': class targets must be in [0, ", vocab,
                    ") or equal ignore_index (", ignore_index, "), got ", bad_value);
}

// Number of labels != ignore_index, as a double scalar on the labels' device.
inline at::Tensor count_counted(const at::Tensor& labels, int64_t ignore_index) {
  if (!labels.is_cpu()) return labels.ne(ignore_index).sum().to(at::kDouble);
  const int64_t* l = labels.const_data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0, e = labels.numel(); i < e; ++i) n += l[i] != ignore_index;
  return at::scalar_tensor(static_cast<double>(n), labels.options().dtype(at::kDouble));
}

// The divisor of 'batchmean'/'mean': num_items_in_batch when given, else the number of counted rows
// (undefined = every row counts). A double scalar on the device.
inline at::Tensor prepare_count(const std::optional<at::Tensor>& num_items, const at::Tensor& labels,
                                int64_t ignore_index, const at::Tensor& like) {
  if (num_items.has_value()) {
    const at::Tensor& n = *num_items;
    FASTKD_CHECK_ARG(n.numel() == 1 && !at::isComplexType(n.scalar_type()) && n.scalar_type() != at::kBool,
                     "num_items_in_batch", "expected a real scalar tensor, got ", n.scalar_type(), " of shape ",
                     n.sizes());
    FASTKD_CHECK_ARG(n.is_cpu() || n.device() == like.device(), "num_items_in_batch", "expected device ",
                     like.device(), " or cpu, got ", n.device());
    if (n.is_cpu()) {
      const double value = n.item<double>();
      FASTKD_CHECK_ARG(std::isfinite(value) && value > 0.0, "num_items_in_batch", "expected a finite value > 0, got ",
                       value);
    }
    return n.reshape({}).to(like.device(), at::kDouble);
  }
  if (labels.defined()) return count_counted(labels, ignore_index);
  return {};
}

// The scalar arguments every response op shares, checked once and turned into the kernels' LossConfig. A
// divergence that equals a parameter-free one for the given parameters (its trait's alias: the JSD at beta 0
// and 1, in TRL's convention) runs that one's kernels, for every entry point.
inline LossConfig make_loss_config(std::string_view divergence, c10::ArrayRef<double> params, double temperature,
                                   bool scale_by_temperature, double soft_weight, double hard_weight,
                                   int64_t ignore_index, std::string_view reduction, bool standardize = false,
                                   double standardize_eps = 1e-7) {
  LossConfig c;
  c.divergence = parse_divergence(divergence);
  check_divergence_params(c.divergence, params);
  check_temperature_arg(temperature);
  FASTKD_CHECK_ARG(std::isfinite(soft_weight), "soft_weight", "expected a finite value, got ", soft_weight);
  FASTKD_CHECK_ARG(std::isfinite(hard_weight), "hard_weight", "expected a finite value, got ", hard_weight);
  c.reduction = parse_reduction(reduction);
  for (size_t i = 0; i < params.size(); ++i) c.div.param[i] = params[i];
  const char* alias = nullptr;
  dispatch_divergence(c.divergence, [&](auto tag) { alias = DivergenceTrait<decltype(tag)::value>::alias(c.div); });
  if (alias != nullptr) {
    c.divergence = parse_divergence(alias);
    c.div = DivArgs{};
  }
  divergence_coefficients(c.divergence, c.div);
  c.inv_temperature = 1.0 / temperature;
  c.loss_factor = scale_by_temperature ? temperature * temperature : 1.0;
  c.scale_by_temperature = scale_by_temperature;
  c.soft_weight = soft_weight;
  c.hard_weight = hard_weight;
  c.hard = hard_weight != 0.0;
  FASTKD_CHECK_ARG(!c.hard || c.divergence != Divergence::DKD, "hard_weight",
                   "'dkd' has no fused cross-entropy part; add the cross-entropy separately");
  c.ignore_index = ignore_index;
  FASTKD_CHECK_ARG(std::isfinite(standardize_eps) && standardize_eps >= 0.0, "eps",
                   "expected a finite value >= 0, got ", standardize_eps);
  c.standardize = standardize;
  c.standardize_eps = standardize_eps;
  return c;
}

// The top-k op's configuration: KL(p || q), soft part only.
inline LossConfig make_topk_config(double temperature, bool scale_by_temperature, int64_t ignore_index,
                                   std::string_view reduction) {
  return make_loss_config("kl", {}, temperature, scale_by_temperature, 1.0, 0.0, ignore_index, reduction);
}

// The per-row options of response_forward (row_options.h), as the op receives them.
struct RowOptions {
  std::optional<at::Tensor> temperature;  // [rows] per-row temperatures, or none (the float temperature)
  std::optional<at::Tensor> weight;       // [rows] per-row weights, or none
  bool standardize = false;
  double standardize_eps = 1e-7;
  bool grad_temperature = false;          // compute d loss / d temperature (needs temperature)
};

// A float [rows] tensor of per-row values on `device`, as float64 (one host sync on CUDA for the range check
// of a temperature: a wrong value would otherwise be a silently wrong loss).
inline at::Tensor prepare_row_values(const at::Tensor& x, const char* name, int64_t rows, const at::Device& device,
                                     bool is_temperature) {
  FASTKD_CHECK_ARG(at::isFloatingType(x.scalar_type()), name, "expected a floating-point tensor, got ",
                   x.scalar_type());
  FASTKD_CHECK_ARG(x.dim() == 1 && x.size(0) == rows, name, "expected shape [", rows, "] (one value per row), got ",
                   x.sizes());
  FASTKD_CHECK_ARG(x.device() == device, name, "expected device ", device, ", got ", x.device());
  at::Tensor y = x.to(at::kDouble).contiguous();
  if (is_temperature && rows > 0) {
    // the range of check_temperature_arg, for every entry
    const bool ok = y.ge(0x1p-63).logical_and(y.le(0x1p63)).all().item<bool>();
    TORCH_CHECK_VALUE(ok, "fastkd: argument '", name, "': every entry must be a finite value in [2**-63, 2**63], got min ",
                      y.min().item<double>(), ", max ", y.max().item<double>());
  }
  return y;
}

struct KdCall {
  at::Tensor student, teacher;            // 2-D views [rows, vocab], unit stride along vocab
  at::Tensor row_temperature, row_weight; // float64 [rows], or undefined
  at::Tensor grad_temperature;            // float64 [rows], or [0]
  at::Tensor labels;                      // int64 [rows] or undefined
  at::Tensor count;                       // double scalar on the device, or undefined (all rows count)
  at::Tensor row_soft, row_hard;          // [rows] accumulation dtype (row_hard: [0] unless hard)
  at::Tensor grad_student, grad_teacher;  // [rows, vocab] or empty
  at::ScalarType student_dtype, teacher_dtype, out_dtype;
  KdParams p;
};

// Validates the arguments of response_forward and allocates its outputs (gradients through alloc_grad,
// which each device picks). Every failure names the argument.
template <typename GradAlloc>
KdCall kd_prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                  const std::optional<at::Tensor>& num_items, const LossConfig& cfg, bool grad_student,
                  bool grad_teacher, GradAlloc&& alloc_grad, const RowOptions& ro = {}) {
  check_logits_arg(student, "student_logits");
  check_logits_arg(teacher, "teacher_logits");
  FASTKD_CHECK_ARG(teacher.sizes() == student.sizes(), "teacher_logits", "expected shape ", student.sizes(),
                   " (the student's), got ", teacher.sizes());
  FASTKD_CHECK_ARG(teacher.device() == student.device(), "teacher_logits", "expected device ", student.device(),
                   " (the student's), got ", teacher.device());
  FASTKD_CHECK_ARG(student.size(1) > 0, "student_logits", "the vocabulary (last) dimension must not be empty");
  const Divergence div = cfg.divergence;
  const bool hard = cfg.hard;
  const bool needs_target = hard || div == Divergence::DKD;
  FASTKD_CHECK_ARG(!needs_target || labels.has_value(), "labels",
                   "class targets are required by the cross-entropy part and by 'dkd'");
  FASTKD_CHECK_ARG(div != Divergence::DKD || student.size(1) >= 2, "student_logits",
                   "decoupled KD needs at least 2 classes, got ", student.size(1));
  FASTKD_CHECK_ARG(!cfg.standardize || student.size(1) >= 2, "standardize",
                   "standardization needs at least 2 classes (an unbiased std), got ", student.size(1));
  FASTKD_CHECK_ARG(!ro.grad_temperature || ro.temperature.has_value(), "temperature",
                   "its gradient needs the temperature as a tensor");

  KdCall c;
  c.student_dtype = student.scalar_type();
  c.teacher_dtype = teacher.scalar_type();
  c.out_dtype = c10::promoteTypes(c.student_dtype, c.teacher_dtype);
  const bool any_double = c.out_dtype == at::kDouble;
  const auto [s_type, t_type] = kd_compute_types(c.student_dtype, c.teacher_dtype);
  c.student = rows_with_unit_stride(student, s_type);
  c.teacher = rows_with_unit_stride(teacher, t_type);
  const int64_t rows = student.size(0), vocab = student.size(1);
  c.labels = prepare_labels(labels, student, rows);
  if (needs_target) {
    check_targets_in_range(c.labels, cfg.ignore_index, vocab, div == Divergence::DKD ? "target" : "labels");
  }
  c.count = prepare_count(num_items, c.labels, cfg.ignore_index, student);

  const auto acc_dtype = any_double ? at::kDouble : at::kFloat;
  auto opts = student.options();
  c.row_soft = at::empty({rows}, opts.dtype(acc_dtype));
  c.row_hard = at::empty({hard ? rows : 0}, opts.dtype(acc_dtype));
  const auto no_grad = [&](at::ScalarType t) { return at::empty({0}, opts.dtype(t)); };
  if (ro.temperature.has_value()) {
    c.row_temperature = prepare_row_values(*ro.temperature, "temperature", rows, student.device(), true);
  }
  if (ro.weight.has_value()) {
    c.row_weight = prepare_row_values(*ro.weight, "token_weights", rows, student.device(), false);
  }
  c.grad_temperature = at::empty({ro.grad_temperature ? rows : 0}, opts.dtype(at::kDouble));
  c.grad_student = grad_student ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(c.student.scalar_type()))
                                : no_grad(c.student.scalar_type());
  c.grad_teacher = grad_teacher ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(c.teacher.scalar_type()))
                                : no_grad(c.teacher.scalar_type());

  KdParams& p = c.p;
  static_cast<LossConfig&>(p) = cfg;
  p.student = c.student.data_ptr();
  p.teacher = c.teacher.data_ptr();
  p.labels = c.labels.defined() ? c.labels.data_ptr<int64_t>() : nullptr;
  p.count = c.count.defined() ? c.count.data_ptr<double>() : nullptr;
  p.grad_student = grad_student ? c.grad_student.data_ptr() : nullptr;
  p.grad_teacher = grad_teacher ? c.grad_teacher.data_ptr() : nullptr;
  p.row_soft = c.row_soft.data_ptr();
  p.row_hard = hard ? c.row_hard.data_ptr() : nullptr;
  p.rows = rows;
  p.vocab = vocab;
  p.student_row_stride = c.student.stride(0);
  p.teacher_row_stride = c.teacher.stride(0);
  p.row_temperature = c.row_temperature.defined() ? c.row_temperature.data_ptr<double>() : nullptr;
  p.row_weight = c.row_weight.defined() ? c.row_weight.data_ptr<double>() : nullptr;
  p.row_grad_temperature = ro.grad_temperature ? c.grad_temperature.data_ptr<double>() : nullptr;
  return c;
}

// Host value of the divisor count (CPU kernels: one read before the parallel loop).
inline double host_count(const at::Tensor& count, int64_t rows) {
  return count.defined() ? count.item<double>() : static_cast<double>(rows);
}

// (loss, soft, hard) from the per-row values (masked rows are 0). soft and hard are the reduced parts,
// loss = soft_weight * soft + hard_weight * hard. Deterministic on every device: a serial double sum on
// the CPU, ATen's (atomic-free) sum on CUDA.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_parts(const at::Tensor& row_soft,
                                                                  const at::Tensor& row_hard, bool hard,
                                                                  const at::Tensor& count, Reduction reduction,
                                                                  int64_t rows, int64_t vocab, double soft_weight,
                                                                  double hard_weight, at::ScalarType out_dtype) {
  auto out = row_soft.options().dtype(out_dtype);
  if (reduction == Reduction::None) {
    at::Tensor soft = row_soft.to(out_dtype);
    at::Tensor h = hard ? row_hard.to(out_dtype) : at::zeros_like(soft);
    at::Tensor loss = hard ? soft.mul(soft_weight).add(h.mul(hard_weight)) : soft.mul(soft_weight);
    return {loss, soft, h};
  }
  if (row_soft.is_cpu()) {
    double s = 0.0, h = 0.0;
    AT_DISPATCH_FLOATING_TYPES(row_soft.scalar_type(), "finish_parts", [&] {
      const scalar_t* rs = row_soft.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) s += static_cast<double>(rs[i]);
      if (hard) {
        const scalar_t* rh = row_hard.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < rows; ++i) h += static_cast<double>(rh[i]);
      }
    });
    const double n = host_count(count, rows);
    s /= kd_denominator(reduction, n, vocab);
    h /= ce_denominator(reduction, n);
    return {at::scalar_tensor(soft_weight * s + hard_weight * h, out), at::scalar_tensor(s, out),
            at::scalar_tensor(h, out)};
  }
  at::Tensor s = row_soft.sum(at::kDouble);
  at::Tensor h = hard ? row_hard.sum(at::kDouble) : at::zeros({}, s.options());
  if (reduction != Reduction::Sum) {
    at::Tensor n = count.defined() ? count : at::scalar_tensor(static_cast<double>(rows), s.options());
    n = at::where(n.gt(0), n, at::ones_like(n));
    h = h.div(n);
    s = reduction == Reduction::Mean ? s.div(n.mul(static_cast<double>(vocab))) : s.div(n);
  }
  at::Tensor loss = hard ? s.mul(soft_weight).add(h.mul(hard_weight)) : s.mul(soft_weight);
  return {loss.to(out_dtype), s.to(out_dtype), h.to(out_dtype)};
}

// Gradients leave the kernels in the compute dtypes; an upcast (mixed input dtypes) is undone here.
// The temperature gradient in the per-row temperature's dtype ([0] when not asked for).
using KdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline KdOutputs kd_outputs(KdCall& c, const RowOptions& ro = {}) {
  const KdParams& p = c.p;
  auto [loss, soft, hard] = finish_parts(c.row_soft, c.row_hard, p.hard, c.count, p.reduction, p.rows, p.vocab,
                                         p.soft_weight, p.hard_weight, c.out_dtype);
  at::Tensor gt = ro.temperature.has_value() ? c.grad_temperature.to(ro.temperature->scalar_type()) : c.grad_temperature;
  return {loss, soft, hard, c.grad_student.to(c.student_dtype), c.grad_teacher.to(c.teacher_dtype), gt};
}

// ---- fastkd::topk_kd_forward ----

inline void check_topk_args(const at::Tensor& values, const at::Tensor& indices, int64_t rows, int64_t vocab,
                            const at::Device& device) {
  FASTKD_CHECK_ARG(values.dim() == 2 && is_kd_dtype(values.scalar_type()), "teacher_topk_values",
                   "expected a 2-D [rows, k] float tensor, got ", values.dim(), "-D ", values.scalar_type());
  FASTKD_CHECK_ARG(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, "teacher_topk_indices",
                   "expected int64 or int32, got ", indices.scalar_type());
  FASTKD_CHECK_ARG(indices.sizes() == values.sizes(), "teacher_topk_indices", "expected shape ", values.sizes(),
                   " (the values'), got ", indices.sizes());
  const int64_t k = values.size(1);
  FASTKD_CHECK_ARG(values.size(0) == rows, "teacher_topk_values", "expected ", rows, " rows (the student's), got ",
                   values.size(0));
  FASTKD_CHECK_ARG(k >= 1 && k <= vocab, "teacher_topk_values", "expected 1 <= k <= vocab size ", vocab, ", got k = ",
                   k);
  FASTKD_CHECK_ARG(values.device() == device && indices.device() == device, "teacher_topk_values",
                   "expected values and indices on the student's device ", device);
}

// The sparse teacher as the kernels read it: each row's kept entries sorted by vocabulary index (values
// follow; the kernels rely on it to find the entries outside the kept set, and it exposes duplicates),
// values in the accumulation type, both contiguous. Indices must be in [0, vocab) and distinct on counted
// rows (labels: int64 [rows] or undefined; padding rows may hold anything).
inline std::pair<at::Tensor, at::Tensor> topk_sorted_teacher(const at::Tensor& values, const at::Tensor& indices,
                                                             const at::Tensor& labels, int64_t ignore_index,
                                                             int64_t vocab, bool any_double) {
  const int64_t rows = values.size(0), k = values.size(1);
  auto [sorted, order] = indices.to(at::kLong).sort(-1);
  at::Tensor sorted_indices = sorted.contiguous();
  at::Tensor sorted_values = values.to(any_double ? at::kDouble : at::kFloat).gather(-1, order).contiguous();
  if (rows > 0) {
    // One host sync on CUDA, and a second one only to say which check failed.
    at::Tensor counted = labels.defined() ? labels.ne(ignore_index) : at::ones({rows}, sorted.options().dtype(at::kBool));
    at::Tensor out_of_range = sorted_indices.select(1, 0).lt(0).logical_or(sorted_indices.select(1, k - 1).ge(vocab));
    at::Tensor repeated = k > 1 ? sorted_indices.narrow(1, 1, k - 1).eq(sorted_indices.narrow(1, 0, k - 1)).any(1)
                                : at::zeros_like(out_of_range);
    if (out_of_range.logical_or(repeated).logical_and(counted).any().item<bool>()) {
      TORCH_CHECK_VALUE(!out_of_range.logical_and(counted).any().item<bool>(),
                        "fastkd: teacher_topk_indices must be in [0, ", vocab, ") on counted rows");
      TORCH_CHECK_VALUE(false, "fastkd: teacher_topk_indices must be distinct within a row (as torch.topk returns them)");
    }
  }
  return {sorted_values, sorted_indices};
}

// What a top-k teacher supports: KL(p || q) without the fused cross-entropy (the fused head adds it with a
// second kernel), a tail bucket only for log-probabilities.
inline void check_topk_config(const LossConfig& cfg, bool values_are_logprobs, bool tail_bucket) {
  FASTKD_CHECK_ARG(cfg.divergence == Divergence::KL, "divergence", "a top-k teacher supports 'kl' only, got '",
                   divergence_name(cfg.divergence), "'");
  FASTKD_CHECK_ARG(!tail_bucket || values_are_logprobs, "tail",
                   "a tail bucket needs log-probabilities (values_are='logprobs'): logits give no tail mass");
}

struct TopkCall {
  at::Tensor student, values, indices, labels, count, row_soft, grad_student, row_weight;
  at::Tensor row_temperature;   // float64 [rows], or undefined
  at::Tensor grad_temperature;  // float64 [rows], or [0]
  at::ScalarType student_dtype, out_dtype;
  at::ScalarType temperature_dtype = at::kDouble;  // the per-row temperatures' dtype (of their gradient)
  TopkParams p;
};

// Besides the checks, sorts each row's kept entries by vocabulary index (values follow): the kernels
// rely on it to find the entries outside the kept set, and it exposes duplicates.
template <typename GradAlloc>
TopkCall topk_prepare(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                      const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                      const LossConfig& cfg, bool values_are_logprobs, bool tail_bucket, bool grad_student,
                      GradAlloc&& alloc_grad, const std::optional<at::Tensor>& row_weight = std::nullopt,
                      const std::optional<at::Tensor>& row_temperature = std::nullopt, bool grad_temperature = false) {
  check_logits_arg(student, "student_logits");
  const int64_t rows = student.size(0), vocab = student.size(1), k = values.dim() == 2 ? values.size(1) : 0;
  check_topk_args(values, indices, rows, vocab, student.device());
  check_topk_config(cfg, values_are_logprobs, tail_bucket);
  FASTKD_CHECK_ARG(!grad_temperature || row_temperature.has_value(), "temperature",
                   "its gradient needs the temperature as a tensor");
  const int64_t ignore_index = cfg.ignore_index;

  TopkCall c;
  c.student_dtype = student.scalar_type();
  c.out_dtype = c10::promoteTypes(c.student_dtype, values.scalar_type());
  const bool any_double = c.out_dtype == at::kDouble;
  c.student = rows_with_unit_stride(student, any_double ? at::kDouble : c.student_dtype);
  c.labels = prepare_labels(labels, student, rows);
  c.count = prepare_count(num_items, c.labels, ignore_index, student);

  std::tie(c.values, c.indices) = topk_sorted_teacher(values, indices, c.labels, ignore_index, vocab, any_double);

  auto opts = student.options();
  c.row_soft = at::empty({rows}, opts.dtype(any_double ? at::kDouble : at::kFloat));
  c.grad_student = grad_student ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(c.student.scalar_type()))
                                : at::empty({0}, opts.dtype(c.student.scalar_type()));

  TopkParams& p = c.p;
  static_cast<LossConfig&>(p) = cfg;
  p.student = c.student.data_ptr();
  p.values = c.values.data_ptr();
  p.indices = c.indices.data_ptr<int64_t>();
  p.labels = c.labels.defined() ? c.labels.data_ptr<int64_t>() : nullptr;
  p.count = c.count.defined() ? c.count.data_ptr<double>() : nullptr;
  p.grad_student = grad_student ? c.grad_student.data_ptr() : nullptr;
  p.row_soft = c.row_soft.data_ptr();
  p.rows = rows;
  p.vocab = vocab;
  p.k = k;
  p.student_row_stride = c.student.stride(0);
  p.values_are_logprobs = values_are_logprobs;
  p.tail_bucket = tail_bucket && k < vocab;  // with every entry kept there is no tail: renormalize
  if (row_weight.has_value()) {
    c.row_weight = prepare_row_values(*row_weight, "token_weights", rows, student.device(), false);
    p.row_weight = c.row_weight.data_ptr<double>();
  }
  if (row_temperature.has_value()) {
    c.row_temperature = prepare_row_values(*row_temperature, "temperature", rows, student.device(), true);
    c.temperature_dtype = row_temperature->scalar_type();
    p.row_temperature = c.row_temperature.data_ptr<double>();
  }
  c.grad_temperature = at::empty({grad_temperature ? rows : 0}, opts.dtype(at::kDouble));
  p.row_grad_temperature = grad_temperature ? c.grad_temperature.data_ptr<double>() : nullptr;
  return c;
}

// (loss, grad_student, grad_temperature): the temperature gradient in the per-row temperatures' dtype ([0] when
// not asked for).
using TopkOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
inline TopkOutputs topk_outputs(TopkCall& c) {
  const TopkParams& p = c.p;
  auto parts = finish_parts(c.row_soft, at::Tensor(), false, c.count, p.reduction, p.rows, p.vocab, 1.0, 0.0,
                            c.out_dtype);
  return {std::get<0>(parts), c.grad_student.to(c.student_dtype), c.grad_temperature.to(c.temperature_dtype)};
}

}  // namespace fastkd
