// Autograd for the fused response-loss operators, in C++ (TORCH_LIBRARY_IMPL(fastkd, Autograd)).
//
// The fused forwards compute the loss and, when an input requires grad, the gradient of the *reduced* loss
// in the same read of the logits; it is saved for backward. The backward multiplies it by the incoming
// gradient: for the usual `loss.backward()` (or `loss + other`) that gradient is exactly 1 and the saved
// tensor is returned as is, so a fused fwd+bwd reads the logits once and writes one gradient. Otherwise
// (`alpha * loss`, reduction "none" with weights) the product is a new tensor: the saved gradient is never
// modified, so retain_graph, torch.autograd.grad and gradcheck see the right values every time.
//
// Written in C++ rather than with torch.library.register_autograd because the Python autograd wrapper cost
// about 0.2 ms per fwd+bwd, more than the kernels themselves at vision sizes ([256, 100]). Under
// torch.compile / AOT tracing the incoming gradient is a fake or functional tensor whose value cannot be
// read: the plain product is traced then.
#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace fastkd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether a float16 gradient saved for an upstream of 1 must be recomputed for this upstream gradient (see
// needs_fp16_recompute): not for exactly 1 (the saved gradient is the answer), nor for a non-finite upstream
// (an overflowed loss scale: the product gives the inf/NaN gradient that GradScaler looks for).
bool recompute_for(const at::Tensor& grad_loss) {
  if (!has_real_data(grad_loss)) return false;
  if (grad_loss.dim() == 0) {
    const double g = grad_loss.item<double>();
    return g != 1.0 && std::isfinite(g);
  }
  return grad_loss.ne(1).any().item<bool>() && grad_loss.isfinite().all().item<bool>();
}

// float16 gradients are recomputed in backward when the upstream gradient is not 1 (a loss scale, a loss
// weight): saved for an upstream of 1 they may have underflowed (fp16's smallest normal is 6e-5; a
// "batchmean" gradient is ~1 / (rows * V)), and scaling the rounded values afterwards cannot bring the lost
// digits back. bfloat16 has float32's range: a scaled copy of its saved gradient is as exact as eager's.
bool needs_fp16_recompute(bool wanted, const at::Tensor& input) { return wanted && input.scalar_type() == at::kHalf; }

// The public function behind a response divergence, for messages (every divergence also runs through
// fastkd.divergence_loss).
std::string response_loss_name(c10::string_view divergence) {
  if (divergence == "kl") return "kd_loss (divergence 'kl')";
  if (divergence == "reverse_kl") return "reverse_kl_loss (divergence 'reverse_kl')";
  if (divergence == "jsd") return "jsd_loss";
  if (divergence == "tvd") return "tvd_loss";
  if (divergence == "dkd") return "dkd_loss";
  return "divergence_loss (divergence '" + std::string(divergence.data(), divergence.size()) + "')";
}

