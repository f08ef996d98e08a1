"""torch.ops.fastkd.response_forward and torch.ops.fastkd.topk_kd_forward: fake kernels and autograd.

The fused forwards compute the loss and, when an input requires grad, the gradient of the *reduced* loss in
the same read of the logits; it is saved for backward. The backward multiplies it by the incoming gradient:
for the usual ``loss.backward()`` (or ``loss + other``) that gradient is exactly 1 and the saved tensor is
returned as is, so a fused fwd+bwd reads the logits once and writes one gradient. Otherwise (``alpha *
loss``, ``reduction="none"`` with weights) the product is a new tensor: the saved gradient is never modified,
so ``retain_graph=True``, ``torch.autograd.grad`` and gradcheck see the right values every time.
"""

from __future__ import annotations

from typing import Optional

import torch

_RESPONSE = "fastkd::response_forward"
_TOPK = "fastkd::topk_kd_forward"


def _loss_like(x: torch.Tensor, rows: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((rows,) if reduction == "none" else (), dtype=dtype)


@torch.library.register_fake(_RESPONSE)
def _response_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    scale_by_temperature: bool,
    grad_student: bool,
    grad_teacher: bool,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, teacher.dtype)
    rows = student.shape[0]
    loss = _loss_like(student, rows, reduction, out_dtype)
    soft = _loss_like(student, rows, reduction, out_dtype)
    hard = _loss_like(student, rows, reduction, out_dtype)
    gs = student.new_empty(student.shape if grad_student else (0,))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
    return loss, soft, hard, gs, gt


@torch.library.register_fake(_TOPK)
def _topk_kd_forward_fake(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    temperature: float,
    values_are_logprobs: bool,
    tail_bucket: bool,
    ignore_index: int,
    reduction: str,
    scale_by_temperature: bool,
    grad_student: bool,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, values.dtype)
    loss = _loss_like(student, student.shape[0], reduction, out_dtype)
    gs = student.new_empty(student.shape if grad_student else (0,))
    return loss, gs


def _is_eager(x: torch.Tensor) -> bool:
    """True for a real tensor outside tracing; False under torch.compile / AOT tracing (fake or functional
    tensors), where the value cannot be inspected and the plain product is traced instead."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def _grad_from(saved: torch.Tensor, grad_loss: torch.Tensor, which: str) -> torch.Tensor:
    if saved.numel() == 0 and saved.dim() == 1:
        raise RuntimeError(
            f"a fastkd op was called with grad_{which}=False but its {which} input needs a gradient; "
            "use the fastkd loss functions, which set these flags"
        )
    # Returning the saved gradient as is when the upstream gradient is exactly 1 costs one host sync on
    # CUDA, the price of skipping a full pass over the gradient.
    if grad_loss.dim() == 0:
        if _is_eager(grad_loss) and grad_loss.item() == 1.0:
            return saved
    else:  # reduction="none": one upstream value per row
        if _is_eager(grad_loss) and bool((grad_loss == 1).all()):
            return saved
        grad_loss = grad_loss.unsqueeze(-1)
    return (saved * grad_loss).to(saved.dtype)


def _response_setup_context(ctx, inputs, output) -> None:
    _, soft, hard, gs, gt = output
    ctx.mark_non_differentiable(soft, hard, gs, gt)
    # The gradient outputs are never differentiated; without this autograd would hand the backward
    # freshly zeroed [rows, vocab] tensors.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gs, gt)


def _response_backward(ctx, grad_loss, *_unused):
    gs, gt = ctx.saved_tensors
    if grad_loss is None:  # the loss itself was not used; only possible without materialized grads
        return (None,) * 15
    grad_s = _grad_from(gs, grad_loss, "student") if ctx.needs_input_grad[0] else None
    grad_t = _grad_from(gt, grad_loss, "teacher") if ctx.needs_input_grad[1] else None
    return (grad_s, grad_t) + (None,) * 13


def _topk_setup_context(ctx, inputs, output) -> None:
    _, gs = output
    ctx.mark_non_differentiable(gs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gs)


def _topk_backward(ctx, grad_loss, _grad_gs):
    (gs,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    grad_s = _grad_from(gs, grad_loss, "student") if ctx.needs_input_grad[0] else None
    return (grad_s,) + (None,) * 11


torch.library.register_autograd(_RESPONSE, _response_backward, setup_context=_response_setup_context)
torch.library.register_autograd(_TOPK, _topk_backward, setup_context=_topk_setup_context)
