// ATen-side code of fastkd::cosine_forward shared by the CPU and CUDA implementations: argument checks (every
// failure names the user-facing argument), output allocation, the plain-data CosineParams the kernels see, and
// the final reduction (finish_parts of kd_host.h, with the cosine a per-row quantity: 'mean' divides by the
// counted rows, as for the cross-entropy and nn.CosineEmbeddingLoss).
#pragma once

#include <cmath>
#include <cstdint>
#include <tuple>

#include "fastkd/cosine_math.h"
#include "fastkd/kd_host.h"

namespace fastkd {

// What the kernels see: pointers, sizes, strides, scalars.
struct CosineParams {
  const void* student = nullptr;
  const void* teacher = nullptr;
  const int64_t* labels = nullptr;  // [rows] or null (every row counts)
  const double* count = nullptr;    // divisor of 'batchmean'/'mean' on the device, or null (= rows)
  void* grad_student = nullptr;     // [rows, vocab] or null
  void* grad_teacher = nullptr;
  void* row_soft = nullptr;  // [rows] accumulation type: 1 - cos (0 on uncounted rows)
  void* row_hard = nullptr;  // [rows] cross-entropy, or null
  int64_t rows = 0, vocab = 0;
  int64_t student_row_stride = 0, teacher_row_stride = 0, grad_student_row_stride = 0, grad_teacher_row_stride = 0;
  int64_t ignore_index = -100;
  double beta = 1.0;         // weight of 1 - cos
  double hard_weight = 0.0;  // weight of the cross-entropy
  double eps = 1e-8;
  Reduction reduction = Reduction::BatchMean;
  bool hard = false;
};

// The divisor of a row's contribution to the reduced loss (the gradient's row scale is its inverse).
FASTKD_HOST_DEVICE double cosine_divisor(Reduction reduction, const double* count, int64_t rows) {
  return ce_denominator(reduction, count != nullptr ? *count : static_cast<double>(rows));
}

struct CosineCall {
  at::Tensor student, teacher, labels, count, row_soft, row_hard, grad_student, grad_teacher;
  at::ScalarType student_dtype, teacher_dtype, out_dtype;
  CosineParams p;
};

// float16 gradients are returned in float32 (the autograd rounds them after the upstream scale, as for the
// relation ops), so a loss scale does not meet entries already flushed to 0; other dtypes keep their own.
inline at::ScalarType cosine_grad_dtype(at::ScalarType compute) {
  return compute == at::kHalf ? at::kFloat : compute;
}

template <typename GradAlloc>
CosineCall cosine_prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                          const std::optional<at::Tensor>& num_items, double beta, double hard_weight, double eps,
                          int64_t ignore_index, c10::string_view reduction, bool grad_student, bool grad_teacher,
                          GradAlloc&& alloc_grad) {
  check_logits_arg(student, "student_logits");
  check_logits_arg(teacher, "teacher_logits");
  FASTKD_CHECK_ARG(teacher.sizes() == student.sizes(), "teacher_logits", "expected shape ", student.sizes(),
                   " (the student's), got ", teacher.sizes());
  FASTKD_CHECK_ARG(teacher.device() == student.device(), "teacher_logits", "expected device ", student.device(),
                   " (the student's), got ", teacher.device());
  FASTKD_CHECK_ARG(student.size(1) > 0, "student_logits", "the vocabulary (last) dimension must not be empty");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0, "fastkd: argument 'beta': expected a finite value >= 0, got ",
                    beta);
  TORCH_CHECK_VALUE(std::isfinite(hard_weight) && hard_weight >= 0.0,
                    "fastkd: argument 'alpha': expected a finite value >= 0, got ", hard_weight);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "fastkd: argument 'eps': expected a finite value > 0, got ", eps);
  const bool hard = hard_weight != 0.0;
  FASTKD_CHECK_ARG(!hard || labels.has_value(), "labels", "class targets are required by the cross-entropy part");

  CosineCall c;
  c.student_dtype = student.scalar_type();
  c.teacher_dtype = teacher.scalar_type();
  c.out_dtype = c10::promoteTypes(c.student_dtype, c.teacher_dtype);
  const auto [s_type, t_type] = kd_compute_types(c.student_dtype, c.teacher_dtype);
  c.student = rows_with_unit_stride(student, s_type);
  c.teacher = rows_with_unit_stride(teacher, t_type);
  const int64_t rows = student.size(0), vocab = student.size(1);
  c.labels = prepare_labels(labels, student, rows);
  if (hard) check_targets_in_range(c.labels, ignore_index, vocab, "labels");
  c.count = prepare_count(num_items, c.labels, ignore_index, student);

  const auto opts = student.options();
  const auto acc = c.out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  c.row_soft = at::empty({rows}, opts.dtype(acc));
  c.row_hard = at::empty({hard ? rows : 0}, opts.dtype(acc));
  const at::ScalarType gs_type = cosine_grad_dtype(s_type), gt_type = cosine_grad_dtype(t_type);
  c.grad_student = grad_student ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(gs_type))
                                : at::empty({0}, opts.dtype(gs_type));
  c.grad_teacher = grad_teacher ? alloc_grad(at::IntArrayRef{rows, vocab}, opts.dtype(gt_type))
                                : at::empty({0}, opts.dtype(gt_type));

  CosineParams& p = c.p;
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
  p.grad_student_row_stride = vocab;
  p.grad_teacher_row_stride = vocab;
  p.ignore_index = ignore_index;
  p.beta = beta;
  p.hard_weight = hard_weight;
  p.eps = eps;
  p.reduction = parse_reduction(to_view(reduction));
  p.hard = hard;
  return c;
}

