"""Functional interface of fastkd's relation-based losses (:func:`rkd_loss`, :func:`rkd_distance_loss`,
:func:`rkd_angle_loss`, :func:`sp_loss`, :func:`pkt_loss`, :func:`cc_loss`) and feature-based losses
(:func:`at_loss`, :func:`nst_loss`, :func:`hint_loss`), re-exported by :mod:`fastkd.functional`. Argument
order is always (student, teacher); the conventions shared by these losses are stated below.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F

from fastkd import _validation as v
from fastkd import relation_reference as reference  # the plain-PyTorch twins (fastkd.reference re-exports them)

__all__ = [
    "rkd_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "sp_loss",
    "pkt_loss",
    "cc_loss",
    "at_loss",
    "nst_loss",
    "hint_loss",
]


# --------------------------------------------------------------------------------------------------------
# Relation-based losses (RKD, SP, PKT, CC) and feature-based losses (AT, NST, FitNet hints).
#
# Features are [N, ...] tensors, one sample per leading index, flattened per sample to [N, D] (reshape with
# explicit sizes: N may be 0 and the input may be strided); student and teacher widths may differ. Computed in
# float32 (float64 if either input is float64); the loss has the promoted input dtype, each gradient its
# input's dtype. N = 0 gives 0 with zero gradients. The fused ops (torch.ops.fastkd.{rkd,sp,pkt,cc,at}_forward)
# return the loss and, for each input that needs one, its gradient computed in the same pass; their autograd
# (C++) returns that gradient times the incoming one. Argument checks run here, before the op, with the
# messages of fastkd.reference.
# --------------------------------------------------------------------------------------------------------
Features = Union[torch.Tensor, Sequence[torch.Tensor]]

_ops_present: Set[str] = set()
_warned_missing_ops: Set[str] = set()


def _relation_kernel(op: str) -> bool:
    """Whether ``torch.ops.fastkd.<op>`` can run: the compiled kernels are loaded and this build defines the op
    (a build older than the relation losses does not; the reference runs then, with one warning per op)."""
    # fastkd.functional owns the one "kernels not available" warning of the process; imported at call time
    # because fastkd.functional imports this module (re-exports)
    from fastkd.functional import _use_kernels

    if not _use_kernels():
        return False
    if op in _ops_present:
        return True
    if hasattr(torch.ops.fastkd, op):
        _ops_present.add(op)
        return True
    if op not in _warned_missing_ops:
        warnings.warn(
            f"this build of fastkd's compiled kernels has no torch.ops.fastkd.{op}; running the plain-PyTorch "
            "reference instead (correct, but slow). Rebuild with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_missing_ops.add(op)
    return False


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _flat2d(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, D] with explicit sizes (``reshape(0, -1)`` is an error)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _flat3d(x: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [N, C, S]."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


# shared with the reference: (promoted output dtype, compute dtype) and an exact 0 tied to the inputs' graph
_dtypes = reference._dtypes
_zero_loss = reference._zero_loss
_NORMALIZE_EPS = reference._NORMALIZE_EPS


def _layer_names(i: int, is_list: bool) -> Tuple[str, str]:
    return (f"g_s[{i}]", f"g_t[{i}]") if is_list else ("g_s", "g_t")


def _weighted_sum(losses: List[torch.Tensor], weights: List[float]) -> torch.Tensor:
    total = None
    for w, term in zip(weights, losses):
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    return total


# ---- RKD ---------------------------------------------------------------------------------------------------
def _rkd(f_s: torch.Tensor, f_t: torch.Tensor, distance_weight: float, angle_weight: float) -> torch.Tensor:
    """Validated inputs; ``torch.ops.fastkd.rkd_forward``'s differentiable output 0 (the weighted loss)."""
    loss, _, _, _ = torch.ops.fastkd.rkd_forward(
        _flat2d(f_s), _flat2d(f_t).detach(), distance_weight, angle_weight, _wants_grad(f_s)
    )
    return loss


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    r"""Relational knowledge distillation (Park et al., CVPR 2019), fused:
    ``distance_weight * L_dist + angle_weight * L_angle`` (see :func:`rkd_distance_loss` and
    :func:`rkd_angle_loss` for the two terms).

    Anchors: RepDistiller ``RKDLoss(w_d=25, w_a=50)``, mdistiller ``rkd_loss(f_s, f_t)`` (``squared=False``,
    ``eps=1e-12``), torchdistill ``RKDLoss(dist_factor, angle_factor, reduction='mean')``; same value and
    gradient. A term whose weight is 0 is not computed and contributes exactly 0 (torchdistill skips a 0/None
    factor too).

    Args:
        f_s: student features ``[N, ...]``, flattened per sample to ``[N, D_s]`` (float32, float16, bfloat16
            or float64).
        f_t: teacher features ``[N, ...]`` (``D_t`` may differ from ``D_s``), same device. It never receives a
            gradient (the anchors compute it under ``no_grad``): ``f_t.grad`` stays None even if it requires
            grad.
        distance_weight, angle_weight: finite, >= 0.

    Returns:
        A 0-dim loss in the promoted input dtype.

    Deviations from the anchors: N = 1 (and N = 0) gives 0 with a zero gradient (the anchors: NaN, a mean
    over no pairs). Kept on purpose: the anchors' ~1e12-scale gradient for rows that are exact duplicates in
    the student but not in the teacher (``F.normalize`` of a zero difference, clamped at 1e-12).

    Numerics: no ``N x N x D`` or ``N^3`` tensor is allocated (the anchors allocate both: 12 GB at N = 512,
    D = 2048). Distances and angles are translation invariant, so the kernel centers the features and forms
    the Gram matrix of the centered features in float64; pairs the Gram matrix cannot resolve (duplicates,
    near duplicates) are recomputed from their differences. This stays exact where the anchors' fp32
    ``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>`` cancels (features with a large common offset, e.g. post-ReLU).
    Deterministic run to run (no float atomics); the Gram GEMM is not bitwise across thread counts.
    """
    v.check_feature_pair(f_s, f_t)
    wd = v.check_nonneg_weight("distance_weight", distance_weight)
    wa = v.check_nonneg_weight("angle_weight", angle_weight)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_loss(f_s, f_t, wd, wa)
    return _rkd(f_s, f_t, wd, wa)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    r"""The unweighted RKD distance term, fused:

    .. math:: \frac{1}{N^2} \sum_{i,j} \mathrm{SmoothL1}\Big(\frac{d^s_{ij}}{\mu_s} - \frac{d^t_{ij}}{\mu_t}\Big),
              \qquad d_{ij} = \sqrt{\max(\lVert x_i - x_j \rVert^2, 10^{-12})}\ (i \ne j),\ d_{ii} = 0

    with ``mu`` the mean of the N(N-1) off-diagonal distances (the anchors' ``d[d > 0].mean()``; the
    student's mean is differentiated through, as in the anchors), SmoothL1 with beta 1, averaged over all N^2
    entries (the zero diagonal counts). Duplicated rows have distance 1e-6 (the clamp) and no gradient.
    ``rkd_loss(f_s, f_t, 1.0, 0.0)``; arguments and conventions as :func:`rkd_loss` (the teacher gets no
    gradient; N < 2 gives 0).
    """
    v.check_feature_pair(f_s, f_t)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_distance_loss(f_s, f_t)
    return _rkd(f_s, f_t, 1.0, 0.0)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    r"""The unweighted RKD angle term, fused:

    .. math:: \frac{1}{N^3} \sum_{i,j,k} \mathrm{SmoothL1}\big(\langle e^s_{ij}, e^s_{ik} \rangle
              - \langle e^t_{ij}, e^t_{ik} \rangle\big), \qquad e_{ij} = \mathrm{normalize}(x_j - x_i)

    (``F.normalize``, eps 1e-12: the zero vector for ``j == i`` and for duplicated rows; those zero entries
    count in the N^3 mean, as in the anchors). ``rkd_loss(f_s, f_t, 0.0, 1.0)``; arguments and conventions as
    :func:`rkd_loss`. O(N^3) time and O(N^2) memory (the anchors: an ``N x N x D`` tensor and ``N^3`` angles).
    """
    v.check_feature_pair(f_s, f_t)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_angle_loss(f_s, f_t)
    return _rkd(f_s, f_t, 0.0, 1.0)


