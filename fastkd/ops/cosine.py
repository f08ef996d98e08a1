"""Fake (meta) kernel of torch.ops.fastkd.cosine_forward, for torch.compile and torch.library.opcheck.

Its autograd is registered in C++ (csrc/autograd.cpp, the cosine block: SavedGradFunction of
csrc/autograd_common.h), like the response ops': the backward returns the gradients the fused forward computed
times the incoming gradient (no copy when that is exactly 1), so a fwd+bwd reads the logits once.
"""

from __future__ import annotations

from typing import Optional

import torch


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 gradients leave the kernel in float32 (the autograd rounds them after the upstream scale)
    return torch.float32 if dtype == torch.float16 else dtype


@torch.library.register_fake("fastkd::cosine_forward")
def _cosine_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    beta: float,
    hard_weight: float,
    eps: float,
    ignore_index: int,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, teacher.dtype)
    shape = (student.shape[0],) if reduction == "none" else ()
    loss, soft, hard = (student.new_empty(shape, dtype=out_dtype) for _ in range(3))
    gs_type, gt_type = _grad_dtype(student.dtype), _grad_dtype(teacher.dtype)
    gs = student.new_empty(student.shape if grad_student else (0,), dtype=gs_type)
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,), dtype=gt_type)
    return loss, soft, hard, gs, gt
