// The device-independent part of fastkd::dist_forward (DIST, see dist_math.h): the op's traits (schema,
// signature, gradient outputs: registration.cpp and dist_autograd.cpp read them), argument checks, the compute
// types, buffers and outputs. The CPU (cpu/dist_cpu.cpp) and CUDA (cuda/dist_cuda.cu) kernels get a DistParams.
//
// Outputs: the loss, 0-dim in the promoted input dtype; grad_student / grad_teacher [rows, cols] (the gradients
// of the loss for an upstream gradient of 1) in the input's dtype, float32 for float16 / bfloat16 inputs (the
// autograd scales them in float32 and rounds to the input dtype once), or empty tensors when not asked for.
#pragma once

#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "fastkd/dist_math.h"
#include "fastkd/kd_host.h"
#include "fastkd/op_traits.h"

namespace fastkd {

struct DistOp {
  static constexpr const char* name = "dist_forward";
  static constexpr const char* loss = "dist_loss";
  // loss = tau^2 (beta inter + gamma intra) of two [rows, classes] logit tensors; returns (loss,
  // grad_student, grad_teacher), a gradient not asked for being an empty tensor.
  static constexpr const char* schema =
      "dist_forward(Tensor student, Tensor teacher, float beta, float gamma, float tau, float eps, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, double,
                                                             double, double, bool, bool);
  static constexpr GradOutput grads[] = {{"student", 1}, {"teacher", 2}};
};

// One call, prepared: the inputs in their compute types (unit column stride), the gradient buffers, the params.
struct DistCall {
  DistParams p;
  at::Tensor student, teacher, grad_student, grad_teacher;
  at::ScalarType out_type;
};

inline at::ScalarType dist_grad_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// alloc(sizes, options) allocates a gradient buffer (the CPU's is huge-page aligned).
template <typename Alloc>
DistCall dist_prepare(const at::Tensor& student, const at::Tensor& teacher, double beta, double gamma, double tau,
                      double eps, bool grad_student, bool grad_teacher, Alloc&& alloc) {
  check_logits_arg(student, "student_logits");
  check_logits_arg(teacher, "teacher_logits");
  FASTKD_CHECK_ARG(teacher.sizes() == student.sizes(), "teacher_logits", "expected the student's shape ",
                   student.sizes(), ", got ", teacher.sizes());
  FASTKD_CHECK_ARG(teacher.device() == student.device(), "teacher_logits", "expected the student's device ",
                   student.device(), ", got ", teacher.device());
  FASTKD_CHECK_ARG(std::isfinite(beta) && beta >= 0.0, "beta", "expected a finite value >= 0, got ", beta);
  FASTKD_CHECK_ARG(std::isfinite(gamma) && gamma >= 0.0, "gamma", "expected a finite value >= 0, got ", gamma);
  FASTKD_CHECK_ARG(tau >= 0x1p-63 && tau <= 0x1p63, "tau",
                   "expected a finite value in [2**-63, 2**63] (1/tau and tau^2 must stay normal float32 numbers), got ",
                   tau);
  FASTKD_CHECK_ARG(std::isfinite(eps) && eps >= 0.0, "eps", "expected a finite value >= 0, got ", eps);
  DistCall c;
  c.out_type = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
  const auto [s_type, t_type] = kd_compute_types(student.scalar_type(), teacher.scalar_type());
  c.student = rows_with_unit_stride(student, s_type);
  c.teacher = rows_with_unit_stride(teacher, t_type);
  const int64_t rows = student.size(0), cols = student.size(1);
  auto grad_buffer = [&](bool wanted, const at::Tensor& x) {
    const at::TensorOptions o = x.options().dtype(dist_grad_type(x.scalar_type()));
    if (!wanted) return at::empty({0}, o);
    return alloc(at::IntArrayRef{rows, cols}, o);
  };
  c.grad_student = grad_buffer(grad_student, student);
  c.grad_teacher = grad_buffer(grad_teacher, teacher);
  DistParams& p = c.p;
  p.rows = rows;
  p.cols = cols;
  p.student = c.student.data_ptr();
  p.teacher = c.teacher.data_ptr();
  p.student_row_stride = rows > 0 ? c.student.stride(0) : 0;
  p.teacher_row_stride = rows > 0 ? c.teacher.stride(0) : 0;
  p.grad_student = grad_student ? c.grad_student.data_ptr() : nullptr;
  p.grad_teacher = grad_teacher ? c.grad_teacher.data_ptr() : nullptr;
  p.beta = beta;
  p.gamma = gamma;
  p.tau = tau;
  p.inv_tau = 1.0 / tau;
  p.eps = eps;
  return c;
}

// Whether the kernels have work: empty inputs (rows or classes 0) give the loss 0 and zero gradients (the eager
// composition gives NaN there: a mean over nothing).
inline bool dist_has_work(const DistCall& c) { return c.p.rows > 0 && c.p.cols > 0; }

// The outputs, given the loss as a float64 0-dim tensor on the device (or undefined: no work).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_outputs(DistCall& c, const at::Tensor& loss64) {
  at::Tensor loss;
  if (loss64.defined()) {
    loss = loss64.to(c.out_type);
  } else {
    loss = at::zeros({}, c.student.options().dtype(c.out_type));
    if (c.p.grad_student) c.grad_student.zero_();
    if (c.p.grad_teacher) c.grad_teacher.zero_();
  }
  return {loss, c.grad_student, c.grad_teacher};
}

}  // namespace fastkd
