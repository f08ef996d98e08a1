"""fastkd's losses in torchdistill's loss registry: switch a torchdistill config to fastkd by changing its ``key``.

Importing this module registers the losses below as torchdistill middle-level losses
(``torchdistill.losses.registry.register_mid_level_loss``), so that torchdistill's own factories
(``get_mid_level_loss``, and through it ``get_high_level_loss`` / ``WeightedSumLoss`` sub-terms, i.e. every
``criterion:`` of a training config) build them. Each takes torchdistill's constructor arguments (the module
paths and io keys, and the loss's hyperparameters with torchdistill's names and defaults) and its call
convention ``forward(student_io_dict, teacher_io_dict, targets=None, *args, **kwargs)``; the value and the
gradients equal those of torchdistill's class built from the same ``kwargs`` (the tests compare them).

=========================  ===========================================================  =======================
key                        fastkd                                                       torchdistill class
=========================  ===========================================================  =======================
``fastkd.KDLoss``          :func:`fastkd.kd_loss` (CE + KD mixed in the same pass)      ``KDLoss``
``fastkd.LogitStdKDLoss``  :func:`fastkd.kd_loss` on the standardized logits            ``LogitStdKDLoss``
``fastkd.DISTLoss``        :func:`fastkd.dist_loss` (``[N, C]`` logits)                 ``DISTLoss``
``fastkd.RKDLoss``         :func:`fastkd.rkd_loss`                                      ``RKDLoss``
``fastkd.SPKDLoss``        :func:`fastkd.sp_loss` with ``normalize="l1"`` (not fused)   ``SPKDLoss``
``fastkd.PKTLoss``         :func:`fastkd.pkt_loss`                                      ``PKTLoss``
``fastkd.CCKDLoss``        :func:`fastkd.cc_loss`                                       ``CCKDLoss``
``fastkd.ATLoss``          :func:`fastkd.at_loss` (``mode`` 'code' and 'paper')         ``ATLoss``
=========================  ===========================================================  =======================

The keys carry a ``fastkd.`` prefix: torchdistill registers its classes under their ``__name__``, which cannot
contain a dot, so they cannot collide with torchdistill's keys (or with ``torch.nn`` losses). A torchdistill
YAML config needs the import (torchdistill's example scripts import a config's ``dependencies``) and the key::

    dependencies:
      - name: 'fastkd.integrations.torchdistill'
    ...
        criterion:
          key: 'fastkd.KDLoss'          # was: 'KDLoss'; kwargs unchanged
          kwargs:
            student_module_path: '.'
            student_module_io: 'output'
            teacher_module_path: '.'
            teacher_module_io: 'output'
            temperature: 4.0
            alpha: 0.5
            reduction: 'batchmean'

:func:`register` (run at import) is idempotent; it raises if one of the keys is already taken by something
that is not this module's class. :data:`LOSSES` maps each key to its class.

torchdistill's losses fastkd does not register: ``FTLoss``, ``FSPLoss``, ``VIDLoss``, ``CRDLoss`` and the rest (fastkd has no kernel for them). torchdistill 1.1.5 has no DKD or NST loss, and its FitNet configs use
``torch.nn.MSELoss`` through ``SimpleLossWrapper`` (fastkd's :func:`fastkd.hint_loss` is ``F.mse_loss`` too: nothing
to gain).

Where these differ from torchdistill (only where torchdistill raises, returns NaN, or where fastkd cannot
reproduce a reduction; each class says which applies):

* ``reduction="none"`` is refused (ValueError): torchdistill returns per-element tensors (``KDLoss`` soft-only,
  ``RKDLoss``) that fastkd's row- and batch-level kernels do not produce.
* Weights and hyperparameters fastkd's losses reject (negative RKD factors, ``max_p < 1``, ``eps <= 0``, ...)
  raise ValueError at construction; torchdistill would compute with them.
* Configs torchdistill crashes on are accepted where the meaning is clear: ``KDLoss`` with ``alpha`` and
  ``beta`` both None (torchdistill: ``TypeError`` from ``1 - None``) is the soft-only loss; an RKD factor of
  None (torchdistill: ``TypeError`` from ``None * 0``) is 0.
* The relation losses' own deviations (documented in :mod:`fastkd.relation_functional`): a batch of one or zero
  samples gives 0 for RKD (torchdistill: NaN), a zero student row gets a finite PKT gradient (torchdistill:
  NaN).
* ``DISTLoss`` takes ``[N, C]`` logits only (ValueError for more dims, where torchdistill's intra-class term
  correlates each class and position across the batch); an empty batch gives 0 (torchdistill: NaN).

Requires torchdistill >= 1.0 (the ``integrations`` extra: ``pip install "fastkd[integrations]"``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import nn

try:
    from torchdistill.losses import registry as _registry
except ImportError as _error:  # pragma: no cover - exercised by a test that hides torchdistill
    raise ImportError(
        "fastkd.integrations.torchdistill needs torchdistill (>= 1.0), which is not installed: "
        "pip install \"fastkd[integrations]\" (or pip install torchdistill)"
    ) from _error
if not hasattr(_registry, "register_mid_level_loss") or not hasattr(_registry, "MIDDLE_LEVEL_LOSS_DICT"):
    raise ImportError(  # pragma: no cover - torchdistill 0.x
        "fastkd.integrations.torchdistill needs torchdistill >= 1.0 (its registry has no register_mid_level_loss): "
        "pip install -U \"fastkd[integrations]\""
    )

from fastkd import _validation as v
from fastkd import dist as _dist
from fastkd import functional as _fn

__all__ = [
    "KDLoss",
    "LogitStdKDLoss",
    "DISTLoss",
    "RKDLoss",
    "SPKDLoss",
    "PKTLoss",
    "CCKDLoss",
    "ATLoss",
    "LOSSES",
    "register",
    "readme_table",
]

_MARK = "_fastkd_torchdistill_key"


def _io(io_dict: Mapping[str, Any], path: str, io: str, side: str) -> torch.Tensor:
    """``io_dict[path][io]`` with a message naming what is missing (torchdistill: a bare KeyError)."""
    try:
        entry = io_dict[path]
    except KeyError:
        raise KeyError(f"{side}_io_dict has no module path {path!r} (it has {list(io_dict)}): the forward hooks of "
                       "torchdistill record only the paths a config names") from None
    try:
        return entry[io]
    except KeyError:
        raise KeyError(f"{side}_io_dict[{path!r}] has no {io!r} (it has {list(entry)})") from None


def _real_or_none(name: str, value) -> Optional[float]:
    return None if value is None else v.check_real(name, value)


def _nonneg_or_none(name: str, value) -> float:
    """An RKD factor: None (torchdistill: the term is skipped) counts as 0."""
    return 0.0 if value is None else v.check_nonneg_weight(name, value)


def _check_reduction(reduction, choices: Tuple[str, ...], why: str) -> str:
    if reduction == "none":
        raise ValueError(f"reduction='none' is not supported by fastkd's torchdistill losses ({why}); "
                         f"use one of {choices}")
    return v.check_choice("reduction", reduction, choices)


# ---- response-based: KDLoss, LogitStdKDLoss --------------------------------------------------------------
def _classes_last(x: torch.Tensor, name: str) -> torch.Tensor:
    """torchdistill's softmaxes run over dim 1: move that dim last, where fastkd's response losses keep it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [N, C, ...] (torchdistill's softmax runs over dim 1), got shape "
                         f"{tuple(x.shape)}")
    return x if x.dim() == 2 else x.movedim(1, -1)


