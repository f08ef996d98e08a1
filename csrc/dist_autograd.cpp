// Autograd of fastkd::dist_forward (TORCH_LIBRARY_IMPL(fastkd, Autograd)): SavedGradFunction
// (autograd_common.h), the backward returning the gradients the fused forward computed times the incoming
// gradient (no copy when that is exactly 1, as for loss.backward()), rounded to the input's dtype.
#include <torch/library.h>

#include "autograd_common.h"
#include "fastkd/dist_host.h"

namespace fastkd {

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) { m.impl(DistOp::name, &SavedGradKernel<DistOp>::call); }

}  // namespace fastkd
