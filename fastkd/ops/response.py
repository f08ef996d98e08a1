"""Fake (meta) kernels of torch.ops.fastkd.response_forward and torch.ops.fastkd.topk_kd_forward, for
torch.compile and torch.library.opcheck.

Their autograd is registered in C++ (csrc/autograd.cpp): the backward returns the gradient the fused forward
computed, times the incoming gradient (no copy when that is exactly 1, as for ``loss.backward()``).
"""

from __future__ import annotations

from typing import List, Optional

import torch

_RESPONSE = "fastkd::response_forward"
_TOPK = "fastkd::topk_kd_forward"


def _loss_like(x: torch.Tensor, rows: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((rows,) if reduction == "none" else (), dtype=dtype)


def _grad_temperature_like(student: torch.Tensor, row_temperature: Optional[torch.Tensor],
                           grad_temperature: bool) -> torch.Tensor:
    """The ops' temperature gradient: [rows] when asked for, else [0]; in the per-row temperatures' dtype (float64
    without them), as the kernels return it."""
    rows = student.shape[0] if grad_temperature and row_temperature is not None else 0
    dtype = torch.float64 if row_temperature is None else row_temperature.dtype
    return student.new_empty((rows,), dtype=dtype)


@torch.library.register_fake(_RESPONSE)
def _response_forward_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    divergence: str,
    params: List[float],
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    scale_by_temperature: bool,
    grad_student: bool,
    grad_teacher: bool,
    row_temperature: Optional[torch.Tensor] = None,
    row_weight: Optional[torch.Tensor] = None,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    grad_temperature: bool = False,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, teacher.dtype)
    rows = student.shape[0]
    loss = _loss_like(student, rows, reduction, out_dtype)
    soft = _loss_like(student, rows, reduction, out_dtype)
    hard = _loss_like(student, rows, reduction, out_dtype)
    gs = student.new_empty(student.shape if grad_student else (0,))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
    return loss, soft, hard, gs, gt, _grad_temperature_like(student, row_temperature, grad_temperature)


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
    row_weight: Optional[torch.Tensor] = None,
    row_temperature: Optional[torch.Tensor] = None,
    grad_temperature: bool = False,
):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    out_dtype = torch.promote_types(student.dtype, values.dtype)
    loss = _loss_like(student, student.shape[0], reduction, out_dtype)
    gs = student.new_empty(student.shape if grad_student else (0,))
    return loss, gs, _grad_temperature_like(student, row_temperature, grad_temperature)


@torch.library.register_fake("fastkd::response_shard_terms")
def _response_shard_terms_fake(student, teacher, stats, divergence, params, temperature, row_temperature=None,
                               dots=False):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    return student.new_empty((student.shape[0], 7 if dots else 2))


@torch.library.register_fake("fastkd::response_shard_grad")
def _response_shard_grad_fake(student, teacher, stats, row_coef, sum_psi_q, divergence, params, temperature,
                              row_temperature=None):
    torch._check(student.dim() == 2, lambda: "student must be 2-D")
    return student.new_empty(student.shape)