class _KDBase(nn.Module):
    """What KDLoss and LogitStdKDLoss share: torchdistill's constructor, the cross-entropy module it builds and
    the soft term ``KLDivLoss(reduction)(log_softmax(s / T, 1), softmax(t / T, 1))`` (no ``T^2``), fused."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, temperature: float, alpha: Optional[float], beta: Optional[float],
                 reduction: str, ce_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.temperature = v.check_temperature(temperature)
        self.alpha = _real_or_none("alpha", alpha)
        beta = _real_or_none("beta", beta)
        # torchdistill: beta = 1 - alpha if beta is None (a TypeError when alpha is None too; here beta stays None
        # then and is never used: with alpha None the loss is the soft term alone)
        self.beta = (None if self.alpha is None else 1.0 - self.alpha) if beta is None else beta
        self.reduction = _check_reduction(reduction, ("batchmean", "sum", "mean"),
                                          "torchdistill's soft-only branch returns the per-element KL")
        cel_reduction = "mean" if reduction == "batchmean" else reduction
        # built exactly as torchdistill builds it (its kwargs go to the cross-entropy): same errors, same options
        self.cross_entropy_loss = nn.CrossEntropyLoss(reduction=cel_reduction, **ce_kwargs)
        self._cel_reduction = cel_reduction

    def _logits(self, student_io_dict, teacher_io_dict) -> Tuple[torch.Tensor, torch.Tensor]:
        s = _io(student_io_dict, self.student_module_path, self.student_module_io, "student")
        t = _io(teacher_io_dict, self.teacher_module_path, self.teacher_module_io, "teacher")
        return s, t

    def _mixed(self, targets) -> bool:
        return not (self.alpha is None or self.alpha == 0 or targets is None)

    def _soft(self, s: torch.Tensor, t: torch.Tensor, standardize_eps: Optional[float] = None) -> torch.Tensor:
        """The fused bare KL, reduced as torchdistill's KLDivLoss over ``[N, C, ...]`` (batchmean: / N); with
        ``standardize_eps``, of the standardized logits (fused: the kernel standardizes each row)."""
        rows_s, rows_t = _classes_last(s, "student logits"), _classes_last(t, "teacher logits")
        n = None
        if self.reduction == "batchmean" and s.dim() > 2 and s.shape[0] > 0:
            n = s.shape[0]  # KLDivLoss's batchmean divides by input.size(0), not by the N * H * W rows
        if standardize_eps is None:
            return _fn.kd_loss(rows_s, rows_t, self.temperature, reduction=self.reduction, scale_by_temperature=False,
                               num_items_in_batch=n)
        v.check_logits(rows_s, rows_t)
        v.check_standardize(True, rows_s, standardize_eps)
        if not _fn._use_kernels():  # the plain-PyTorch path: the same formula
            return _fn.reference.kd_loss(_fn.reference.standardized(rows_s, standardize_eps),
                                         _fn.reference.standardized(rows_t, standardize_eps), self.temperature,
                                         reduction=self.reduction, scale_by_temperature=False, num_items_in_batch=n)
        return _fn._response(rows_s, rows_t, None, n, "kl", self.temperature, reduction=self.reduction,
                             standardize=True, eps=standardize_eps)[0]

    def _compose(self, soft: torch.Tensor, ce_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = self.cross_entropy_loss(ce_logits, targets)
        return self.alpha * hard + self.beta * (self.temperature ** 2) * soft

    def extra_repr(self) -> str:
        return (f"student={self.student_module_path!r}/{self.student_module_io!r}, "
                f"teacher={self.teacher_module_path!r}/{self.teacher_module_io!r}, temperature={self.temperature}, "
                f"alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}")


class KDLoss(_KDBase):
    r"""torchdistill's ``KDLoss`` (key ``"fastkd.KDLoss"``), fused:

    * ``alpha`` None or 0, or no ``targets``: the bare ``KL(softmax(t/T) || softmax(s/T))`` **without** ``T^2``,
      reduced as ``nn.KLDivLoss(reduction)`` over the class dim 1 (``"batchmean"``: / N, ``"mean"``: / numel,
      ``"sum"``).
    * otherwise ``alpha * CrossEntropyLoss(s, targets) + beta * T^2 * KL`` (``beta = 1 - alpha`` unless given;
      the cross-entropy with ``reduction="mean"`` for ``"batchmean"`` and torchdistill's extra ``kwargs``).

    That is torchdistill's ``T^2`` quirk, kept: ``T^2`` only in the mixed branch.

    Args:
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: where the logits are
            in the io dicts (``io_dict[path][io]``), as torchdistill.
        temperature: ``T > 0``.
        alpha: weight of the cross-entropy (None: the soft term only).
        beta: weight of the KD term; default ``1 - alpha``.
        reduction: ``"batchmean"`` (default), ``"sum"`` or ``"mean"`` (``"none"``: ValueError, see below).
        **kwargs: passed to ``nn.CrossEntropyLoss`` as torchdistill does (``ignore_index``, ``label_smoothing``,
            ``weight``, ...).

    The mixed branch runs in one fused pass (:func:`fastkd.kd_loss` with ``labels``) for ``[N, C]`` logits with
    ``int64`` class targets ``[N]``, ``alpha, beta >= 0``, no class ``weight``, no label smoothing and no target
    equal to ``ignore_index`` (checked on the tensor: one device synchronization). Otherwise the soft term is
    fused and the cross-entropy is torchdistill's ``nn.CrossEntropyLoss`` (exact in every case: e.g. an ignored
    target drops out of the cross-entropy but, as in torchdistill, its row still counts in the KL).

    Differences: ``reduction="none"`` raises (torchdistill: the per-element KL in the soft branch); ``alpha``
    and ``beta`` both None is the soft-only loss (torchdistill: TypeError at construction). Logits with
    more than 2 dims (``[N, C, H, W]``): classes on dim 1, as torchdistill.
    """

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, temperature: float, alpha: Optional[float] = None,
                 beta: Optional[float] = None, reduction: str = "batchmean", **kwargs) -> None:
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io,
                         temperature, alpha, beta, reduction, kwargs)

    def _fusable(self, s: torch.Tensor, targets) -> bool:
        ce = self.cross_entropy_loss
        return (
            s.dim() == 2
            and isinstance(targets, torch.Tensor)
            and targets.dtype == torch.int64
            and targets.shape == s.shape[:1]
            and ce.weight is None
            and ce.label_smoothing == 0.0
            and ce.reduction == self._cel_reduction  # the deprecated size_average / reduce may change it
            and self.alpha >= 0.0
            and self.beta >= 0.0
            and not bool((targets == ce.ignore_index).any())
        )

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs) -> torch.Tensor:
        s, t = self._logits(student_io_dict, teacher_io_dict)
        if not self._mixed(targets):
            return self._soft(s, t)
        if self._fusable(s, targets):
            return _fn.kd_loss(s, t, self.temperature, reduction=self.reduction, labels=targets,
                               ignore_index=self.cross_entropy_loss.ignore_index, scale_by_temperature=True,
                               alpha=self.alpha, beta=self.beta)
        return self._compose(self._soft(s, t), s, targets)


class LogitStdKDLoss(_KDBase):
    r"""torchdistill's ``LogitStdKDLoss`` (key ``"fastkd.LogitStdKDLoss"``; Sun et al., CVPR 2024): ``KDLoss`` on
    standardized logits ``z -> (z - mean(z)) / (eps + std(z))`` (over the last dim, unbiased ``std``, both
    sides), the fused KL at temperature ``T``; the mixed branch adds ``alpha * CrossEntropyLoss`` of the **raw**
    student logits and multiplies the KL by ``beta * T^2``, as torchdistill.

    Arguments as :class:`KDLoss`, plus ``eps`` (default 1e-7). For ``[N, C]`` logits the standardization and
    the KL are fused (:func:`fastkd.kd_loss` with ``standardize=True``: the kernel standardizes each row in its
    sweeps, with the exact gradient, no standardized copy); for ``[N, C, ...]`` torchdistill standardizes over the
    last dim but softmaxes over dim 1, so the standardization is then a plain-PyTorch composition before the fused
    KL. The cross-entropy (on the raw logits) is ``nn.CrossEntropyLoss``.
    Differences as :class:`KDLoss`.
    """

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, temperature: float, eps: float = 1e-7, alpha: Optional[float] = None,
                 beta: Optional[float] = None, reduction: str = "batchmean", **kwargs) -> None:
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io,
                         temperature, alpha, beta, reduction, kwargs)
        self.eps = v.check_real("eps", eps, 0.0)

    def standardize(self, logits: torch.Tensor) -> torch.Tensor:
        """torchdistill's method (the fused forward does not call it)."""
        return _fn.reference.standardized(logits, self.eps)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs) -> torch.Tensor:
        s, t = self._logits(student_io_dict, teacher_io_dict)
        if s.dim() > 2:  # torchdistill standardizes over the last dim but softmaxes over dim 1: two axes
            soft = self._soft(self.standardize(s), self.standardize(t))
        else:
            soft = self._soft(s, t, standardize_eps=self.eps)
        if not self._mixed(targets):
            return soft
        return self._compose(soft, s, targets)