# ---- SP ----------------------------------------------------------------------------------------------------
def _sp_pair(f_s: torch.Tensor, f_t: torch.Tensor, reduction: str, normalize: str = "l2") -> torch.Tensor:
    """One validated layer pair: 0-dim loss. The fused op normalizes the Gram rows by their L2 norm; the L1
    normalization of torchdistill runs as the plain-PyTorch composition (exact value and gradient)."""
    if normalize == "l1":
        return reference._sp_single(f_s, f_t, reduction, p=1.0)
    if not _relation_kernel("sp_forward"):
        return reference.sp_loss(f_s, f_t, reduction=reduction)
    loss, _, _ = torch.ops.fastkd.sp_forward(
        _flat2d(f_s), _flat2d(f_t), reduction, _wants_grad(f_s), _wants_grad(f_t)
    )
    return loss


def _sp_layers(g_s: Features, g_t: Features, reduction: str, normalize: str = "l2") -> Tuple[List[torch.Tensor], bool]:
    """Validates (reduction, normalize, layers) and returns the per-layer 0-dim losses and whether lists were
    given."""
    v.check_relation_reduction(reduction)
    v.check_choice("normalize", normalize, tuple(v.SP_NORMALIZE))
    list_s, list_t, is_list = v.check_layers(g_s, g_t)
    return [_sp_pair(a, b, reduction, normalize) for a, b in zip(list_s, list_t)], is_list


