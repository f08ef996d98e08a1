"""Python-side registrations (fake kernels, autograd) of the compiled operators in torch.ops.fastkd."""

from fastkd.ops import fused_linear, relation, response  # noqa: F401
from fastkd.ops import cosine  # noqa: F401  (issue 14)