class DISTLoss(nn.Module):
    r"""torchdistill's ``DISTLoss`` (key ``"fastkd.DISTLoss"``; Huang et al., NeurIPS 2022), fused:
    :func:`fastkd.dist_loss` of ``io_dict[path][io]`` on each side, ``tau^2 * (beta * inter + gamma * intra)``
    with ``inter = 1 - mean_rows pearson(y_s, y_t)``, ``intra`` the same over the classes (each class across the
    batch), ``y = softmax(z / tau, dim=1)``; the cosine's ``eps`` applied as ``F.cosine_similarity`` applies it.

    Args:
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: where the logits are
            in the io dicts (``io_dict[path][io]``), as torchdistill.
        beta: weight of the inter-class term, finite >= 0 (default 1.0).
        gamma: weight of the intra-class term, finite >= 0 (default 1.0).
        tau: softmax temperature > 0 (default 1.0).
        eps: the cosine similarity's lower bound on each norm, finite >= 0 (default 1e-8).
        **kwargs: ignored, as torchdistill ignores them.

    The teacher gets a gradient iff it requires grad, as in torchdistill (it does not detach it). Differences:
    logits must be ``[N, C]`` (ValueError otherwise: for ``[N, C, H, W]`` torchdistill's intra-class term
    correlates each ``(class, position)`` across the batch, which fastkd's kernel does not compute); negative
    ``beta`` / ``gamma``, ``tau <= 0`` or ``eps < 0`` raise at construction; N = 0 gives 0 (torchdistill: NaN).
    """

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, eps: float = 1e-8,
                 **kwargs) -> None:
        super().__init__()
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.beta = v.check_nonneg_weight("beta", beta)
        self.gamma = v.check_nonneg_weight("gamma", gamma)
        self.tau = v.check_temperature(tau, "tau")
        self.eps = v.check_real("eps", eps, 0.0)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        s = _io(student_io_dict, self.student_module_path, self.student_module_io, "student")
        t = _io(teacher_io_dict, self.teacher_module_path, self.teacher_module_io, "teacher")
        return _dist.dist_loss(s, t, self.beta, self.gamma, self.tau, self.eps)

    def extra_repr(self) -> str:
        return (f"student={self.student_module_path!r}/{self.student_module_io!r}, "
                f"teacher={self.teacher_module_path!r}/{self.teacher_module_io!r}, beta={self.beta}, "
                f"gamma={self.gamma}, tau={self.tau}, eps={self.eps}")


