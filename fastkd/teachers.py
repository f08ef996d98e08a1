"""Teacher inputs of :func:`fastkd.fused_linear_kd_loss` besides dense logits: a teacher head whose logits
are computed chunk by chunk (never whole), and a cached sparse (top-k) teacher."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["TeacherHead", "TopKTeacher"]


class TeacherHead(NamedTuple):
    """The teacher's last hidden states and its linear head: teacher logits ``hidden @ weight.T + bias``,
    computed chunk by chunk inside the fused loss, so the full ``[tokens, V_t]`` logits never exist.

    Attributes:
        hidden: ``[..., H_t]``, with the student hidden states' leading dimensions.
        weight: ``[V_t, H_t]``, the teacher's lm_head weight (``V_t`` at most the student's vocabulary).
        bias: ``[V_t]`` or None.

    The teacher gets no gradient (it is a frozen model): these tensors are used as constants.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class TopKTeacher(NamedTuple):
    """A cached sparse teacher: its ``k`` largest entries per token, as :func:`fastkd.topk_kd_loss` takes them.

    Attributes:
        values: ``[..., k]`` float: teacher logits, or log-probabilities with ``values_are="logprobs"``.
        indices: ``[..., k]`` int64/int32 vocabulary indices, distinct within a row.
        values_are: ``"logits"`` (softmax over the kept entries at the temperature) or ``"logprobs"``.
        tail: ``"renormalize"`` (drop the missing mass) or ``"bucket"`` (keep it as one bucket; log-probs only).
    """

    values: torch.Tensor
    indices: torch.Tensor
    values_are: str = "logits"
    tail: str = "renormalize"
