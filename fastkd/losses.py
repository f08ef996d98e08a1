"""nn.Module drop-ins for fastkd's losses, including aliases named as in the frameworks users come from."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from fastkd import _validation as v
from fastkd import divergences
from fastkd import functional as _fn
from fastkd import relation_losses as _relation
from fastkd.functional import (
    NumItems,
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    topk_kd_loss,
    tvd_loss,
)
from fastkd.fused_linear import Teacher, fused_linear_kd_loss
from fastkd.outputs import LossParts
from fastkd.relation_losses import *  # noqa: F401,F403  (the relation and feature family, re-exported)

__all__ = [
    "KDLoss",
    "DistillKL",
    "ReverseKLLoss",
    "JSDLoss",
    "TVDLoss",
    "DKDLoss",
    "TopKKDLoss",
    "FusedLinearKDLoss",
] + _relation.__all__

# fastkd.relation_losses' public names outside __all__
HINT_REGRESSORS = _relation.HINT_REGRESSORS
LayerLosses = _relation.LayerLosses


class KDLoss(nn.Module):
    r"""Hinton knowledge-distillation loss (fused), optionally mixed with the hard-label cross-entropy:
    ``alpha * CE(s, target) + beta * T^2 * KL(softmax(t/T) || softmax(s/T))``, ``beta = 1 - alpha`` by default.

    Args:
        temperature: softmax temperature ``T > 0`` (default 4, the CIFAR KD setting).
        alpha: weight of the cross-entropy on ``target`` (temperature 1, computed in the same pass);
            0 (default) is plain KD.
        beta: weight of the KD term; defaults to ``1 - alpha`` (``alpha`` must then be in ``[0, 1]``).
        reduction: ``"batchmean"`` (default), ``"sum"``, ``"mean"`` or ``"none"``; see :func:`fastkd.kd_loss`.
        ignore_index: rows whose target equals this are not counted (in either part).
        scale_by_temperature: multiply the KL by ``T^2`` (default True).
        return_parts: make ``forward`` return a :class:`fastkd.LossParts` ``(loss, soft, hard)`` whose soft
            and hard parts are detached (for logging).
        standardize: logit standardization of both sides before the temperature (LSKD); see
            :func:`fastkd.kd_loss`.

    Shape:
        ``forward(student_logits [..., V], teacher_logits [..., V], target [...] or None, *,
        num_items_in_batch=None, token_weights=None)``. With ``alpha != 0`` a target is required.
        ``token_weights`` ``[...]``: each counted row's loss times its weight (see :func:`fastkd.kd_loss`).

    The temperature of a module is a Python number; for a learnable or per-row temperature (a tensor) call
    :func:`fastkd.kd_loss`.

    torchdistill's ``KDLoss(temperature, alpha, beta)``: its soft-only branch (alpha 0/None or no targets) is
    ``KDLoss(T, scale_by_temperature=False)``; its mixed branch is ``KDLoss(T, alpha=alpha, beta=beta)`` when no
    target equals ``ignore_index`` (torchdistill keeps those rows in its KL; ``fastkd.integrations.torchdistill``
    is the exact drop-in).

    Example::

        criterion = fastkd.KDLoss(temperature=4.0, alpha=0.1)
        loss = criterion(student(x), teacher(x).detach(), y)
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.0,
        beta: Optional[float] = None,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_temperature: bool = True,
        return_parts: bool = False,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        self.standardize = v.check_bool("standardize", standardize)
        self.alpha, _ = v.check_mix_weights(alpha, beta)
        self.beta = None if beta is None else float(beta)
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.scale_by_temperature = v.check_bool("scale_by_temperature", scale_by_temperature)
        self.return_parts = v.check_bool("return_parts", return_parts)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, LossParts]:
        return kd_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            reduction=self.reduction,
            labels=target,
            ignore_index=self.ignore_index,
            scale_by_temperature=self.scale_by_temperature,
            alpha=self.alpha,
            beta=self.beta,
            num_items_in_batch=num_items_in_batch,
            return_parts=self.return_parts,
            token_weights=token_weights,
            standardize=self.standardize,
        )

    def extra_repr(self) -> str:
        return _repr_of(self, "temperature", "alpha", "beta", "reduction", "ignore_index", "scale_by_temperature",
                        "return_parts", "standardize")


class DistillKL(KDLoss):
    """Drop-in for RepDistiller's ``DistillKL(T)``: ``KL(p_t || p_s) * T^2 / batch_size`` over ``[B, C]``
    logits, the same value and gradient (the teacher is used as given: detach it, as RepDistiller's
    training loop does, unless you want its gradient)."""

    def __init__(self, T: float) -> None:
        super().__init__(temperature=T, reduction="batchmean")
        self.T = self.temperature

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(y_s, y_t)