# ---- relation-based: RKD, SP, PKT, CC --------------------------------------------------------------------
class RKDLoss(nn.Module):
    r"""torchdistill's ``RKDLoss`` (key ``"fastkd.RKDLoss"``), fused: ``dist_factor * SmoothL1(distances) +
    angle_factor * SmoothL1(angles)`` over ``io_dict[path]["output"].flatten(1)``, teacher without gradient.

    Args:
        student_output_path, teacher_output_path: module paths (their ``"output"``), as torchdistill.
        dist_factor, angle_factor: finite weights >= 0 (None: 0, as torchdistill skips the term; it then fails on
            ``None * 0``). A weight of 0 skips its term.
        reduction: the ``nn.SmoothL1Loss`` reduction: ``"mean"`` (torchdistill's configs) or ``"sum"`` (the mean
            times N^2 for distances and N^3 for angles, one fused call with the weights scaled so).

    One call of :func:`fastkd.rkd_loss`. Differences: ``reduction="none"`` raises (torchdistill's terms would
    have shapes ``[N, N]`` and ``[N^3]``); negative factors raise; N < 2 gives 0 (torchdistill: NaN).
    """

    def __init__(self, student_output_path: str, teacher_output_path: str, dist_factor: Optional[float],
                 angle_factor: Optional[float], reduction: str, **kwargs) -> None:
        super().__init__()
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        self.dist_factor = _nonneg_or_none("dist_factor", dist_factor)
        self.angle_factor = _nonneg_or_none("angle_factor", angle_factor)
        self.reduction = _check_reduction(reduction, ("mean", "sum"), "torchdistill's terms would be per-entry")

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        f_s = _io(student_io_dict, self.student_output_path, "output", "student")
        f_t = _io(teacher_io_dict, self.teacher_output_path, "output", "teacher")
        wd, wa = self.dist_factor, self.angle_factor
        if self.reduction == "sum":
            n = float(f_s.shape[0]) if isinstance(f_s, torch.Tensor) and f_s.dim() > 0 else 0.0
            wd, wa = wd * n * n, wa * n * n * n
        return _fn.rkd_loss(f_s, f_t, wd, wa)

    def extra_repr(self) -> str:
        return (f"student_output_path={self.student_output_path!r}, teacher_output_path={self.teacher_output_path!r}, "
                f"dist_factor={self.dist_factor}, angle_factor={self.angle_factor}, reduction={self.reduction!r}")


