// fastkd::cosine_forward, described once (traits as in op_traits.h): its schema (registration.cpp), its C++
// signature and where it returns each input's gradient (the autograd, autograd.cpp's cosine block). Kernels:
// cpu/cosine_cpu.cpp, cuda/cosine_cuda.cu; fake: fastkd/ops/cosine.py.
//
// Per row beta * (1 - cos(student, teacher)) on raw logits (cos with each norm clamped at eps, as
// torch.nn.functional.cosine_similarity) plus, when hard_weight != 0, hard_weight * the student's cross-entropy on
// the labels at temperature 1; rows whose label equals ignore_index are not counted; num_items replaces the
// counted rows as the divisor of 'batchmean' and 'mean' (both per row: the cosine is one value per row).
// Returns (loss, soft, hard, grad_student, grad_teacher): soft = the reduced 1 - cos, hard = the reduced
// cross-entropy, loss = beta * soft + hard_weight * hard; the gradients of the reduced loss (float32 for float16
// inputs), or empty when not asked for.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "fastkd/op_traits.h"

namespace fastkd::cosine_ops {

struct Cosine {
  static constexpr const char* name = "cosine_forward";
  static constexpr const char* loss = "cosine_loss";
  static constexpr const char* schema =
      "cosine_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? num_items, float beta, "
      "float hard_weight, float eps, int ignore_index, str reduction, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
      double, double, int64_t, c10::string_view, bool, bool);
  static constexpr GradOutput grads[] = {{"student", 3}, {"teacher", 4}};
};

}  // namespace fastkd::cosine_ops