// (saved * upstream) in float32, rounded to `dtype` once: the product of a float32 gradient recomputed for an
// upstream of 1 (reduction "none": one upstream value per row).
at::Tensor scaled_to(const at::Tensor& grad32, const at::Tensor& grad_loss, at::ScalarType dtype) {
  const at::Tensor g = grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(-1);
  return (grad32 * g.to(grad32.scalar_type())).to(dtype);
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
std::optional<at::Tensor> undefined_to_opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient of a per-row temperature from the saved d loss / d row temperature [rows]: times the upstream (a
// scalar, or one value per row for reduction "none"). `computed`: the op ran with grad_temperature=True (the
// saved gradient then is real even when empty: no rows).
at::Tensor row_temperature_grad(const at::Tensor& saved, const at::Tensor& g, bool computed) {
  TORCH_CHECK(computed, "fastkd: the op was called with grad_temperature=False but its temperature input needs a "
              "gradient; use the fastkd loss functions, which set these flags");
  if (saved.sym_numel() == 0) return saved;
  return g.dim() == 0 ? grad_from(saved, g, "temperature") : saved * g.to(saved.scalar_type());
}

using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ResponseSig = Six(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, c10::string_view, c10::ArrayRef<double>, double, double,
                        double, int64_t, c10::string_view, bool, bool, bool, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, bool, double, bool);
constexpr size_t kResponseArgs = 19;
constexpr size_t kRowTemperatureArg = 14;  // its place among all arguments (the backward's outputs)

class ResponseForward : public torch::autograd::Function<ResponseForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                               c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
                               double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
                               bool scale_by_temperature, bool grad_student, bool grad_teacher,
                               const std::optional<at::Tensor>& row_temperature,
                               const std::optional<at::Tensor>& row_weight, bool standardize, double standardize_eps,
                               bool grad_temperature) {
    static auto op = typed_op<ResponseSig>("fastkd::response_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, soft, hard, gs, gt, g_temp] =
        op.call(student, teacher, labels, num_items, divergence, params, temperature, soft_weight, hard_weight,
                ignore_index, reduction, scale_by_temperature, grad_student, grad_teacher, row_temperature, row_weight,
                standardize, standardize_eps, grad_temperature);
    ctx->mark_non_differentiable({soft, hard, gs, gt, g_temp});
    // The gradient outputs are never differentiated; without this autograd would hand the backward freshly
    // zeroed [rows, vocab] tensors.
    ctx->set_materialize_grads(false);
    const bool recompute = needs_fp16_recompute(grad_student, student) || needs_fp16_recompute(grad_teacher, teacher);
    if (recompute) {  // the inputs and arguments of the op, for a backward under a loss scale
      ctx->save_for_backward({gs, gt, g_temp, student, teacher, opt_or_undefined(labels), opt_or_undefined(num_items),
                              opt_or_undefined(row_temperature), opt_or_undefined(row_weight)});
      auto& d = ctx->saved_data;
      d["standardize"] = standardize;
      d["standardize_eps"] = standardize_eps;
      d["temperature"] = temperature;
      d["params"] = params.vec();
      d["soft_weight"] = soft_weight;
      d["hard_weight"] = hard_weight;
      d["ignore_index"] = ignore_index;
      d["reduction"] = std::string(reduction.data(), reduction.size());
      d["scale_by_temperature"] = scale_by_temperature;
    } else {
      ctx->save_for_backward({gs, gt, g_temp});
    }
    ctx->saved_data["recompute"] = recompute;
    ctx->saved_data["divergence"] = std::string(divergence.data(), divergence.size());
    ctx->saved_data["row_temperature_edge"] =
        row_temperature.has_value() ? int64_t(2 + labels.has_value() + num_items.has_value()) : int64_t(-1);
    ctx->saved_data["grad_temperature"] = grad_temperature;
    return {loss, soft, hard, gs, gt, g_temp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kResponseArgs);
    if (!grads[0].defined()) return out;  // the loss itself was not used
    const auto saved = ctx->get_saved_variables();
    const std::string divergence = ctx->saved_data["divergence"].toStringRef();
    if (ctx->saved_data["recompute"].toBool() && recompute_for(grads[0])) {
      out = recompute(ctx, saved, grads[0]);
    } else {
      if (ctx->needs_input_grad(0)) out[0] = grad_from(saved[0], grads[0], "student");
      if (ctx->needs_input_grad(1)) out[1] = grad_from(saved[1], grads[0], "teacher");
    }
    // needs_input_grad counts the tensor arguments that are present (an absent optional is not an edge)
    const int64_t row_temperature_edge = ctx->saved_data["row_temperature_edge"].toInt();
    // d loss / d row temperature, per row: times the upstream (a scalar, or one value per row for "none")
    if (row_temperature_edge >= 0 && ctx->needs_input_grad(row_temperature_edge)) {
      // [] or [rows] upstream
      out[kRowTemperatureArg] =
          row_temperature_grad(saved[2], grads[0], ctx->saved_data["grad_temperature"].toBool());
    }
    refuse_double_backward(response_loss_name(divergence));
    return out;
  }

 private:
  // float16 under a loss scale: the op again, for the gradients of g * loss. A scalar upstream g goes into
  // the op's weights (the kernel rounds g * gradient once, in the input dtype); per-row upstreams (reduction
  // "none") multiply a float32 recomputation, rounded once.
  static variable_list recompute(AutogradContext* ctx, const variable_list& saved, const at::Tensor& g) {
    static auto op = typed_op<ResponseSig>("fastkd::response_forward");
    auto& d = ctx->saved_data;
    const bool want_s = ctx->needs_input_grad(0), want_t = ctx->needs_input_grad(1);
    const at::Tensor &student = saved[3], &teacher = saved[4];
    const bool scalar = g.dim() == 0;
    const double w = scalar ? g.item<double>() : 1.0;
    at::AutoDispatchBelowADInplaceOrView guard;
    // per-row upstreams: the float16 side(s) widened to float32 (a float32 / float64 side as it is)
    auto widen = [&](const at::Tensor& x) { return !scalar && x.scalar_type() == at::kHalf ? x.to(at::kFloat) : x; };
    const at::Tensor s_in = widen(student), t_in = widen(teacher);
    auto [loss, soft, hard, gs, gt, g_temp] =
        op.call(s_in, t_in, undefined_to_opt(saved[5]), undefined_to_opt(saved[6]), d["divergence"].toStringRef(),
                d["params"].toDoubleVector(), d["temperature"].toDouble(), d["soft_weight"].toDouble() * w,
                d["hard_weight"].toDouble() * w, d["ignore_index"].toInt(),
                d["reduction"].toStringRef(), d["scale_by_temperature"].toBool(), want_s, want_t,
                undefined_to_opt(saved[7]), undefined_to_opt(saved[8]), d["standardize"].toBool(),
                d["standardize_eps"].toDouble(), false);
    variable_list out(kResponseArgs);
    if (want_s) out[0] = scalar ? gs : scaled_to(gs, g, student.scalar_type());
    if (want_t) out[1] = scalar ? gt : scaled_to(gt, g, teacher.scalar_type());
    return out;
  }
};

using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TopkSig = Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, double, bool, bool, int64_t, c10::string_view, bool, bool,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool);
constexpr size_t kTopkArgs = 15;
constexpr size_t kTopkRowTemperatureArg = 13;  // its place among all arguments (the backward's outputs)

