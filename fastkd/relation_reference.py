"""Plain-PyTorch implementations of fastkd's relation- and feature-based losses (RKD, SP, PKT, CC, AT, NST,
FitNet hints), re-exported by :mod:`fastkd.reference` (the response-based twins and the module's conventions
are documented there).

They are the test oracle (run in float64) and what :mod:`fastkd.relation_functional` runs, with a warning,
where the compiled kernels are missing: same signatures and the same argument checks as the fused versions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd import _validation as v
from fastkd._precision import _dtypes

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
# Relation-based losses (RKD distance and angle, SP, PKT, CC) and feature-based losses (AT, NST, FitNet).
#
# Features are [N, ...]: one sample per leading index, flattened per sample to [N, D]; student and teacher
# widths may differ. Computed in float32 (float64 for float64 input, the oracle); the result has the
# promoted input dtype. These follow the anchors' formulas term by term (see the docstrings of
# fastkd.relation_functional), but with exact pairwise differences where the anchors cancel: RKD distances
# come from torch.cdist without the Gram shortcut (exactly 0 for duplicated rows, whatever the common offset).
# --------------------------------------------------------------------------------------------------------
_RKD_DIST_EPS = 1e-12  # RepDistiller pdist: squared distances clamped at eps before the square root
_NORMALIZE_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)
_CHUNK_ELEMS = 1 << 22  # elements per intermediate tensor of the chunked loops below


def _flat(x: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """[N, ...] -> [N, D] in the compute dtype (reshape, not view: N may be 0 and x may be strided)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).to(cdtype)


