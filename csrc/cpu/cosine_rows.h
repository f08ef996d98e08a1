// The CPU cosine kernel (cosine_cpu.cpp) as the fused linear head calls it (fused_linear_cpu.cpp): the rows of a
// CosineParams, gradients written where p.grad_student points (the logits themselves, in place, is allowed).
#pragma once

#include "fastkd/cosine_host.h"

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
void run_cosine(const CosineParams& p, at::ScalarType student, at::ScalarType teacher);
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
