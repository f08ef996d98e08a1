"""Fake (meta) kernels of the relation- and feature-based operators: torch.ops.fastkd.rkd_forward,
sp_forward, pkt_forward, cc_forward and at_forward, for torch.compile and torch.library.opcheck.

Every op returns the 0-dim loss in ``promote_types(student, teacher)`` and, for each input whose flag is
set, the gradient of the loss computed in the same pass (in that input's shape and dtype, float32 for
float16 / bfloat16 inputs; an empty ``(0,)`` tensor when not asked for). ``rkd_forward`` also returns the
unweighted distance and angle terms (detached, for logging) and never a teacher gradient. The fakes are made
from one table, :data:`SPECS` (one line per op). Their autograd is registered in C++
(csrc/relation_autograd.cpp): the backward returns the saved gradient times the incoming gradient, in the
input's dtype.

An op that the loaded build does not define (a build older than these losses) is skipped: importing fastkd
must not fail, and :mod:`fastkd.functional` then runs the plain-PyTorch reference. :func:`register_fakes`
registers the fakes of ops defined later (idempotent).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Set, Tuple

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


class _Spec(NamedTuple):
    """One relation op's outputs: its inputs' dimensions ([N, D] features, or [N, C, S] maps with a common S),
    the 0-dim outputs before the gradients (the loss; RKD: also its detached distance and angle terms), and the
    inputs whose gradients follow, in order; their flags (grad_student, grad_teacher) are the op's last
    arguments, in the same order."""

    dims: int
    losses: int
    grads: Tuple[str, ...]


# The relation ops, as csrc/include/fastkd/relation_ops.h lists them.
SPECS: Dict[str, _Spec] = {
    "rkd_forward": _Spec(dims=2, losses=3, grads=("student",)),  # the teacher never gets a gradient
    "sp_forward": _Spec(dims=2, losses=1, grads=("student", "teacher")),
    "pkt_forward": _Spec(dims=2, losses=1, grads=("student", "teacher")),
    "cc_forward": _Spec(dims=2, losses=1, grads=("student", "teacher")),
    "at_forward": _Spec(dims=3, losses=1, grads=("student", "teacher")),
}


def _make_fake(spec: _Spec) -> Callable[..., Tuple[torch.Tensor, ...]]:
    def fake(student: torch.Tensor, teacher: torch.Tensor, *args: Any) -> Tuple[torch.Tensor, ...]:
        _check_pair(student, teacher, spec.dims)
        if spec.dims == 3:
            torch._check(
                student.shape[2] == teacher.shape[2], lambda: "student and teacher must have the same spatial size S"
            )
        inputs = {"student": student, "teacher": teacher}
        flags = args[len(args) - len(spec.grads):]
        losses = tuple(_loss_like(student, teacher) for _ in range(spec.losses))
        return losses + tuple(_grad_like(inputs[name], wanted) for name, wanted in zip(spec.grads, flags))

    return fake


FAKES: Dict[str, Callable[..., Tuple[torch.Tensor, ...]]] = {name: _make_fake(spec) for name, spec in SPECS.items()}


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