class SPKDLoss(nn.Module):
    r"""torchdistill's ``SPKDLoss`` (key ``"fastkd.SPKDLoss"``): ``G = F.normalize(F F^T, 1)`` per side, i.e. the
    rows **L1**-normalized (``F.normalize``'s second positional argument is ``p``; RepDistiller and mdistiller
    L2-normalize), ``||G_t - G_s||_F^2``, divided by N^2 for ``reduction="batchmean"`` and not divided for any
    other reduction, over ``io_dict[path]["output"]``.

    :func:`fastkd.sp_loss` with ``normalize="l1"``: exact in value and gradient, but **not fused** (fastkd's SP
    kernel implements the L2 normalization only; the L1 one runs as a plain-PyTorch composition): no speed-up
    over torchdistill's class. The teacher gets a gradient iff it requires grad, as in torchdistill.
    """

    def __init__(self, student_output_path: str, teacher_output_path: str, reduction: str, **kwargs) -> None:
        super().__init__()
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
        self.reduction = reduction  # torchdistill: "batchmean" divides by N^2, anything else does not

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        f_s = _io(student_io_dict, self.student_output_path, "output", "student")
        f_t = _io(teacher_io_dict, self.teacher_output_path, "output", "teacher")
        reduction = "batchmean" if self.reduction == "batchmean" else "sum"
        return _fn.sp_loss(f_s, f_t, reduction=reduction, normalize="l1")

    def extra_repr(self) -> str:
        return (f"student_output_path={self.student_output_path!r}, teacher_output_path={self.teacher_output_path!r}, "
                f"reduction={self.reduction!r}")


