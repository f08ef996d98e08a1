r"""The vocabulary-parallel fused linear head: :func:`fastkd.distributed.vocab_parallel_fused_linear_kd_loss`.

Tensor parallelism (Megatron-style) shards the student's lm_head by vocabulary rows: rank ``r`` of the group
holds rows ``[offset_r, offset_r + V_r)`` of the ``[V, H]`` weight (and of the bias), slices in rank order,
``V = sum_r V_r``; the hidden states are replicated. Per chunk of ``chunk_size`` rows (tokens):

1. the local GEMM: this rank's ``[chunk, V_r]`` slice of the logits (the teacher's too, for a sharded
   :class:`fastkd.TeacherHead`), then the optional logit scale and softcap, elementwise;
2. the phased row computation of :func:`fastkd.distributed.vocab_parallel_kd_loss` (the shard kernels
   ``response_shard_terms`` / ``response_shard_grad``), with all-reduces of ``O(chunk)`` numbers between the
   phases, never the logits; the cross-entropy's global log-sum-exp at ``T = 1`` and the label's logit (from
   the rank owning its column) ride in the statistics phase's all-reduce;
3. the local gradient of the logits slice, then the local weight (and bias) gradient of this rank's rows and
   this rank's share of the chunk's hidden-state gradient, all-reduced (SUM) over the group.

A :class:`fastkd.TopKTeacher` holds *global* vocabulary indices; every rank uses the kept entries that fall in
its slice. Its math (fastkd's ``topk_*`` of kd_math.h) needs, per row, the student's log-sum-exp over the kept
entries and over the others (the tail bucket's mass), each with its own maximum: one all-reduce MAX of
``[2, chunk]`` and one SUM that also carries the kept entries' partial loss terms.

The per-row options, as the single-process head: ``token_weights`` multiply each row's two terms (and the
gradients' row weights); a tensor temperature's gradient comes from the row dots of the divergence phase (the
shard ops' ``dots=True``; for a top-k teacher four more partial sums in its SUM all-reduce, see
:func:`_topk_chunk`), computed with the chunk's logits gradient; ``standardize`` adds, per chunk, the
standardization's two all-reduces (row sums, then sums of squares about the mean) before the statistics and
one (the row sums of the gradient and of the gradient times ``x - mean``) in the gradient phase.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastkd import _validation as v
from fastkd import divergences
from fastkd._precision import _dtypes
from fastkd._validation_head import check_linear_head
from fastkd.distributed import (
    _check_distributed,
    _column,
    _divergence_grad,
    _divergence_rows,
    _row_log_sums,
    _row_shift,
    _row_standardization,
    _standardize_grad,
    _standardized,
    _temperature_dots,
)
from fastkd.functional import _row_temperature
from fastkd.fused_linear import default_chunk_size
from fastkd.outputs import LossParts
from fastkd.teachers import TeacherHead, TopKTeacher

__all__ = ["vocab_parallel_fused_linear_kd_loss"]

_KINDS = {"dense": 0, "head": 1, "topk": 2}
_REDUCTIONS = {"batchmean": 0, "sum": 1, "mean": 2, "none": 3}
_WHERE = "vocab_parallel_fused_linear_kd_loss"


def vocab_parallel_fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight_shard: torch.Tensor,
    teacher,
    *,
    group: Optional[dist.ProcessGroup] = None,
    student_bias_shard: Optional[torch.Tensor] = None,
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
    num_items_in_batch=None,
    return_parts: bool = False,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    student_logit_scale: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
    **params: float,
):
    r"""The fused linear-head distillation loss of :func:`fastkd.fused_linear_kd_loss` with the student's lm_head
    sharded by vocabulary rows over a tensor-parallel group: every rank of ``group`` passes the (replicated)
    hidden states and its contiguous slice of the head, and gets the loss of the full head, without any rank
    ever holding more than ``[chunk_size, V_r]`` logits or exchanging logits.

    This is a collective: every rank of ``group`` must call it (and, for ``reduction="none"``, run its backward:
    the chunks run again there, with communication) with the same hidden states, labels, teacher values and
    arguments; only the vocabulary slices differ (uneven widths allowed, ``V_r = 0`` included). The loss (the
    same on every rank) and the gradients equal, up to rounding, those of
    ``fastkd.fused_linear_kd_loss(student_hidden, W, teacher_full, student_bias=b, ...)`` with ``W``, ``b`` (and
    a TeacherHead's weight and bias, or the dense teacher logits) gathered along the vocabulary in rank order:
    each rank's ``student_weight_shard.grad`` / ``student_bias_shard.grad`` is its slice of the gathered head's
    gradient, and ``student_hidden.grad`` is the full hidden-state gradient on every rank (all-reduced).

    Args:
        student_hidden: ``[..., H]`` the student's last hidden states, identical on every rank.
        student_weight_shard: ``[V_r, H]`` this rank's rows ``[offset_r, offset_r + V_r)`` of the lm_head weight
            (same dtype and device as the hidden states); ``offset_r`` is the sum of the lower ranks' ``V_r``.
        teacher: one of

            * dense teacher logits ``[..., V_r]``: this rank's slice of the teacher's logits (the same columns);
            * :class:`fastkd.TeacherHead` ``(hidden [..., H_t], weight [V_r, H_t], bias=None)``: the teacher's
              hidden states (replicated) and its head sharded like the student's;
            * :class:`fastkd.TopKTeacher` ``(values, indices, ...)`` with *global* vocabulary indices in
              ``[0, V)``, identical on every rank (``loss="kl"`` only, as the fused head).

            The teacher gets no gradient. Unlike the single-process head, the teacher's slice must have the
            student's width: a smaller teacher vocabulary is passed as ``-inf`` logits (dense) in its place.
        group: the tensor-parallel process group (default: the world).
        student_bias_shard: ``[V_r]`` this rank's slice of the lm_head bias, or None.
        student_softcap, teacher_softcap: ``z -> cap * tanh(z / cap)`` on the logits (Gemma-2's
            ``final_logit_softcapping``), finite > 0, or None (off). Applied after the logit scale.
        student_logit_scale, teacher_logit_scale: ``z -> scale * z`` on the logits (Cohere's ``logit_scale``),
            finite > 0, or None (off). The student's logits are ``softcap(scale * (h W^T + b))``; the teacher's
            transforms apply to a TeacherHead's computed logits and to dense logits alike, not to a TopKTeacher.
            The gradient is exact: ``scale * (1 - tanh^2(scale * x / cap))`` times that of the logits.
        loss, beta, labels, ignore_index, hard_label_weight, soft_weight, reduction, chunk_size,
        scale_by_temperature, num_items_in_batch, return_parts, **params: as in
            :func:`fastkd.fused_linear_kd_loss`; ``labels`` are global vocabulary indices (the cross-entropy
            targets, at ``T = 1``); ``chunk_size=None`` picks :func:`fastkd.fused_linear.default_chunk_size` of
            the gathered head (the global ``V``: the single-process head's chunk, so that each rank's
            buffers are ``1 / world`` of its). ``"mean"`` divides the distillation term by the counted
            rows times the global ``V``.
        temperature: as in :func:`fastkd.fused_linear_kd_loss`: a Python number, or a tensor, 0-dim or one per
            row (the hidden states' leading shape), identical on every rank, for every teacher kind. When it
            requires grad its exact gradient (``T^2`` included) comes from per-row sums of the chunk's phases (the
            shard kernels' row dots, summed over the vocabulary in the divergence all-reduce, which then carries
            ``[7, chunk]`` numbers; for a :class:`fastkd.TopKTeacher` four more rows in its SUM all-reduce); every
            rank gets the full gradient of the (replicated) loss. For ``reduction="none"`` it is computed in the
            backward's pass over the chunks.
        token_weights: optional per-row weights ``[...]`` (the hidden states' leading shape), floating point,
            identical on every rank, as :func:`fastkd.fused_linear_kd_loss`: each counted row's loss (both
            terms, and the parts of ``return_parts``) times its weight, the divisor unchanged, no gradient for the
            weights; every teacher kind and reduction.
        standardize: logit standardization of both sides' (transformed) logits, as
            :func:`fastkd.fused_linear_kd_loss`, over the *global* vocabulary (``V >= 2``): per chunk, two more
            all-reduces of ``O(chunk)`` numbers before the statistics (the row sums, then the sums of squares
            about the mean, float64) and, with a gradient, one in the gradient phase; the cross-entropy stays on
            the unstandardized logits (its row maximum rides in the MAX all-reduce). Dense or
            :class:`fastkd.TeacherHead` teacher, not a :class:`fastkd.TopKTeacher` (ValueError).

    Returns:
        The loss in float32 (float64 if the hidden states or the teacher are float64), also for bf16 / fp16
        input, with each chunk's logits in that dtype (not rounded to the input dtype), as
        :func:`fastkd.fused_linear_kd_loss`; a :class:`fastkd.LossParts` with ``return_parts``.

    Communication per chunk, on the hidden states' device (any backend): three all-reduces of ``O(chunk)``
    numbers (two with a TopKTeacher; three more with ``standardize``) and, when the hidden states require grad,
    the all-reduce of the chunk's ``[chunk, H]`` hidden-state gradient; once per call, an all-gather of a few
    integers per rank (the shard widths, from which the offsets and ``V`` follow, and the arguments every rank
    must agree on, ``standardize`` and whether the temperature requires grad among them).

    Memory: the ``[chunk_size, V_r]`` logits slices (student, teacher) and their gradient, the weight gradient
    (accumulated in float32 for half-precision input), never ``O(rows * V)``. With a scalar reduction the
    gradients are computed in the forward and handed to autograd once, without a copy: a second backward through
    the same graph (``retain_graph=True``) is a RuntimeError (the single-process head allows it).

    Raises:
        ValueError / TypeError: invalid arguments, with the fused head's messages. Everything that can be
            checked locally is checked before any communication; what needs the global vocabulary (the labels'
            and top-k indices' range, ``k <= V``) or the other ranks (the same rows, hidden size, teacher kind
            and options on every rank) is checked right after the first all-gather, identically on every rank.
        RuntimeError: ``torch.distributed`` is not available or not initialized.
    """
    cfg = _check_arguments(student_hidden, student_weight_shard, teacher, student_bias_shard, loss, beta,
                           temperature, labels, ignore_index, hard_label_weight, soft_weight, reduction, chunk_size,
                           scale_by_temperature, num_items_in_batch, return_parts, student_softcap, teacher_softcap,
                           student_logit_scale, teacher_logit_scale, token_weights, standardize, params)
    _check_distributed()

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows, width = hidden.shape[0], student_weight_shard.shape[0]
    grad_on = torch.is_grad_enabled()
    row_t, cfg.temperature = _row_temperature(cfg.temperature, student_hidden)
    want = (grad_on and student_hidden.requires_grad, grad_on and student_weight_shard.requires_grad,
            grad_on and student_bias_shard is not None and student_bias_shard.requires_grad,
            grad_on and row_t is not None and row_t.requires_grad)
    offset, vocab = _exchange_widths(cfg, rows, student_hidden.shape[-1], width,
                                     0 if chunk_size is None else int(chunk_size), want, group, hidden.device)
    # the default chunk: the single-process head's on the gathered weight (the same on every rank), so that each
    # rank's logits buffers are 1/world of its
    chunk = default_chunk_size(rows, vocab, hidden.device) if chunk_size is None else int(chunk_size)
    _check_global(cfg, vocab, labels, ignore_index)

    run = _Run(cfg, hidden, student_weight_shard, student_bias_shard, teacher, labels, ignore_index, offset, vocab,
               chunk, group, row_t)
    out, soft_part, hard_part = _VocabParallelHead.apply(hidden, student_weight_shard, student_bias_shard, row_t,
                                                         run, want)
    lead = student_hidden.shape[:-1]
    if reduction == "none":
        out, soft_part, hard_part = out.reshape(lead), soft_part.reshape(lead), hard_part.reshape(lead)
    return LossParts(out, soft_part, hard_part) if return_parts else out


# --------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------
class _Config:
    """The validated arguments."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _check_arguments(hidden, weight, teacher, bias, loss, beta, temperature, labels, ignore_index, hard_label_weight,
                     soft_weight, reduction, chunk_size, scale_by_temperature, num_items, return_parts, s_cap, t_cap,
                     s_scale, t_scale, token_weights, standardize, params) -> _Config:
    """Every check that needs no communication, in the order and with the messages of the fused head's
    (:func:`fastkd._validation_head.check_fused_linear`), for a weight *shard* (``V_r = 0`` allowed)."""
    check_linear_head(hidden, weight, bias, None, ("student_hidden", "student_weight_shard", "student_bias_shard"),
                      allow_empty=True)
    lead = tuple(hidden.shape[:-1])
    width = weight.shape[0]
    device = hidden.device
    v.check_choice("loss", loss, v.fused_linear_losses())
    scale = v.resolve_scale_by_temperature(scale_by_temperature, loss)
    v.check_bool("return_parts", return_parts)
    spec = divergences.get(loss)
    div_params = v.resolve_divergence_params(loss, beta, dict(params), _WHERE)
    spec.check_ranges(div_params)
    proxy = _Shape(torch.Size(lead + (width,)), device)
    t = v.check_temperature_or_tensor(temperature, proxy)  # a float, or a tensor of [] or the rows' shape
    if isinstance(t, torch.Tensor):
        v.check_row_temperature_values(t)  # before any communication: every rank raises alike
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    hard, soft = v.check_mix_weights(hard_label_weight, soft_weight, ("hard_label_weight", "soft_weight"))
    n = v.check_num_items(num_items, reduction)
    v.check_chunk_size(chunk_size)
    # the single-process head's rule and messages; None for "no transform" here
    s_scale, s_cap, t_scale, t_cap = (None if x == off else x for x, off in zip(
        v.check_head_transforms(s_scale, s_cap, t_scale, t_cap, "topk" if isinstance(teacher, TopKTeacher) else "head"),
        (1.0, 0.0, 1.0, 0.0)))
    weights = v.check_token_weights(token_weights, hidden)
    v.check_bool("standardize", standardize)
    if standardize and isinstance(teacher, TopKTeacher):
        raise ValueError("standardize: a top-k teacher has no full row to standardize")
    if labels is not None:
        v._check_index_tensor(labels, proxy, "labels")
    if hard != 0.0:
        v.check_target(labels, proxy, ignore_index, required=True, name="labels", check_range=False)

    k = 0
    if isinstance(teacher, TopKTeacher):
        kind = "topk"
        # k <= V needs the global V: checked after the widths are exchanged
        v.check_topk_teacher(lead, 2**62, device, teacher.values, teacher.indices, teacher.values_are, teacher.tail)
        if loss != "kl":
            raise ValueError(f"a TopKTeacher supports loss='kl' only (KL from the sparse teacher), got {loss!r}")
        k = teacher.values.shape[-1]
        teacher_dtype = teacher.values.dtype
    elif isinstance(teacher, TeacherHead):
        kind = "head"
        check_linear_head(teacher.hidden, teacher.weight, teacher.bias, lead,
                          ("teacher.hidden", "teacher.weight", "teacher.bias"), allow_empty=True)
        if teacher.hidden.device != device:
            raise ValueError(f"teacher.hidden must be on the student's device {device}, got {teacher.hidden.device}")
        if teacher.weight.shape[0] != width:
            raise ValueError(
                f"teacher.weight must hold the student shard's vocabulary rows ({width}: the same slice of the "
                f"vocabulary on this rank), got {teacher.weight.shape[0]}"
            )
        teacher_dtype = teacher.hidden.dtype
    elif isinstance(teacher, torch.Tensor):
        kind = "dense"
        v._check_float_tensor(teacher, "teacher", 1)
        if tuple(teacher.shape) != lead + (width,):
            raise ValueError(
                f"teacher logits must have shape {lead + (width,)} (the student hidden states' leading dimensions "
                f"and this rank's vocabulary slice), got {tuple(teacher.shape)}"
            )
        if teacher.device != device:
            raise ValueError(f"teacher logits must be on the student's device {device}, got {teacher.device}")
        teacher_dtype = teacher.dtype
    else:
        raise TypeError(
            "teacher must be dense teacher logits (a torch.Tensor), a fastkd.TeacherHead or a fastkd.TopKTeacher, "
            f"got {type(teacher).__name__}"
        )
    return _Config(kind=kind, k=k, spec=spec, named=dict(zip(spec.param_names, div_params)), temperature=t,
                   scale=scale, hard=hard, soft=soft, num_items=n, reduction=reduction, s_cap=s_cap, t_cap=t_cap,
                   s_scale=s_scale, t_scale=t_scale, teacher_dtype=teacher_dtype, weights=weights,
                   standardize=standardize)


class _Shape:
    """Stands in for logits that are never materialized: the shape and device the label checks read."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        self.shape = shape
        self.device = device


def _exchange_widths(cfg: _Config, rows: int, hidden_size: int, width: int, chunk: int, want: Tuple[bool, ...],
                     group, device) -> Tuple[int, int]:
    """The one all-gather before the work: every rank's shard width and the arguments that decide the
    communication pattern (``chunk`` 0: None; ``want`` the gradients wanted: hidden states, weight, bias,
    temperature). Returns ``(offset, V)``; raises the same ValueError on every rank where they disagree (a
    mismatch would otherwise hang or mix rows)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([width, rows, hidden_size, chunk, _KINDS[cfg.kind], cfg.k, int(cfg.hard != 0.0),
                         _REDUCTIONS[cfg.reduction], int(want[0]), int(any(want[:3])), int(want[3]),
                         int(cfg.standardize)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu()
    names = ("shard width", "rows (student_hidden's leading dimensions)", "hidden size", "chunk_size (0: None)",
             "teacher kind", "top-k k", "cross-entropy on (hard_label_weight != 0)", "reduction",
             "student_hidden.requires_grad", "head gradient (student_hidden, the weight or bias shard requires grad)",
             "temperature.requires_grad", "standardize")
    for col in range(1, table.shape[1]):
        if not bool((table[:, col] == table[0, col]).all()):
            raise ValueError(
                f"{_WHERE}: every rank of the group must pass the same {names[col]}, got {table[:, col].tolist()} "
                "(ranks in order)"
            )
    widths = table[:, 0].tolist()
    return sum(widths[:rank]), sum(widths)


def _check_global(cfg: _Config, vocab: int, labels, ignore_index: int) -> None:
    """The checks that need the global vocabulary ``V`` (identical on every rank: the data is replicated)."""
    if vocab < 1:
        raise ValueError(f"{_WHERE}: the vocabulary slices of the group are all empty (V = 0)")
    if cfg.hard != 0.0:
        v.check_target(labels, _Shape(torch.Size(tuple(labels.shape) + (vocab,)), labels.device), ignore_index,
                       required=True, name="labels")
    if cfg.kind == "topk":
        if cfg.k > vocab:
            raise ValueError(f"k (the last dimension of teacher_topk_values) must be in [1, V={vocab}], got {cfg.k}")
        # (indices of the TopKTeacher: checked in _Run, which holds them)
    if cfg.standardize:
        v.check_standardize_classes(vocab)


# --------------------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------------------
def _linear_exact(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], cdtype: torch.dtype) -> torch.Tensor:
    """``x @ w^T + b`` in ``cdtype`` (float32 / float64), never rounded to a narrower input dtype, as the
    single-process head computes its logits (fused_linear_host.h linear_exact): operands already in ``cdtype``
    multiply as they are (the CPU's reduced-precision weights are widened once per call, see ``_Run``); on a GPU
    bf16 / fp16 operands go through a GEMM with a float32 output."""
    if w.dtype == cdtype:
        return F.linear(x.to(cdtype), w, None if b is None else b.to(cdtype))
    if x.is_cuda and cdtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16):
        out = torch.mm(x, w.t(), out_dtype=torch.float32)
        return out if b is None else out.add_(b)
    return F.linear(x, w, b).to(cdtype)  # float32 operands of a float64 call (as the CUDA head does)


def _gemm_operand(w: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """A weight as the GEMMs take it: widened to ``cdtype`` once per call on the CPU (its GEMMs have no float32
    output for bf16 / fp16), as it is on a GPU."""
    return w if w.is_cuda or w.dtype == cdtype else w.to(cdtype)


def _transform(x: torch.Tensor, scale: Optional[float], cap: Optional[float], need_factor: bool):
    """``softcap(scale * x)`` elementwise and, when asked, its derivative ``scale * (1 - tanh^2)`` (None when the
    transform is the identity)."""
    factor = None
    if scale is not None:
        x = x * scale
    if cap is not None:
        th = torch.tanh(x / cap)
        x = cap * th
        if need_factor:
            factor = (1.0 - th * th) * (scale if scale is not None else 1.0)
    elif scale is not None and need_factor:
        factor = torch.full((), scale, dtype=x.dtype, device=x.device)
    return x, factor


class _Run:
    """Everything one pass over the chunks needs (the forward's, and for reduction "none" the backward's)."""

    def __init__(self, cfg, hidden, weight, bias, teacher, labels, ignore_index, offset, vocab, chunk, group,
                 row_temperature: Optional[torch.Tensor]):
        self.cfg, self.offset, self.vocab, self.chunk, self.group = cfg, offset, vocab, chunk, group
        self.width = weight.shape[0]
        self.like = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                     None if row_temperature is None else row_temperature.dtype)
        rows = hidden.shape[0]
        self.rows = rows
        _, self.cdtype = _dtypes(hidden, torch.empty((), dtype=cfg.teacher_dtype))
        self.out_dtype = self.cdtype  # float32 (float64) whatever the input dtype, as the single-process head
        device = hidden.device
        # the rows' temperatures: the float, or one per row [rows] in the compute dtype (a constant here: its
        # gradient is computed from the row dots, see chunk_rows)
        self.temperature = cfg.temperature if row_temperature is None else row_temperature.detach().to(self.cdtype)
        self.weights = None if cfg.weights is None else cfg.weights.reshape(-1).to(self.cdtype)
        self.keep = None if labels is None else labels.reshape(-1) != ignore_index
        self.labels = None
        if cfg.hard != 0.0:
            self.labels = torch.where(self.keep, labels.reshape(-1), torch.zeros_like(labels.reshape(-1))).long()
        self.dense = self.t_hidden = self.t_weight = self.t_bias = None
        if cfg.kind == "dense":
            self.dense = teacher.detach().reshape(rows, self.width)
        elif cfg.kind == "head":
            self.t_hidden = teacher.hidden.detach().reshape(rows, teacher.hidden.shape[-1])
            self.t_weight = _gemm_operand(teacher.weight.detach(), self.cdtype)
            self.t_bias = None if teacher.bias is None else teacher.bias.detach()
        else:
            v.check_topk_indices_range(teacher.indices, vocab, labels, ignore_index)
            k = cfg.k
            idx = teacher.indices.reshape(rows, k).long()
            if self.keep is not None:  # ignored rows may hold any indices: 0..k-1 there (valid and distinct)
                idx = torch.where(self.keep.unsqueeze(-1), idx, torch.arange(k, device=device).expand_as(idx))
            self.topk_idx = idx
            self.topk_tempered = teacher.values_are == "logits"  # its probabilities depend on the temperature
            self.topk_log_p, self.topk_p_tail = _topk_teacher(teacher.values.detach().reshape(rows, k).to(self.cdtype),
                                                              teacher.values_are, teacher.tail, k < vocab,
                                                              _column(self.temperature))
        # the divisors of the scalar reductions (num_items_in_batch replaces the counted rows)
        if cfg.num_items is not None:
            counted = torch.as_tensor(cfg.num_items, device=device).to(self.cdtype)
        else:
            counted = (self.keep.sum() if self.keep is not None else torch.tensor(rows, device=device))
            counted = counted.clamp_min(1).to(self.cdtype)
        self.denom_soft = counted * vocab if cfg.reduction == "mean" else counted
        self.denom_hard = counted

    # ---- one chunk ---------------------------------------------------------------------------------------
    def _temperature(self, r0: int, r1: int):
        """The temperature of rows ``[r0, r1)``: the float, or a ``[r1 - r0]`` tensor."""
        t = self.temperature
        return t[r0:r1] if isinstance(t, torch.Tensor) else t

    def _teacher_logits(self, r0: int, r1: int) -> torch.Tensor:
        cfg = self.cfg
        if cfg.kind == "dense":
            xt = self.dense[r0:r1].to(self.cdtype)
        else:
            xt = _linear_exact(self.t_hidden[r0:r1], self.t_weight, self.t_bias, self.cdtype)
        return _transform(xt, cfg.t_scale, cfg.t_cap, False)[0]

    def chunk_rows(self, xs: torch.Tensor, r0: int, r1: int, w_soft, w_hard, need_grad: bool, dots: bool):
        """Per-row soft and hard terms of rows ``[r0, r1)`` from this rank's logits slice ``xs`` (compute dtype,
        transformed; overwritten when the cross-entropy's gradient is formed), with the token weights, and with
        ``need_grad`` the gradient of ``sum_i w_soft_i * soft_i + w_hard_i * hard_i`` with respect to ``xs``
        (``w_*``: per-row weights, the token weights included; masked rows are zeroed here), with ``dots`` that
        sum's gradient with respect to the rows' temperatures ``[r1 - r0]`` (else None)."""
        cfg = self.cfg
        n = r1 - r0
        ce = cfg.hard != 0.0
        T = self._temperature(r0, r1)
        scale_t2 = T * T if cfg.scale else 1.0
        y_local = owned = None
        if ce:
            y_local = self.labels[r0:r1] - self.offset
            owned = (y_local >= 0) & (y_local < self.width)
            y_local = torch.where(owned, y_local, torch.zeros_like(y_local))
        grad_t = None
        if cfg.kind == "topk":
            per_row, grad, ce_stats, dots_st = _topk_chunk(self, xs, r0, r1, T, w_soft, need_grad, y_local, owned,
                                                           dots)
        else:
            xt = self._teacher_logits(r0, r1)
            zs, std = xs, None
            if cfg.standardize:  # the divergence of the standardized rows; the cross-entropy of the raw ones
                mean, std_, scale, _ = _row_standardization(xs, xt, self.group, self.vocab)
                zs, xt = _standardized(xs, mean[0], scale[0]), _standardized(xt, mean[1], scale[1])
                std = (mean[0], std_[0], scale[0])
            # the cross-entropy's origin: the raw student's row maximum (in the same all-reduce)
            shift = _row_shift(zs, xt, self.group, *((xs,) if ce and std is not None else ()))
            origin, shift = shift[2] if shift.shape[0] > 2 else shift[0], shift[:2]
            extra = _ce_partials(xs, origin, y_local, owned) if ce else None
            log_s, _, _, ce_stats = _row_log_sums(zs, xt, shift, T, self.group, extra)
            if ce:
                ce_stats = (origin, ce_stats)
            per_row, sums = _divergence_rows(cfg.spec, cfg.named, zs, xt, shift, log_s, T, self.group, dots)
            sum_psi_q = sums[0] if dots else sums
            dots_st = _temperature_dots(sums) if dots else None
            grad = None
            if need_grad:
                coef = w_soft * (scale_t2 / T)
                grad = _divergence_grad(cfg.spec, cfg.named, zs, xt, shift, log_s, T, coef, sum_psi_q)
                if std is not None:
                    grad = _standardize_grad(grad, xs, *std, self.vocab, self.group)
            del zs
        soft_rows = per_row * scale_t2
        if dots:  # d(soft_i) / d(T_i) = f'(T) D_i - f(T) / T (D_s + D_t), f = T^2 or 1 (row_options.h)
            d_s, d_t = dots_st
            df = 2.0 * T if cfg.scale else 0.0
            grad_t = w_soft * (df * per_row - scale_t2 / T * (d_s + d_t))
        hard_rows = torch.zeros(n if ce else 0, dtype=self.cdtype, device=xs.device)
        if ce:
            origin, (sum1, label_logit) = ce_stats
            log_sum1 = sum1.log()
            hard_rows = log_sum1 - label_logit
            if need_grad:  # softmax(x) - onehot(y), in place over xs (the chunk's own buffer, not needed after)
                g_ce = xs.sub_((origin + log_sum1).unsqueeze(-1)).exp_()
                if self.width > 0:  # -1 at the owned label columns (y_local is 0 where not owned: adds 0 there)
                    g_ce.scatter_add_(1, y_local.unsqueeze(-1), owned.to(g_ce.dtype).neg().unsqueeze(-1))
                grad.add_(g_ce.mul_(w_hard.unsqueeze(-1)))
                del g_ce
        if self.weights is not None:  # each row's loss (both terms) times its weight; w_* carry it already
            tw = self.weights[r0:r1]
            soft_rows = soft_rows * tw
            if ce:
                hard_rows = hard_rows * tw
        if self.keep is not None:
            keep = self.keep[r0:r1]
            zero = torch.zeros((), dtype=self.cdtype, device=xs.device)
            soft_rows = torch.where(keep, soft_rows, zero)
            if ce:
                hard_rows = torch.where(keep, hard_rows, zero)
            if grad is not None:
                grad.masked_fill_(~keep.unsqueeze(-1), 0.0)
            if grad_t is not None:
                grad_t = torch.where(keep, grad_t, zero)
        return soft_rows, hard_rows, grad, grad_t

    # ---- the pass over the chunks -------------------------------------------------------------------------
    def run(self, hidden, weight, bias, row_weights: Optional[torch.Tensor], want: Tuple[bool, bool, bool, bool]):
        """One pass: ``(soft_rows, hard_rows, grad_hidden, grad_weight, grad_bias, grad_temperature)``. The
        gradients (None where not wanted; the temperature's per row ``[rows]``) are of
        ``sum_i a_i * (soft * soft_i) + b_i * (hard * hard_i)`` with ``a_i``, ``b_i`` the reduction's weights
        (``row_weights`` the upstream per-row gradient for "none") and ``soft_i``, ``hard_i`` the weighted rows."""
        cfg, cdtype, rows = self.cfg, self.cdtype, self.rows
        device = hidden.device
        need_grad = any(want[:3])
        if row_weights is not None:
            w_soft = row_weights.to(cdtype) * cfg.soft
            w_hard = row_weights.to(cdtype) * cfg.hard
        else:
            w_soft = (cfg.soft / self.denom_soft).expand(rows) if cfg.reduction != "sum" else \
                torch.full((rows,), cfg.soft, dtype=cdtype, device=device)
            w_hard = (cfg.hard / self.denom_hard).expand(rows) if cfg.reduction != "sum" else \
                torch.full((rows,), cfg.hard, dtype=cdtype, device=device)
        if self.weights is not None:
            w_soft, w_hard = w_soft * self.weights, w_hard * self.weights
        soft_rows = torch.zeros(rows, dtype=cdtype, device=device)
        hard_rows = torch.zeros(rows if cfg.hard != 0.0 else 0, dtype=cdtype, device=device)
        acc = cdtype  # the weight-gradient accumulator: float32 for half-precision input, else the input dtype
        # the hidden-state gradient: this rank's share per chunk (a GEMM in the input dtype), summed over the
        # group in the compute dtype
        g_hidden = torch.zeros(hidden.shape, dtype=cdtype, device=device) if want[0] else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=device) if want[1] else None
        g_bias = torch.zeros(weight.shape[0], dtype=acc, device=device) if want[2] else None
        g_temp = torch.zeros(rows, dtype=cdtype, device=device) if want[3] else None
        weight_g = _gemm_operand(weight, cdtype)
        gemm = weight_g.dtype
        for r0 in range(0, rows, self.chunk):
            r1 = min(rows, r0 + self.chunk)
            h = hidden[r0:r1]
            raw = _linear_exact(h, weight_g, bias, cdtype)
            xs, factor = _transform(raw, cfg.s_scale, cfg.s_cap, need_grad)
            s_r, h_r, grad, g_t = self.chunk_rows(xs, r0, r1, w_soft[r0:r1], w_hard[r0:r1], need_grad, want[3])
            soft_rows[r0:r1] = s_r
            if cfg.hard != 0.0:
                hard_rows[r0:r1] = h_r
            if g_t is not None:
                g_temp[r0:r1] = g_t
            if not need_grad:
                continue
            if factor is not None:
                grad.mul_(factor)
            del raw, xs, factor
            if want[2]:
                g_bias += grad.sum(dim=0, dtype=acc)
            g_in = grad.to(gemm)  # the logits' gradient in the GEMMs' dtype, as the fused head's
            if want[0]:  # this rank's share, summed over the group chunk by chunk (O(chunk * H) in flight)
                part = (g_in @ weight_g).to(cdtype)
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self.group)
                g_hidden[r0:r1] = part
            if want[1]:
                g_weight.addmm_(g_in.t().to(acc), h.to(acc))
            del grad, g_in  # before the next chunk's logits: one chunk's buffers alive at a time
        return soft_rows, hard_rows, g_hidden, g_weight, g_bias, g_temp

    def reduce(self, soft_rows: torch.Tensor, hard_rows: torch.Tensor):
        """``(loss, soft, hard)`` in the output dtype, as the fused head combines and reduces them."""
        cfg = self.cfg
        red = cfg.reduction
        if red == "none":
            soft_v, hard_v = soft_rows, hard_rows if cfg.hard != 0.0 else torch.zeros_like(soft_rows)
        elif red == "sum":
            soft_v = soft_rows.sum()
            hard_v = hard_rows.sum()
        else:
            soft_v = soft_rows.sum() / self.denom_soft
            hard_v = hard_rows.sum() / self.denom_hard
        loss = cfg.soft * soft_v + cfg.hard * hard_v if cfg.hard != 0.0 else (soft_v if cfg.soft == 1.0 else
                                                                               cfg.soft * soft_v)
        o = self.out_dtype
        # the parts are copies: the loss may be the soft part itself, and they are marked non-differentiable
        return loss.to(o), soft_v.to(o).clone(), hard_v.to(o).clone()


