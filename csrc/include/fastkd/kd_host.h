// ATen-side code shared by the CPU and CUDA implementations of fastkd::kd_forward: argument checks,
// output allocation, dtype dispatch and the final (deterministic) reduction over rows. Header-only so
// that the per-ISA CPU libraries and the CUDA library each carry the same definitions.
#pragma once

#include <string_view>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "fastkd/kd_params.h"

namespace fastkd {

#define FASTKD_CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, "fastkd: argument '", name, "': ", __VA_ARGS__)

inline Reduction parse_reduction(std::string_view r) {
  if (r == "none") return Reduction::None;
  if (r == "sum") return Reduction::Sum;
  if (r == "mean") return Reduction::Mean;
  if (r == "batchmean") return Reduction::BatchMean;
  TORCH_CHECK(false, "fastkd: argument 'reduction': expected one of 'batchmean', 'sum', 'mean', 'none', got '", r,
              "'");
}

inline bool is_kd_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Calls f(S{}, T{}) with the C++ element types of student and teacher. fp64 pairs only with fp64
// (kd_prepare upcasts the other side); fp32/fp16/bf16 combine freely.
template <typename F>
void kd_dispatch_pair(at::ScalarType s, at::ScalarType t, F&& f) {
  if (s == at::kDouble) {
    TORCH_INTERNAL_ASSERT(t == at::kDouble);
    f(double{}, double{});
    return;
  }
  auto inner = [&](auto s_tag) {
    switch (t) {
      case at::kFloat: f(s_tag, float{}); break;
      case at::kHalf: f(s_tag, at::Half{}); break;
      case at::kBFloat16: f(s_tag, at::BFloat16{}); break;
      default: TORCH_INTERNAL_ASSERT(false, "unexpected teacher dtype");
    }
  };
  switch (s) {
    case at::kFloat: inner(float{}); break;
    case at::kHalf: inner(at::Half{}); break;
    case at::kBFloat16: inner(at::BFloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected student dtype");
  }
}

struct KdCall {
  at::Tensor student, teacher;           // 2-D views [rows, vocab], unit stride along vocab
  at::Tensor labels;                     // int64 [rows] or undefined
  at::Tensor count;                      // int64 scalar on the device, or undefined (all rows count)
  at::Tensor row_loss;                   // [rows] accumulation dtype
  at::Tensor grad_student, grad_teacher; // [rows, vocab] or empty
  at::ScalarType student_dtype, teacher_dtype, out_dtype;
  KdParams p;
};

// Validates the arguments of kd_forward and allocates its outputs (gradients through alloc_grad, which
// each device picks). Every failure names the argument.
template <typename GradAlloc>
KdCall kd_prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                         double temperature, int64_t ignore_index, std::string_view reduction,
                         bool scale_by_temperature, bool grad_student, bool grad_teacher,
                  GradAlloc&& alloc_grad) {
  FASTKD_CHECK_ARG(student.dim() == 2, "student_logits", "expected a 2-D [rows, vocab] tensor, got ", student.dim(),
                   "-D");
  FASTKD_CHECK_ARG(teacher.sizes() == student.sizes(), "teacher_logits", "expected shape ", student.sizes(),
                   " (the student's), got ", teacher.sizes());
  FASTKD_CHECK_ARG(teacher.device() == student.device(), "teacher_logits", "expected device ", student.device(),
                   " (the student's), got ", teacher.device());
  FASTKD_CHECK_ARG(is_kd_dtype(student.scalar_type()), "student_logits",
                   "expected float32, float16, bfloat16 or float64, got ", student.scalar_type());
  FASTKD_CHECK_ARG(is_kd_dtype(teacher.scalar_type()), "teacher_logits",
                   "expected float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  FASTKD_CHECK_ARG(student.size(1) > 0, "student_logits", "the vocabulary (last) dimension must not be empty");
  FASTKD_CHECK_ARG(std::isfinite(temperature) && temperature > 0.0, "temperature",
                   "expected a finite value > 0, got ", temperature);

  KdCall c;
  c.student_dtype = student.scalar_type();
  c.teacher_dtype = teacher.scalar_type();
  c.out_dtype = at::promote_types(c.student_dtype, c.teacher_dtype);
  const bool any_double = c.out_dtype == at::kDouble;
  auto as_rows = [&](const at::Tensor& x) {
    at::Tensor y = any_double ? x.to(at::kDouble) : x;
    return y.stride(1) == 1 ? y : y.contiguous();
  };
  c.student = as_rows(student);
  c.teacher = as_rows(teacher);
  const int64_t rows = student.size(0), vocab = student.size(1);

  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    FASTKD_CHECK_ARG(l.device() == student.device(), "labels", "expected device ", student.device(), ", got ",
                     l.device());
    FASTKD_CHECK_ARG(!at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
                         l.scalar_type() != at::kBool,
                     "labels", "expected an integer tensor, got ", l.scalar_type());
    FASTKD_CHECK_ARG(l.dim() == 1 && l.size(0) == rows, "labels", "expected shape [", rows, "], got ", l.sizes());
    c.labels = l.to(at::kLong).contiguous();
    c.count = c.labels.ne(ignore_index).sum();
  }

  const auto acc_dtype = any_double ? at::kDouble : at::kFloat;
  auto opts = student.options();
  c.row_loss = at::empty({rows}, opts.dtype(acc_dtype));
  const auto no_grad = [&](at::ScalarType t) { return at::empty({0}, opts.dtype(t)); };
  c.grad_student = grad_student ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(c.student.scalar_type()))
                                : no_grad(c.student.scalar_type());
  c.grad_teacher = grad_teacher ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(c.teacher.scalar_type()))
                                : no_grad(c.teacher.scalar_type());

  KdParams& p = c.p;
  p.student = c.student.data_ptr();
  p.teacher = c.teacher.data_ptr();
  p.labels = c.labels.defined() ? c.labels.data_ptr<int64_t>() : nullptr;
  p.counted_rows = c.count.defined() ? c.count.data_ptr<int64_t>() : nullptr;
  p.grad_student = grad_student ? c.grad_student.data_ptr() : nullptr;
  p.grad_teacher = grad_teacher ? c.grad_teacher.data_ptr() : nullptr;
  p.row_loss = c.row_loss.data_ptr();
  p.rows = rows;
  p.vocab = vocab;
  p.student_row_stride = c.student.stride(0);
  p.teacher_row_stride = c.teacher.stride(0);
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.loss_factor = scale_by_temperature ? temperature * temperature : 1.0;
  p.reduction = parse_reduction(reduction);
  return c;
}