class PKTLoss(nn.Module):
    r"""torchdistill's ``PKTLoss`` (key ``"fastkd.PKTLoss"``), fused: :func:`fastkd.pkt_loss` of
    ``io_dict[path][io]`` on each side.

    Args:
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: as torchdistill.
        eps: finite, > 0 (default 1e-7).

    The teacher gets a gradient iff it requires grad, as in torchdistill. Differences: features ``[N, ...]``
    with more than 2 dims are flattened per sample (torchdistill's ``torch.mm`` needs ``[N, D]``); a zero
    student row gets a finite gradient (torchdistill: NaN).
    """

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, eps: float = 0.0000001) -> None:
        super().__init__()
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.eps = v.check_positive("eps", eps)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        f_s = _io(student_io_dict, self.student_module_path, self.student_module_io, "student")
        f_t = _io(teacher_io_dict, self.teacher_module_path, self.teacher_module_io, "teacher")
        return _fn.pkt_loss(f_s, f_t, self.eps)

    def extra_repr(self) -> str:
        return (f"student={self.student_module_path!r}/{self.student_module_io!r}, "
                f"teacher={self.teacher_module_path!r}/{self.teacher_module_io!r}, eps={self.eps}")


class CCKDLoss(nn.Module):
    r"""torchdistill's ``CCKDLoss`` (key ``"fastkd.CCKDLoss"``), fused: :func:`fastkd.cc_loss` of
    ``io_dict[path]["output"]`` (the outputs of torchdistill's ``Linear4CCKD``): ``||C_s - C_t||_F`` (not squared),
    divided by N^2 for ``reduction="batchmean"`` and not divided otherwise.

    Args:
        student_linear_path, teacher_linear_path: module paths, as torchdistill.
        kernel_config: ``{"type": "gaussian", "gamma": ..., "max_p": ...}`` or ``{"type": "bilinear"}``
            (torchdistill's keys; note its docstring's YAML example says ``kernel_params`` / ``key``, which its
            constructor does not read).
        reduction: ``"batchmean"`` divides by N^2; any other value does not (torchdistill's rule).

    The teacher gets a gradient iff it requires grad, as in torchdistill. Differences: ``gamma`` must be > 0
    and ``max_p`` an int >= 1 (torchdistill computes with any); N = 0 gives 0 (torchdistill: NaN).
    """

    def __init__(self, student_linear_path: str, teacher_linear_path: str, kernel_config: Mapping[str, Any],
                 reduction: str, **kwargs) -> None:
        super().__init__()
        self.student_linear_path = student_linear_path
        self.teacher_linear_path = teacher_linear_path
        if not isinstance(kernel_config, Mapping):
            raise TypeError(f"kernel_config must be a dict with a 'type', got {type(kernel_config).__name__}")
        if "type" not in kernel_config:
            raise ValueError("kernel_config must have a 'type' ('gaussian' or 'bilinear')")
        self.kernel_type = v.check_choice("kernel_config['type']", kernel_config["type"], v.CC_KERNELS)
        if self.kernel_type == "gaussian":
            for key in ("gamma", "max_p"):
                if key not in kernel_config:
                    raise ValueError(f"kernel_config of type 'gaussian' must have {key!r}")
            self.gamma = v.check_positive("kernel_config['gamma']", kernel_config["gamma"])
            self.max_p = v.check_max_p(kernel_config["max_p"])
        else:  # unused by the bilinear kernel; cc_loss validates them anyway
            self.gamma, self.max_p = 0.4, 2
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
        self.reduction = reduction

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        f_s = _io(student_io_dict, self.student_linear_path, "output", "student")
        f_t = _io(teacher_io_dict, self.teacher_linear_path, "output", "teacher")
        reduction = "batchmean" if self.reduction == "batchmean" else "sum"
        return _fn.cc_loss(f_s, f_t, self.kernel_type, self.gamma, self.max_p, reduction)

    def extra_repr(self) -> str:
        kernel = f"gaussian, gamma={self.gamma}, max_p={self.max_p}" if self.kernel_type == "gaussian" else "bilinear"
        return (f"student_linear_path={self.student_linear_path!r}, teacher_linear_path={self.teacher_linear_path!r}, "
                f"kernel={kernel}, reduction={self.reduction!r}")


