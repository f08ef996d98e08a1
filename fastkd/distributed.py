r"""Vocabulary-parallel knowledge distillation for tensor-parallel (Megatron-style) training.

With a vocabulary-parallel LM head every rank of a tensor-parallel group holds the logits of the *same*
tokens (rows) but only a contiguous slice of the vocabulary: rank ``r`` holds columns
``[offset_r, offset_r + V_r)`` of the global ``[..., V]`` logits, ``V = sum_r V_r``, slices in rank order.
:func:`vocab_parallel_kd_loss` computes the distillation loss of the full (never materialized) logits from
the shards, exchanging only ``O(rows)`` numbers::

    from fastkd.distributed import vocab_parallel_kd_loss
    # on every rank of the tensor-parallel group: this rank's [B, T, V_r] slices of the vocabulary
    loss = vocab_parallel_kd_loss(student_logits_shard, teacher_logits_shard, loss="kl", temperature=2.0,
                                  labels=labels, group=tp_group)
    loss.backward()   # each rank gets the gradient of its own student slice

The math, per row, with ``z = logits / T`` split into slices ``z^(r)``:

.. math::

    M = \max_r \max_{j} z^{(r)}_j \quad (\text{all-reduce MAX}), \qquad
    S = \sum_r \sum_{j} e^{z^{(r)}_j - M} \quad (\text{all-reduce SUM}), \qquad
    \log\mathrm{softmax}(z)_j = z_j - (M + \log S)

so each rank gets the exact log-probabilities of its own slice, ``log q`` (student) and ``log p`` (teacher).
Every divergence is a sum over the vocabulary of terms that depend only on the entry and on these row-level
normalizers, so each rank sums its slice and one all-reduce SUM gives the row's divergence:

* ``"kl"``: :math:`\mathrm{KL}(p \,\|\, q) = \sum_j p_j (\log p_j - \log q_j)` (:func:`fastkd.kd_loss`);
* ``"reverse_kl"``: :math:`\mathrm{KL}(q \,\|\, p)` (:func:`fastkd.reverse_kl_loss`);
* ``"jsd"``: :math:`\beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m)`,
  :math:`m = \beta p + (1 - \beta) q` (:func:`fastkd.jsd_loss`; ``beta=0`` is ``KL(p || q)`` and ``beta=1`` is
  ``KL(q || p)``, as there).

The gradient with respect to the student logits ``s_j`` (``z = s / T``) needs only the entry and row-level
sums that the forward already has, so the backward is purely local (no communication):

.. math::

    \text{kl: } \frac{q_j - p_j}{T}, \qquad
    \text{reverse\_kl: } \frac{q_j\,(\log q_j - \log p_j - \mathrm{KL}(q \,\|\, p))}{T}, \qquad
    \text{jsd: } \frac{(1 - \beta)\, q_j\,(\log q_j - \log m_j - \mathrm{KL}(q \,\|\, m))}{T}

(times ``T^2`` with ``scale_by_temperature`` and the reduction's weight of the row). Each rank's gradient is
its slice of the gradient of the full logits.

Communication per call: three all-reduces, on the logits' device (any backend: gloo, NCCL):
a MAX of ``[2, rows]`` row maxima, a SUM of ``[2 * rows + 1]`` row sum-exps and shard widths (the global ``V``
for ``reduction="mean"``), a SUM of ``[rows]`` (``[2, rows]`` for the mixed JSD) partial divergences, all in the
compute dtype (float32, or float64 for float64 input). Logits are never gathered. The per-shard arithmetic is
plain PyTorch (no fused kernel): it allocates a few temporaries of the shard's size ``[rows, V_r]``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fastkd import _validation as v
from fastkd.reference import _dtypes, _plogp_ratio, _safe_logaddexp

__all__ = ["vocab_parallel_kd_loss", "LOSSES"]

LOSSES = ("kl", "reverse_kl", "jsd")


def vocab_parallel_kd_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor,
    *,
    loss: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_temperature: bool = False,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    r"""Distillation loss of vocabulary-sharded logits: every rank of ``group`` passes its slice of the
    vocabulary and gets the loss of the full logits (concatenated along the vocabulary in rank order).

    This is a collective: every rank of ``group`` must call it, with the same rows (tokens), the same
    ``labels`` and the same arguments; only the vocabulary slice differs. The result (the same value on every
    rank) and each rank's student gradient equal, up to rounding, those of the single-process loss on the
    gathered logits ``s``, ``t``:

    * ``loss="kl"``: ``fastkd.kd_loss(s, t, temperature, scale_by_temperature=scale_by_temperature,
      labels=labels, ignore_index=ignore_index, reduction=reduction)``;
    * ``loss="reverse_kl"``: ``fastkd.reverse_kl_loss(...)`` with the same arguments;
    * ``loss="jsd"``: ``fastkd.jsd_loss(s, t, beta=beta, temperature=temperature, labels=labels,
      ignore_index=ignore_index, reduction=reduction)``, except that ``"batchmean"`` always divides by the
      counted rows (all flattened leading dimensions without labels): ``jsd_loss``'s TRL convention of
      dividing ``[B, T, V]`` input by ``B`` is not reproduced. No ``T^2`` factor.

    Args:
        student_logits_shard: this rank's slice ``[..., V_r]`` of the student logits (float32, float16,
            bfloat16 or float64); the leading dimensions are the rows. Slices may have different widths on
            different ranks, ``V_r = 0`` included (the global vocabulary ``V = sum_r V_r`` should not be empty:
            with no entry at all every row counts as all ``-inf`` and gives 0).
        teacher_logits_shard: the teacher's slice, same shape and device as the student's (its dtype may
            differ). The teacher is a constant: it never receives a gradient (``.grad`` stays None even if it
            requires grad).
        loss: ``"kl"`` (forward KL, Hinton KD), ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixing weight in ``[0, 1]`` (``loss="jsd"`` only; ignored otherwise).
        temperature: softmax temperature ``T > 0``.
        labels: integer tensor with the rows' shape ``[...]``, identical on every rank: rows equal to
            ``ignore_index`` do not count (value 0, gradient 0).
        ignore_index: label value of ignored rows.
        reduction: ``"batchmean"`` (sum over counted rows / counted rows; 0 if none is counted), ``"sum"``,
            ``"mean"`` (sum / (counted rows * global V), as ``fastkd.kd_loss``) or ``"none"`` (one value per
            row, shape ``[...]``).
        scale_by_temperature: multiply ``"kl"`` / ``"reverse_kl"`` by ``T^2`` (Hinton's convention; note the
            default here is ``False``, the bare divergence). An error with ``loss="jsd"``, which has no ``T^2``.
        group: the tensor-parallel process group whose ranks hold the vocabulary slices (default: the world).

    Returns:
        The loss in the promoted dtype of the inputs, computed in float32 (float64 for float64 input). The
        student's gradient has the student's dtype.

    Vocabulary entries that are ``-inf`` in both student and teacher (padded vocabulary, even a whole shard)
    contribute exactly 0 with a zero gradient; a row that is ``-inf`` everywhere in both gives 0 and a zero
    gradient. Where the teacher gives an entry probability 0 but the student does not, ``"reverse_kl"`` is
    ``+inf`` (and ``"kl"`` where the reverse holds), as the mathematics says. A NaN or ``+inf`` logit on any
    rank makes its row NaN (on every rank), as in fastkd's other losses.

    Raises:
        RuntimeError: ``torch.distributed`` is not available or not initialized.
        ValueError / TypeError: invalid arguments (checked before any communication, with the messages of
            fastkd's other losses).
    """
    _check_shards(student_logits_shard, teacher_logits_shard)
    v.check_choice("loss", loss, LOSSES)
    t = v.check_temperature(temperature)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    v.check_labels(labels, student_logits_shard)
    b = 0.0
    if loss == "jsd":
        b = v.check_beta_unit(beta)
        if scale_by_temperature:
            raise ValueError(
                "scale_by_temperature applies to loss='kl' and loss='reverse_kl' only: the JSD has no T^2 "
                "factor (as fastkd.jsd_loss)"
            )
    _check_distributed()

    # beta = 0 / 1 are the forward / reverse KL (TRL's special cases), computed as such
    divergence = loss
    if loss == "jsd" and b in (0.0, 1.0):
        divergence = "kl" if b == 0.0 else "reverse_kl"
    scale = t * t if scale_by_temperature else 1.0
    keep = None if labels is None else labels.reshape(-1) != ignore_index
    return _VocabParallelKD.apply(
        student_logits_shard, teacher_logits_shard, keep, divergence, b, t, scale, reduction, group
    )


# --------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------
def _check_shards(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Float tensors of the same shape ``[..., V_r]`` on the same device; ``V_r = 0`` is allowed."""
    v._check_logits_tensor(student, "student_logits_shard")
    v._check_logits_tensor(teacher, "teacher_logits_shard")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits_shard must have the student shard's shape {tuple(student.shape)} (both hold the "
            f"same rows and the same vocabulary slice), got {tuple(teacher.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(
            f"teacher_logits_shard must be on the student shard's device {student.device}, got {teacher.device}"
        )