def _ce_partials(xs: torch.Tensor, origin: torch.Tensor, y_local, owned) -> torch.Tensor:
    """``[2, rows]``: this rank's ``sum_j exp(x_j - origin)`` (the cross-entropy's log-sum-exp at ``T = 1``, in
    the shifted coordinates of the row maximum ``origin``) and ``x_y - origin`` where it owns the label's column
    (0 elsewhere)."""
    rows, width = xs.shape
    out = torch.zeros(2, rows, dtype=xs.dtype, device=xs.device)
    if width > 0:
        out[0] = (xs - origin.unsqueeze(-1)).exp().sum(dim=-1)
        label = xs.gather(-1, y_local.unsqueeze(-1)).squeeze(-1) - origin
        out[1] = torch.where(owned, label, torch.zeros_like(label))
    return out


# --------------------------------------------------------------------------------------------------------
# the sparse (top-k) teacher
# --------------------------------------------------------------------------------------------------------
def _topk_teacher(vals: torch.Tensor, values_are: str, tail: str, has_outside: bool, temperature):
    """The teacher's kept log-probabilities ``[rows, k]`` and tail mass ``[rows]`` (0 without a tail bucket), as
    :func:`fastkd.reference.topk_kd_loss` and the kernels (kd_math.h ``topk_teacher``) decide them; replicated
    data, so every rank computes the same. ``temperature``: a float or a ``[rows, 1]`` column (logits only)."""
    zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
    if values_are == "logits":
        return F.log_softmax(vals / temperature, dim=-1), torch.zeros_like(vals[:, 0])
    lse = torch.logsumexp(vals, dim=-1, keepdim=True)
    if tail == "renormalize":
        return vals - lse, torch.zeros_like(vals[:, 0])
    has_tail = (lse < 0) & has_outside  # False for NaN: the renormalized NaN values propagate
    log_p = vals - torch.where(has_tail, zero, lse)
    p_tail = torch.where(has_tail, -torch.expm1(lse), zero).squeeze(-1)
    return log_p, p_tail


