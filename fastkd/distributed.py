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

The math, per row, with the raw logits ``x`` split into slices ``x^(r)``:

.. math::

    M = \max_r \max_{j} x^{(r)}_j \quad (\text{all-reduce MAX}), \qquad
    z_j = (x_j - M) / T, \qquad
    S = \sum_r \sum_{j} e^{z_j} \quad (\text{all-reduce SUM}), \qquad
    \log\mathrm{softmax}(x / T)_j = z_j - \log S

so each rank gets the exact log-probabilities of its own slice, ``log q`` (student) and ``log p`` (teacher).
The row maximum is subtracted *before* the scaling by ``1/T``, as the fused kernels do: ``z_j <= 0`` and
``log S`` is in ``[0, log V]``, so the log-probabilities come from well-conditioned differences even where
``|x| / T`` is huge (``|x| ~ 300``, ``T = 1e-3``: forming ``x / T - lse`` in float32 instead lost ~1e-3 of the
value and ~1e-2 of the gradient).
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

Communication per call: three all-reduces, on the logits' device (any backend: gloo, NCCL), after a MAX of 4
numbers that checks that the ranks agree on the options that change the collectives (``standardize``, whether
the temperature requires grad; a ValueError on every rank otherwise, instead of a hang):
a MAX of ``[2, rows]`` row maxima, a SUM of ``[2 * rows + 1]`` row sum-exps and shard widths (the global ``V``
for ``reduction="mean"``), a SUM of ``[2, rows]``: the partial divergences and the partial sums of
``psi_q = q dphi/dq`` (``[7, rows]`` for a temperature tensor that requires grad: also the partial sums of its
row dots), all in the compute dtype (float32, or float64 for float64 input). With ``standardize=True`` two
SUMs come first (the rows' sums with the shard widths, then the sums of squares about the mean, float64) and one
more in the backward (the standardization's gradient, :class:`_Standardize`). Logits are never gathered.

Every divergence of the registry but ``"dkd"`` runs here (``loss=`` its name, its parameters by keyword): its
spec's per-entry formula ``phi`` (fastkd/divergences.py, shared with ``fastkd.reference``) gives each entry's
term and, differentiated entry by entry, ``psi_q``; the gradient is ``psi_q(j) - q_j sum psi_q`` (the Psi form of
the kernels, kd_math.h). The statistics (maxima, sums of exponentials) are plain PyTorch; the per-entry phases
are the fused shard kernels ``torch.ops.fastkd.response_shard_terms`` / ``response_shard_grad``, the
divergence's trait of the single-device kernels in the same coordinates (csrc/include/fastkd/shard_host.h),
with the spec's formula as the fallback where the kernels are not compiled.

:func:`vocab_parallel_fused_linear_kd_loss` (fastkd/_vocab_parallel_head.py) runs the same phases per chunk of
rows of a vocabulary-sharded lm_head (the logits slices computed by a local GEMM, never whole), with the fused
cross-entropy, a top-k teacher of global indices, the softcap / logit-scale transforms and the per-row options
(``token_weights``, a tensor temperature, ``standardize``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fastkd import _ops_loader
from fastkd import _validation as v
from fastkd import divergences
from fastkd.reference import _dtypes

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_fused_linear_kd_loss", "LOSSES"]

LOSSES = v.fused_linear_losses()  # the divergences it runs (every registered one but "dkd")


def vocab_parallel_kd_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor,
    *,
    loss: str = "kl",
    beta: Optional[float] = None,
    temperature: v.Temperature = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_temperature: Optional[bool] = None,
    group: Optional[dist.ProcessGroup] = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
    **params: float,
) -> torch.Tensor:
    r"""Distillation loss of vocabulary-sharded logits: every rank of ``group`` passes its slice of the
    vocabulary and gets the loss of the full logits (concatenated along the vocabulary in rank order).

    This is a collective: every rank of ``group`` must call it, with the same rows (tokens), the same
    ``labels`` and the same arguments; only the vocabulary slice differs. The result (the same value on every
    rank) and each rank's student gradient equal, up to rounding, those of the single-process loss on the
    gathered logits ``s``, ``t``:

    * ``loss="kl"``: ``fastkd.kd_loss(s, t, temperature, labels=labels, ignore_index=ignore_index,
      reduction=reduction)`` (with ``scale_by_temperature`` passed on when given);
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
        loss: any registered divergence but ``"dkd"`` (fastkd/divergences.py): ``"kl"`` (forward KL, Hinton KD),
            ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ...; each equals :func:`fastkd.divergence_loss` on the gathered
            logits (the cases above are the named functions).
        beta: the divergence's ``beta`` (JSD mixing weight in ``[0, 1]``); None means its default (0.5 for the
            JSD); ignored by divergences without one.
        **params: the divergence's other parameters by name (e.g. ``skew=0.1``).
        temperature: softmax temperature ``T > 0``: a Python number, or a tensor, 0-dim or one per row ``[...]``
            (identical on every rank), as :func:`fastkd.kd_loss`. When it requires grad its exact gradient
            (``T^2`` included) comes from per-row sums of the same shard phases (the row dots of the single-device
            kernels, their vocabulary ranges summed in the divergence phase's all-reduce, which then carries
            ``[7, rows]`` numbers instead of ``[2, rows]``); every rank gets the full gradient of the (replicated)
            loss.
        labels: integer tensor with the rows' shape ``[...]``, identical on every rank: rows equal to
            ``ignore_index`` do not count (value 0, gradient 0).
        ignore_index: label value of ignored rows.
        reduction: ``"batchmean"`` (sum over counted rows / counted rows; 0 if none is counted), ``"sum"``,
            ``"mean"`` (sum / (counted rows * global V), as ``fastkd.kd_loss``) or ``"none"`` (one value per
            row, shape ``[...]``).
        scale_by_temperature: multiply ``"kl"`` / ``"reverse_kl"`` by ``T^2``. None (default) means the
            divergence's own default, as in :func:`fastkd.fused_linear_kd_loss`: ``T^2`` for ``"kl"`` and
            ``"reverse_kl"`` (as :func:`fastkd.kd_loss`), none for ``"jsd"`` (as :func:`fastkd.jsd_loss`); True
            with ``"jsd"`` is an error. (The default was ``False`` before.) TRL and Liger-Kernel apply no ``T^2``
            to their KL: pass ``scale_by_temperature=False`` to match them.
        group: the tensor-parallel process group whose ranks hold the vocabulary slices (default: the world).
        token_weights: optional per-row weights ``[...]``, identical on every rank, as :func:`fastkd.kd_loss`
            (each counted row's loss times its weight, the divisor unchanged, no gradient for the weights).
        standardize: logit standardization as :func:`fastkd.kd_loss` (each row of both sides becomes
            ``(z - mean(z)) / (1e-7 + std(z))``, unbiased std over the *global* vocabulary, ``V >= 2``), with the
            exact gradient through mean and std. Unlike the single-device kernels it is a separate phase: two more
            all-reduces of ``O(rows)`` numbers in the forward (the row sums, then the sums of squares about the
            mean: two passes, well conditioned) and one in the backward (the row sums of the gradient and of the
            gradient times ``z - mean``), and each rank holds the standardized copy of its two shards
            (``[..., V_r]`` in the compute dtype) while the loss runs.

    Returns:
        The loss in the promoted dtype of the inputs, computed in float32 (float64 for float64 input). The
        student's gradient has the student's dtype.

    Special values, the rules of fastkd's other losses: vocabulary entries that are ``-inf`` in both student
    and teacher (padded vocabulary, even a whole shard) contribute exactly 0 with a zero gradient; a row that is
    ``-inf`` in every entry on both sides contributes exactly 0 with a zero gradient and *is counted* by
    ``"batchmean"`` / ``"mean"`` (the divisor depends only on ``labels``, never on logit values). Where the
    teacher gives an entry probability 0 but the student does not, ``"reverse_kl"`` is ``+inf`` (and ``"kl"``
    where the reverse holds), as the mathematics says. A NaN or ``+inf`` logit on any rank in a counted row
    makes the loss NaN (on every rank); a masked row (label ``ignore_index``) is dropped whatever it holds.
    Empty input (no rows) gives 0, an empty tensor for ``"none"``.

    Raises:
        RuntimeError: ``torch.distributed`` is not available or not initialized.
        ValueError / TypeError: invalid arguments (checked before any communication, with the messages of
            fastkd's other losses).
    """
    _check_shards(student_logits_shard, teacher_logits_shard)
    v.check_choice("loss", loss, v.fused_linear_losses())
    scale_on = v.resolve_scale_by_temperature(scale_by_temperature, loss)
    t = v.check_temperature_or_tensor(temperature, student_logits_shard)
    row_t = None
    if isinstance(t, torch.Tensor):
        v.check_row_temperature_values(t)  # before any communication: every rank raises alike
        row_t, t = t.expand(student_logits_shard.shape[:-1]).reshape(-1), 1.0
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    v.check_labels(labels, student_logits_shard)
    weights = v.check_token_weights(token_weights, student_logits_shard)
    spec = divergences.get(loss)
    values = v.resolve_divergence_params(loss, beta, params, "vocab_parallel_kd_loss")
    spec.check_ranges(values)
    v.check_bool("standardize", standardize)
    _check_distributed()
    # the options that change the collectives: a rank that disagrees would hang or abort them
    t_grad = row_t is not None and row_t.requires_grad and torch.is_grad_enabled()
    _check_ranks_agree({"standardize": standardize, "temperature.requires_grad": t_grad}, student_logits_shard.device,
                       group, "vocab_parallel_kd_loss")

    keep = None if labels is None else labels.reshape(-1) != ignore_index
    out_dtype = _dtypes(student_logits_shard, teacher_logits_shard)[0]
    if standardize:
        student_logits_shard, teacher_logits_shard = _standardized_shards(student_logits_shard, teacher_logits_shard,
                                                                          keep, group)
    out = _VocabParallelKD.apply(
        student_logits_shard, teacher_logits_shard, keep, spec, dict(zip(spec.param_names, values)), t, scale_on,
        reduction, group, None if weights is None else weights.reshape(-1), row_t
    )
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------
def _check_ranks_agree(flags: dict, device: torch.device, group: Optional[dist.ProcessGroup], where: str) -> None:
    """Every rank of ``group`` has the same value of each flag (one all-reduce MAX of ``2 * len(flags)`` numbers:
    each flag and its negation); raises the same ValueError on every rank otherwise."""
    both = torch.tensor([x for f in flags.values() for x in (float(f), -float(f))], dtype=torch.float32,
                        device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    got = both.tolist()
    for i, name in enumerate(flags):
        if got[2 * i] != -got[2 * i + 1]:  # the largest value is not the smallest one
            raise ValueError(f"{where}: every rank of the group must pass the same {name}, got True on some ranks "
                             f"and False on others")


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
# In the phases below `temperature` is a float, or a [rows] tensor in the computation dtype (one per row).
Temperature = Union[float, torch.Tensor]


def _column(temperature: Temperature) -> Temperature:
    """A temperature as the divisor of ``[rows, V_r]`` logits: the float, or the per-row tensor as a column."""
    return temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature


def _op_temperature(temperature: Temperature) -> Tuple[float, Optional[torch.Tensor]]:
    """The shard ops' (temperature, row_temperature) arguments."""
    return (1.0, temperature) if isinstance(temperature, torch.Tensor) else (temperature, None)


def _global_log_normalizers(
    xs: torch.Tensor, xt: torch.Tensor, temperature: Temperature, group: Optional[dist.ProcessGroup]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For raw shards ``[rows, V_r]`` in the compute dtype: ``(shift, log_s, teacher_has_mass, vocab)`` with
    ``shift [2, rows]`` the global row maxima of the raw logits (student, teacher; 0 for a row with no finite
    maximum, so that an all ``-inf`` row stays ``-inf`` and not NaN), ``log_s [2, rows]`` the global
    ``log sum_j exp((x_j - shift) / T)`` (0 for a row with no mass), whether the teacher row has mass, and the
    global vocabulary size. Two all-reduces (:func:`_row_shift`, :func:`_row_log_sums`). The log-probabilities
    are then ``(x - shift) / T - log_s``."""
    shift = _row_shift(xs, xt, group)
    log_s, sum_exp, vocab, _ = _row_log_sums(xs, xt, shift, temperature, group)
    return shift, log_s, sum_exp[1] > 0, vocab


def _row_shift(xs: torch.Tensor, xt: torch.Tensor, group: Optional[dist.ProcessGroup],
               *more: torch.Tensor) -> torch.Tensor:
    """The statistics phase, part 1 (one all-reduce MAX of ``[2, rows]``): ``shift [2, rows]``, the global row
    maxima of the raw student and teacher logits ``[rows, V_r]``, 0 for a row with no finite maximum (an all
    ``-inf`` row stays ``-inf``, not NaN; ``+inf`` and NaN stay in the shift and make the row NaN). Each of
    ``more`` (``[rows, V_r]`` as well) adds its row maxima to the same all-reduce: ``[2 + len(more), rows]``."""
    rows, width = xs.shape
    maxima = torch.full((2 + len(more), rows), -math.inf, dtype=xs.dtype, device=xs.device)
    if width > 0:
        for i, x in enumerate((xs, xt) + more):
            maxima[i] = x.amax(dim=-1)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    return torch.where(maxima == -math.inf, torch.zeros_like(maxima), maxima)


def _row_log_sums(
    xs: torch.Tensor,
    xt: torch.Tensor,
    shift: torch.Tensor,
    temperature: Temperature,
    group: Optional[dist.ProcessGroup],
    extra: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The statistics phase, part 2 (one all-reduce SUM of ``2 * rows + 1`` numbers, plus ``extra``):
    ``(log_s, sum_exp, vocab, extra)`` with ``sum_exp [2, rows]`` the global ``sum_j exp((x_j - shift) / T)``
    (student, teacher), ``log_s`` its log (0 for a row with no mass), ``vocab`` the global vocabulary size
    (the sum of the shard widths) and ``extra`` (``[k, rows]`` per-row partial sums of the caller, e.g. the
    fused head's cross-entropy terms) summed over the group in the same all-reduce (None if not given)."""
    rows, width = xs.shape
    n_extra = 0 if extra is None else extra.numel()
    sums = torch.empty(2 * rows + 1 + n_extra, dtype=xs.dtype, device=xs.device)
    # one [rows, V_r] temporary at a time: (x - shift) / T, exponentiated in place
    sums[:rows] = torch.sub(xs, shift[0].unsqueeze(-1)).div_(_column(temperature)).exp_().sum(dim=-1)
    sums[rows : 2 * rows] = torch.sub(xt, shift[1].unsqueeze(-1)).div_(_column(temperature)).exp_().sum(dim=-1)
    sums[2 * rows] = width
    if extra is not None:
        sums[2 * rows + 1 :] = extra.reshape(-1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sum_exp, vocab = sums[: 2 * rows].reshape(2, rows), sums[2 * rows]
    log_s = torch.where(sum_exp == 0, torch.zeros_like(sum_exp), sum_exp.log())
    reduced = None if extra is None else sums[2 * rows + 1 :].reshape(extra.shape)
    return log_s, sum_exp, vocab, reduced


def _shifted(x: torch.Tensor, shift: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """``(x - shift) / T`` per row: the row maximum is subtracted before the scaling (well conditioned)."""
    return (x - shift.unsqueeze(-1)) / _column(temperature)


def _log_probs(x: torch.Tensor, shift: torch.Tensor, log_s: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    return _shifted(x, shift, temperature) - log_s.unsqueeze(-1)


def _stats(shift: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """[rows, 4] = (shift_s, shift_t, log_zs, log_zt): the rows' global statistics as the shard kernels read them."""
    return torch.stack([shift[0], shift[1], log_s[0], log_s[1]], dim=1).contiguous()


def _range_sums(spec, named, xs, xt, shift, log_s, temperature, dots: bool = False) -> torch.Tensor:
    """``[2, rows]``: this rank's sum of phi and of psi_q per row, by the fused shard kernel (the divergence's
    trait, csrc/include/fastkd/shard_host.h) when compiled, else by the spec's formula. With ``dots``
    ``[7, rows]``: also the range's parts of the temperature gradient's row dots (sum psi_p, sum log p psi_p,
    sum p log p, sum log q psi_q, sum q log q; :func:`_temperature_dots`)."""
    if _ops_loader.LOADED:
        t, row_t = _op_temperature(temperature)
        sums = torch.ops.fastkd.response_shard_terms(xs, xt, _stats(shift, log_s), spec.name, list(named.values()),
                                                     t, row_t, dots)
        return sums.t().contiguous()
    log_q = _log_probs(xs, shift[0], log_s[0], temperature)
    log_p = _log_probs(xt, shift[1], log_s[1], temperature)
    phi, psi_q = _entry_terms(spec, named, log_p, log_q)
    sums = [phi.sum(dim=-1), psi_q.sum(dim=-1)]
    if dots:
        psi_p = _entry_psi_p(spec, named, log_p, log_q)
        zero = torch.zeros((), dtype=phi.dtype, device=phi.device)

        # the kernels' psi_dot_terms: a term whose weight is 0 is 0 (also where x is -inf)
        def x_psi(x, psi):
            return torch.where(psi != 0, x * psi, zero).sum(dim=-1)

        def w_x(x):
            w = x.exp()
            return torch.where(w != 0, w * x, zero).sum(dim=-1)

        sums += [psi_p.sum(dim=-1), x_psi(log_p, psi_p), w_x(log_p), x_psi(log_q, psi_q), w_x(log_q)]
    return torch.stack(sums)


def _range_grad(spec, named, xs, xt, shift, log_s, temperature, coef, sum_psi_q) -> torch.Tensor:
    """``coef * (psi_q - q * sum_psi_q)`` over this rank's range, ``[rows, V_r]`` (fused when compiled)."""
    if _ops_loader.LOADED:
        t, row_t = _op_temperature(temperature)
        return torch.ops.fastkd.response_shard_grad(xs, xt, _stats(shift, log_s), coef.contiguous(),
                                                    sum_psi_q.contiguous(), spec.name, list(named.values()), t,
                                                    row_t)
    log_q = _log_probs(xs, shift[0], log_s[0], temperature)
    log_p = _log_probs(xt, shift[1], log_s[1], temperature)
    _, psi_q = _entry_terms(spec, named, log_p, log_q)
    return coef.unsqueeze(-1) * (psi_q - log_q.exp() * sum_psi_q.unsqueeze(-1))


def _bad_rows(shift: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """``[rows]``: rows with a NaN or ``+inf`` logit on some rank (in the shift) or a NaN normalizer: their
    value and gradient are NaN, not silently 0 (the probability-0 tests of the formulas would drop NaN
    entries)."""
    return shift.isnan().any(dim=0) | (shift == math.inf).any(dim=0) | log_s.isnan().any(dim=0)


def _divergence_rows(spec, named, xs, xt, shift, log_s, temperature, group,
                     dots: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The divergence phase (one all-reduce SUM of ``[2, rows]``): ``(per_row, sum_psi_q)``, each row's
    divergence over the whole vocabulary (NaN for :func:`_bad_rows`; no ``T^2``, no mask) and its sum of
    ``psi_q``, which :func:`_divergence_grad` needs. With ``dots`` (``[7, rows]`` all-reduced) the second is
    ``[6, rows]``: sum psi_q and the row dots' sums (:func:`_range_sums`)."""
    parts = _range_sums(spec, named, xs, xt, shift, log_s, temperature, dots)
    dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)
    nan = torch.full((), math.nan, dtype=xs.dtype, device=xs.device)
    return torch.where(_bad_rows(shift, log_s), nan, parts[0]), parts[1:] if dots else parts[1]


def _temperature_dots(sums: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(D_s, D_t)`` per row from the all-reduced ``[6, rows]`` sums of :func:`_divergence_rows` (sum psi_q,
    sum psi_p, sum log p psi_p, sum p log p, sum log q psi_q, sum q log q): the row dots of the temperature
    gradient, ``D = sum x psi - (sum psi)(sum w x)`` (csrc/include/fastkd/row_options.h, psi_row_dot)."""
    sum_psi_q, sum_psi_p, lp_psi_p, p_lp, lq_psi_q, q_lq = sums
    return lq_psi_q - sum_psi_q * q_lq, lp_psi_p - sum_psi_p * p_lp


def _divergence_grad(spec, named, xs, xt, shift, log_s, temperature, coef, sum_psi_q) -> torch.Tensor:
    """The gradient phase (local): ``coef_i * d D_i / d z_ij`` over this rank's range, ``[rows, V_r]``, with
    ``z = x / T`` the tempered student logits (``coef`` carries the ``1 / T`` of the chain rule when the
    gradient of the raw logits is wanted); NaN in :func:`_bad_rows`."""
    grad = _range_grad(spec, named, xs, xt, shift, log_s, temperature, coef, sum_psi_q)
    return grad.masked_fill_(_bad_rows(shift, log_s).unsqueeze(-1), math.nan)  # in place: a fresh tensor


def _entry_terms(spec, named, log_p: torch.Tensor, log_q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The divergence's per-entry terms ``phi`` (its spec's formula) and ``psi_q = q dphi/dq = dphi/d(log q)``,
    the student's share of the gradient through the softmax, by differentiating the formula entry by entry."""
    with torch.enable_grad():
        lq = log_q.detach().requires_grad_(True)
        phi = spec.formula(log_p.exp(), lq.exp(), log_p, lq, **named)
        (psi_q,) = torch.autograd.grad(phi.sum(), lq)
    return phi.detach(), psi_q


def _entry_psi_p(spec, named, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``psi_p = p dphi/dp = dphi/d(log p)`` entry by entry (the teacher's share, for the temperature's row dot);
    0 where the teacher has no mass."""
    with torch.enable_grad():
        lp = log_p.detach().requires_grad_(True)
        phi = spec.formula(lp.exp(), log_q.exp(), lp, log_q, **named)
        (psi_p,) = torch.autograd.grad(phi.sum(), lp)
    return torch.where(log_p == -math.inf, torch.zeros((), dtype=psi_p.dtype, device=psi_p.device), psi_p)


_STANDARDIZE_EPS = 1e-7  # torchdistill LogitStdKDLoss's eps, as the single-device kernels


def _standardized_shards(
    student: torch.Tensor, teacher: torch.Tensor, keep: Optional[torch.Tensor], group: Optional[dist.ProcessGroup]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both shards ``[..., V_r]`` standardized over the global vocabulary, ``(x - mean) / (eps + std)`` per row
    (unbiased std), in the compute dtype; the student's through :class:`_Standardize` (its exact gradient), the
    teacher's a constant (:func:`_row_standardization`: two all-reduces)."""
    _, cdtype = _dtypes(student, teacher)
    lead, width = student.shape[:-1], student.shape[-1]
    rows = math.prod(lead)
    xs = student.detach().reshape(rows, width).to(cdtype)
    xt = teacher.detach().reshape(rows, width).to(cdtype)
    mean, std, scale, vocab = _row_standardization(xs, xt, group)
    zt = _standardized(xt, mean[1], scale[1]).reshape(teacher.shape)
    zs = _Standardize.apply(student, xs, mean[0], std[0], scale[0], vocab, keep, group)
    return zs, zt


def _row_standardization(xs: torch.Tensor, xt: torch.Tensor, group: Optional[dist.ProcessGroup],
                         vocab: Optional[int] = None):
    """The row statistics of the standardization of two shards ``[rows, V_r]`` (student, teacher) over the
    global vocabulary: ``(mean, std, scale, V)``, each ``[2, rows]`` float64 (``scale = 1 / (eps + std)``,
    unbiased std). Two all-reduces SUM (float64): ``[2 * rows + 1]`` row sums and shard widths, then
    ``[2, rows]`` sums of squares about the mean (two passes: well conditioned). A row with a NaN or infinite
    logit is NaN (as single-device). Raises the same ValueError on every rank for ``V < 2``; a caller that knows
    ``V`` (checked) passes it, and no host sync reads it back."""
    rows, width = xs.shape
    sums = torch.empty(2 * rows + 1, dtype=torch.float64, device=xs.device)
    sums[:rows] = xs.sum(dim=-1, dtype=torch.float64)
    sums[rows : 2 * rows] = xt.sum(dim=-1, dtype=torch.float64)
    sums[2 * rows] = width
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if vocab is None:
        vocab = int(sums[2 * rows].item())  # the same on every rank: every rank raises alike
        v.check_standardize_classes(vocab)
    mean = (sums[: 2 * rows] / vocab).view(2, rows)
    squares = torch.stack([_centered(xs, mean[0]).square().sum(dim=-1, dtype=torch.float64),
                           _centered(xt, mean[1]).square().sum(dim=-1, dtype=torch.float64)])
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    std = (squares / (vocab - 1)).sqrt()
    return mean, std, 1.0 / (_STANDARDIZE_EPS + std), vocab


def _centered(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``x - mean`` per row of ``[rows, V_r]``, in x's dtype."""
    return x - mean.to(x.dtype).unsqueeze(-1)


def _standardized(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * scale`` per row of ``[rows, V_r]``, in x's dtype."""
    return _centered(x, mean) * scale.to(x.dtype).unsqueeze(-1)


def _standardize_grad(g: torch.Tensor, xs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      scale: torch.Tensor, vocab: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The gradient of the standardization ``z = (x - mean) * scale`` over the global vocabulary of ``vocab``
    entries, given ``g = dL/dz`` of this rank's ``[rows, V_r]`` and the row statistics (``[rows]``):
    ``dL/dx = scale (g - mean(g)) + f (x - mean)``, ``f = -scale^2 sum_j g_j (x_j - mean) / ((n - 1) std)`` (the
    term through the std; none for a constant row, std 0, where torch's autograd of std gives NaN). One
    all-reduce SUM of ``[2, rows]`` (float64): the row sums of ``g`` and of ``g (x - mean)``."""
    d = _centered(xs, mean)
    sums = torch.stack([g.sum(dim=-1, dtype=torch.float64), (g * d).sum(dim=-1, dtype=torch.float64)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    g_mean = sums[0] / vocab
    factor = torch.where(std > 0, -scale * scale * sums[1] / ((vocab - 1) * std), torch.zeros_like(std))
    cdtype = xs.dtype
    return (g - g_mean.to(cdtype).unsqueeze(-1)) * scale.to(cdtype).unsqueeze(-1) + factor.to(cdtype).unsqueeze(-1) * d


class _Standardize(torch.autograd.Function):
    """``z = (x - mean) * scale`` of the student shard given its row statistics (``scale = 1 / (eps + std)``),
    with the gradient of the standardization over the global vocabulary (:func:`_standardize_grad`, one
    all-reduce). Masked rows (``keep`` False) get exactly 0 whatever they hold."""

    @staticmethod
    def forward(ctx, student, xs, mean, std, scale, vocab: int, keep, group):
        ctx.save_for_backward(xs, mean, std, scale, keep)
        ctx.config = (student.shape, student.dtype, vocab, group)
        return _standardized(xs, mean, scale).reshape(student.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        xs, mean, std, scale, keep = ctx.saved_tensors
        shape, dtype, vocab, group = ctx.config
        grad = _standardize_grad(grad_z.reshape(xs.shape).to(xs.dtype), xs, mean, std, scale, vocab, group)
        if keep is not None:
            grad = torch.where(keep.unsqueeze(-1), grad, torch.zeros((), dtype=xs.dtype, device=grad.device))
        return (grad.reshape(shape).to(dtype),) + (None,) * 7


class _VocabParallelKD(torch.autograd.Function):
    """Forward: the three all-reduces and the loss; backward: the local student gradient (the teacher gets
    none). Inputs after the validated arguments of :func:`vocab_parallel_kd_loss`: the divergence's spec and
    parameters, ``scale_on`` whether the T^2 factor applies, ``keep`` the counted rows or None, ``row_temperature``
    one temperature per row (replacing ``temperature``; it gets a gradient) or None.

    Any divergence sum_j phi(p_j, q_j) works the same way: each rank sums phi and psi_q = q dphi/dq over its
    slice, one all-reduce gives the row's divergence and sum psi_q, and the gradient with respect to the
    tempered logits is psi_q(j) - q_j sum psi_q (the kernels' Psi family, kd_math.h). A temperature that requires
    grad adds the sums of its two row dots to that all-reduce: d L_i / d T_i = w_i (f'(T_i) D_i - f(T_i) / T_i
    (D_s + D_t)) (row_options.h, row_grad_temperature), computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        keep: Optional[torch.Tensor],
        spec,
        named: dict,
        temperature: float,
        scale_on: bool,
        reduction: str,
        group: Optional[dist.ProcessGroup],
        weights: Optional[torch.Tensor] = None,
        row_temperature: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        out_dtype, cdtype = _dtypes(student, teacher)
        lead, width = student.shape[:-1], student.shape[-1]
        rows = math.prod(lead)
        xs = student.reshape(rows, width).to(cdtype)
        xt = teacher.reshape(rows, width).to(cdtype)
        T = temperature if row_temperature is None else row_temperature.detach().to(cdtype)
        dots = row_temperature is not None and ctx.needs_input_grad[10]
        shift, log_s, _, vocab = _global_log_normalizers(xs, xt, T, group)
        zero = torch.zeros((), dtype=cdtype, device=xs.device)
        # a NaN (or +inf) logit anywhere in a row makes its normalizer NaN: the row is NaN
        divergence, sums = _divergence_rows(spec, named, xs, xt, shift, log_s, T, group, dots)
        sum_psi_q = sums[0] if dots else sums
        scale = T * T if scale_on else 1.0
        per_row = divergence * scale if scale_on else divergence
        if weights is not None:
            per_row = per_row * weights.to(cdtype)
        if keep is not None:
            per_row = torch.where(keep, per_row, zero)
        grad_t = None
        if dots:  # d(row loss) / d(row temperature), before the reduction's weight
            d_s, d_t = _temperature_dots(sums)
            df = 2.0 * T if scale_on else zero
            grad_t = df * divergence - scale / T * (d_s + d_t)
            if weights is not None:
                grad_t = grad_t * weights.to(cdtype)
            if keep is not None:
                grad_t = torch.where(keep, grad_t, zero)

        denom = None
        if reduction == "none":
            result = per_row.reshape(lead)
        elif reduction == "sum":
            result = per_row.sum()
        else:
            counted = keep.sum() if keep is not None else torch.tensor(rows, device=xs.device)
            denom = counted.clamp_min(1).to(cdtype)
            if reduction == "mean":
                denom = denom * vocab.clamp_min(1)
            result = per_row.sum() / denom

        ctx.save_for_backward(student, teacher, shift, log_s, sum_psi_q, keep, denom, weights,
                              None if row_temperature is None else T, grad_t)
        ctx.config = (spec, named, temperature, scale_on, reduction, cdtype,
                      None if row_temperature is None else row_temperature.dtype)
        return result.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        student, teacher, shift, log_s, sum_psi_q, keep, denom, weights, row_t, grad_t = ctx.saved_tensors
        spec, named, temperature, scale_on, reduction, cdtype, t_dtype = ctx.config
        width = student.shape[-1]
        rows = shift.shape[1]

        # the weight of each row in the reduced loss
        g = grad_out.to(cdtype)
        row_weight = g.reshape(rows) if reduction == "none" else (g if denom is None else g / denom).expand(rows)
        grad_temperature = None
        if grad_t is not None and ctx.needs_input_grad[10]:
            grad_temperature = (row_weight * grad_t).to(t_dtype)
        if not ctx.needs_input_grad[0]:
            return (None,) * 10 + (grad_temperature,)

        T = temperature if row_t is None else row_t
        coef = row_weight * ((T * T if scale_on else 1.0) / T)  # the T^2 factor times the chain rule's 1 / T
        if weights is not None:
            coef = coef * weights.to(cdtype)

        xs = student.reshape(rows, width).to(cdtype)
        xt = teacher.reshape(rows, width).to(cdtype)
        zero = torch.zeros((), dtype=cdtype, device=xs.device)
        grad = _divergence_grad(spec, named, xs, xt, shift, log_s, T, coef, sum_psi_q)  # NaN rows: NaN
        if keep is not None:
            grad = torch.where(keep.unsqueeze(-1), grad, zero)
        return (grad.reshape(student.shape).to(student.dtype),) + (None,) * 9 + (grad_temperature,)


# the fused linear head over a vocabulary-sharded lm_head, on the phases above (imported last: it uses them)
from fastkd._vocab_parallel_head import vocab_parallel_fused_linear_kd_loss  # noqa: E402