def _check_distributed() -> None:
    if not dist.is_available():
        raise RuntimeError(
            "vocab_parallel_kd_loss needs torch.distributed, which this PyTorch build does not include"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "vocab_parallel_kd_loss needs an initialized default process group: call "
            "torch.distributed.init_process_group(...) first; every rank of `group` passes its vocabulary slice "
            "(for logits that are not sharded, use fastkd.kd_loss / reverse_kl_loss / jsd_loss)"
        )


# --------------------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------------------
def _global_log_normalizers(
    zs: torch.Tensor, zt: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tempered shards ``[rows, V_r]``: the global log-sum-exps of each row (student, teacher; 0 instead of
    -inf for a row with no mass anywhere, so that ``z - lse`` is -inf there, not NaN), whether the teacher row
    has mass, and the global vocabulary size. Two all-reduces."""
    rows, width = zs.shape
    neg_inf = torch.full((), -math.inf, dtype=zs.dtype, device=zs.device)
    maxima = neg_inf.expand(2, rows).clone()
    if width > 0:
        maxima[0] = zs.amax(dim=-1)
        maxima[1] = zt.amax(dim=-1)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(maxima == -math.inf, torch.zeros_like(maxima), maxima)  # empty row: exp(-inf - 0) = 0

    sums = torch.empty(2 * rows + 1, dtype=zs.dtype, device=zs.device)
    sums[:rows] = (zs - shift[0].unsqueeze(-1)).exp().sum(dim=-1)
    sums[rows : 2 * rows] = (zt - shift[1].unsqueeze(-1)).exp().sum(dim=-1)
    sums[2 * rows] = width
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sum_exp, vocab = sums[: 2 * rows].reshape(2, rows), sums[2 * rows]

    lse = torch.where(sum_exp == 0, torch.zeros_like(sum_exp), shift + sum_exp.log())
    return lse[0], lse[1], sum_exp[1] > 0, vocab


def _log_m(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log of the mixture ``beta * p + (1 - beta) * q`` (0 < beta < 1); -inf where both are 0."""
    return _safe_logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


class _VocabParallelKD(torch.autograd.Function):
    """Forward: the three all-reduces and the loss; backward: the local student gradient (the teacher gets
    none). Inputs after the validated arguments of :func:`vocab_parallel_kd_loss`; ``divergence`` is "kl",
    "reverse_kl" or "jsd" (0 < beta < 1), ``scale`` the T^2 factor or 1, ``keep`` the counted rows or None."""

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: Optional[torch.Tensor],
        divergence: str,
        beta: float,
        temperature: float,
        scale: float,
        reduction: str,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        out_dtype, cdtype = _dtypes(student, teacher)
        lead, width = student.shape[:-1], student.shape[-1]
        rows = math.prod(lead)
        zs = student.reshape(rows, width).to(cdtype) / temperature
        zt = teacher.reshape(rows, width).to(cdtype) / temperature
        lse_s, lse_t, teacher_has_mass, vocab = _global_log_normalizers(zs, zt, group)
        log_q = zs - lse_s.unsqueeze(-1)
        log_p = zt - lse_t.unsqueeze(-1)
        q, p = log_q.exp(), log_p.exp()
        zero = torch.zeros((), dtype=cdtype, device=q.device)
        nan = torch.full((), math.nan, dtype=cdtype, device=q.device)

        if divergence == "kl":
            parts = _plogp_ratio(p, log_p, log_q).sum(dim=-1)
        elif divergence == "reverse_kl":
            parts = _plogp_ratio(q, log_q, log_p).sum(dim=-1)
        else:
            log_m = _log_m(log_p, log_q, beta)
            parts = torch.stack(
                [_plogp_ratio(p, log_p, log_m).sum(dim=-1), _plogp_ratio(q, log_q, log_m).sum(dim=-1)]
            )
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)

        if divergence == "jsd":
            per_row = beta * parts[0] + (1.0 - beta) * parts[1]
            row_stat = parts[1]  # KL(q || m), for the gradient
        else:
            per_row = parts
            # kl: the gradient is q * sum(p) - p, where sum(p) is 1 if the teacher row has mass, else 0
            row_stat = teacher_has_mass.to(cdtype) if divergence == "kl" else parts  # reverse_kl: KL(q || p)
        if scale != 1.0:
            per_row = per_row * scale
        # a NaN (or +inf) logit anywhere in a row makes its normalizer NaN: the row is NaN, not silently 0 (the
        # probability-0 test of _plogp_ratio would drop NaN entries)
        per_row = torch.where(lse_s.isnan() | lse_t.isnan(), nan, per_row)
        if keep is not None:
            per_row = torch.where(keep, per_row, zero)

        denom = None
        if reduction == "none":
            result = per_row.reshape(lead)
        elif reduction == "sum":
            result = per_row.sum()
        else:
            counted = keep.sum() if keep is not None else torch.tensor(rows, device=q.device)
            denom = counted.clamp_min(1).to(cdtype)
            if reduction == "mean":
                denom = denom * vocab.clamp_min(1)
            result = per_row.sum() / denom

        ctx.save_for_backward(student, teacher, lse_s, lse_t, row_stat, keep, denom)
        ctx.config = (divergence, beta, temperature, scale, reduction, cdtype)
        return result.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        nothing = (None,) * 8
        if not ctx.needs_input_grad[0]:
            return (None,) + nothing
        student, teacher, lse_s, lse_t, row_stat, keep, denom = ctx.saved_tensors
        divergence, beta, temperature, scale, reduction, cdtype = ctx.config
        width = student.shape[-1]
        rows = lse_s.shape[0]

        # the weight of each row in the reduced loss, times the chain rule's factor of the tempered logits
        g = grad_out.to(cdtype)
        coef = g.reshape(rows) if reduction == "none" else (g if denom is None else g / denom).expand(rows)
        factor = scale / temperature * (1.0 - beta if divergence == "jsd" else 1.0)
        coef = coef * factor

        log_q = student.reshape(rows, width).to(cdtype) / temperature - lse_s.unsqueeze(-1)
        log_p = teacher.reshape(rows, width).to(cdtype) / temperature - lse_t.unsqueeze(-1)
        q = log_q.exp()
        zero = torch.zeros((), dtype=cdtype, device=q.device)
        nan = torch.full((), math.nan, dtype=cdtype, device=q.device)
        if divergence == "kl":
            local = q * row_stat.unsqueeze(-1) - log_p.exp()
        else:
            log_r = log_p if divergence == "reverse_kl" else _log_m(log_p, log_q, beta)
            pos = q > 0  # q_j = 0 contributes exactly 0; both branches finite there
            diff = torch.where(pos, log_q, zero) - torch.where(pos, log_r, zero) - row_stat.unsqueeze(-1)
            local = torch.where(pos, q * diff, zero)
        grad = coef.unsqueeze(-1) * local
        grad = torch.where((lse_s.isnan() | lse_t.isnan()).unsqueeze(-1), nan, grad)  # NaN rows: NaN, not 0
        if keep is not None:
            grad = torch.where(keep.unsqueeze(-1), grad, zero)
        return (grad.reshape(student.shape).to(student.dtype),) + nothing
