"""Fake (meta) kernel of torch.ops.fastkd.fused_linear_kd_forward, for torch.compile and
torch.library.opcheck. Its autograd is registered in C++ (csrc/autograd.cpp)."""

from __future__ import annotations

from typing import List, Optional

import torch

from fastkd.ops.response import _grad_temperature_like

_FUSED_LINEAR = "fastkd::fused_linear_kd_forward"


@torch.library.register_fake(_FUSED_LINEAR)
def _fused_linear_kd_forward_fake(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    topk_values: Optional[torch.Tensor],
    topk_indices: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    grad_rows: Optional[torch.Tensor],
    divergence: str,
    params: List[float],
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    scale_by_temperature: bool,
    values_are_logprobs: bool,
    tail_bucket: bool,
    chunk_size: int,
    student_logit_scale: float,
    student_softcap: float,
    teacher_logit_scale: float,
    teacher_softcap: float,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    row_weight: Optional[torch.Tensor] = None,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    row_temperature: Optional[torch.Tensor] = None,
    grad_temperature: bool = False,
):
    torch._check(hidden.dim() == 2 and weight.dim() == 2, lambda: "hidden and weight must be 2-D")
    teacher = teacher_logits if teacher_logits is not None else teacher_hidden
    if teacher is None:
        teacher = topk_values
    torch._check(teacher is not None, lambda: "a teacher is required")
    out_dtype = torch.float64 if torch.float64 in (hidden.dtype, teacher.dtype) else torch.float32
    rows = hidden.shape[0]
    shape = (rows,) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=out_dtype)
    soft = hidden.new_empty(shape, dtype=out_dtype)
    hard = hidden.new_empty(shape, dtype=out_dtype)
    gh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if grad_weight else (0,))
    gb = hidden.new_empty((weight.shape[0],) if grad_bias else (0,))
    return loss, soft, hard, gh, gw, gb, _grad_temperature_like(hidden, row_temperature, grad_temperature)
