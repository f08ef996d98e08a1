r"""DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian, Xu; NeurIPS 2022), fused.

With ``y_s = softmax(z_s / tau)``, ``y_t = softmax(z_t / tau)`` per row of the ``[N, C]`` logits and
``pearson(u, v) = cos(u - mean(u), v - mean(v))``:

.. math:: L = \tau^2 \Big(\beta \big(1 - \tfrac1N \textstyle\sum_i \mathrm{pearson}(y_{s,i}, y_{t,i})\big)
          + \gamma \big(1 - \tfrac1C \textstyle\sum_j \mathrm{pearson}(y_{s,:j}, y_{t,:j})\big)\Big)

the inter-class relation over the rows and the intra-class relation over the columns (each class across the
batch). Anchor: torchdistill ``DISTLoss(beta=1, gamma=1, tau=1, eps=1e-8)`` (after the authors' ``dist_kd.py``),
same value and gradients; the cosine's eps is applied as ``torch.nn.functional.cosine_similarity`` applies it
(torch 2.x): each centered vector's norm is clamped at ``eps`` on its own.

The fused op ``torch.ops.fastkd.dist_forward`` computes the loss and the gradients (student, and teacher when it
requires grad) in the same call: the logits are read twice, the gradients written once; besides them it holds
O(N + C) values (16 blocks of float64 column sums). Its autograd (C++) returns those gradients times the
incoming gradient.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from fastkd import _validation as v

__all__ = ["dist_loss", "DISTLoss"]

_warned_missing_op = False


def _check_dist_args(student_logits, teacher_logits, beta, gamma, tau, eps) -> Tuple[float, float, float, float]:
    """The checks of :func:`dist_loss` (shared with :func:`fastkd.reference.dist_loss`): two ``[N, C]`` float
    tensors of one shape and device; ``beta``, ``gamma`` finite >= 0; ``tau`` a temperature; ``eps`` finite >= 0.
    Returns the numbers as floats."""
    v.check_logits(student_logits, teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(
            "student_logits must be 2-D [batch, classes] (DIST's intra-class term correlates each class across the "
            f"batch, and torchdistill's DISTLoss takes 2-D logits), got shape {tuple(student_logits.shape)}"
        )
    return (
        v.check_nonneg_weight("beta", beta),
        v.check_nonneg_weight("gamma", gamma),
        v.check_temperature(tau, "tau"),
        v.check_real("eps", eps, 0.0),
    )


def _dist_kernel() -> bool:
    """Whether ``torch.ops.fastkd.dist_forward`` can run (kernels loaded, and a build that has the op)."""
    global _warned_missing_op
    from fastkd.functional import _use_kernels

    if not _use_kernels():
        return False
    if hasattr(torch.ops.fastkd, "dist_forward"):
        return True
    if not _warned_missing_op:
        import warnings

        warnings.warn(
            "this fastkd build has no dist_forward kernel (built before DIST was added); running "
            "fastkd.reference.dist_loss instead (correct, but slow). Rebuild with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_missing_op = True
    return False


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""DIST loss (NeurIPS 2022), fused: ``tau^2 * (beta * inter + gamma * intra)`` (see :mod:`fastkd.dist`).

    Anchor: torchdistill ``DISTLoss(beta=1.0, gamma=1.0, tau=1.0, eps=1e-8)``, same value and gradients.

    Args:
        student_logits, teacher_logits: ``[N, C]`` logits (float32, float16, bfloat16 or float64), same shape and
            device. The teacher gets its exact gradient iff it requires grad (torchdistill does not detach it).
        beta: weight of the inter-class (per-row Pearson) term, finite >= 0.
        gamma: weight of the intra-class (per-column Pearson) term, finite >= 0.
        tau: softmax temperature; the loss is multiplied by ``tau**2``.
        eps: the cosine similarity's lower bound on each norm, finite >= 0.

    Returns:
        A 0-dim loss in the promoted input dtype (computed in float32, float64 for float64 input). ``N = 0``
        gives 0 (the eager composition gives NaN: a mean over no rows). A uniform row (all logits equal) or, with
        ``N = 1``, every column has a zero centered vector: its correlation is 0, as in torch.

    Numerics: column sums in float64 in 16 fixed row blocks, reduced in block order: bitwise the same for any
    thread count.
    """
    beta, gamma, tau, eps = _check_dist_args(student_logits, teacher_logits, beta, gamma, tau, eps)
    if not _dist_kernel():
        from fastkd import reference

        return reference.dist_loss(student_logits, teacher_logits, beta, gamma, tau, eps)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.fastkd.dist_forward(
        student_logits,
        teacher_logits,
        beta,
        gamma,
        tau,
        eps,
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    return loss


class DISTLoss(nn.Module):
    """:func:`dist_loss` as a module, with torchdistill's argument names and defaults (``beta=1.0, gamma=1.0,
    tau=1.0, eps=1e-8``); ``forward(student_logits, teacher_logits)``. For torchdistill's io-dict call convention
    use the registered key ``fastkd.DISTLoss`` (:mod:`fastkd.integrations.torchdistill`)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = v.check_nonneg_weight("beta", beta)
        self.gamma = v.check_nonneg_weight("gamma", gamma)
        self.tau = v.check_temperature(tau, "tau")
        self.eps = v.check_real("eps", eps, 0.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.tau, self.eps)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, eps={self.eps}"