class TopkForward : public torch::autograd::Function<TopkForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& values,
                               const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& num_items, double temperature, bool values_are_logprobs,
                               bool tail_bucket, int64_t ignore_index, c10::string_view reduction,
                               bool scale_by_temperature, bool grad_student,
                               const std::optional<at::Tensor>& row_weight,
                               const std::optional<at::Tensor>& row_temperature, bool grad_temperature) {
    static auto op = typed_op<TopkSig>("fastkd::topk_kd_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, gs, g_temp] = op.call(student, values, indices, labels, num_items, temperature, values_are_logprobs,
                                      tail_bucket, ignore_index, reduction, scale_by_temperature, grad_student,
                                      row_weight, row_temperature, grad_temperature);
    ctx->mark_non_differentiable({gs, g_temp});
    ctx->set_materialize_grads(false);
    const bool recompute = needs_fp16_recompute(grad_student, student);
    if (recompute) {  // the inputs and arguments of the op, for a backward under a loss scale
      ctx->save_for_backward({gs, g_temp, student, values, indices, opt_or_undefined(labels),
                              opt_or_undefined(num_items), opt_or_undefined(row_weight),
                              opt_or_undefined(row_temperature)});
      auto& d = ctx->saved_data;
      d["temperature"] = temperature;
      d["values_are_logprobs"] = values_are_logprobs;
      d["tail_bucket"] = tail_bucket;
      d["ignore_index"] = ignore_index;
      d["reduction"] = std::string(reduction.data(), reduction.size());
      d["scale_by_temperature"] = scale_by_temperature;
    } else {
      ctx->save_for_backward({gs, g_temp});
    }
    ctx->saved_data["recompute"] = recompute;
    // needs_input_grad counts the tensor arguments that are present (an absent optional is not an edge)
    ctx->saved_data["row_temperature_edge"] =
        row_temperature.has_value()
            ? int64_t(3 + labels.has_value() + num_items.has_value() + row_weight.has_value())
            : int64_t(-1);
    ctx->saved_data["grad_temperature"] = grad_temperature;
    return {loss, gs, g_temp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kTopkArgs);
    if (!grads[0].defined()) return out;
    TORCH_CHECK(!ctx->needs_input_grad(1), "fastkd: topk_kd_forward gives the teacher values no gradient; detach them");
    const auto saved = ctx->get_saved_variables();
    const int64_t row_temperature_edge = ctx->saved_data["row_temperature_edge"].toInt();
    if (row_temperature_edge >= 0 && ctx->needs_input_grad(row_temperature_edge)) {
      out[kTopkRowTemperatureArg] =
          row_temperature_grad(saved[1], grads[0], ctx->saved_data["grad_temperature"].toBool());
    }
    if (ctx->needs_input_grad(0)) {
      if (ctx->saved_data["recompute"].toBool() && recompute_for(grads[0])) {
        // float16 under a loss scale (see needs_fp16_recompute): a float32 recomputation, scaled, rounded once.
        static auto op = typed_op<TopkSig>("fastkd::topk_kd_forward");
        auto& d = ctx->saved_data;
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [loss, gs, g_temp] =
            op.call(saved[2].to(at::kFloat), saved[3], saved[4], undefined_to_opt(saved[5]),
                    undefined_to_opt(saved[6]), d["temperature"].toDouble(), d["values_are_logprobs"].toBool(),
                    d["tail_bucket"].toBool(), d["ignore_index"].toInt(), d["reduction"].toStringRef(),
                    d["scale_by_temperature"].toBool(), true, undefined_to_opt(saved[7]), undefined_to_opt(saved[8]),
                    false);
        out[0] = scaled_to(gs, grads[0], saved[2].scalar_type());
      } else {
        out[0] = grad_from(saved[0], grads[0], "student");
      }
    }
    refuse_double_backward("topk_kd_loss");
    return out;
  }
};

