"""Python-side registrations (fake kernels, autograd) of the compiled operators in torch.ops.fastkd."""

from fastkd.ops import cosine, dist, fused_linear, relation, response  # noqa: F401