def sp_loss(
    g_s: Features,
    g_t: Features,
    *,
    reduction: str = "batchmean",
    weights: Optional[Sequence[float]] = None,
    normalize: str = "l2",
) -> torch.Tensor:
    r"""Similarity-preserving KD (Tung & Mori, ICCV 2019), fused. Per layer, with ``F`` the features flattened
    to ``[N, D]``:

    .. math:: G = \mathrm{normalize}_{\text{rows}}(F F^\top), \qquad
              L = \lVert G_t - G_s \rVert_F^2 \,/\, N^2 \ (\text{"batchmean"}) \text{ or } /\, 1 \ (\text{"sum"})

    (row normalization as ``F.normalize(G)``, eps 1e-12; not centered, not translation invariant).

    Anchors: RepDistiller ``Similarity()`` (per layer, batchmean; RepDistiller weights it by 3000) and
    mdistiller ``sp_loss(g_s, g_t)`` (the sum over layers) normalize the rows of ``G`` by their **L2** norm (the
    default, ``normalize="l2"``). torchdistill's ``SPKDLoss(reduction)`` computes ``normalize(G, 1)``: the second
    positional argument of ``F.normalize`` is ``p``, so its rows are **L1**-normalized and its values differ;
    ``normalize="l1"`` reproduces it exactly (value and gradient), as does :class:`fastkd.SPKDLoss`
    ("batchmean" divides by N^2, any other reduction of torchdistill does not: our ``"sum"``).

    Args:
        g_s, g_t: one feature pair (two tensors ``[N, ...]``, widths may differ) or two equal-length non-empty
            lists/tuples of layer tensors.
        reduction: ``"batchmean"`` (default) or ``"sum"``.
        weights: for lists, one finite weight >= 0 per layer (default all 1): the result is
            ``sum_l weights[l] * loss_l`` (torchdistill's per-pair weights).
        normalize: ``"l2"`` (default; RepDistiller, mdistiller) or ``"l1"`` (torchdistill ``SPKDLoss``). The
            fused kernel implements ``"l2"``; ``"l1"`` runs as a plain-PyTorch composition (exact value and
            gradient, not fused: two N x N Gram matrices and autograd's intermediates).

    Returns:
        A 0-dim loss (RepDistiller/mdistiller return shape (1,), which broadcasts the same; the
        :class:`fastkd.Similarity` module keeps their per-layer shape (1,)). The teacher gets the exact
        gradient iff it requires grad (the anchors do not detach it). N = 0 gives 0.

    Numerics: two N x N Gram matrices per layer (GEMMs), fp32 accumulation, memory O(N^2), deterministic run to run (the Gram GEMMs are not bitwise across thread counts).
    """
    losses, _ = _sp_layers(g_s, g_t, reduction, normalize)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


