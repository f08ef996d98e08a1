"""nn.Module drop-ins for fastkd's relation- and feature-based losses (RKD, SP, PKT, CC, AT, NST, FitNet
hints and their regressors), including aliases named as in the frameworks users come from; re-exported by
:mod:`fastkd.losses`."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from fastkd import _validation as v
from fastkd import relation_functional as _fn
from fastkd import relation_reference as _reference
from fastkd.relation_functional import Features, cc_loss, hint_loss, pkt_loss, rkd_loss

__all__ = [
    "RKDLoss",
    "SPLoss",
    "Similarity",
    "SPKDLoss",
    "PKTLoss",
    "PKT",
    "CCLoss",
    "ATLoss",
    "Attention",
    "NSTLoss",
    "HintLoss",
    "ConvReg",
    "LinearReg",
]

LayerLosses = Union[torch.Tensor, List[torch.Tensor]]


# --------------------------------------------------------------------------------------------------------
# Relation- and feature-based losses. Rule for the multi-layer ones (SP, AT, NST): a pair of tensors gives
# a 0-dim loss, a pair of lists gives a *list* of per-layer losses (RepDistiller's convention:
# ``loss_kd = sum(criterion_kd(g_s, g_t))``); the weighted sum over layers is the functional's ``weights=``.
# --------------------------------------------------------------------------------------------------------
class RKDLoss(nn.Module):
    """Relational KD: ``distance_weight * L_dist + angle_weight * L_angle``; see :func:`fastkd.rkd_loss`.

    Drop-in for RepDistiller's ``RKDLoss(w_d=25, w_a=50)``, mdistiller's ``rkd_loss`` and torchdistill's
    ``RKDLoss(dist_factor, angle_factor)`` (a 0 factor skips its term). The teacher never gets a gradient.

    Args:
        distance_weight: weight of the distance term (finite, >= 0; default 25).
        angle_weight: weight of the angle term (finite, >= 0; default 50).

    ``forward(f_s [N, ...], f_t [N, ...])`` -> 0-dim loss (features flattened per sample, widths may differ).

    Example::

        criterion = fastkd.RKDLoss()                       # RepDistiller's defaults (25, 50)
        loss = criterion(feat_s[-1], feat_t[-1].detach())  # penultimate (pooled) features
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = v.check_nonneg_weight("distance_weight", distance_weight)
        self.angle_weight = v.check_nonneg_weight("angle_weight", angle_weight)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return rkd_loss(f_s, f_t, self.distance_weight, self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class SPLoss(nn.Module):
    """Similarity-preserving KD; see :func:`fastkd.sp_loss`.

    Args:
        reduction: ``"batchmean"`` (divide by N^2; RepDistiller, mdistiller, torchdistill's default) or
            ``"sum"`` (torchdistill ``SPKDLoss`` with another reduction).
        normalize: ``"l2"`` (default; RepDistiller / mdistiller) or ``"l1"`` (torchdistill's ``SPKDLoss``, see
            :class:`SPKDLoss`) row normalization of the Gram matrices.

    ``forward(g_s, g_t)``: two tensors ``[N, ...]`` -> a 0-dim loss; two equal-length lists of layer features
    -> a list of per-layer 0-dim losses. The teacher gets a gradient iff it requires grad.

    Example::

        criterion = fastkd.SPLoss()
        loss = 3000.0 * criterion(feat_s[-2], feat_t[-2].detach())             # RepDistiller's beta
        losses = criterion([feat_s[-2]], [feat_t[-2].detach()])                 # a list, one per layer
    """

    def __init__(self, reduction: str = "batchmean", normalize: str = "l2") -> None:
        super().__init__()
        self.reduction = v.check_relation_reduction(reduction)
        self.normalize = v.check_choice("normalize", normalize, tuple(v.SP_NORMALIZE))

    def forward(self, g_s: Features, g_t: Features) -> LayerLosses:
        losses, is_list = _fn._sp_layers(g_s, g_t, self.reduction, self.normalize)
        return losses if is_list else losses[0]

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, normalize={self.normalize!r}"


class Similarity(SPLoss):
    """Drop-in for RepDistiller's ``Similarity()``: ``forward(g_s, g_t)`` over lists of layer features returns
    a list with one loss **of shape (1,)** per layer (RepDistiller's ``.view(-1, 1).sum(0)``), batchmean
    reduction; a tensor pair gives one loss of shape (1,). Same value and gradient; see :func:`fastkd.sp_loss`.

    Example::

        criterion = fastkd.Similarity()
        loss_kd = 3000.0 * sum(criterion([feat_s[-2]], [feat_t[-2].detach()]))
    """

    def __init__(self) -> None:
        super().__init__("batchmean")

    def forward(self, g_s: Features, g_t: Features) -> LayerLosses:
        losses, is_list = _fn._sp_layers(g_s, g_t, self.reduction)
        losses = [loss.reshape(1) for loss in losses]
        return losses if is_list else losses[0]

    def extra_repr(self) -> str:
        return ""


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer; see :func:`fastkd.pkt_loss`. ``PKT`` is an alias (RepDistiller's
    ``PKT()`` is ``PKTLoss()``; torchdistill's ``PKTLoss(eps)`` and mdistiller's ``pkt_loss`` have the same
    value).

    Args:
        eps: the anchors' eps (finite, > 0; default 1e-7).

    ``forward(f_s [N, ...], f_t [N, ...])`` -> 0-dim loss.

    Example::

        criterion = fastkd.PKT()
        loss = 30000.0 * criterion(feat_s[-1], feat_t[-1].detach())   # RepDistiller's beta
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = v.check_positive("eps", eps)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return pkt_loss(f_s, f_t, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


PKT = PKTLoss


_TORCHDISTILL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


class SPKDLoss(nn.Module):
    """Drop-in for torchdistill's ``SPKDLoss(student_output_path, teacher_output_path, reduction)``, the same
    value and gradient: ``G = F.normalize(F F^T, 1)`` per side, i.e. rows **L1**-normalized (the second
    positional argument of ``F.normalize`` is ``p``), ``||G_t - G_s||_F^2``, divided by N^2 for
    ``reduction="batchmean"`` and not divided for any other reduction (torchdistill's semantics). RepDistiller's
    ``Similarity`` (:class:`Similarity`, :class:`SPLoss`) L2-normalizes the rows instead: the two anchors give
    different values. Equal to ``fastkd.sp_loss(f_s, f_t, reduction=..., normalize="l1")``.

    Args:
        student_output_path, teacher_output_path: as torchdistill's: with them, ``forward(student_io_dict,
            teacher_io_dict)`` reads ``io_dict[path]["output"]`` as torchdistill does; without them (None)
            ``forward(f_s, f_t)`` takes the two feature tensors ``[N, ...]``.
        reduction: ``"batchmean"`` (divide by N^2) or ``"sum"``, ``"mean"``, ``"none"`` (torchdistill does not
            divide for these: the undivided sum).

    The L1 normalization is not covered by the fused SP kernel: it runs as a plain-PyTorch composition (exact
    value and gradient, autograd's memory).
    """

    def __init__(
        self,
        student_output_path: Optional[str] = None,
        teacher_output_path: Optional[str] = None,
        reduction: str = "batchmean",
        **kwargs,
    ) -> None:
        super().__init__()
        if (student_output_path is None) != (teacher_output_path is None):
            raise ValueError("student_output_path and teacher_output_path must be given together (or neither)")
        for name, path in (("student_output_path", student_output_path), ("teacher_output_path", teacher_output_path)):
            if path is not None and not isinstance(path, str):
                raise TypeError(f"{name} must be a str (a module path) or None, got {type(path).__name__}")
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        self.reduction = v.check_choice("reduction", reduction, _TORCHDISTILL_REDUCTIONS)

    def forward(self, student: Union[torch.Tensor, dict], teacher: Union[torch.Tensor, dict]) -> torch.Tensor:
        if self.student_output_path is not None:
            student = student[self.student_output_path]["output"]
            teacher = teacher[self.teacher_output_path]["output"]
        reduction = "batchmean" if self.reduction == "batchmean" else "sum"
        return _fn.sp_loss(student, teacher, reduction=reduction, normalize="l1")

    def extra_repr(self) -> str:
        return (f"student_output_path={self.student_output_path!r}, teacher_output_path={self.teacher_output_path!r}, "
                f"reduction={self.reduction!r}")


class CCLoss(nn.Module):
    """Correlation congruence with torchdistill ``CCKDLoss`` semantics (the Frobenius norm, not squared); see
    :func:`fastkd.cc_loss`.

    Args:
        kernel: ``"gaussian"`` (default; the order-``max_p`` Taylor expansion of the RBF) or ``"bilinear"``.
        gamma: finite, > 0 (default 0.4); max_p: int >= 1 (default 2). Validated for "bilinear" too.
        reduction: ``"batchmean"`` (default) or ``"sum"``.

    ``forward(f_s [N, ...], f_t [N, ...])`` -> 0-dim loss. The teacher gets a gradient iff it requires grad.

    Example::

        criterion = fastkd.CCLoss(kernel="gaussian", gamma=0.4, max_p=2)   # torchdistill's shipped config
        loss = criterion(embed_s(feat_s), embed_t(feat_t).detach())
    """

    def __init__(
        self, kernel: str = "gaussian", gamma: float = 0.4, max_p: int = 2, reduction: str = "batchmean"
    ) -> None:
        super().__init__()
        self.kernel = v.check_choice("kernel", kernel, v.CC_KERNELS)
        self.gamma = v.check_positive("gamma", gamma)
        self.max_p = v.check_max_p(max_p)
        self.reduction = v.check_relation_reduction(reduction)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return cc_loss(f_s, f_t, self.kernel, self.gamma, self.max_p, self.reduction)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, gamma={self.gamma}, max_p={self.max_p}, reduction={self.reduction!r}"


class ATLoss(nn.Module):
    """Attention transfer; see :func:`fastkd.at_loss`. ``Attention`` is an alias: RepDistiller's
    ``Attention(p=2)`` returns the per-layer list, as this module does for lists.

    Args:
        p: the power of the attention map (finite, > 0; default 2).
        mode: ``"code"`` (default; channel mean, mean squared difference) or ``"paper"`` (torchdistill's:
            channel sum, L2 norm per sample, divided by N).

    ``forward(g_s, g_t)``: two maps ``[N, C, *spatial]`` -> a 0-dim loss; two equal-length lists of layer maps
    -> a list of per-layer 0-dim losses. Maps of different heights are pooled as RepDistiller does.

    Example::

        criterion = fastkd.Attention(p=2)
        loss_kd = 1000.0 * sum(criterion(feat_s[1:-1], [f.detach() for f in feat_t[1:-1]]))
    """

    def __init__(self, p: float = 2, mode: str = "code") -> None:
        super().__init__()
        self.p = v.check_positive("p", p)
        self.mode = v.check_choice("mode", mode, v.AT_MODES)

    def forward(self, g_s: Features, g_t: Features) -> LayerLosses:
        losses, is_list = _fn._at_layers(g_s, g_t, self.p, self.mode)
        return losses if is_list else losses[0]

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"


Attention = ATLoss


class NSTLoss(nn.Module):
    """Neuron selectivity transfer, RepDistiller's ``NSTLoss()``; see :func:`fastkd.nst_loss`.

    ``forward(g_s, g_t)``: two maps ``[N, C, *spatial]`` -> a 0-dim loss; two equal-length lists of layer maps
    -> a list of per-layer 0-dim losses (RepDistiller's convention). Maps of different heights are pooled as
    RepDistiller does.

    Example::

        criterion = fastkd.NSTLoss()
        loss_kd = 50.0 * sum(criterion(feat_s[1:-1], [f.detach() for f in feat_t[1:-1]]))
    """

    def forward(self, g_s: Features, g_t: Features) -> LayerLosses:
        losses, is_list = _fn._nst_layers(g_s, g_t)
        return losses if is_list else losses[0]


class ConvReg(nn.Module):
    """RepDistiller's FitNet regressor (``models/util.py`` ``ConvReg``), mapping a student feature map of shape
    ``s_shape`` onto the teacher's ``t_shape`` (both ``(N, C, H, W)``, N ignored):

    * ``s_H == 2 t_H``: ``Conv2d(s_C, t_C, 3, stride=2, padding=1)``;
    * ``2 s_H == t_H``: ``ConvTranspose2d(s_C, t_C, 4, stride=2, padding=1)``;
    * ``s_H >= t_H``: ``Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))``;

    tested in that order, then ``BatchNorm2d(t_C)`` and, if ``use_relu``, ReLU. The attributes are named
    ``conv``, ``bn`` and ``relu`` as RepDistiller's, so its state dicts load. Any other pair of heights is a
    ValueError (RepDistiller raises ``NotImplemented(...)``, a TypeError), as is a width that the third case
    cannot map (``s_W < t_W``).

    Example::

        reg = fastkd.ConvReg(feat_s[2].shape, feat_t[2].shape)
        loss = fastkd.hint_loss(reg(feat_s[2]), feat_t[2].detach())   # or fastkd.HintLoss(s_shape, t_shape)
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        s_shape, t_shape = _shape4("s_shape", s_shape), _shape4("t_shape", t_shape)
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        self.use_relu = v.check_bool("use_relu", use_relu)
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            if s_w < t_w:
                raise ValueError(
                    f"ConvReg: student width {s_w} is smaller than teacher width {t_w} with student height {s_h} "
                    f">= teacher height {t_h}: a (1 + s_H - t_H, 1 + s_W - t_W) convolution cannot map it"
                )
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg: no regressor for student height {s_h} and teacher height {t_h} (supported: the student "
                "twice or half as tall as the teacher, or at least as tall)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x

    def extra_repr(self) -> str:
        return f"use_relu={self.use_relu}"


def _dims(name: str, shape) -> tuple:
    """A shape: a sequence of Python ints >= 0 (a torch.Size works); TypeError otherwise."""
    if isinstance(shape, (str, bytes, torch.Tensor)) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a shape (a sequence of ints), got {type(shape).__name__}")
    dims = tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{name} must be a shape of ints, got {dims!r}")
        if d < 0:
            raise ValueError(f"{name} must not have negative sizes, got {dims}")
    return dims


def _shape4(name: str, shape: Sequence[int]) -> tuple:
    """A 4-D shape ``(N, C, H, W)`` of ints (a torch.Size works)."""
    dims = _dims(name, shape)
    if len(dims) != 4:
        raise ValueError(f"{name} must be a 4-D shape (N, C, H, W) for a ConvReg regressor, got {dims}")
    return dims


def _width(name: str, value) -> int:
    """A feature width: an int >= 1 (not a bool)."""
    return v.check_int_range(name, value, 1)


class LinearReg(nn.Module):
    """FitNet regressor for flat features (MLP and transformer hints): ``nn.Linear(s_dim, t_dim)`` on the last
    dimension, then a ReLU if ``use_relu`` (off by default: hidden states are signed). The layer is named
    ``linear``. :class:`HintLoss` picks it for int widths and 2-D / 3-D shapes (``[N, D]``, ``[N, T, D]``), as
    torchdistill's configs put a linear regressor in front of the MSE for such features.

    Args:
        s_dim, t_dim: student and teacher feature widths (ints >= 1).
        use_relu: end with a ReLU (bool).
        bias: the linear layer's bias (bool).

    Example::

        reg = fastkd.LinearReg(384, 768)
        loss = fastkd.hint_loss(reg(h_s), h_t.detach())   # or fastkd.HintLoss(384, 768)
    """

    def __init__(self, s_dim: int, t_dim: int, use_relu: bool = False, bias: bool = True) -> None:
        super().__init__()
        s_dim, t_dim = _width("s_dim", s_dim), _width("t_dim", t_dim)
        self.use_relu = v.check_bool("use_relu", use_relu)
        self.linear = nn.Linear(s_dim, t_dim, bias=v.check_bool("bias", bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return torch.relu(x) if self.use_relu else x

    def extra_repr(self) -> str:
        return f"use_relu={self.use_relu}"


HINT_REGRESSORS = ("auto", "always", "none")


def _hint_shape(name: str, shape) -> tuple:
    """A hint shape for :class:`HintLoss`: an int width ``D`` (flat features, returned as ``(D,)``), a flat shape
    ``(N, D)`` / ``(N, T, D)`` or a feature map shape ``(N, C, H, W)``. Returned without the batch size N."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        return (_width(name, shape),)
    dims = _dims(name, shape)
    if len(dims) not in (2, 3, 4):
        raise ValueError(
            f"{name} must be an int width, a flat shape (N, D) / (N, T, D) or a map shape (N, C, H, W), got {dims}"
        )
    return dims[1:]


class HintLoss(nn.Module):
    """FitNets hint loss: ``MSE(regressor(f_s), f_t)``; see :func:`fastkd.hint_loss`.

    Args:
        student_shape, teacher_shape: the shapes of the hinted student feature and the teacher's hint (N
            ignored), e.g. from one probe forward as RepDistiller does. Give both or neither. Feature maps
            ``(N, C, H, W)`` get a :class:`ConvReg`; flat features, given as int widths (``HintLoss(16, 256)``)
            or shapes ``(N, D)`` / ``(N, T, D)``, get a :class:`LinearReg` on the last dimension (the other
            dimensions must agree). A map and a flat shape together are a ValueError.
        use_relu: end the regressor with a ReLU. None (default): True for a ConvReg (RepDistiller's default),
            False for a LinearReg (hidden states are signed).
        regressor: ``"auto"`` (default): a regressor when both shapes are given and differ beyond the
            batch size, else none (plain MSE: RepDistiller ``HintLoss()``); ``"always"``: a regressor whenever
            the shapes are given (RepDistiller's and mdistiller's FitNet build one even for equal shapes);
            ``"none"``: never (the shapes must then match).
        reduction: ``"mean"`` (``nn.MSELoss()``, RepDistiller/mdistiller) or ``"sum"`` (torchdistill configs).

    The regressor (``self.regressor``, None, a ConvReg or a LinearReg) is a submodule with trainable parameters: pass
    ``HintLoss.parameters()`` (or the module itself) to the optimizer along with the student's, and move the
    loss to the student's device (``.to(device)``).

    ``forward(f_s, f_t)`` -> 0-dim loss.

    Example::

        criterion = fastkd.HintLoss(feat_s[2].shape, feat_t[2].shape).to(device)
        optimizer = torch.optim.SGD(list(student.parameters()) + list(criterion.parameters()), lr=0.05)
        loss = 100.0 * criterion(feat_s[2], feat_t[2].detach())   # RepDistiller's beta for FitNet
    """

    def __init__(
        self,
        student_shape: Union[None, int, Sequence[int]] = None,
        teacher_shape: Union[None, int, Sequence[int]] = None,
        *,
        use_relu: Optional[bool] = None,
        regressor: str = "auto",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        v.check_choice("regressor", regressor, HINT_REGRESSORS)
        self.reduction = v.check_choice("reduction", reduction, _reference.HINT_REDUCTIONS)
        if (student_shape is None) != (teacher_shape is None):
            raise ValueError(
                "student_shape and teacher_shape must be given together (or neither), got "
                f"student_shape={student_shape} and teacher_shape={teacher_shape}"
            )
        v.check_optional_bool("use_relu", use_relu)
        reg: Optional[nn.Module] = None
        if student_shape is not None:
            s_dims, t_dims = _hint_shape("student_shape", student_shape), _hint_shape("teacher_shape", teacher_shape)
            s_map, t_map = len(s_dims) == 3, len(t_dims) == 3
            if s_map != t_map:
                raise ValueError(
                    f"student_shape and teacher_shape must both be feature maps (N, C, H, W) or both flat (an int "
                    f"width, (N, D) or (N, T, D)), got {student_shape} and {teacher_shape}"
                )
            if not s_map and s_dims[:-1] != t_dims[:-1]:
                raise ValueError(
                    f"flat features: student_shape and teacher_shape may differ only in the last (feature) "
                    f"dimension, got {student_shape} and {teacher_shape}"
                )
            if regressor != "none" and (regressor == "always" or s_dims != t_dims):
                if s_map:
                    reg = ConvReg(student_shape, teacher_shape, use_relu=True if use_relu is None else use_relu)
                else:
                    reg = LinearReg(s_dims[-1], t_dims[-1], use_relu=bool(use_relu))
        self.regressor = reg

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if self.regressor is not None:
            f_s = self.regressor(f_s)
        return hint_loss(f_s, f_t, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