def _topk_chunk(run: _Run, xs: torch.Tensor, r0: int, r1: int, T, w_soft, need_grad: bool, y_local, owned,
                dots: bool):
    """The top-k KL of rows ``[r0, r1)`` over this rank's slice (``T`` the float or the rows' ``[n]``
    temperatures): ``(rows_loss, grad or None, ce_stats, (D_s, D_t) or None)``, the loss without the ``T^2``
    factor, the gradient with it and the weights ``w_soft``.

    With ``o`` the global row maximum, ``L_kept`` / ``L_out`` the student's global ``log sum exp((s - o) / T)``
    over the kept entries / the others (each summed from its own maximum, so that a tail far below the kept
    mass keeps its precision), ``log Z = logaddexp(L_kept, L_out)``, ``log q_j = (s_j - o) / T - log Z``::

        loss = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - (L_out - log Z))
        d loss / d((s_j - o) / T) = q_j - p_j (kept), q_j - p_tail exp((s_j - o) / T - L_out) (others)

    the sum over the kept entries split as ``sum_k p_k (log p_k - (s_k - o) / T) + log Z * sum_k p_k``, whose
    first part each rank sums over its kept entries in the same all-reduce as the exponentials.

    With ``dots`` the temperature's row dots ride in that all-reduce too: with ``z_j = (s_j - o) / T`` and ``g``
    the gradient above, ``D_s = sum_j g_j z_j`` and, for ``values_are="logits"`` (the only teacher whose ``p``
    depends on ``T``), ``D_t = sum_k p_k (log p_k - log q_k - loss) log p_k``, so that
    ``d loss / d T = -(D_s + D_t) / T``; each rank adds its kept and other entries' ``exp(z_j) z_j`` (from each
    set's maximum, as the sums), ``p_k z_k`` and ``p_k z_k log p_k``."""
    cfg = run.cfg
    Tc = _column(T)
    n, width = xs.shape
    dtype, device = xs.dtype, xs.device
    neg_inf = torch.full((), -math.inf, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    idx = run.topk_idx[r0:r1] - run.offset
    in_slice = (idx >= 0) & (idx < width)
    col = torch.where(in_slice, idx, torch.zeros_like(idx))
    log_p = run.topk_log_p[r0:r1]
    p_tail = run.topk_p_tail[r0:r1]
    p = log_p.exp()

    kept = torch.zeros((n, width), dtype=torch.bool, device=device)
    s_kept = neg_inf.expand(n, idx.shape[1])
    if width > 0:
        ri, ki = in_slice.nonzero(as_tuple=True)
        kept[ri, col[ri, ki]] = True
        s_kept = torch.where(in_slice, xs.gather(-1, col), neg_inf)
    s_out = torch.where(kept, neg_inf, xs)

    maxima = torch.full((2, n), -math.inf, dtype=dtype, device=device)
    if width > 0:
        maxima[0] = s_kept.amax(dim=-1)
        maxima[1] = s_out.amax(dim=-1)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=run.group)
    m = torch.where(maxima == -math.inf, zero, maxima)  # each set's origin (0 for an empty set)
    o = torch.maximum(maxima[0], maxima[1])
    o = torch.where(o == -math.inf, zero, o)

    def weighted(w, x):  # sum_j w_j x_j over the row, a term of weight 0 being 0 (also where x is -inf)
        return torch.where(w != 0, w * x, zero).sum(dim=-1)

    ce = cfg.hard != 0.0
    n_dots = 4 if dots else 0
    sums = torch.zeros(3 + n_dots + (2 if ce else 0), n, dtype=dtype, device=device)
    e_kept = ((s_kept - m[0].unsqueeze(-1)) / Tc).exp()
    sums[0] = e_kept.sum(dim=-1)
    e_out = None
    if width > 0:
        e_out = ((s_out - m[1].unsqueeze(-1)) / Tc).exp()
        sums[1] = e_out.sum(dim=-1)
    local_p = torch.where(in_slice, p, zero)
    z_kept = (s_kept - o.unsqueeze(-1)) / Tc
    sums[2] = weighted(local_p, log_p - z_kept)
    if dots:
        sums[3] = weighted(e_kept, z_kept)
        if width > 0:
            sums[4] = weighted(e_out, (s_out - o.unsqueeze(-1)) / Tc)
        sums[5] = weighted(local_p, z_kept)
        if run.topk_tempered:
            sums[6] = weighted(local_p, z_kept * log_p)
    del e_kept, e_out
    if ce:
        sums[3 + n_dots:] = _ce_partials(xs, o, y_local, owned)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=run.group)

    def set_lse(total, origin):
        return torch.where(total == 0, neg_inf, (origin - o) / T + total.log())

    l_kept, l_out = set_lse(sums[0], m[0]), set_lse(sums[1], m[1])
    log_z = torch.logaddexp(l_kept, l_out)
    p_counted = torch.where(p != 0, p, zero).sum(dim=-1)
    rows_loss = sums[2] + log_z * p_counted
    log_q_tail = l_out - log_z
    safe_tail = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))
    rows_loss = rows_loss + torch.where(p_tail > 0, p_tail * (safe_tail.log() - log_q_tail), zero)

    row_dots = None
    if dots:
        def share(partial, total, lse):  # sum over a set of q_j z_j (partial / total = its exp-weighted mean z)
            return torch.where(total > 0, partial / torch.where(total > 0, total, 1.0) * (lse - log_z).exp(), zero)

        out_mean = torch.where(sums[1] > 0, sums[4] / torch.where(sums[1] > 0, sums[1], 1.0), zero)
        d_s = share(sums[3], sums[0], l_kept) + share(sums[4], sums[1], l_out) - sums[5] \
            - torch.where(p_tail > 0, p_tail * out_mean, zero)
        d_t = torch.zeros_like(d_s)
        if run.topk_tempered:  # sum_k p_k log p_k (log p_k + log Z - loss) - sum_k p_k z_k log p_k
            d_t = weighted(p, log_p * (log_p + (log_z - rows_loss).unsqueeze(-1))) - sums[6]
        row_dots = (d_s, d_t)

    grad = None
    if need_grad:
        z = torch.sub(xs, o.unsqueeze(-1)).div_(Tc)
        grad = torch.sub(z, log_z.unsqueeze(-1)).exp_()  # q
        if bool((p_tail > 0).any()):  # the others: - p_tail * q_j / q_tail
            finite_out = torch.where(l_out == -math.inf, zero, l_out)
            tail = z.sub_(finite_out.unsqueeze(-1)).exp_().mul_(p_tail.unsqueeze(-1)).masked_fill_(kept, 0.0)
            grad.sub_(tail)
            del tail
        del z
        if width > 0:  # the kept entries: - p_k
            grad.index_put_((ri, col[ri, ki]), -p[ri, ki], accumulate=True)
        scale_t2 = T * T if cfg.scale else 1.0
        grad.mul_(_column(w_soft * (scale_t2 / T)))
    ce_stats = (o, sums[3 + n_dots:]) if ce else None
    return rows_loss, grad, ce_stats, row_dots


