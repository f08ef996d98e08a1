"""Fake (meta) kernel of torch.ops.fastkd.dist_forward, for torch.compile and torch.library.opcheck. Its autograd
is registered in C++ (csrc/dist_autograd.cpp)."""

from __future__ import annotations

import torch

_DIST = "fastkd::dist_forward"


def _grad_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


if hasattr(torch.ops.fastkd, "dist_forward"):  # a build older than DIST has no such op

    @torch.library.register_fake(_DIST)
    def _dist_forward_fake(student, teacher, beta, gamma, tau, eps, grad_student, grad_teacher):
        torch._check(student.dim() == 2, lambda: "student_logits must be 2-D")
        loss = student.new_empty((), dtype=torch.promote_types(student.dtype, teacher.dtype))
        gs = student.new_empty(student.shape if grad_student else (0,), dtype=_grad_dtype(student))
        gt = teacher.new_empty(teacher.shape if grad_teacher else (0,), dtype=_grad_dtype(teacher))
        return loss, gs, gt
