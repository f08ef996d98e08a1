"""Argument checks of the fused linear head (:func:`fastkd.fused_linear_kd_loss`); re-exported by
:mod:`fastkd._validation`, whose primitives they use."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastkd._validation import (
    _check_float_tensor,
    _check_index_tensor,
    check_bool,
    check_choice,
    check_chunk_size,
    check_ignore_index,
    check_mix_weights,
    check_num_items,
    check_real,
    check_reduction,
    check_target,
    check_temperature_or_tensor,
    check_topk_indices_range,
    check_topk_teacher,
    resolve_divergence_params,
    resolve_scale_by_temperature,
)

# --------------------------------------------------------------------------------------------------------
# Checks of the fused linear head (fused_linear_kd_loss).
# --------------------------------------------------------------------------------------------------------
def fused_linear_losses() -> Tuple[str, ...]:
    """The divergences the fused head and vocab_parallel_kd_loss run: every registered one but "dkd"."""
    from fastkd import divergences

    return divergences.names(fused_head=True)


def check_linear_head(hidden, weight, bias, lead: Optional[tuple], names: tuple, allow_empty: bool = False) -> None:
    """hidden ``[..., H]`` (leading dimensions ``lead`` when given), weight ``[V, H]``, bias ``[V]`` or None: one
    float dtype (the matmul needs it), one device, ``V >= 1`` (``V = 0`` with ``allow_empty``: a vocabulary-parallel
    rank's empty slice)."""
    h_name, w_name, b_name = names
    _check_float_tensor(hidden, h_name, 1)
    _check_float_tensor(weight, w_name, 2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} must have shape [V, {hidden.shape[-1]}] ({h_name}'s last dimension), got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{w_name}: the vocabulary (first) dimension must not be empty")
    if lead is not None and tuple(hidden.shape[:-1]) != lead:
        raise ValueError(
            f"{h_name} must have the leading dimensions {lead} of the student hidden states, got {tuple(hidden.shape)}"
        )
    tensors = [(w_name, weight)] + ([] if bias is None else [(b_name, bias)])
    if bias is not None:
        _check_float_tensor(bias, b_name, 1)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, x in tensors:
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {h_name}'s dtype {hidden.dtype}, got {x.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name} must be on {h_name}'s device {hidden.device}, got {x.device}")


def check_fused_linear(
    student_hidden,
    student_weight,
    teacher,
    student_bias,
    loss: str,
    beta: float,
    temperature,
    labels,
    ignore_index: int,
    hard_label_weight: float,
    soft_weight: Optional[float],
    reduction: str,
    chunk_size,
    num_items_in_batch,
    scale_by_temperature: Optional[bool] = None,
    return_parts: bool = False,
    params=(),
):
    """Every argument of :func:`fastkd.fused_linear_kd_loss`. Returns ``(kind, teacher_vocab, temperature,
    divergence parameters, hard_label_weight, soft_weight, num_items, scale_by_temperature)`` with ``kind`` one
    of "dense", "head", "topk", the temperature a float or a tensor (0-dim or of the hidden states' leading shape,
    :func:`check_temperature_or_tensor`), the parameters in registry order (``beta`` and ``params`` resolved, see
    :func:`resolve_divergence_params`), ``soft_weight`` resolved (None: ``1 - hard_label_weight``) and
    ``scale_by_temperature`` resolved (None: the divergence's default, see
    :func:`resolve_scale_by_temperature`)."""
    from fastkd import divergences

    from fastkd.teachers import TeacherHead, TopKTeacher

    check_linear_head(student_hidden, student_weight, student_bias, None,
                      ("student_hidden", "student_weight", "student_bias"))
    lead = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    device = student_hidden.device
    check_choice("loss", loss, fused_linear_losses())
    scale = resolve_scale_by_temperature(scale_by_temperature, loss)
    check_bool("return_parts", return_parts)
    spec = divergences.get(loss)
    div_params = resolve_divergence_params(loss, beta, dict(params), "fused_linear_kd_loss")
    spec.check_ranges(div_params)  # before any work (the op checks again, one rule and message)
    proxy = _Shape(torch.Size(lead + (vocab,)), device)
    t = check_temperature_or_tensor(temperature, proxy)  # a float, or a tensor of [] or the tokens' shape
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    hard, soft = check_mix_weights(hard_label_weight, soft_weight, ("hard_label_weight", "soft_weight"))
    n = check_num_items(num_items_in_batch, reduction)
    check_chunk_size(chunk_size)
    if labels is not None:
        _check_index_tensor(labels, proxy, "labels")
    if hard != 0.0:
        check_target(labels, proxy, ignore_index, required=True, name="labels", check_range=False)

    if isinstance(teacher, TopKTeacher):
        kind = "topk"
        values, indices = teacher.values, teacher.indices
        check_topk_teacher(lead, vocab, device, values, indices, teacher.values_are, teacher.tail)
        if loss != "kl":
            raise ValueError(f"a TopKTeacher supports loss='kl' only (KL from the sparse teacher), got {loss!r}")
        check_topk_indices_range(indices, vocab, labels, ignore_index)
        teacher_vocab = vocab
    elif isinstance(teacher, TeacherHead):
        kind = "head"
        check_linear_head(teacher.hidden, teacher.weight, teacher.bias, lead,
                          ("teacher.hidden", "teacher.weight", "teacher.bias"))
        if teacher.hidden.device != device:
            raise ValueError(f"teacher.hidden must be on the student's device {device}, got {teacher.hidden.device}")
        teacher_vocab = teacher.weight.shape[0]
    elif isinstance(teacher, torch.Tensor):
        kind = "dense"
        _check_float_tensor(teacher, "teacher", 1)
        if tuple(teacher.shape[:-1]) != lead:
            raise ValueError(
                f"teacher logits must have shape {lead + ('V_t',)} (the student hidden states' leading dimensions), "
                f"got {tuple(teacher.shape)}"
            )
        if teacher.device != device:
            raise ValueError(f"teacher logits must be on the student's device {device}, got {teacher.device}")
        teacher_vocab = teacher.shape[-1]
    else:
        raise TypeError(
            "teacher must be dense teacher logits (a torch.Tensor), a fastkd.TeacherHead or a fastkd.TopKTeacher, "
            f"got {type(teacher).__name__}"
        )
    if teacher_vocab < 1 or teacher_vocab > vocab:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_vocab}) must be in [1, {vocab}] (the student's): extra student "
            "columns are entries the teacher gives probability 0, but a larger teacher vocabulary has no student "
            "counterpart; slice the teacher's head to the shared vocabulary"
        )
    if spec.infinite_on_padding is not None and spec.infinite_on_padding(*div_params) and teacher_vocab < vocab:
        what = "reverse KL" if loss in ("reverse_kl", "jsd") else f"{loss!r} with these parameters"
        raise ValueError(
            f"{what} is infinite when the student has vocabulary entries the teacher lacks (student {vocab}, "
            f"teacher {teacher_vocab}): slice the student's head to the teacher's vocabulary "
            f"(student_weight[:{teacher_vocab}])"
        )
    return kind, teacher_vocab, t, div_params, hard, soft, n, scale