# ---- feature-based: AT -----------------------------------------------------------------------------------
class ATLoss(nn.Module):
    r"""torchdistill's ``ATLoss`` (key ``"fastkd.ATLoss"``), fused: per pair of ``at_pairs`` (``{name: {"student":
    {"path", "io"}, "teacher": {"path", "io"}, "weight": 1}}``), :func:`fastkd.at_loss` with ``p = 2``:

    * ``mode="code"``: ``sum_pairs weight * mean((a_s - a_t)^2)``, ``a = normalize(mean_c f^2)``;
    * ``mode="paper"``: ``sum_pairs weight * sum_n ||a_s - a_t||_2`` divided by the first pair's batch size,
      ``a = normalize(sum_c f^2)``.

    Maps ``[N, C, *spatial]``; the spatial dims are flattened (as torchdistill's ``flatten(1)``), channel counts
    may differ, the flattened spatial sizes must agree (torchdistill fails there too; fastkd's own ``at_loss``
    pools, this class does not). The weights may be any finite numbers. The teacher gets a gradient iff it
    requires grad, as in torchdistill. Differences: an empty ``at_pairs`` raises (torchdistill: 0 in 'code'
    mode, a TypeError in 'paper' mode).
    """

    def __init__(self, at_pairs: Mapping[str, Mapping[str, Any]], mode: str = "code", **kwargs) -> None:
        super().__init__()
        self.mode = v.check_choice("mode", mode, v.AT_MODES)
        if not isinstance(at_pairs, Mapping):
            raise TypeError(f"at_pairs must be a dict of pair configs, got {type(at_pairs).__name__}")
        if len(at_pairs) == 0:
            raise ValueError("at_pairs must name at least one teacher-student pair")
        pairs = []
        for name, config in at_pairs.items():
            for side in ("student", "teacher"):
                if not isinstance(config, Mapping) or not isinstance(config.get(side), Mapping) \
                        or "path" not in config[side] or "io" not in config[side]:
                    raise ValueError(f"at_pairs[{name!r}] must have {side!r}: {{'path': ..., 'io': ...}}")
            weight = v.check_real(f"at_pairs[{name!r}]['weight']", config.get("weight", 1))
            pairs.append((name, config["student"]["path"], config["student"]["io"], config["teacher"]["path"],
                          config["teacher"]["io"], weight))
        self.at_pairs = at_pairs
        self._pairs = pairs

    @staticmethod
    def _maps(f: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() < 3:
            raise ValueError(f"{name} must be a map [N, C, *spatial], got shape {tuple(f.shape)}")
        return f.reshape(f.shape[0], f.shape[1], math.prod(f.shape[2:]))

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        total = None
        batch_size = None
        for name, s_path, s_io, t_path, t_io, weight in self._pairs:
            f_s = self._maps(_io(student_io_dict, s_path, s_io, "student"), f"at_pairs[{name!r}] student map")
            f_t = self._maps(_io(teacher_io_dict, t_path, t_io, "teacher"), f"at_pairs[{name!r}] teacher map")
            if f_s.shape[2] != f_t.shape[2]:
                raise ValueError(f"at_pairs[{name!r}]: the student and teacher maps must have the same number of "
                                 f"spatial positions, got {f_s.shape[2]} and {f_t.shape[2]}")
            loss = _fn.at_loss(f_s, f_t, 2, mode=self.mode)
            if self.mode == "paper":
                # at_loss divides each pair by its own N; torchdistill divides the sum by the first pair's N
                n = f_s.shape[0]
                if batch_size is None:
                    batch_size = n
                elif n != batch_size:
                    loss = loss * (n / batch_size)
            term = weight * loss
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return f"pairs={[p[0] for p in self._pairs]}, mode={self.mode!r}"


# ---- the registry ------------------------------------------------------------------------------------------
_TABLE = (
    # (key, class, fastkd function, torchdistill class, notes)
    ("fastkd.KDLoss", KDLoss, "`kd_loss`", "KDLoss",
     "`T^2` only in the mixed branch (torchdistill's rule); CE + KD in one fused pass for `[N, C]` logits"),
    ("fastkd.LogitStdKDLoss", LogitStdKDLoss, "`kd_loss` on the standardized logits", "LogitStdKDLoss",
     "standardization in plain PyTorch, the KL fused, the CE (raw logits) `nn.CrossEntropyLoss`"),
    ("fastkd.DISTLoss", DISTLoss, "`dist_loss`", "DISTLoss", "`[N, C]` logits only"),
    ("fastkd.RKDLoss", RKDLoss, "`rkd_loss`", "RKDLoss", "`reduction` 'mean' or 'sum'"),
    ("fastkd.SPKDLoss", SPKDLoss, "`sp_loss(normalize=\"l1\")`", "SPKDLoss",
     "exact but not fused (the SP kernel does L2 only): no speed-up"),
    ("fastkd.PKTLoss", PKTLoss, "`pkt_loss`", "PKTLoss", ""),
    ("fastkd.CCKDLoss", CCKDLoss, "`cc_loss`", "CCKDLoss", "`kernel_config` type 'gaussian' or 'bilinear'"),
    ("fastkd.ATLoss", ATLoss, "`at_loss`", "ATLoss", "`mode` 'code' or 'paper'"),
)

#: Each registered key and its class.
LOSSES: Dict[str, Type[nn.Module]] = {key: cls for key, cls, *_ in _TABLE}


def register() -> Dict[str, Type[nn.Module]]:
    """Registers every loss of :data:`LOSSES` in torchdistill's middle-level loss registry (run when this module
    is imported). Idempotent: registering again (or after a reload of this module) replaces fastkd's own entries.
    Raises RuntimeError if a key is taken by a class that is not fastkd's. Returns :data:`LOSSES`."""
    table = _registry.MIDDLE_LEVEL_LOSS_DICT
    for key, cls in LOSSES.items():
        current = table.get(key)
        if current is not None and current is not cls and getattr(current, _MARK, None) != key:
            raise RuntimeError(f"torchdistill's loss registry already has {key!r} ({current!r}), not fastkd's: "
                               "fastkd.integrations.torchdistill does not overwrite it")
    for key, cls in LOSSES.items():
        setattr(cls, _MARK, key)
        _registry.register_mid_level_loss(key=key)(cls)
    return LOSSES


def readme_table() -> str:
    """The README's table of the registered keys (``tests/test_integration_torchdistill.py`` checks it)."""
    rows = ["| torchdistill key | fastkd | torchdistill class | notes |", "|---|---|---|---|"]
    for key, _, fn, anchor, notes in _TABLE:
        rows.append(f"| `{key}` | {fn} | `{anchor}` | {notes} |")
    return "\n".join(rows)


register()
