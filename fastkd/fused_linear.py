"""LLM-scale distillation through the student's linear head, without ever holding the full logits.

:func:`fused_linear_kd_loss` takes the student's last hidden states and lm_head instead of its logits. The
operator ``torch.ops.fastkd.fused_linear_kd_forward`` processes the tokens in chunks of ``chunk_size`` rows:

1. the chunk's student logits, ``hidden @ weight.T + bias``, by one GEMM into a float32 ``[chunk_size, V]``
   buffer (and the teacher's, for a :class:`fastkd.TeacherHead`), then the head's logit scale and softcap;
2. the fused response kernel of :func:`fastkd.kd_loss` / :func:`fastkd.reverse_kl_loss` /
   :func:`fastkd.jsd_loss` (or of :func:`fastkd.topk_kd_loss`) computes each row's loss and overwrites the
   logits with their gradient;
3. GEMMs give the gradients of the hidden states, of the weight and of the bias (accumulated in float32).

Peak extra memory is ``O(chunk_size * V)`` plus the weight gradient, never ``O(tokens * V)``: at 4096 tokens
and V = 32000 the eager composition (matmul + loss) holds several fp32 ``[4096, 32000]`` tensors of 0.5 GB.
The gradients are computed in the forward pass (the logits exist one chunk at a time) and handed to
autograd; ``loss.backward()`` then costs nothing more.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fastkd import _dtensor
from fastkd import _validation as v
from fastkd import divergences, reference
from fastkd.functional import NumItems, _num_items_tensor, _row_temperature, _use_kernels
from fastkd.outputs import LossParts
from fastkd.teachers import TeacherHead, TopKTeacher

__all__ = ["fused_linear_kd_loss", "default_chunk_size", "TeacherHead", "TopKTeacher"]

Teacher = Union[torch.Tensor, TeacherHead, TopKTeacher]

# Elements of one [chunk_size, V] logits buffer (float32 whatever the input dtype) chosen by default. CPU: 16M
# (64 MB). CUDA: 64M (256 MB): every chunk reads and writes the whole float32 weight-gradient accumulator
# (V x H), so on a GPU the chunks must be long enough (~500 rows at V = 128k) for the GEMMs, not that traffic,
# to dominate.
_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


def default_chunk_size(rows: int, vocab: int, device: Union[str, torch.device] = "cpu") -> int:
    """The rows per chunk used when ``chunk_size`` is None: about 16M logits per chunk on the CPU (64 MB in
    float32) and 64M on a GPU, a multiple of 8 rows where possible, at most ``rows``. Large enough for the
    GEMMs to run at full speed, far below the memory of the full logits."""
    budget = _CHUNK_ELEMENTS.get(torch.device(device).type, _CHUNK_ELEMENTS["cuda"])
    chunk = max(1, budget // max(1, vocab))
    if chunk >= 8:
        chunk -= chunk % 8
    return max(1, min(chunk, rows))


def _autocast_head(hidden, weight, bias, teacher):
    """Under ``torch.autocast``, a head whose hidden states, weight and bias have different dtypes (autocast
    hands over bf16 hidden states with an fp32 lm_head weight) in the autocast dtype, as ``F.linear`` would take
    them; the casts are differentiable, so the gradients reach the original tensors in their dtypes. A head of
    one dtype is left as it is, as fastkd's ops take their inputs under autocast (fp32 stays exact fp32).
    Outside autocast: unchanged (mixed dtypes are then a TypeError)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias, teacher
    dtype = torch.get_autocast_dtype(device_type)

    def head(*xs):
        dtypes = {x.dtype for x in xs if isinstance(x, torch.Tensor)}
        if len(dtypes) < 2 or not all(d.is_floating_point for d in dtypes):
            return xs
        return tuple(x if x is None else x.to(dtype) for x in xs)

    if isinstance(teacher, TeacherHead):
        teacher = TeacherHead(*head(teacher.hidden, teacher.weight, teacher.bias))
    return (*head(hidden, weight, bias), teacher)


def _rows(x: Optional[torch.Tensor], last: bool = True) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x.reshape(-1, x.shape[-1]) if last else x.reshape(-1)


