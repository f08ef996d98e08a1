// Autograd of the relation- and feature-based loss operators (TORCH_LIBRARY_IMPL(fastkd, Autograd)), from
// their list in fastkd/relation_ops.h: each is SavedGradFunction (autograd_common.h), the backward returning
// the gradients the fused forward computed times the incoming gradient, rounded to the input's dtype.
#include <torch/library.h>

#include "autograd_common.h"
#include "fastkd/relation_ops.h"

namespace fastkd {

#define FASTKD_AUTOGRAD_RELATION_OP(op, Traits) \
  m.impl(relation_ops::Traits::name, &SavedGradKernel<relation_ops::Traits>::call);
TORCH_LIBRARY_IMPL(fastkd, Autograd, m) { FASTKD_RELATION_OPS(FASTKD_AUTOGRAD_RELATION_OP) }
#undef FASTKD_AUTOGRAD_RELATION_OP

}  // namespace fastkd