def _repr_of(module: nn.Module, *names: str) -> str:
    """``name=value, ...`` of a module's constructor arguments (every module shows all of its own)."""
    return ", ".join(f"{n}={getattr(module, n)!r}" for n in names)


class _ResponseLoss(nn.Module):
    """Shared constructor checks and repr of the label-masked response losses (``standardize``: the logit
    standardization of the functions, for the losses that offer it)."""

    def __init__(self, temperature: float, reduction: str, ignore_index: int, standardize: bool = False) -> None:
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.standardize = v.check_bool("standardize", standardize)

    _repr_args: Tuple[str, ...] = ("temperature", "reduction", "ignore_index", "standardize")

    def extra_repr(self) -> str:
        return _repr_of(self, *self._repr_args)


class ReverseKLLoss(_ResponseLoss):
    """Reverse KL ``T^2 * KL(softmax(s/T) || softmax(t/T))``; see :func:`fastkd.reverse_kl_loss`.

    ``forward(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None, token_weights=None)``;
    ``standardize``: as :class:`KDLoss`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_temperature: bool = True,
        standardize: bool = False,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, standardize)
        self.scale_by_temperature = v.check_bool("scale_by_temperature", scale_by_temperature)

    _repr_args = ("temperature", "reduction", "ignore_index", "scale_by_temperature", "standardize")

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return reverse_kl_loss(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                               labels=labels, ignore_index=self.ignore_index,
                               scale_by_temperature=self.scale_by_temperature, num_items_in_batch=num_items_in_batch,
                               token_weights=token_weights, standardize=self.standardize)


class JSDLoss(_ResponseLoss):
    """Generalized Jensen-Shannon divergence with TRL GKD semantics; see :func:`fastkd.jsd_loss`.

    ``forward(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None, token_weights=None)``;
    ``standardize``: as :class:`KDLoss`.
    """

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
        standardize: bool = False,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, standardize)
        self.beta = v.check_beta_unit(beta)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return jsd_loss(student_logits, teacher_logits, self.beta, self.temperature, reduction=self.reduction,
                        labels=labels, ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch,
                        token_weights=token_weights, standardize=self.standardize)

    _repr_args = ("beta",) + _ResponseLoss._repr_args


class TVDLoss(_ResponseLoss):
    """Total variation distance ``0.5 * sum |p_t - p_s|``; see :func:`fastkd.tvd_loss`.

    ``forward(student_logits, teacher_logits, labels=None, *, num_items_in_batch=None, token_weights=None)``;
    ``standardize``: as :class:`KDLoss`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 standardize: bool = False) -> None:
        super().__init__(temperature, reduction, ignore_index, standardize)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return tvd_loss(student_logits, teacher_logits, self.temperature, reduction=self.reduction, labels=labels,
                        ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch,
                        token_weights=token_weights, standardize=self.standardize)


