// The relation- and feature-based loss operators, listed once. Everything that names them comes from this
// list: the schemas (registration.cpp), the CPU and CUDA kernels (relation_cpu.cpp, relation_cuda.cu: the
// drivers <op>_impl of relation_host.h), the autograd (relation_autograd.cpp) and autocast (autocast.cpp); the
// fake kernels are fastkd/ops/relation.py's table. A new relation loss is one traits struct and one line of
// FASTKD_RELATION_OPS here, its driver <op>_impl<B> in relation_host.h, its fake's line, its Python function.
//
// Fused: the loss and, when asked, the gradients of the loss with respect to the inputs, from Gram matrices;
// nothing of size N x N x D or N x N x N is allocated. Inputs are [N, D] features (flattened per sample by the
// Python layer), AT's are [N, C, S] maps. Losses are 0-dim in the promoted input type; gradients are in the
// input's dtype, float32 for float16 / bfloat16 inputs (the autograd rounds them after scaling); a gradient not
// asked for is an empty tensor. Traits: see op_traits.h.
#pragma once

#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "fastkd/op_traits.h"

namespace fastkd {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace relation_ops {

// X(op, Traits) for every relation op.
#define FASTKD_RELATION_OPS(X) \
  X(rkd_forward, Rkd)          \
  X(sp_forward, Sp)            \
  X(pkt_forward, Pkt)          \
  X(cc_forward, Cc)            \
  X(at_forward, At)

// RKD: loss = distance_weight * distance + angle_weight * angle, also returned as detached parts; the teacher
// never gets a gradient (the reference computes it under no_grad).
struct Rkd {
  static constexpr const char* name = "rkd_forward";
  static constexpr const char* loss = "rkd_loss";
  static constexpr const char* schema =
      "rkd_forward(Tensor student, Tensor teacher, float distance_weight, float angle_weight, bool grad_student) "
      "-> (Tensor, Tensor, Tensor, Tensor)";
  using Sig = Tensor4(const at::Tensor&, const at::Tensor&, double, double, bool);
  static constexpr GradOutput grads[] = {{"student", 3}, {"teacher", -1}};
};

// The others return (loss, grad_student, grad_teacher).
struct Sp {
  static constexpr const char* name = "sp_forward";
  static constexpr const char* loss = "sp_loss";
  static constexpr const char* schema =
      "sp_forward(Tensor student, Tensor teacher, str reduction, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)";
  using Sig = Tensor3(const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool);
  static constexpr GradOutput grads[] = {{"student", 1}, {"teacher", 2}};
};

struct Pkt {
  static constexpr const char* name = "pkt_forward";
  static constexpr const char* loss = "pkt_loss";
  static constexpr const char* schema =
      "pkt_forward(Tensor student, Tensor teacher, float eps, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)";
  using Sig = Tensor3(const at::Tensor&, const at::Tensor&, double, bool, bool);
  static constexpr GradOutput grads[] = {{"student", 1}, {"teacher", 2}};
};

struct Cc {
  static constexpr const char* name = "cc_forward";
  static constexpr const char* loss = "cc_loss";
  static constexpr const char* schema =
      "cc_forward(Tensor student, Tensor teacher, str kernel, float gamma, int max_p, str reduction, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)";
  using Sig = Tensor3(const at::Tensor&, const at::Tensor&, c10::string_view, double, int64_t, c10::string_view, bool,
                      bool);
  static constexpr GradOutput grads[] = {{"student", 1}, {"teacher", 2}};
};

struct At {
  static constexpr const char* name = "at_forward";
  static constexpr const char* loss = "at_loss";
  static constexpr const char* schema =
      "at_forward(Tensor student, Tensor teacher, float p, str mode, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)";
  using Sig = Tensor3(const at::Tensor&, const at::Tensor&, double, c10::string_view, bool, bool);
  static constexpr GradOutput grads[] = {{"student", 1}, {"teacher", 2}};
};

// Each entry's op, traits name and schema agree.
#define FASTKD_RELATION_OP_CHECK(op, Traits)                               \
  static_assert(std::string_view(Traits::name) == #op &&                   \
                    std::string_view(Traits::schema).starts_with(#op "("), \
                "relation_ops.h: " #Traits "::name / schema do not match the list entry " #op);
FASTKD_RELATION_OPS(FASTKD_RELATION_OP_CHECK)
#undef FASTKD_RELATION_OP_CHECK

}  // namespace relation_ops
}  // namespace fastkd