// The loss from the per-row KL values (already multiplied by loss_factor, 0 for ignored rows).
// Deterministic on every device: a serial double sum on the CPU, ATen's (atomic-free) sum on CUDA.
inline at::Tensor kd_finish_loss(const KdCall& c) {
  const KdParams& p = c.p;
  if (p.reduction == Reduction::None) return c.row_loss.to(c.out_dtype);
  if (c.row_loss.is_cpu()) {
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES(c.row_loss.scalar_type(), "kd_finish_loss", [&] {
      const scalar_t* r = c.row_loss.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < p.rows; ++i) total += static_cast<double>(r[i]);
    });
    const int64_t counted = c.count.defined() ? c.count.item<int64_t>() : p.rows;
    total /= kd_denominator(p.reduction, counted, p.vocab);
    return at::scalar_tensor(total, c.row_loss.options().dtype(c.out_dtype));
  }
  at::Tensor total = c.row_loss.sum(at::kDouble);
  if (p.reduction != Reduction::Sum) {
    at::Tensor counted = c.count.defined() ? c.count : at::scalar_tensor(p.rows, total.options().dtype(at::kLong));
    at::Tensor denom = counted.to(at::kDouble).clamp_min(1.0);
    if (p.reduction == Reduction::Mean) denom = denom * static_cast<double>(p.vocab);
    total = total / denom;
  }
  return total.to(c.out_dtype);
}

// Gradients leave the kernels in the input dtypes; fp64 upcasting (mixed fp64 input) is undone here.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_outputs(KdCall& c) {
  at::Tensor loss = kd_finish_loss(c);
  at::Tensor gs = c.grad_student.to(c.student_dtype);
  at::Tensor gt = c.grad_teacher.to(c.teacher_dtype);
  return {loss, gs, gt};
}

}  // namespace fastkd
