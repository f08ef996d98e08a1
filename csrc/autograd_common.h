// What the C++ autograd of the fused operators shares (autograd.cpp: the response family,
// relation_autograd.cpp: the relation family): the copy-free product of a saved gradient and the upstream
// gradient, the refusal of double backward, typed dispatcher handles, and SavedGradFunction, the autograd of an
// op whose forward returns the loss and the gradients of its inputs.
//
// The fused forwards compute the loss and, when an input requires grad, the gradient of the *reduced* loss in
// the same read of the inputs; it is saved for backward. The backward multiplies it by the incoming gradient:
// for the usual `loss.backward()` (or `loss + other`) that gradient is exactly 1 and the saved tensor is
// returned as is. Otherwise (`alpha * loss`, reduction "none" with weights) the product is a new tensor: the
// saved gradient is never modified, so retain_graph, torch.autograd.grad and gradcheck see the right values
// every time. Under torch.compile / AOT tracing the incoming gradient is a fake or functional tensor whose value
// cannot be read: the plain product is traced then.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastkd {

// A tensor with real data (not a fake, functional or meta tensor of a tracer).
inline bool has_real_data(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kTraced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                         c10::DispatchKey::Functionalize});
  return !t.is_meta() && !t.key_set().has_any(kTraced);
}

// saved * grad_loss, in saved's dtype; saved itself when grad_loss is exactly 1. `which` names the input
// (student, teacher, ...): an empty saved gradient means the op was told not to compute it.
inline at::Tensor grad_from(const at::Tensor& saved, const at::Tensor& grad_loss, const char* which) {
  TORCH_CHECK(!(saved.dim() == 1 && saved.sym_numel() == 0), "fastkd: the op was called with grad_", which,
              "=False but its ", which, " input needs a gradient; use the fastkd loss functions, which set these flags");
  if (grad_loss.dim() == 0) {
    // One host sync on CUDA: the price of skipping a full pass over the gradient.
    if (has_real_data(grad_loss) && grad_loss.item<double>() == 1.0) return saved;
    return (saved * grad_loss).to(saved.scalar_type());
  }
  // reduction "none": one upstream value per row
  if (has_real_data(grad_loss) && grad_loss.eq(1).all().item<bool>()) return saved;
  return (saved * grad_loss.unsqueeze(-1)).to(saved.scalar_type());
}

// Double backward: the saved gradients are constants, so differentiating them again would silently give a
// wrong (zero) second-order term. Under create_graph=True (the only time a backward runs with grad mode on)
// the backward refuses, naming the loss.
inline void refuse_double_backward(const std::string& loss) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "fastkd: ", loss,
              ": double backward is not supported (create_graph=True, torch.func transforms): the gradient is "
              "computed by a fused kernel and is not differentiable. For a gradient penalty or higher-order "
              "gradients use fastkd.reference.", loss.substr(0, loss.find(' ')),
              " (plain PyTorch, twice differentiable).");
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The number of arguments of an op signature R(Args...).
template <typename Sig>
struct ArgCount;
template <typename R, typename... Args>
struct ArgCount<R(Args...)> {
  static constexpr size_t value = sizeof...(Args);
};

// The autograd of an op whose output 0 is the loss and whose other outputs are the gradients of its inputs
// (computed for an upstream gradient of 1) or detached values; Op: traits as in fastkd/op_traits.h (name, loss,
// Sig, grads). Backward: each saved gradient times the upstream gradient (grad_from: copy-free for exactly 1),
// then rounded to its input's dtype. The relation ops return float32 gradients for float16 / bfloat16 inputs
// (see relation_host.h): the product is formed in float32 and rounded once, so a loss scale (GradScaler: up to
// 2^16) neither flushes small entries to 0 nor overflows large ones. Inputs without a gradient output
// (GradOutput::output == -1) get none.
template <typename Op>
class SavedGradFunction : public torch::autograd::Function<SavedGradFunction<Op>> {
  using AutogradContext = torch::autograd::AutogradContext;
  using variable_list = torch::autograd::variable_list;
  static constexpr size_t kGrads = std::size(Op::grads);

 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const Args&... args) {
    static auto op = typed_op<typename Op::Sig>((std::string("fastkd::") + Op::name).c_str());
    at::AutoDispatchBelowADInplaceOrView guard;
    const variable_list out = std::apply([](const auto&... t) { return variable_list{t...}; }, op.call(args...));
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    // The gradient outputs are never differentiated; without this autograd would hand the backward freshly
    // zeroed tensors for them.
    ctx->set_materialize_grads(false);
    const std::array<at::ScalarType, kGrads> input_types =
        leading_types(std::forward_as_tuple(args...), std::make_index_sequence<kGrads>());
    variable_list saved;
    std::vector<int64_t> saved_types;
    for (size_t i = 0; i < kGrads; ++i) {
      if (Op::grads[i].output < 0) continue;
      saved.push_back(out[Op::grads[i].output]);
      saved_types.push_back(static_cast<int64_t>(input_types[i]));
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["input_types"] = saved_types;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(ArgCount<typename Op::Sig>::value);  // one per argument of the op
    if (!grads[0].defined()) return out;  // the loss itself was not used
    const auto saved = ctx->get_saved_variables();
    const auto types = ctx->saved_data["input_types"].toIntVector();
    for (size_t i = 0, s = 0; i < kGrads; ++i) {
      if (Op::grads[i].output < 0) continue;
      if (ctx->needs_input_grad(i)) {
        out[i] = grad_from(saved[s], grads[0], Op::grads[i].input).to(static_cast<at::ScalarType>(types[s]));
      }
      ++s;
    }
    refuse_double_backward(Op::loss);
    return out;
  }

 private:
  // The dtypes of the first kGrads arguments (the differentiable inputs: tensors).
  template <typename Tuple, size_t... I>
  static std::array<at::ScalarType, kGrads> leading_types(const Tuple& args, std::index_sequence<I...>) {
    return {std::get<I>(args).scalar_type()...};
  }
};

// The Autograd kernel of Op, with the op's signature: m.impl(Op::name, &SavedGradKernel<Op>::call).
template <typename Op, typename Sig = typename Op::Sig>
struct SavedGradKernel;
template <typename Op, typename R, typename... Args>
struct SavedGradKernel<Op, R(Args...)> {
  static R call(Args... args) {
    const torch::autograd::variable_list out = SavedGradFunction<Op>::apply(args...);
    return as_tuple(out, std::make_index_sequence<std::tuple_size_v<R>>());
  }

 private:
  template <size_t... I>
  static R as_tuple(const torch::autograd::variable_list& out, std::index_sequence<I...>) {
    return R{out[I]...};
  }
};

}  // namespace fastkd