// (loss, soft, hard, grad_student, grad_teacher): soft = the reduced 1 - cos, hard = the reduced cross-entropy,
// loss = beta * soft + alpha * hard. Gradients in the compute dtype (float32 for float16); a mixed-dtype upcast
// of a non-float16 input is undone.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_outputs(CosineCall& c) {
  const CosineParams& p = c.p;
  auto [loss, soft, hard] = finish_parts(c.row_soft, c.row_hard, p.hard, c.count, p.reduction, p.rows, 1, p.beta,
                                         p.hard_weight, c.out_dtype);
  const auto back = [](const at::Tensor& g, at::ScalarType input) {
    return input == at::kHalf ? g : g.to(cosine_grad_dtype(input));
  };
  return {loss, soft, hard, back(c.grad_student, c.student_dtype), back(c.grad_teacher, c.teacher_dtype)};
}

}  // namespace fastkd

namespace fastkd {

// The fused linear head's chunk call (fused_linear_host.h, divergence "cosine"): the response kernel's
// parameters of the chunk as the cosine kernel takes them (beta = the soft weight, eps = the op's params[0]).
inline CosineParams cosine_params_of(const KdParams& k, double eps) {
  CosineParams p;
  p.student = k.student;
  p.teacher = k.teacher;
  p.labels = k.labels;
  p.count = k.count;
  p.grad_student = k.grad_student;
  p.grad_teacher = k.grad_teacher;
  p.row_soft = k.row_soft;
  p.row_hard = k.row_hard;
  p.rows = k.rows;
  p.vocab = k.vocab;
  p.student_row_stride = p.grad_student_row_stride = k.student_row_stride;
  p.teacher_row_stride = p.grad_teacher_row_stride = k.teacher_row_stride;
  p.ignore_index = k.ignore_index;
  p.beta = k.soft_weight;
  p.hard_weight = k.hard_weight;
  p.eps = eps;
  p.reduction = k.reduction;
  p.hard = k.hard;
  return p;
}

// The head's "cosine" arguments: params = [eps], eps finite and > 0.
inline double cosine_head_eps(c10::ArrayRef<double> params) {
  TORCH_CHECK_VALUE(params.size() == 1, "fastkd: divergence 'cosine' takes one parameter (eps), got ", params.size());
  TORCH_CHECK_VALUE(std::isfinite(params[0]) && params[0] > 0.0,
                    "fastkd: argument 'eps': expected a finite value > 0, got ", params[0]);
  return params[0];
}

}  // namespace fastkd