@_dtensor.accepts_dtensor  # DTensor inputs: fastkd/_dtensor.py
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Teacher,
    *,
    student_bias: Optional[torch.Tensor] = None,
    loss: str = "kl",
    beta: Optional[float] = None,
    temperature: v.Temperature = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    soft_weight: Optional[float] = None,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
    scale_by_temperature: Optional[bool] = None,
    num_items_in_batch: NumItems = None,
    return_parts: bool = False,
    student_softcap: Optional[float] = None,
    student_logit_scale: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
    **params: float,
) -> Union[torch.Tensor, LossParts]:
    r"""Distillation loss of a student given by its hidden states and linear head, fused and chunked:

    .. math:: \text{soft\_weight} \cdot D\big(\mathrm{teacher},\ \mathrm{softmax}((h W^T + b) / T)\big)
              + \text{hard\_label\_weight} \cdot \mathrm{CE}(h W^T + b,\ \text{labels}),
              \qquad \text{soft\_weight} = 1 - \text{hard\_label\_weight} \text{ unless given}

    equal (to float tolerance, for any ``chunk_size``) to computing ``logits = F.linear(student_hidden,
    student_weight, student_bias)`` and then the matching fastkd loss on them (the composition
    ``fastkd.reference.fused_linear_kd_loss`` spells out), without ever holding the ``[tokens, V]`` logits.

    One loss name, one value: with the same arguments, ``loss="kl"`` gives the value of
    ``fastkd.kd_loss(logits, teacher_logits, T, alpha=hard_label_weight, beta=soft_weight, ...)``,
    ``"reverse_kl"`` that of :func:`fastkd.reverse_kl_loss` and ``"jsd"`` that of :func:`fastkd.jsd_loss`
    (whose ``"batchmean"`` of ``[B, T, V]`` input without labels divides by ``B``; here always by the counted
    tokens), including their defaults: ``T^2`` for the KL-type losses, none for the JSD.

    Args:
        student_hidden: ``[..., H]`` last hidden states; every leading index is a token (a row).
        student_weight: ``[V, H]`` the student's lm_head weight (same dtype as the hidden states).
        teacher: one of

            * dense teacher logits ``[..., V_t]`` (e.g. precomputed under ``torch.no_grad()``);
            * :class:`fastkd.TeacherHead` ``(hidden [..., H_t], weight [V_t, H_t], bias=None)``: the teacher's
              logits are computed chunk by chunk as well;
            * :class:`fastkd.TopKTeacher` ``(values, indices, values_are="logits", tail="renormalize")``: a cached
              sparse teacher, as :func:`fastkd.topk_kd_loss` (``loss="kl"`` only).

            The teacher gets no gradient: its tensors are used as constants. Its vocabulary ``V_t`` may be
            smaller than the student's (tokenizers padded to different sizes): the student's extra columns
            ``V_t..V-1`` are treated as entries the teacher gives probability 0. They still take part in the
            student's softmax, so the student learns to put no mass there. ``reverse_kl`` is then infinite and
            refused: slice the student's head to the teacher's vocabulary instead.
        student_bias: ``[V]`` or None.
        loss: any registered divergence but ``"dkd"`` (fastkd/divergences.py, the README's table): ``"kl"``
            (forward KL, :func:`fastkd.kd_loss`), ``"reverse_kl"`` (:func:`fastkd.reverse_kl_loss`), ``"jsd"`` (the
            generalized JSD of :func:`fastkd.jsd_loss` with mixing weight ``beta``; ``beta`` 0 and 1 are forward and
            reverse KL, as in TRL), ``"tvd"``, ...; each gives the value of :func:`fastkd.divergence_loss` on the
            logits. ``"cosine"``: cosine distillation on the raw logits (:func:`fastkd.cosine_loss`, ``beta`` its
            weight, default 1, parameter ``eps``; see :func:`fastkd.cosine.fused_linear_cosine_loss`).
        beta: the divergence's ``beta`` (JSD's mixing weight in ``[0, 1]``); None (default) means its default
            (0.5 for the JSD). Ignored by divergences without a ``beta`` (as before).
        **params: the divergence's other parameters by name (e.g. ``skew=0.1``); a parameter it does not have
            is a TypeError.
        temperature: softmax temperature ``T > 0`` of the distillation term (the cross-entropy uses ``T = 1``): a
            Python number, or a tensor, 0-dim (e.g. CTKD's learnable temperature) or one per token (the hidden
            states' leading shape ``[...]``), as :func:`fastkd.kd_loss`. When it requires grad its exact gradient
            (``T^2`` included) comes from per-row sums of the chunk loop's response (or top-k) kernel, for every
            teacher kind.
        labels: integer ``[...]``: rows equal to ``ignore_index`` do not count (loss 0, gradient 0); with
            ``hard_label_weight != 0`` they are the cross-entropy targets, in ``[0, V)``.
        ignore_index: label value of ignored rows (prompt and padding tokens).
        hard_label_weight: weight of the student's cross-entropy on ``labels``, computed in the same pass
            (finite, >= 0; in ``[0, 1]`` when ``soft_weight`` is None).
        soft_weight: weight of the distillation term; None (default) means ``1 - hard_label_weight``, as
            :func:`fastkd.kd_loss`'s ``beta`` defaults to ``1 - alpha`` (``soft_weight=1.0`` before this default
            changed: pass it explicitly to weight the two terms independently).
        reduction: ``"batchmean"`` (sum over counted tokens / counted tokens, the default), ``"sum"``, ``"mean"``
            (divides the distillation term by counted tokens * V, as :func:`fastkd.kd_loss`) or ``"none"``
            (one value per token, shape ``[...]``).
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size` (about 16M logits per chunk on the
            CPU, 64M on a GPU). The result does not depend on it beyond float rounding.
        scale_by_temperature: multiply the KL-type terms by ``T^2`` (Hinton). None (default) means the
            divergence's own default: ``T^2`` for ``"kl"`` and ``"reverse_kl"`` (as :func:`fastkd.kd_loss` and
            :func:`fastkd.reverse_kl_loss`), none for ``"jsd"`` (as :func:`fastkd.jsd_loss` and TRL); True with
            ``"jsd"`` is an error. (The default was no ``T^2`` before: a change of ``T^2`` in value at ``T != 1``.)
            TRL and Liger-Kernel apply no ``T^2`` to their KL: to match them pass ``scale_by_temperature=False``.
        num_items_in_batch: divisor replacing the counted tokens in ``"batchmean"``/``"mean"`` (gradient
            accumulation).
        return_parts: return a :class:`fastkd.LossParts` ``(loss, soft, hard)``, the unweighted distillation
            and cross-entropy terms detached, for logging.
        student_softcap, student_logit_scale: the student head's final logit transform: its logits are
            ``softcap(scale * (h W^T + b))`` with ``softcap(x) = cap * tanh(x / cap)``, the scale first (Cohere's
            ``logit_scale``), then the cap (Gemma-2's ``final_logit_softcapping``), applied to every use of the
            logits (the divergence and the cross-entropy), inside the chunk loop with the exact gradient
            (``scale * (1 - tanh^2)``). None (default): no scale, no cap. Each a finite number > 0.
            :func:`fastkd.integrations.head_options` reads them from a Hugging Face config.
        teacher_softcap, teacher_logit_scale: the same for the teacher's logits, those a :class:`TeacherHead`
            computes or dense ones (then transformed as given); not with a :class:`TopKTeacher`.
        token_weights: optional weights ``[...]`` (the hidden states' leading shape), as :func:`fastkd.kd_loss`:
            each counted token's loss (both terms) times its weight, the divisor unchanged, no gradient for the
            weights; every teacher kind and reduction, and ``loss="cosine"``.
        standardize: logit standardization of both sides' (transformed) logits, as :func:`fastkd.kd_loss`, in
            the chunk loop's response kernel; needs teacher and student of one vocabulary, not a
            :class:`TopKTeacher`, not ``loss="cosine"`` (it compares the raw logits).

    Precision: the logits of a chunk are float32 (float64 for float64 input) whatever the dtype of the hidden
    states and weights, computed by GEMMs that accumulate and write float32 (on the CPU a bfloat16 / float16
    weight is widened to float32 once per call, O(V * H) memory): rounding bf16 logits before the divergence,
    as the eager composition ``F.linear`` in bf16 + the loss does, puts an error of up to 2^-9 |z| into each logit
    (4-23% in the gradients of Liger-Kernel's bf16 fused JSD). The logit gradient is rounded to the GEMM
    operand dtype (bf16 on a GPU) only for the gradient GEMMs.

    Autocast: under ``torch.autocast`` a head whose hidden states, weight and bias have different dtypes (a
    bf16 hidden state with an fp32 lm_head weight is the usual pair; a TeacherHead's likewise) is cast to the
    autocast dtype as ``F.linear`` would cast it, then computed as above; the gradients reach the original
    tensors in their own dtypes. A head of one dtype runs in it, as every fastkd op under autocast (fp32 stays
    exact fp32). Outside autocast the hidden states, weight and bias must share one dtype (TypeError otherwise,
    as ``F.linear``).

    Returns:
        The loss in float32 (float64 if the hidden states or the teacher are float64), also for bfloat16 /
        float16 input: unlike the eager composition (and fastkd's losses on logits, which return the input
        dtype), the fused head's loss is not rounded to the input dtype, as its logits are not.

    Determinism: run to run (same thread count) the value and every gradient are bitwise reproducible. Across
    CPU thread counts they are not: the logits and the gradients come from GEMMs, which the BLAS splits by
    thread count (the hidden-state gradient differs by ~1e-9 relative between 1 and 2 threads); only float
    rounding differs. (The response kernel itself has a fixed reduction order, see the README.)

    Memory: one ``[chunk_size, V]`` logits buffer (in the student's dtype; a second one for a TeacherHead, a
    padded teacher or a TopKTeacher with the cross-entropy), the weight gradient accumulated in float32 (float64 for float64 input), and the
    gradients themselves. With ``reduction="none"`` the gradients depend on each token's upstream gradient,
    so they are computed in the backward pass by running the chunks again.
    """
    if loss == "cosine":  # cosine distillation (issue 14): fastkd/cosine.py
        from fastkd.cosine import fused_linear_cosine_loss

        if v.check_bool("standardize", standardize):
            raise ValueError("standardize: 'cosine' compares the raw logits: no standardization")
        return fused_linear_cosine_loss(
            student_hidden, student_weight, teacher, student_bias=student_bias, beta=beta, temperature=temperature,
            labels=labels, ignore_index=ignore_index, hard_label_weight=hard_label_weight, soft_weight=soft_weight,
            reduction=reduction, chunk_size=chunk_size, scale_by_temperature=scale_by_temperature,
            num_items_in_batch=num_items_in_batch, return_parts=return_parts, student_softcap=student_softcap,
            student_logit_scale=student_logit_scale, teacher_softcap=teacher_softcap,
            teacher_logit_scale=teacher_logit_scale, token_weights=token_weights, **params)
    student_hidden, student_weight, student_bias, teacher = _autocast_head(student_hidden, student_weight,
                                                                          student_bias, teacher)
    kind, _, t, div_params, hard, soft, n, scale = v.check_fused_linear(
        student_hidden, student_weight, teacher, student_bias, loss, beta, temperature, labels, ignore_index,
        hard_label_weight, soft_weight, reduction, chunk_size, num_items_in_batch, scale_by_temperature,
        return_parts, params)
    head = v.check_head_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, kind)
    weights = v.check_token_weights(token_weights, student_hidden)
    v.check_bool("standardize", standardize)
    if standardize:
        if kind == "topk":
            raise ValueError("standardize: a top-k teacher has no full row to standardize")
        t_vocab = teacher.shape[-1] if kind == "dense" else teacher.weight.shape[0]
        if t_vocab != student_weight.shape[0]:
            raise ValueError(f"standardize: standardization needs teacher and student rows of one vocabulary, got "
                             f"{t_vocab} and {student_weight.shape[0]}")
        v.check_standardize_classes(t_vocab)
    if not _use_kernels():
        return reference.fused_linear_kd_loss(
            student_hidden, student_weight, teacher, student_bias=student_bias, loss=loss, temperature=t,
            labels=labels, ignore_index=ignore_index, hard_label_weight=hard, soft_weight=soft, reduction=reduction,
            scale_by_temperature=scale, num_items_in_batch=n, return_parts=return_parts,
            student_softcap=student_softcap, student_logit_scale=student_logit_scale,
            teacher_softcap=teacher_softcap, teacher_logit_scale=teacher_logit_scale, token_weights=weights,
            standardize=standardize, **dict(zip(divergences.get(loss).param_names, div_params)))

    lead = student_hidden.shape[:-1]
    hidden = _rows(student_hidden)
    rows, vocab = hidden.shape[0], student_weight.shape[0]
    dense = _rows(teacher).detach() if kind == "dense" else None
    t_hidden = t_weight = t_bias = values = indices = None
    values_are_logprobs = tail_bucket = False
    if kind == "head":
        t_hidden = _rows(teacher.hidden).detach()
        t_weight = teacher.weight.detach()
        t_bias = None if teacher.bias is None else teacher.bias.detach()
    elif kind == "topk":
        values, indices = _rows(teacher.values), _rows(teacher.indices)
        values_are_logprobs = teacher.values_are == "logprobs"
        tail_bucket = teacher.tail == "bucket"
    grad_on = torch.is_grad_enabled()
    row_temperature, t = _row_temperature(t, student_hidden)
    out, soft_part, hard_part, _, _, _, _ = torch.ops.fastkd.fused_linear_kd_forward(
        hidden, student_weight, student_bias, dense, t_hidden, t_weight, t_bias, values, indices,
        _rows(labels, last=False), _num_items_tensor(n), None, loss, list(div_params), t, soft, hard, ignore_index,
        reduction, scale, values_are_logprobs, tail_bucket,
        default_chunk_size(rows, vocab, hidden.device) if chunk_size is None else int(chunk_size), *head,
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
        None if weights is None else _rows(weights, last=False), standardize, 1e-7, row_temperature,
        grad_on and row_temperature is not None and row_temperature.requires_grad)
    if reduction == "none":
        out, soft_part, hard_part = out.reshape(lead), soft_part.reshape(lead), hard_part.reshape(lead)
    return LossParts(out, soft_part, hard_part) if return_parts else out
