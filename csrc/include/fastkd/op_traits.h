// What an operator's traits struct says about it (see relation_ops.h for the relation family):
//   static constexpr const char* name     the op, as in torch.ops.fastkd.<name>
//   static constexpr const char* loss     its public loss function, for messages ("sp_loss")
//   static constexpr const char* schema   its TORCH_LIBRARY schema, "name(Tensor student, ...) -> (...)"
//   using Sig = std::tuple<...>(...)      its C++ signature (schema types: const at::Tensor&, double, int64_t,
//                                         bool, c10::string_view; a tuple of the outputs)
//   static constexpr GradOutput grads[]   one entry per differentiable input, in argument order from the
//                                         first: where the op returns that input's gradient
// The op's output 0 is the loss; every other output is a gradient or a detached value (never differentiable).
#pragma once

namespace fastkd {

struct GradOutput {
  const char* input;  // the input's name, for messages ("student")
  int output;         // the output holding the gradient of the loss with respect to it; -1: it never gets one
};

}  // namespace fastkd