def check_head_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
                          teacher_kind: str) -> Tuple[float, float, float, float]:
    """The fused head's logit transforms ``z -> softcap(scale * z)``: each scale None (1) or a finite number
    > 0, each softcap None (none) or a finite number > 0; no teacher transform for a top-k teacher (its values
    are used as given). Returns ``(student_scale, student_cap, teacher_scale, teacher_cap)`` as the operator
    takes them: scale 1.0 and cap 0.0 mean none."""
    out = []
    for scale_name, scale, cap_name, cap in (("student_logit_scale", student_logit_scale, "student_softcap",
                                              student_softcap),
                                             ("teacher_logit_scale", teacher_logit_scale, "teacher_softcap",
                                              teacher_softcap)):
        out.append(1.0 if scale is None else check_real(scale_name, scale, 0.0, low_open=True))
        out.append(0.0 if cap is None else check_real(cap_name, cap, 0.0, low_open=True,
                                                      why=" (None: no softcap)"))
    if teacher_kind == "topk" and (teacher_logit_scale is not None or teacher_softcap is not None):
        name = "teacher_softcap" if teacher_softcap is not None else "teacher_logit_scale"
        raise ValueError(f"{name}: a TopKTeacher's values are used as given (no teacher logit transform)")
    return tuple(out)


class _Shape:
    """Stands in for logits that are never materialized: the shape and device the label checks read."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        self.shape = shape
        self.device = device