# --------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------
class _VocabParallelHead(torch.autograd.Function):
    """Scalar reductions: the forward computes the gradients with the loss (the logits exist one chunk at a
    time) and the backward scales them by the upstream gradient. Reduction "none": the forward computes the
    losses only and the backward runs the chunks again with the per-row upstream gradients as weights (a
    collective: every rank runs it). Inputs: the hidden states, the weight and bias shards, the rows'
    temperatures ``[rows]`` (or None; their gradient from the row dots). The teacher never gets a gradient; no
    double backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_temperature, run: _Run, want):
        per_row = run.cfg.reduction == "none"
        soft_rows, hard_rows, gh, gw, gb, gt = run.run(hidden, weight, bias, None,
                                                       (False,) * 4 if per_row else want)
        loss, soft_v, hard_v = run.reduce(soft_rows, hard_rows)
        ctx.run, ctx.want, ctx.per_row = run, want, per_row
        if per_row:
            ctx.save_for_backward(hidden, weight, bias)
        else:
            ctx.grads = (gh, gw, gb, gt)
        ctx.mark_non_differentiable(soft_v, hard_v)
        return loss, soft_v, hard_v

    @staticmethod
    def backward(ctx, grad_out, _soft, _hard):
        if grad_out is None:
            return None, None, None, None, None, None
        if ctx.per_row:
            hidden, weight, bias = ctx.saved_tensors
            want = tuple(w and ctx.needs_input_grad[i] for i, w in enumerate(ctx.want))
            *_, gh, gw, gb, gt = ctx.run.run(hidden, weight, bias, grad_out.reshape(-1), want)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "vocab_parallel_fused_linear_kd_loss: backward ran a second time (retain_graph=True); the "
                    "gradients were computed in the forward and are handed over once, without a copy")
            # copy-free for an upstream gradient of exactly 1 (the usual loss.backward()): the references are
            # dropped so that autograd takes the tensors as the .grad fields instead of copying them
            g = grad_out.to(ctx.run.cdtype)
            one = bool(g == 1.0)
            gh, gw, gb, gt = (None if x is None else x if one else x * g for x in ctx.grads)
            ctx.grads = None
        out = []
        for x, like in zip((gh, gw, gb, gt), ctx.run.like):
            out.append(None if x is None else x.to(like))
        return out[0], out[1], out[2], out[3], None, None