# ---- PKT ---------------------------------------------------------------------------------------------------
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), fused. With ``F`` flattened to
    ``[N, D]`` on each side:

    .. math:: \hat x_i = \frac{x_i}{\lVert x_i \rVert + \epsilon}, \quad S = \frac{\hat X \hat X^\top + 1}{2},
              \quad P = S / \mathrm{rowsum}(S), \quad
              L = \frac{1}{N^2} \sum_{ij} P^t_{ij} \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    NaN entries of ``x_hat`` are set to 0, as the anchors do.

    Anchors: RepDistiller ``PKT()`` (``cosine_similarity_loss``, RepDistiller weights it by 30000),
    mdistiller ``pkt_loss``, torchdistill ``PKTLoss(eps=1e-7)``; same value and gradient.

    Args:
        f_s, f_t: student and teacher features ``[N, ...]`` (widths may differ), flattened per sample (the
            anchors need ``[N, D]``). The teacher gets the exact gradient iff it requires grad.
        eps: finite, > 0.

    Deviation: a zero student row gets the finite gradient of ``x / (||x|| + eps)`` (the anchors'
    ``sqrt(sum(x^2))`` gives NaN there). N = 0 gives 0.

    Numerics: the loss is a mean of N^2 log-ratio terms that cancel: in fp32 it carries ~1e-8 absolute error
    (so does the eager anchor). Memory O(N^2), deterministic run to run (not bitwise across thread counts: GEMMs).
    """
    v.check_feature_pair(f_s, f_t)
    e = v.check_positive("eps", eps)
    if not _relation_kernel("pkt_forward"):
        return reference.pkt_loss(f_s, f_t, e)
    loss, _, _ = torch.ops.fastkd.pkt_forward(_flat2d(f_s), _flat2d(f_t), e, _wants_grad(f_s), _wants_grad(f_t))
    return loss


# ---- CC ----------------------------------------------------------------------------------------------------
def cc_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    max_p: int = 2,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Correlation congruence (Peng et al., ICCV 2019), fused, with torchdistill ``CCKDLoss`` semantics.
    With ``G = F F^T`` on each side's ``[N, D]`` features:

    .. math:: C = G \ (\text{"bilinear"}), \qquad
              C = e^{-2\gamma} \sum_{p=0}^{P} \frac{(2\gamma)^p}{p!} G^{\circ p} \ (\text{"gaussian"}), \qquad
              L = \lVert C_s - C_t \rVert_F \,/\, N^2 \ (\text{"batchmean"}) \text{ or } /\, 1 \ (\text{"sum"})

    "gaussian" is the order-``P`` Taylor expansion of ``exp(-gamma ||x_i - x_j||^2)`` (exact for unit-norm
    rows); the features are used as given, not normalized (torchdistill feeds the raw outputs of its
    ``Linear4CCKD`` layer). Note the loss is the Frobenius norm itself, **not squared** (``torch.dist``), as
    torchdistill; its gradient at ``C_s == C_t`` is 0.

    Args:
        f_s, f_t: features ``[N, ...]`` (widths may differ). The teacher gets the exact gradient iff it
            requires grad.
        kernel: ``"gaussian"`` (default) or ``"bilinear"``.
        gamma: finite, > 0; max_p: int >= 1 (a bool is rejected). Both validated for "bilinear" too.
        reduction: ``"batchmean"`` (torchdistill's shipped config) or ``"sum"`` (the undivided norm).

    torchdistill builds ``C`` with a Python loop over rows; here it is elementwise on ``G``. N = 0 gives 0
    (the anchor: NaN). RepDistiller's ``Correlation`` is a different loss (consecutive pairs only).
    Memory O(N^2), deterministic run to run (not bitwise across thread counts: GEMMs).
    """
    v.check_feature_pair(f_s, f_t)
    v.check_choice("kernel", kernel, v.CC_KERNELS)
    gm = v.check_positive("gamma", gamma)
    mp = v.check_max_p(max_p)
    v.check_relation_reduction(reduction)
    if not _relation_kernel("cc_forward"):
        return reference.cc_loss(f_s, f_t, kernel, gm, mp, reduction)
    loss, _, _ = torch.ops.fastkd.cc_forward(
        _flat2d(f_s), _flat2d(f_t), kernel, gm, mp, reduction, _wants_grad(f_s), _wants_grad(f_t)
    )
    return loss


