"""Fake (meta) kernels of the relation- and feature-based operators: torch.ops.fastkd.rkd_forward,
sp_forward, pkt_forward, cc_forward and at_forward, for torch.compile and torch.library.opcheck.

Every op returns the 0-dim loss in ``promote_types(student, teacher)`` and, for each input whose flag is
set, the gradient of the loss computed in the same pass (in that input's shape and dtype, float32 for
float16 / bfloat16 inputs; an empty ``(0,)`` tensor when not asked for). ``rkd_forward`` also returns the unweighted distance and angle terms (detached,
for logging) and never a teacher gradient. Their autograd is registered in C++ (csrc/autograd.cpp): the
backward returns the saved gradient times the incoming gradient, in the input's dtype.

An op that the loaded build does not define (a build older than these losses) is skipped: importing fastkd
must not fail, and :mod:`fastkd.functional` then runs the plain-PyTorch reference. :func:`register_fakes`
registers the fakes of ops defined later (idempotent).
"""

from __future__ import annotations

from typing import Callable, Dict, Set, Tuple

import torch

_NAMESPACE = "fastkd"
_REGISTERED: Set[str] = set()


def _loss_like(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return student.new_empty((), dtype=torch.promote_types(student.dtype, teacher.dtype))


def _grad_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    # float16 / bfloat16 inputs get a float32 gradient (autograd scales it, then rounds to x.dtype once)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.new_empty(x.shape if wanted else (0,), dtype=dtype)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> None:
    torch._check(student.dim() == dim, lambda: f"student must be {dim}-D, got {student.dim()}-D")
    torch._check(teacher.dim() == dim, lambda: f"teacher must be {dim}-D, got {teacher.dim()}-D")
    torch._check(student.shape[0] == teacher.shape[0], lambda: "student and teacher must have the same batch size")


def _rkd_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float,
    angle_weight: float,
    grad_student: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, 2)
    return (
        _loss_like(student, teacher),
        _loss_like(student, teacher),
        _loss_like(student, teacher),
        _grad_like(student, grad_student),
    )


def _sp_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, 2)
    return _loss_like(student, teacher), _grad_like(student, grad_student), _grad_like(teacher, grad_teacher)


def _pkt_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    eps: float,
    grad_student: bool,
    grad_teacher: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, 2)
    return _loss_like(student, teacher), _grad_like(student, grad_student), _grad_like(teacher, grad_teacher)


def _cc_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kernel: str,
    gamma: float,
    max_p: int,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, 2)
    return _loss_like(student, teacher), _grad_like(student, grad_student), _grad_like(teacher, grad_teacher)


def _at_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float,
    mode: str,
    grad_student: bool,
    grad_teacher: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(student, teacher, 3)
    torch._check(
        student.shape[2] == teacher.shape[2], lambda: "student and teacher must have the same spatial size S"
    )
    return _loss_like(student, teacher), _grad_like(student, grad_student), _grad_like(teacher, grad_teacher)


FAKES: Dict[str, Callable] = {
    "rkd_forward": _rkd_forward_fake,
    "sp_forward": _sp_forward_fake,
    "pkt_forward": _pkt_forward_fake,
    "cc_forward": _cc_forward_fake,
    "at_forward": _at_forward_fake,
}


def _op_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, _NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_fakes() -> Tuple[str, ...]:
    """Registers the fake kernel of every op in :data:`FAKES` that exists in ``torch.ops.fastkd`` and has not
    been registered yet; returns the names registered by this call."""
    done = []
    for name, fake in FAKES.items():
        if name in _REGISTERED or not _op_exists(name):
            continue
        torch.library.register_fake(f"{_NAMESPACE}::{name}", fake)
        _REGISTERED.add(name)
        done.append(name)
    return tuple(done)


register_fakes()