Six response_forward_autograd(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                              c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
                              double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction,
                              bool scale_by_temperature, bool grad_student, bool grad_teacher,
                              const std::optional<at::Tensor>& row_temperature,
                              const std::optional<at::Tensor>& row_weight, bool standardize, double standardize_eps,
                              bool grad_temperature) {
  auto r = ResponseForward::apply(student, teacher, labels, num_items, divergence, params, temperature,
                                  soft_weight, hard_weight, ignore_index, reduction, scale_by_temperature, grad_student,
                                  grad_teacher, row_temperature, row_weight, standardize, standardize_eps,
                                  grad_temperature);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

Three topk_kd_forward_autograd(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                               const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                               double temperature, bool values_are_logprobs, bool tail_bucket, int64_t ignore_index,
                               c10::string_view reduction, bool scale_by_temperature, bool grad_student,
                               const std::optional<at::Tensor>& row_weight,
                               const std::optional<at::Tensor>& row_temperature, bool grad_temperature) {
  auto r = TopkForward::apply(student, values, indices, labels, num_items, temperature, values_are_logprobs,
                              tail_bucket, ignore_index, reduction, scale_by_temperature, grad_student, row_weight,
                              row_temperature, grad_temperature);
  return {r[0], r[1], r[2]};
}

using OptTensor = std::optional<at::Tensor>;
using Seven = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FusedLinearSig = Seven(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
                             c10::ArrayRef<double>, double, double, double, int64_t, c10::string_view, bool, bool,
                             bool, int64_t, double, double, double, double, bool, bool, bool, const OptTensor&, bool,
                             double, const OptTensor&, bool);
constexpr size_t kFusedLinearArgs = 35;
constexpr size_t kFusedRowTemperatureArg = 33;  // its place among all arguments (the backward's outputs)
// Where the saved tensors are: the short form (scalar reductions, no recomputation) keeps the gradients only.
constexpr size_t kShortGradTemperature = 3;                      // {gh, gw, gb, g_temp}
constexpr size_t kLongGrads = 11, kLongRowWeight = 14, kLongRowTemperature = 15, kLongGradTemperature = 16;

// The fused linear head. Scalar reductions: the forward computes the gradients of hidden, weight and bias
// with the loss (the logits exist one chunk at a time, so they cannot wait for backward) and the backward
// scales them. Reduction "none": the gradients depend on each row's upstream gradient, so the forward only
// computes the losses and the backward runs the op again with grad_rows = that upstream gradient.
// A per-row temperature's gradient is computed in the forward in every case (its rows' values, times the
// upstream in backward). The teacher never gets a gradient.
class FusedLinearForward : public torch::autograd::Function<FusedLinearForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& teacher_logits, const OptTensor& teacher_hidden,
                               const OptTensor& teacher_weight, const OptTensor& teacher_bias,
                               const OptTensor& topk_values, const OptTensor& topk_indices, const OptTensor& labels,
                               const OptTensor& num_items, const OptTensor& grad_rows, c10::string_view divergence,
                               c10::ArrayRef<double> params, double temperature, double soft_weight, double hard_weight,
                               int64_t ignore_index, c10::string_view reduction, bool scale_by_temperature,
                               bool values_are_logprobs, bool tail_bucket, int64_t chunk_size,
                               double student_logit_scale, double student_softcap, double teacher_logit_scale,
                               double teacher_softcap, bool grad_hidden, bool grad_weight, bool grad_bias,
                               const OptTensor& row_weight, bool standardize, double standardize_eps,
                               const OptTensor& row_temperature, bool grad_temperature) {
    static auto op = typed_op<FusedLinearSig>("fastkd::fused_linear_kd_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    // With grad_rows the call *is* a backward (as a traced backward graph replays it): it returns the weighted
    // gradients asked for, and nothing of it is differentiable.
    const bool weighted = grad_rows.has_value();
    const bool per_row = reduction == "none" && !weighted;
    auto [loss, soft, hard, gh, gw, gb, g_temp] =
        op.call(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, topk_values,
                topk_indices, labels, num_items, grad_rows, divergence, params, temperature, soft_weight, hard_weight,
                ignore_index, reduction, scale_by_temperature, values_are_logprobs, tail_bucket, chunk_size,
                student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, grad_hidden && !per_row,
                grad_weight && !per_row, grad_bias && !per_row, row_weight, standardize, standardize_eps,
                row_temperature, grad_temperature);
    ctx->set_materialize_grads(false);
    ctx->saved_data["per_row"] = per_row;
    if (weighted) {
      ctx->mark_non_differentiable({loss, soft, hard, gh, gw, gb, g_temp});
      return {loss, soft, hard, gh, gw, gb, g_temp};
    }
    ctx->mark_non_differentiable({soft, hard, gh, gw, gb, g_temp});
    // needs_input_grad counts the tensor arguments that are present (an absent optional is not an edge)
    int64_t edge = 2;
    for (const OptTensor* t : {&bias, &teacher_logits, &teacher_hidden, &teacher_weight, &teacher_bias, &topk_values,
                               &topk_indices, &labels, &num_items, &grad_rows, &row_weight}) {
      edge += t->has_value();
    }
    ctx->saved_data["row_temperature_edge"] = row_temperature.has_value() ? edge : int64_t(-1);
    ctx->saved_data["grad_temperature"] = grad_temperature;
    // float16 under a loss scale (see needs_fp16_recompute): the op runs again in backward, with the upstream
    // gradient in its weights.
    const bool recompute = !per_row && (needs_fp16_recompute(grad_hidden, hidden) ||
                                        needs_fp16_recompute(grad_weight, weight) ||
                                        (bias.has_value() && needs_fp16_recompute(grad_bias, *bias)));
    ctx->saved_data["recompute"] = recompute;
    if (!per_row && !recompute) {
      ctx->save_for_backward({gh, gw, gb, g_temp});
    } else {
      auto value = [](const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); };
      ctx->save_for_backward({hidden, weight, value(bias), value(teacher_logits), value(teacher_hidden),
                              value(teacher_weight), value(teacher_bias), value(topk_values), value(topk_indices),
                              value(labels), value(num_items), gh, gw, gb, value(row_weight), value(row_temperature),
                              g_temp});
      ctx->saved_data["standardize"] = standardize;
      ctx->saved_data["standardize_eps"] = standardize_eps;
      ctx->saved_data["reduction"] = std::string(reduction.data(), reduction.size());
      ctx->saved_data["divergence"] = std::string(divergence.data(), divergence.size());
      ctx->saved_data["temperature"] = temperature;
      ctx->saved_data["params"] = params.vec();
      ctx->saved_data["soft_weight"] = soft_weight;
      ctx->saved_data["hard_weight"] = hard_weight;
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["scale_by_temperature"] = scale_by_temperature;
      ctx->saved_data["values_are_logprobs"] = values_are_logprobs;
      ctx->saved_data["tail_bucket"] = tail_bucket;
      ctx->saved_data["chunk_size"] = chunk_size;
      ctx->saved_data["head"] = std::vector<double>{student_logit_scale, student_softcap, teacher_logit_scale,
                                                    teacher_softcap};
      // The gradients the caller asked for (those of inputs that required grad).
      ctx->saved_data["grad_hidden"] = grad_hidden;
      ctx->saved_data["grad_weight"] = grad_weight;
      ctx->saved_data["grad_bias"] = grad_bias;
    }
    return {loss, soft, hard, gh, gw, gb, g_temp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kFusedLinearArgs);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const bool per_row = d["per_row"].toBool();
    const bool short_form = !per_row && !d["recompute"].toBool();
    const int64_t row_temperature_edge = d["row_temperature_edge"].toInt();
    if (row_temperature_edge >= 0 && ctx->needs_input_grad(row_temperature_edge)) {
      out[kFusedRowTemperatureArg] =
          row_temperature_grad(saved[short_form ? kShortGradTemperature : kLongGradTemperature], grads[0],
                               d["grad_temperature"].toBool());
    }
    if (!per_row && !(d["recompute"].toBool() && recompute_for(grads[0]))) {
      const size_t g0 = short_form ? 0 : kLongGrads;  // where gh, gw, gb are among the saved tensors
      if (ctx->needs_input_grad(0)) out[0] = grad_from(saved[g0], grads[0], "hidden");
      if (ctx->needs_input_grad(1)) out[1] = grad_from(saved[g0 + 1], grads[0], "weight");
      if (ctx->needs_input_grad(2)) out[2] = grad_from(saved[g0 + 2], grads[0], "bias");
      refuse_double_backward("fused_linear_kd_loss");
      return out;
    }
    // The op again: reduction "none" with grad_rows = the per-row upstream gradients, or (float16 under a
    // loss scale) the scalar reduction with the upstream gradient folded into the weights.
    static auto op = typed_op<FusedLinearSig>("fastkd::fused_linear_kd_forward");
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const std::string divergence = d["divergence"].toStringRef();
    const bool want[3] = {d["grad_hidden"].toBool() && ctx->needs_input_grad(0),
                          d["grad_weight"].toBool() && ctx->needs_input_grad(1),
                          d["grad_bias"].toBool() && ctx->needs_input_grad(2)};
    if (want[0] || want[1] || want[2]) {
      const double w = per_row ? 1.0 : grads[0].item<double>();
      const std::vector<double> head = d["head"].toDoubleVector();
      at::AutoDispatchBelowADInplaceOrView guard;  // the kernels themselves, not this autograd function again
      auto [loss, soft, hard, gh, gw, gb, g_temp] =
          op.call(saved[0], saved[1], opt(saved[2]), opt(saved[3]), opt(saved[4]), opt(saved[5]), opt(saved[6]),
                  opt(saved[7]), opt(saved[8]), opt(saved[9]), opt(saved[10]),
                  per_row ? OptTensor(grads[0]) : OptTensor(), divergence, d["params"].toDoubleVector(),
                  d["temperature"].toDouble(), d["soft_weight"].toDouble() * w, d["hard_weight"].toDouble() * w,
                  d["ignore_index"].toInt(), per_row ? std::string("none") : d["reduction"].toStringRef(),
                  d["scale_by_temperature"].toBool(), d["values_are_logprobs"].toBool(), d["tail_bucket"].toBool(),
                  d["chunk_size"].toInt(), head[0], head[1], head[2], head[3], want[0], want[1], want[2],
                  opt(saved[kLongRowWeight]), d["standardize"].toBool(), d["standardize_eps"].toDouble(),
                  opt(saved[kLongRowTemperature]), false);
      if (want[0]) out[0] = gh;
      if (want[1]) out[1] = gw;
      if (want[2]) out[2] = gb;
    }
    refuse_double_backward("fused_linear_kd_loss");
    return out;
  }
};

