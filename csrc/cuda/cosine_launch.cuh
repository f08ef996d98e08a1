// The CUDA cosine kernel (cosine_cuda.cu) as the fused linear head calls it (fused_linear_cuda.cu): the rows of a
// CosineParams on `stream`, gradients written where p.grad_student points (in place over the logits is allowed).
#pragma once

#include <cuda_runtime.h>

#include "fastkd/cosine_host.h"

namespace fastkd {
namespace cuda {
void launch_cosine(const CosineParams& p, at::ScalarType student, at::ScalarType teacher, cudaStream_t stream);
}  // namespace cuda
}  // namespace fastkd
