"""torch.ops.fastkd.kd_forward: fake kernel and autograd.

The fused forward computes the loss and, when an input requires grad, the gradient of the *reduced* loss in
the same read of the logits (saved for backward). The backward is the op ``scale_grad_``, which multiplies
the saved gradient by the incoming gradient in place and costs nothing when that is exactly 1 (the usual
``loss.backward()``). Consequence: the graph can be backpropagated through once; ``retain_graph=True`` with a
second backward raises PyTorch's "modified by an inplace operation" error instead of a wrong result.
"""

from __future__ import annotations

from typing import Optional

import torch

_OP = "fastkd::kd_forward"


@torch.library.register_fake(_OP)
def _kd_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    reduction: str,
    scale_by_temperature: bool,
    grad_student: bool,
    grad_teacher: bool,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, teacher.dtype)
    rows = student.shape[0]
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=out_dtype)
    gs = student.new_empty(student.shape if grad_student else (0,))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
    return loss, gs, gt


@torch.library.register_fake("fastkd::scale_grad_")
def _scale_grad_fake(grad: torch.Tensor, scale: torch.Tensor) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    _, gs, gt = output
    ctx.mark_non_differentiable(gs, gt)
    ctx.save_for_backward(gs, gt)


def _grad_from(saved: torch.Tensor, grad_loss: torch.Tensor, which: str) -> torch.Tensor:
    if saved.numel() == 0 and saved.dim() == 1:
        raise RuntimeError(
            f"fastkd.kd_forward was called with grad_{which}=False but its {which} input needs a gradient; "
            "use fastkd.kd_loss, which sets these flags"
        )
    torch.ops.fastkd.scale_grad_(saved, grad_loss)
    return saved


def _backward(ctx, grad_loss, _grad_gs, _grad_gt):
    gs, gt = ctx.saved_tensors
    grad_s = _grad_from(gs, grad_loss, "student") if ctx.needs_input_grad[0] else None
    grad_t = _grad_from(gt, grad_loss, "teacher") if ctx.needs_input_grad[1] else None
    return grad_s, grad_t, None, None, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