Seven fused_linear_kd_forward_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias, const OptTensor& teacher_logits,
    const OptTensor& teacher_hidden, const OptTensor& teacher_weight, const OptTensor& teacher_bias,
    const OptTensor& topk_values, const OptTensor& topk_indices, const OptTensor& labels, const OptTensor& num_items,
    const OptTensor& grad_rows, c10::string_view divergence, c10::ArrayRef<double> params, double temperature,
    double soft_weight, double hard_weight, int64_t ignore_index, c10::string_view reduction, bool scale_by_temperature,
    bool values_are_logprobs, bool tail_bucket, int64_t chunk_size, double student_logit_scale,
    double student_softcap, double teacher_logit_scale, double teacher_softcap, bool grad_hidden, bool grad_weight,
    bool grad_bias, const OptTensor& row_weight, bool standardize, double standardize_eps,
    const OptTensor& row_temperature, bool grad_temperature) {
  auto r = FusedLinearForward::apply(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                     teacher_bias, topk_values, topk_indices, labels, num_items, grad_rows, divergence,
                                     params, temperature, soft_weight, hard_weight, ignore_index, reduction,
                                     scale_by_temperature, values_are_logprobs, tail_bucket, chunk_size,
                                     student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
                                     grad_hidden, grad_weight, grad_bias, row_weight, standardize, standardize_eps,
                                     row_temperature, grad_temperature);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl("fused_linear_kd_forward", &fused_linear_kd_forward_autograd);
  m.impl("response_forward", &response_forward_autograd);
  m.impl("topk_kd_forward", &topk_kd_forward_autograd);
}

}  // namespace fastkd

// ---- fastkd::cosine_forward (fastkd/cosine_ops.h): the saved gradients times the upstream gradient ----
#include "fastkd/cosine_ops.h"
namespace fastkd {
TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl(cosine_ops::Cosine::name, &SavedGradKernel<cosine_ops::Cosine>::call);
}
}  // namespace fastkd