# ---- AT and NST: RepDistiller's pooling ----------------------------------------------------------------------
def _pool_pair(
    f_s: torch.Tensor, f_t: torch.Tensor, names: Tuple[str, str]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's Attention / NSTLoss pooling, after the shape checks: if the heights differ, the map with
    the larger height is adaptive-average-pooled (in the compute dtype) to a *square* (h, h) of the smaller
    height (the width is not looked at); then the spatial shapes must agree."""
    if not v.check_spatial_pair(f_s, f_t, names):
        return f_s, f_t
    _, cdtype = _dtypes(f_s, f_t)
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s.to(cdtype), (t_h, t_h))
    else:
        f_t = F.adaptive_avg_pool2d(f_t.to(cdtype), (s_h, s_h))
    v.check_pooled_spatial(f_s, f_t, names)
    return f_s, f_t


def _pooled_layers(g_s: Features, g_t: Features):
    """Validates every layer pair (shapes, pooling) before any loss runs. Returns ``(pairs, is_list)`` with
    ``pairs = [(pooled f_s, pooled f_t, loss dtype), ...]``."""
    list_s, list_t, is_list = v.check_layers(g_s, g_t, 3, "[N, C, *spatial]")
    pairs = []
    for i, (a, b) in enumerate(zip(list_s, list_t)):
        out_dtype, _ = _dtypes(a, b)
        a, b = _pool_pair(a, b, _layer_names(i, is_list))
        pairs.append((a, b, out_dtype))
    return pairs, is_list


def _at_pair(f_s: torch.Tensor, f_t: torch.Tensor, out_dtype: torch.dtype, p: float, mode: str) -> torch.Tensor:
    """One pooled, validated layer pair (equal spatial sizes): 0-dim loss in ``out_dtype``."""
    if not _relation_kernel("at_forward"):
        return reference.at_loss(f_s, f_t, p, mode=mode).to(out_dtype)
    loss, _, _ = torch.ops.fastkd.at_forward(_flat3d(f_s), _flat3d(f_t), p, mode, _wants_grad(f_s), _wants_grad(f_t))
    return loss.to(out_dtype)


def _at_layers(g_s: Features, g_t: Features, p: float, mode: str) -> Tuple[List[torch.Tensor], bool]:
    pp = v.check_positive("p", p)
    v.check_choice("mode", mode, v.AT_MODES)
    pairs, is_list = _pooled_layers(g_s, g_t)
    return [_at_pair(a, b, dt, pp, mode) for a, b, dt in pairs], is_list


def at_loss(
    g_s: Features,
    g_t: Features,
    p: float = 2,
    *,
    mode: str = "code",
    weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), fused. Per layer, on maps
    ``[N, C, *spatial]`` flattened to ``[N, C, S]``:

    .. math:: a = \mathrm{normalize}\Big(\frac{1}{C}\sum_c f_c^{\,p}\Big) \ (\text{"code"}), \quad
              L = \frac{1}{N S}\sum_{n,s} (a^s_{ns} - a^t_{ns})^2; \qquad
              a = \mathrm{normalize}\Big(\sum_c f_c^{\,p}\Big) \ (\text{"paper"}), \quad
              L = \frac{1}{N}\sum_n \lVert a^s_n - a^t_n \rVert_2

    (``normalize`` over the spatial positions, eps 1e-12; "paper" uses the L2 norm per sample, not squared).

    Anchors: RepDistiller ``Attention(p=2)`` (per layer; RepDistiller weights it by 1000), mdistiller
    ``at_loss(g_s, g_t, p)`` (sum over layers), torchdistill ``ATLoss(at_pairs, mode='code'|'paper')`` (p = 2,
    weighted pairs; paper mode divides by the batch size).

    Pooling (RepDistiller's rule, kept): if the heights (dim 2) differ, the taller map is
    ``F.adaptive_avg_pool2d``-ed to a *square* ``(h, h)`` of the smaller height; the widths are never
    compared. Different heights need 4-D maps; equal heights with different spatial shapes, or spatial shapes
    that still differ after pooling, are a ValueError. Channel counts may differ.

    Args:
        g_s, g_t: one pair of maps or two equal-length non-empty lists/tuples of layer maps.
        p: finite, > 0 (float allowed; ``f.pow(p)`` semantics: NaN for negative features with a non-integer
            p, as the anchors).
        mode: ``"code"`` (default; RepDistiller/mdistiller/torchdistill 'code') or ``"paper"``.
        weights: for lists, one finite weight >= 0 per layer (default all 1): ``sum_l weights[l] * loss_l``.

    Returns:
        A 0-dim loss. The teacher gets the exact gradient iff it requires grad (the anchors do not detach it).

    Deviation: ``p`` applies in "paper" mode too (torchdistill hard-codes 2; p = 2 reproduces it). N = 0 gives
    0. Numerics: one read of each map for the channel reduction, one more for the gradient; deterministic.
    """
    losses, _ = _at_layers(g_s, g_t, p, mode)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


def _nst_pair(f_s: torch.Tensor, f_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """One pooled, validated layer pair: the squared MMD with the kernel <a, b>^2 through batched Grams."""
    _, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    # Under torch.autocast the bmm would run in float16 / bfloat16: the composition runs with autocast off,
    # in float32 (float64 for float64 input), as every fastkd op does.
    with torch.autocast(f_s.device.type, enabled=False):
        return _nst_terms(f_s, f_t, cdtype).to(out_dtype)


def _nst_terms(f_s: torch.Tensor, f_t: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    s = F.normalize(_flat3d(f_s).to(cdtype), p=2.0, dim=2, eps=_NORMALIZE_EPS)  # [N, C_s, S]
    t = F.normalize(_flat3d(f_t).to(cdtype), p=2.0, dim=2, eps=_NORMALIZE_EPS)  # [N, C_t, S]
    with torch.no_grad():  # RepDistiller detaches K(t, t) only
        k_tt = torch.bmm(t, t.transpose(1, 2)).pow(2).mean()
    k_ss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean()
    k_st = torch.bmm(s, t.transpose(1, 2)).pow(2).mean()
    return k_tt + k_ss - 2.0 * k_st


def _nst_layers(g_s: Features, g_t: Features) -> Tuple[List[torch.Tensor], bool]:
    pairs, is_list = _pooled_layers(g_s, g_t)
    return [_nst_pair(a, b, dt) for a, b, dt in pairs], is_list


def nst_loss(g_s: Features, g_t: Features, *, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    r"""Neuron selectivity transfer (Huang & Wang, 2017): the squared MMD with the polynomial kernel
    ``k(a, b) = <a, b>^2`` between the channels of the two maps. Per layer, with each channel's map
    L2-normalized over the spatial positions (``S [N, C_s, HW]``, ``T [N, C_t, HW]``):

    .. math:: L = \mathrm{mean}\big((T T^\top)^{\circ 2}\big) + \mathrm{mean}\big((S S^\top)^{\circ 2}\big)
              - 2\,\mathrm{mean}\big((S T^\top)^{\circ 2}\big)

    (means over ``N C_t^2``, ``N C_s^2`` and ``N C_s C_t`` entries), with the ``K(t, t)`` term detached.

    Anchors: RepDistiller ``NSTLoss()`` (per layer), mdistiller ``nst_loss`` (sum over layers); same value and
    gradient. Pooling as :func:`at_loss` (RepDistiller's square pooling of the taller map).

    Args:
        g_s, g_t: one pair of maps ``[N, C, *spatial]`` or two equal-length non-empty lists/tuples of them.
        weights: for lists, one finite weight >= 0 per layer (default all 1): ``sum_l weights[l] * loss_l``.

    Returns:
        A 0-dim loss. Kept on purpose (RepDistiller's quirk): a teacher that requires grad gets the gradient of
        the cross term ``-2 mean K(s, t)`` only. N = 0 gives 0.

    Numerics: plain PyTorch (no custom op): batched Gram matrices (``torch.bmm``, ``[N, C, C]``) instead of the
    anchor's ``[N, C, C, HW]`` broadcast; fp32 accumulation (float64 for float64 input).
    """
    losses, _ = _nst_layers(g_s, g_t)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


# ---- FitNet ------------------------------------------------------------------------------------------------
def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., ICLR 2015) without a regressor:
    ``mean((f_s - f_t)^2)`` (``reduction="mean"``: RepDistiller ``HintLoss()`` = ``nn.MSELoss()``, mdistiller's
    FitNet ``F.mse_loss``) or its sum (``"sum"``: torchdistill's ``MSELoss(reduction='sum')`` configs).

    ``f_s`` and ``f_t`` must have the same shape: to map a student feature onto a differently shaped teacher
    use :class:`fastkd.HintLoss` with shapes (a :class:`fastkd.ConvReg` regressor). The teacher gets the
    gradient iff it requires grad. Computed in float32 (float64 for float64 input) with ``F.mse_loss`` (no
    custom op); N = 0 gives 0.
    """
    v.check_feature_pair(f_s, f_t)
    v.check_same_shape(f_s, f_t)
    v.check_choice("reduction", reduction, reference.HINT_REDUCTIONS)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    return F.mse_loss(f_s.to(cdtype), f_t.to(cdtype), reduction=reduction).to(out_dtype)