def _zero_loss(*xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact 0 that is still connected to the inputs' graph (their gradient is then all zeros)."""
    out = torch.zeros((), dtype=dtype, device=xs[0].device)
    for x in xs:
        if x.requires_grad:
            out = out + (x.sum() * 0).to(dtype)
    return out


def _rkd_pdist(x: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``pdist(e, squared=False, eps=1e-12)``: sqrt(max(||x_i - x_j||^2, eps)) off the diagonal,
    0 on it. The squared distances are computed from the differences (torch.cdist without the mm path),
    never as |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>: exact for duplicated rows and large common offsets."""
    n = x.shape[0]
    sq = torch.cdist(x, x, p=2.0, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    d = sq.clamp_min(_RKD_DIST_EPS).sqrt()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.zeros((), dtype=x.dtype, device=x.device), d)


def _rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unweighted RKD distance term on [N, D] compute-dtype features (teacher without gradient).

    Every off-diagonal distance is >= sqrt(1e-12) > 0, so the anchors' ``d[d > 0].mean()`` is the mean over
    the N (N - 1) off-diagonal entries. N < 2 has no pair: 0 (the anchors give NaN, a mean over nothing)."""
    n = s.shape[0]
    if n < 2:
        return _zero_loss(s, dtype=s.dtype)
    pairs = n * (n - 1)
    with torch.no_grad():
        t_d = _rkd_pdist(t)
        t_d = t_d / (t_d.sum() / pairs)
    d = _rkd_pdist(s)
    d = d / (d.sum() / pairs)
    return F.smooth_l1_loss(d, t_d, reduction="mean", beta=1.0)


def _rkd_angle_chunk(s: torch.Tensor, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum over apexes i in [start, stop) and all j, k of SmoothL1(<e_ij, e_ik>_s - <e_ij, e_ik>_t),
    e_ij = normalize(x_j - x_i) (F.normalize, eps 1e-12: the zero vector for j == i and duplicated rows)."""
    with torch.no_grad():
        e_t = F.normalize(t[None, :, :] - t[start:stop, None, :], p=2.0, dim=2, eps=_NORMALIZE_EPS)
        a_t = torch.bmm(e_t, e_t.transpose(1, 2))
    e_s = F.normalize(s[None, :, :] - s[start:stop, None, :], p=2.0, dim=2, eps=_NORMALIZE_EPS)
    a_s = torch.bmm(e_s, e_s.transpose(1, 2))
    return F.smooth_l1_loss(a_s, a_t, reduction="sum", beta=1.0)


def _rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unweighted RKD angle term: the mean over all N^3 triplets (i, j, k) of SmoothL1(a_s - a_t),
    a_ijk = <e_ij, e_ik>. Looped over chunks of apexes i so that no N x N x D or N^3 tensor exists at once;
    with a gradient to compute, each chunk is checkpointed (recomputed in backward) once the problem is
    large, so autograd does not keep the chunks' N x N x D differences either."""
    n = s.shape[0]
    if n == 0:
        return _zero_loss(s, dtype=s.dtype)
    width = max(s.shape[1], t.shape[1], n)
    step = max(1, min(n, _CHUNK_ELEMS // (n * width)))
    checkpoint = s.requires_grad and torch.is_grad_enabled() and n * n * width > _CHUNK_ELEMS
    total = _zero_loss(s, dtype=s.dtype)
    for start in range(0, n, step):
        stop = min(n, start + step)
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as _ckpt

            part = _ckpt(_rkd_angle_chunk, s, t, start, stop, use_reentrant=False)
        else:
            part = _rkd_angle_chunk(s, t, start, stop)
        total = total + part
    return total / (n * n * n)


def _rkd_inputs(f_s: torch.Tensor, f_t: torch.Tensor):
    v.check_feature_pair(f_s, f_t)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    return _flat(f_s, cdtype), _flat(f_t, cdtype).detach(), out_dtype


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational KD (Park et al. 2019) in plain PyTorch, RepDistiller ``RKDLoss(w_d, w_a)`` / mdistiller
    ``rkd_loss`` / torchdistill ``RKDLoss(dist_factor, angle_factor, reduction='mean')`` semantics:
    ``distance_weight * L_dist + angle_weight * L_angle``. The teacher never receives a gradient (the anchors
    compute it under no_grad). A term whose weight is 0 is not computed and contributes exactly 0
    (torchdistill skips it too). See :func:`fastkd.rkd_loss`."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    wd = v.check_nonneg_weight("distance_weight", distance_weight)
    wa = v.check_nonneg_weight("angle_weight", angle_weight)
    loss = _zero_loss(s, dtype=s.dtype)
    if wd != 0.0:
        loss = loss + wd * _rkd_distance(s, t)
    if wa != 0.0:
        loss = loss + wa * _rkd_angle(s, t)
    return loss.to(out_dtype)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The unweighted RKD distance term: SmoothL1 (beta 1, mean over the N^2 entries, diagonal included) of
    the pairwise distance matrices, each divided by the mean of its positive (off-diagonal) entries."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    return _rkd_distance(s, t).to(out_dtype)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The unweighted RKD angle term: SmoothL1 (beta 1, mean over the N^3 triplets) of
    ``a_ijk = <normalize(x_j - x_i), normalize(x_k - x_i)>`` (0 where j == i or k == i)."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    return _rkd_angle(s, t).to(out_dtype)


def _layers_sum(g_s, g_t, weights, single, min_dim=2, what="[N, ...]"):
    """Applies ``single(f_s, f_t, names)`` to one pair or to every layer pair and returns the weighted sum
    (``names``: the argument names for error messages, e.g. ``("g_s[1]", "g_t[1]")``)."""
    list_s, list_t, is_list = v.check_layers(g_s, g_t, min_dim, what)
    w = v.check_layer_weights(weights, len(list_s))
    total = None
    for i, (wi, a, b) in enumerate(zip(w, list_s, list_t)):
        names = (f"g_s[{i}]", f"g_t[{i}]") if is_list else ("g_s", "g_t")
        term = single(a, b, names)
        term = term if wi == 1.0 else wi * term
        total = term if total is None else total + term
    return total


def _sp_single(f_s: torch.Tensor, f_t: torch.Tensor, reduction: str, names=("g_s", "g_t"),
               p: float = 2.0) -> torch.Tensor:
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    s, t = _flat(f_s, cdtype), _flat(f_t, cdtype)
    g_s = F.normalize(s @ s.t(), p=p, dim=1, eps=_NORMALIZE_EPS)
    g_t = F.normalize(t @ t.t(), p=p, dim=1, eps=_NORMALIZE_EPS)
    diff = g_t - g_s
    loss = (diff * diff).sum()
    if reduction == "batchmean":
        loss = loss / (n * n)
    return loss.to(out_dtype)


def sp_loss(g_s, g_t, *, reduction: str = "batchmean", weights=None, normalize: str = "l2") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019) in plain PyTorch: ``G = normalize(F F^T)`` row-wise
    (F.normalize, eps 1e-12) for each side, ``||G_t - G_s||_F^2``, divided by N^2 for "batchmean"
    (RepDistiller ``Similarity``, torchdistill ``SPKDLoss(reduction='batchmean')``), not for "sum".
    ``g_s``, ``g_t``: one feature pair or lists of layer pairs (weighted sum, mdistiller ``sp_loss``).
    Not translation invariant: features are used as given. ``normalize="l1"`` normalizes the rows of ``G`` by
    their L1 norm instead (torchdistill's ``SPKDLoss``). See :func:`fastkd.sp_loss`."""
    v.check_relation_reduction(reduction)
    p = v.SP_NORMALIZE[v.check_choice("normalize", normalize, tuple(v.SP_NORMALIZE))]
    return _layers_sum(g_s, g_t, weights, lambda a, b, names: _sp_single(a, b, reduction, names, p))


def _pkt_probs(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalized ``(cos + 1) / 2`` similarities of PKT: x / (||x|| + eps) (NaN entries set to 0, as the
    anchors do after the division), S = (x x^T + 1) / 2, P = S / row sums."""
    norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)  # gradient 0 (not NaN) at a zero row
    x = x / (norm + eps)
    x = torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) in plain PyTorch, RepDistiller ``PKT`` /
    torchdistill ``PKTLoss`` semantics: ``mean_ij P_t * log((P_t + eps) / (P_s + eps))`` over the N^2 entries.
    Features are flattened per sample (the anchors need [N, D]). A zero student row gets the finite gradient
    of x / (||x|| + eps) (the anchors' sqrt gives NaN there). See :func:`fastkd.pkt_loss`."""
    v.check_feature_pair(f_s, f_t)
    e = v.check_positive("eps", eps)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    p_s = _pkt_probs(_flat(f_s, cdtype), e)
    p_t = _pkt_probs(_flat(f_t, cdtype), e)
    return torch.mean(p_t * torch.log((p_t + e) / (p_s + e))).to(out_dtype)


def _cc_matrix(x: torch.Tensor, kernel: str, gamma: float, max_p: int) -> torch.Tensor:
    """torchdistill CCKDLoss's correlation matrix: ``x x^T`` (bilinear) or the order-``max_p`` Taylor expansion
    of the Gaussian RBF, ``exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (x x^T)^p`` (gaussian)."""
    g = x @ x.t()
    if kernel == "bilinear":
        return g
    out = torch.ones_like(g)
    for p in range(1, max_p + 1):
        out = out + ((2.0 * gamma) ** p / math.factorial(p)) * g.pow(p)
    return out * math.exp(-2.0 * gamma)


def cc_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    max_p: int = 2,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Correlation congruence (Peng et al. 2019) in plain PyTorch, torchdistill ``CCKDLoss`` semantics:
    ``||C_s - C_t||_F`` (the Frobenius norm itself, not its square), divided by N^2 for "batchmean", not for
    "sum". The gradient at C_s == C_t is 0 (torch.dist's). ``gamma`` and ``max_p`` are only used by the
    gaussian kernel (but are validated either way). See :func:`fastkd.cc_loss`."""
    v.check_feature_pair(f_s, f_t)
    v.check_choice("kernel", kernel, v.CC_KERNELS)
    gm = v.check_positive("gamma", gamma)
    mp = v.check_max_p(max_p)
    v.check_relation_reduction(reduction)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    c_s = _cc_matrix(_flat(f_s, cdtype), kernel, gm, mp)
    c_t = _cc_matrix(_flat(f_t, cdtype), kernel, gm, mp)
    loss = torch.linalg.vector_norm(c_s - c_t)  # torch.dist(c_s, c_t, 2): subgradient 0 at 0
    if reduction == "batchmean":
        loss = loss / (n * n)
    return loss.to(out_dtype)


def _pool_like_repdistiller(f_s: torch.Tensor, f_t: torch.Tensor, pool: bool, names=("g_s", "g_t")):
    """RepDistiller's Attention / NSTLoss pooling: if the heights differ, the map with the larger height is
    adaptive-average-pooled to a square (h, h) of the smaller height (the width is not looked at)."""
    if not pool:
        return f_s, f_t
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    else:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    v.check_pooled_spatial(f_s, f_t, names)
    return f_s, f_t


def _attention_map(f: torch.Tensor, p: float, mode: str) -> torch.Tensor:
    """``normalize(mean_c f^p)`` flattened over the spatial positions ("code"; torchdistill's "paper" sums
    over the channels, which only matters below the normalize eps)."""
    a = f.pow(p)
    a = a.sum(1) if mode == "paper" else a.mean(1)
    return F.normalize(a.reshape(f.shape[0], -1), p=2.0, dim=1, eps=_NORMALIZE_EPS)


def _at_single(f_s: torch.Tensor, f_t: torch.Tensor, p: float, mode: str, names=("g_s", "g_t")) -> torch.Tensor:
    pool = v.check_spatial_pair(f_s, f_t, names)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    f_s, f_t = _pool_like_repdistiller(f_s.to(cdtype), f_t.to(cdtype), pool, names)
    diff = _attention_map(f_s, p, mode) - _attention_map(f_t, p, mode)
    if mode == "paper":
        loss = torch.linalg.vector_norm(diff, ord=2, dim=1).sum() / n
    else:
        loss = diff.pow(2).mean()
    return loss.to(out_dtype)


def at_loss(g_s, g_t, p: float = 2, *, mode: str = "code", weights=None) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) in plain PyTorch. ``mode="code"``: RepDistiller
    ``Attention(p)`` / torchdistill ``ATLoss(mode='code')``, ``mean((a_s - a_t)^2)`` over N x HW with
    ``a = normalize(mean_c f^p)``; ``mode="paper"``: torchdistill ``ATLoss(mode='paper')``,
    ``sum_n ||a_s - a_t||_2 / N`` with the channel sum. Maps of different heights are pooled as RepDistiller
    does. ``g_s``, ``g_t``: one pair of [N, C, *spatial] maps or lists of layer pairs (weighted sum,
    mdistiller ``at_loss``). See :func:`fastkd.at_loss`."""
    pp = v.check_positive("p", p)
    v.check_choice("mode", mode, v.AT_MODES)
    return _layers_sum(g_s, g_t, weights, lambda a, b, names: _at_single(a, b, pp, mode, names), 3,
                       "[N, C, *spatial]")


def _nst_single(f_s: torch.Tensor, f_t: torch.Tensor, names=("g_s", "g_t")) -> torch.Tensor:
    pool = v.check_spatial_pair(f_s, f_t, names)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    f_s, f_t = _pool_like_repdistiller(f_s.to(cdtype), f_t.to(cdtype), pool, names)
    s = F.normalize(f_s.reshape(n, f_s.shape[1], -1), p=2.0, dim=2, eps=_NORMALIZE_EPS)
    t = F.normalize(f_t.reshape(n, f_t.shape[1], -1), p=2.0, dim=2, eps=_NORMALIZE_EPS)
    # poly_kernel(a, b) = (<a_c, b_c'>)^2 over channel pairs: a batched Gram, never [N, C, C, HW]
    k_tt = torch.bmm(t, t.transpose(1, 2)).pow(2).mean().detach()
    k_ss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean()
    k_st = torch.bmm(s, t.transpose(1, 2)).pow(2).mean()
    return (k_tt + k_ss - 2.0 * k_st).to(out_dtype)


def nst_loss(g_s, g_t, *, weights=None) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017) in plain PyTorch, RepDistiller ``NSTLoss`` semantics:
    the squared MMD with the polynomial kernel k(a, b) = <a, b>^2 between the channel-wise L2-normalized
    maps: ``mean K(t, t) (detached) + mean K(s, s) - 2 mean K(s, t)``. The teacher receives a gradient (from the
    cross term only) if it requires grad. See :func:`fastkd.nst_loss`."""
    return _layers_sum(g_s, g_t, weights, _nst_single, 3, "[N, C, *spatial]")


HINT_REDUCTIONS = ("mean", "sum")


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """FitNets hint loss without a regressor: ``mean((f_s - f_t)^2)`` (RepDistiller ``HintLoss``, an
    ``nn.MSELoss()``) or its sum (``reduction="sum"``, torchdistill's ``MSELoss(reduction='sum')`` configs);
    the shapes must match. See :class:`fastkd.HintLoss` for the regressor."""
    v.check_feature_pair(f_s, f_t)
    v.check_same_shape(f_s, f_t)
    v.check_choice("reduction", reduction, HINT_REDUCTIONS)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    return F.mse_loss(f_s.to(cdtype), f_t.to(cdtype), reduction=reduction).to(out_dtype)