class DKDLoss(_ResponseLoss):
    """Decoupled KD with mdistiller's warmup; see :func:`fastkd.dkd_loss`.

    Args:
        alpha, beta: weights of TCKD and NCKD (mdistiller defaults 1 and 8; CIFAR configs vary beta).
        temperature: ``T`` (default 4).
        warmup: epochs over which the loss ramps up linearly: ``forward(..., epoch=e)`` multiplies by
            ``min(e / warmup, 1)`` (mdistiller's DKD distiller; 0 disables the ramp). Without ``epoch`` the
            factor is 1.
        standardize: logit standardization of both sides before the temperature (LSKD, CVPR 2024, on DKD);
            see :func:`fastkd.dkd_loss`.

    ``forward(student_logits, teacher_logits, target, epoch=None, *, num_items_in_batch=None, token_weights=None)``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: float = 20,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        standardize: bool = False,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, standardize)
        self.alpha = v.check_nonneg_weight("alpha", alpha)
        self.beta = v.check_nonneg_weight("beta", beta)
        self.warmup = v.check_nonneg_weight("warmup", warmup)

    def warmup_factor(self, epoch: Optional[float]) -> float:
        """``min(epoch / warmup, 1)`` (1 without an epoch or with ``warmup=0``)."""
        if epoch is None or self.warmup == 0:
            return 1.0
        e = v.check_nonneg_weight("epoch", epoch)
        return min(e / self.warmup, 1.0)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        epoch: Optional[float] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        factor = self.warmup_factor(epoch)
        return dkd_loss(student_logits, teacher_logits, target, self.alpha * factor, self.beta * factor,
                        self.temperature, reduction=self.reduction, ignore_index=self.ignore_index,
                        num_items_in_batch=num_items_in_batch, token_weights=token_weights,
                        standardize=self.standardize)

    _repr_args = ("alpha", "beta", "warmup") + _ResponseLoss._repr_args


class TopKKDLoss(_ResponseLoss):
    """KD against a cached sparse (top-k) teacher; see :func:`fastkd.topk_kd_loss`.

    ``forward(student_logits, teacher_topk_values, teacher_topk_indices, labels=None, *,
    num_items_in_batch=None, token_weights=None)`` (no ``standardize``: a top-k teacher has no full row).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        values_are: str = "logits",
        tail: str = "renormalize",
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_temperature: bool = True,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index)
        v.check_choice("values_are", values_are, v.TOPK_VALUES_ARE)
        v.check_choice("tail", tail, v.TOPK_TAILS)
        if tail == "bucket" and values_are != "logprobs":
            raise ValueError("tail='bucket' needs values_are='logprobs' (logits give no tail mass)")
        self.values_are = values_are
        self.tail = tail
        self.scale_by_temperature = v.check_bool("scale_by_temperature", scale_by_temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_topk_values: torch.Tensor,
        teacher_topk_indices: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return topk_kd_loss(student_logits, teacher_topk_values, teacher_topk_indices, self.temperature,
                            values_are=self.values_are, tail=self.tail, reduction=self.reduction, labels=labels,
                            ignore_index=self.ignore_index, scale_by_temperature=self.scale_by_temperature,
                            num_items_in_batch=num_items_in_batch, token_weights=token_weights)

    _repr_args = ("temperature", "values_are", "tail", "reduction", "ignore_index", "scale_by_temperature")


class DivergenceLoss(nn.Module):
    """Module form of :func:`fastkd.divergence_loss`: ``DivergenceLoss("skew_kl", temperature=2.0, skew=0.2)``;
    ``forward(student_logits, teacher_logits, labels=None, num_items_in_batch=None, *, token_weights=None)``.
    The divergence's parameters are checked when the module is built; ``standardize`` as :class:`KDLoss`."""

    def __init__(self, divergence: str, temperature: float = 1.0, *, reduction: str = "batchmean",
                 ignore_index: int = -100, scale_by_temperature: Optional[bool] = None, standardize: bool = False,
                 **params: float) -> None:
        super().__init__()
        spec = divergences.get(divergence)
        values = spec.resolve(params, "DivergenceLoss")
        spec.check_ranges(values)
        v.resolve_scale_by_temperature(scale_by_temperature, divergence)
        self.divergence = divergence
        self.params = dict(zip(spec.param_names, values))
        self.temperature = v.check_temperature(temperature)
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.scale_by_temperature = scale_by_temperature
        self.standardize = v.check_bool("standardize", standardize)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None, num_items_in_batch: NumItems = None, *,
                token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _fn.divergence_loss(student_logits, teacher_logits, self.divergence, self.temperature,
                                   reduction=self.reduction, labels=labels, ignore_index=self.ignore_index,
                                   scale_by_temperature=self.scale_by_temperature,
                                   num_items_in_batch=num_items_in_batch, token_weights=token_weights,
                                   standardize=self.standardize, **self.params)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={x!r}" for k, x in self.params.items())
        return (f"{self.divergence!r}, temperature={self.temperature!r}{params}, "
                + _repr_of(self, "reduction", "ignore_index", "scale_by_temperature", "standardize"))


def _generate_modules() -> List[str]:
    """The modules of the registered divergences that are not written by hand (fastkd/divergences.py)."""
    from fastkd import _codegen

    made = []
    for spec in divergences.REGISTRY.values():
        if spec.generated:
            globals()[spec.module] = _codegen.make_module(spec, getattr(_fn, spec.function), __name__)
            made.append(spec.module)
    return made


__all__ += ["DivergenceLoss"] + _generate_modules()


class FusedLinearKDLoss(nn.Module):
    """Distillation through the student's linear head without the full logits; see
    :func:`fastkd.fused_linear_kd_loss` (the constructor's arguments are its keyword arguments, with the same
    defaults: ``soft_weight=None`` is ``1 - hard_label_weight``, ``scale_by_temperature=None`` is ``T^2`` for
    ``"kl"`` / ``"reverse_kl"`` and none for ``"jsd"``, as :class:`KDLoss` / :class:`JSDLoss`).

    Args:
        return_parts: make ``forward`` return a :class:`fastkd.LossParts` ``(loss, soft, hard)`` (detached parts,
            for logging). A constructor argument, as for every fastkd module (:class:`KDLoss`); it was a
            ``forward`` argument before.
        student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale: the heads' final logit
            transforms (Gemma-2, Cohere); ``fastkd.FusedLinearKDLoss(**fastkd.integrations.head_options(
            student.config))`` reads the student's from its config.

    ``forward(student_hidden, student_weight, teacher, labels=None, *, student_bias=None,
    num_items_in_batch=None, token_weights=None)`` where ``teacher`` is dense teacher logits, a
    :class:`fastkd.TeacherHead` or a :class:`fastkd.TopKTeacher`. For a Hugging Face causal LM::

        criterion = fastkd.FusedLinearKDLoss(loss="jsd", beta=0.5, hard_label_weight=0.5)
        out_s = student(input_ids, output_hidden_states=True)
        with torch.no_grad():
            out_t = teacher(input_ids, output_hidden_states=True)
        loss = criterion(out_s.hidden_states[-1][:, :-1], student.lm_head.weight,
                         fastkd.TeacherHead(out_t.hidden_states[-1][:, :-1], teacher.lm_head.weight),
                         labels=input_ids[:, 1:])
    """

    def __init__(
        self,
        loss: str = "kl",
        beta: Optional[float] = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        hard_label_weight: float = 0.0,
        soft_weight: Optional[float] = None,
        reduction: str = "batchmean",
        chunk_size: Optional[int] = None,
        scale_by_temperature: Optional[bool] = None,
        return_parts: bool = False,
        student_softcap: Optional[float] = None,
        student_logit_scale: Optional[float] = None,
        teacher_softcap: Optional[float] = None,
        teacher_logit_scale: Optional[float] = None,
        standardize: bool = False,
        **params: float,
    ) -> None:
        super().__init__()
        self.loss = v.check_choice("loss", loss, v.fused_linear_losses())
        self.standardize = v.check_bool("standardize", standardize)
        v.check_head_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, "head")
        self.head_options = {k: x for k, x in (("student_softcap", student_softcap),
                                               ("student_logit_scale", student_logit_scale),
                                               ("teacher_softcap", teacher_softcap),
                                               ("teacher_logit_scale", teacher_logit_scale)) if x is not None}
        self.chunk_size = v.check_chunk_size(chunk_size)
        v.resolve_scale_by_temperature(scale_by_temperature, loss)  # checks it; None is kept (resolved per call)
        self.scale_by_temperature = scale_by_temperature
        spec = divergences.get(loss)
        values = v.resolve_divergence_params(loss, beta, params, "FusedLinearKDLoss")
        spec.check_ranges(values)
        self.params = dict(zip(spec.param_names, values))  # the divergence's parameters, beta included
        self.beta = self.params.get("beta", beta)
        self.temperature = v.check_temperature(temperature)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.hard_label_weight, _ = v.check_mix_weights(hard_label_weight, soft_weight,
                                                        ("hard_label_weight", "soft_weight"))
        self.soft_weight = None if soft_weight is None else float(soft_weight)
        self.reduction = v.check_reduction(reduction)
        self.return_parts = v.check_bool("return_parts", return_parts)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher: Teacher,
        labels: Optional[torch.Tensor] = None,
        *,
        student_bias: Optional[torch.Tensor] = None,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, LossParts]:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher, student_bias=student_bias, loss=self.loss, **self.params,
            temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
            hard_label_weight=self.hard_label_weight, soft_weight=self.soft_weight, reduction=self.reduction,
            chunk_size=self.chunk_size, scale_by_temperature=self.scale_by_temperature,
            num_items_in_batch=num_items_in_batch, return_parts=self.return_parts, token_weights=token_weights,
            standardize=self.standardize, **self.head_options)

    def extra_repr(self) -> str:
        params = "".join(f"{k}={x}, " for k, x in {**self.params, **self.head_options}.items())
        return (f"loss={self.loss!r}, {params}temperature={self.temperature}, "
                f"hard_label_weight={self.hard_label_weight}, soft_weight={self.soft_weight}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, "
                f"ignore_index={self.ignore_index}, scale_by_temperature={self.scale_by_temperature}, "
                f"return_parts={self.return_parts}, standardize={self.standardize}")


# Cosine distillation (issue 14): defined in fastkd/cosine.py, re-exported here.
from fastkd.cosine import CosineLoss  # noqa: E402

__all__ += ["CosineLoss"]
