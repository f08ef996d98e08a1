// torch.autocast for every fastkd operator (TORCH_LIBRARY_IMPL(fastkd, AutocastCPU / AutocastCUDA)).
//
// The kernels take float32, float16, bfloat16 and float64 inputs as they are and accumulate in float32 (or
// float64), so autocast has nothing to cast: the inputs are passed on unchanged and the result keeps the
// promoted input dtype. What autocast must not do is reach the ATen calls *inside* the kernels: with the
// Autocast key still active, their at::matmul would run in bfloat16 / float16 (a dtype mismatch with the
// float32 buffers around it, and lost accuracy). So the kernel below excludes the autocast keys for the
// duration of the call, then calls the op again (autograd, then the device kernel), as torchvision does for
// its ops. One boxed kernel serves every op: it never looks at the arguments.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "fastkd/relation_ops.h"

namespace fastkd {
namespace {

void call_without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

// Every operator of TORCH_LIBRARY(fastkd) in registration.cpp.
#define FASTKD_RELATION_OP_NAME(op, Traits) relation_ops::Traits::name,
constexpr const char* kOps[] = {
    "response_forward", "topk_kd_forward", "fused_linear_kd_forward", "response_shard_terms", "response_shard_grad",
    "cosine_forward", "dist_forward",
    FASTKD_RELATION_OPS(FASTKD_RELATION_OP_NAME)
};
#undef FASTKD_RELATION_OP_NAME

void register_autocast(torch::Library& m) {
  for (const char* name : kOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, AutocastCPU, m) { register_autocast(m); }
TORCH_LIBRARY_IMPL(fastkd, AutocastCUDA, m) { register_autocast(m); }

}  // namespace fastkd
