"""The response divergences, one spec each: the Python side of ``csrc/include/fastkd/divergences.h``.

A spec names a divergence (its schema name in the C++ registry), its parameters in registry order (defaults,
ranges), whether the ``T^2`` factor applies, a float64 PyTorch formula per vocabulary entry, its one-line
doc, the parameter sets the test suite runs and the anchor it matches. From the specs come
:func:`fastkd.divergence_loss`, the generated functions and modules (``fastkd.skew_kl_loss``,
``fastkd.SkewKLLoss``, ...), their twins in :mod:`fastkd.reference`, the choices of
:func:`fastkd.fused_linear_kd_loss` and :func:`fastkd.distributed.vocab_parallel_kd_loss`, the benchmark cases,
the README's table of divergences and the tests' parametrization. ``tests/test_divergences.py`` checks that
these specs and the compiled registry (``fastkd._C.divergences()``) agree.

Notation: ``p`` = teacher, ``q`` = student, both ``softmax(z / T)`` of one row; a formula maps
``(p, q, log_p, log_q, **params)`` (tensors ``[..., V]`` and floats) to the per-entry terms ``phi`` whose sum over
the vocabulary is the row's divergence. Entries where a term's weight is 0 contribute exactly 0 (never
``0 * inf``); formulas are written in the compute dtype and differentiate correctly there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["Param", "DivergenceSpec", "REGISTRY", "register", "get", "names", "readme_table"]


@dataclass(frozen=True)
class Param:
    """A named hyperparameter: its default (None: required) and its range ``[lo, hi]``, an end excluded when
    marked open."""

    name: str
    default: Optional[float]
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    doc: str = ""

    def range_text(self) -> str:
        if self.lo == -math.inf and self.hi == math.inf:
            return "any finite value"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def contains(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return math.isfinite(x) and above and below


Formula = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DivergenceSpec:
    """One response divergence (see the module docstring)."""

    name: str                      # schema name, as in csrc/include/fastkd/divergences.h
    family: str                    # "kl_type", "psi" or "decoupled" (the kernels' families)
    params: Tuple[Param, ...]      # registry order: the op's float[] params
    temperature_squared: bool      # default of scale_by_temperature
    formula: Optional[Formula]     # float64 per-entry terms phi(p, q, log_p, log_q, **params); None: decoupled
    doc: str                       # one line, for docstrings and the README table
    anchor: str                    # what it matches
    function: str                  # the functional's name (fastkd.<function>)
    module: str                    # the nn.Module's name (fastkd.<module>)
    test_params: Tuple[Mapping[str, float], ...] = ({},)  # parameter sets the test suite runs
    temperature_squared_allowed: bool = True  # False: scale_by_temperature=True is an error
    generated: bool = True         # the function and module are generated (False: written by hand)
    fused_head: bool = True        # runs in fastkd.fused_linear_kd_loss / vocab_parallel_kd_loss
    formula_doc: str = ""          # the row's value, for docstrings
    # whether the divergence is infinite where the teacher gives 0 to entries the student does not (a teacher
    # vocabulary padded to the student's), given the parameters: the fused head refuses that case
    infinite_on_padding: Optional[Callable[..., bool]] = None
    # the anchor's own eager formulation, (student_logits, teacher_logits, T, **params) -> per-row values in
    # fastkd's convention (no T^2): the tests compare it with the kernels (None: compared elsewhere)
    anchor_formula: Optional[Callable[..., torch.Tensor]] = None
    # limit cases the tests check exactly: (params, other divergence, its params), e.g. skew 0 is "kl"
    same_as: Tuple[Tuple[Mapping[str, float], str, Mapping[str, float]], ...] = ()

    @property
    def param_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def resolve(self, given: Mapping[str, object], where: str) -> Tuple[float, ...]:
        """The parameters in registry order from keyword arguments (defaults filled in). Python types are
        checked here (TypeError); ranges by the op (ValueError), or by :meth:`check_ranges` where no op runs."""
        from fastkd import _validation as v

        unknown = sorted(set(given) - set(self.param_names))
        if unknown:
            takes = ", ".join(self.param_names) or "no parameters"
            raise TypeError(f"{where}: divergence {self.name!r} takes {takes}; got unexpected {', '.join(unknown)}")
        values = []
        for p in self.params:
            x = given.get(p.name, p.default)
            if x is None:
                raise TypeError(f"{where}: divergence {self.name!r} needs its parameter {p.name!r}")
            values.append(v.check_real(p.name, x))
        return tuple(values)

    def check_ranges(self, values: Sequence[float]) -> None:
        """The op's range rule, for the plain-PyTorch paths and early checks (the same message)."""
        from fastkd import _validation as v

        for p, x in zip(self.params, values):
            v.check_real(p.name, x, p.lo, p.hi, low_open=p.lo_open, high_open=p.hi_open,
                         why=f" for divergence '{self.name}'")


REGISTRY: Dict[str, DivergenceSpec] = {}


def register(spec: DivergenceSpec) -> DivergenceSpec:
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> DivergenceSpec:
    if name not in REGISTRY:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, REGISTRY))}, got {name!r}")
    return REGISTRY[name]


def names(fused_head: bool = False) -> Tuple[str, ...]:
    return tuple(n for n, s in REGISTRY.items() if s.fused_head or not fused_head)


# --------------------------------------------------------------------------------------------------------
# formula building blocks (float64 oracle; exact zeros where a weight is 0)
# --------------------------------------------------------------------------------------------------------
def plogp_ratio(w: torch.Tensor, log_w: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``w * (log w - log r)``, exactly 0 where ``w == 0`` (whatever ``log_r`` is), with finite gradients there;
    +inf where ``w > 0`` and ``r == 0``; NaN stays NaN."""
    pos = w != 0
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    diff = torch.where(pos, log_w, zero) - torch.where(pos, log_r, zero)
    return torch.where(pos, w * diff, zero)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, a_weight: float) -> torch.Tensor:
    """``log(a_weight * a + (1 - a_weight) * b)``; -inf where both terms are 0, with zero (not NaN) gradients."""
    if a_weight == 0.0:
        return log_b
    if a_weight == 1.0:
        return log_a
    x, y = log_a + math.log(a_weight), log_b + math.log1p(-a_weight)
    both = (x == -math.inf) & (y == -math.inf)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.logaddexp(torch.where(both, zero, x), torch.where(both, zero, y))
    return torch.where(both, torch.full((), -math.inf, dtype=x.dtype, device=x.device), out)


def _kl(p, q, log_p, log_q):
    return plogp_ratio(p, log_p, log_q)


def _reverse_kl(p, q, log_p, log_q):
    return plogp_ratio(q, log_q, log_p)


def _jsd(p, q, log_p, log_q, beta):
    if beta == 0.0:  # TRL's convention: the endpoints are the forward and reverse KL
        return plogp_ratio(p, log_p, log_q)
    if beta == 1.0:
        return plogp_ratio(q, log_q, log_p)
    log_m = log_mix(log_p, log_q, beta)
    return beta * plogp_ratio(p, log_p, log_m) + (1.0 - beta) * plogp_ratio(q, log_q, log_m)


def _tvd(p, q, log_p, log_q):
    return 0.5 * (p - q).abs()


# --------------------------------------------------------------------------------------------------------
# the registry (order: as csrc/include/fastkd/divergences.h)
# --------------------------------------------------------------------------------------------------------
register(DivergenceSpec(
    name="kl", family="kl_type", params=(), temperature_squared=True, formula=_kl,
    doc="forward KL, Hinton KD", formula_doc="KL(p || q)",
    anchor="RepDistiller DistillKL, mdistiller kd_loss, torchdistill KDLoss",
    function="kd_loss", module="KDLoss", generated=False))
register(DivergenceSpec(
    name="reverse_kl", family="kl_type", params=(), temperature_squared=True, formula=_reverse_kl,
    doc="reverse (mode-seeking) KL", formula_doc="KL(q || p)",
    anchor="TRL generalized_jsd_loss(beta=1), MiniLLM",
    function="reverse_kl_loss", module="ReverseKLLoss", generated=False,
    infinite_on_padding=lambda: True))
register(DivergenceSpec(
    name="jsd", family="psi", temperature_squared=False, temperature_squared_allowed=False, formula=_jsd,
    params=(Param("beta", 0.5, 0.0, 1.0, doc="weight of the teacher in the mixture m"),),
    doc="generalized Jensen-Shannon divergence",
    formula_doc="beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q",
    anchor="TRL GKD generalized_jsd_loss, Liger-Kernel JSD",
    function="jsd_loss", module="JSDLoss", generated=False, infinite_on_padding=lambda beta: beta == 1.0,
    same_as=(({"beta": 0.0}, "kl", {}), ({"beta": 1.0}, "reverse_kl", {})),
    test_params=({"beta": 0.5}, {"beta": 0.1}, {"beta": 0.0}, {"beta": 1.0})))
register(DivergenceSpec(
    name="tvd", family="psi", params=(), temperature_squared=False, temperature_squared_allowed=False,
    formula=_tvd, doc="total variation distance", formula_doc="0.5 sum_j |p_j - q_j|",
    anchor="Liger-Kernel TVD, DistillKit", function="tvd_loss", module="TVDLoss", generated=False))
register(DivergenceSpec(
    name="dkd", family="decoupled", temperature_squared=True, formula=None, fused_head=False,
    params=(Param("alpha", 1.0, 0.0, math.inf, hi_open=True, doc="weight of TCKD"),
            Param("beta", 8.0, 0.0, math.inf, hi_open=True, doc="weight of NCKD")),
    doc="decoupled KD (needs class targets)", formula_doc="alpha TCKD + beta NCKD",
    anchor="mdistiller dkd_loss", function="dkd_loss", module="DKDLoss", generated=False,
    test_params=({"alpha": 1.0, "beta": 8.0},)))


def _skew_kl(p, q, log_p, log_q, skew):
    return plogp_ratio(p, log_p, log_mix(log_p, log_q, skew))


def _distillm_skewed_forward_kl(s, t, T, skew):
    """DistiLLM's skewed_forward_kl (cross-entropy -sum p log m, no temperature; here at T), per row, plus the
    teacher's negative entropy sum p log p: KL(p || m)."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    cross = -(p * torch.log(skew * p + (1 - skew) * q)).sum(-1)
    return cross + (p * torch.log_softmax(t / T, -1)).sum(-1)


register(DivergenceSpec(
    name="skew_kl", family="psi", temperature_squared=True, formula=_skew_kl,
    params=(Param("skew", 0.1, 0.0, 1.0, hi_open=True, doc="weight of the teacher in the mixture m"),),
    doc="skew KL (DistiLLM)", formula_doc="KL(p || m), m = skew p + (1 - skew) q",
    anchor="DistiLLM skewed_forward_kl(lam=skew), which returns the cross-entropy -sum p log m (the KL plus the "
           "teacher's entropy: same gradient)",
    function="skew_kl_loss", module="SkewKLLoss", anchor_formula=_distillm_skewed_forward_kl,
    test_params=({"skew": 0.1}, {"skew": 0.5}, {"skew": 0.0}), same_as=(({"skew": 0.0}, "kl", {}),)))


def _skew_reverse_kl(p, q, log_p, log_q, skew):
    return plogp_ratio(q, log_q, log_mix(log_q, log_p, skew))


def _distillm_skewed_reverse_kl(s, t, T, skew):
    """DistiLLM's skewed_reverse_kl (here at T), per row: sum q (log q - log m), m = (1 - skew) p + skew q."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    mixed = (1 - skew) * p + skew * q
    return (q * torch.log_softmax(s / T, -1) - q * torch.log(mixed)).sum(-1)


register(DivergenceSpec(
    name="skew_reverse_kl", family="psi", temperature_squared=True, formula=_skew_reverse_kl,
    params=(Param("skew", 0.1, 0.0, 1.0, hi_open=True, doc="weight of the student in the mixture m"),),
    doc="skew reverse KL (DistiLLM)", formula_doc="KL(q || m), m = skew q + (1 - skew) p",
    anchor="DistiLLM skewed_reverse_kl(lam=skew)", function="skew_reverse_kl_loss", module="SkewReverseKLLoss",
    anchor_formula=_distillm_skewed_reverse_kl, infinite_on_padding=lambda skew: skew == 0.0,
    test_params=({"skew": 0.1}, {"skew": 0.7}, {"skew": 0.0}), same_as=(({"skew": 0.0}, "reverse_kl", {}),)))


def _symmetric_kl(p, q, log_p, log_q, reverse_weight):
    w = reverse_weight
    return (1.0 - w) * plogp_ratio(p, log_p, log_q) + w * plogp_ratio(q, log_q, log_p)


def _distillm_symmetric_kl(s, t, T, reverse_weight):
    """DistiLLM's symmetric_kl(lam=reverse_weight) (here at T), per row: (1 - lam) forward_kl + lam reverse_kl,
    whose forward_kl is the cross-entropy -sum p log q; plus (1 - lam) sum p log p, the KL."""
    log_p, log_q = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
    p, q = log_p.exp(), log_q.exp()
    forward_ce = -(p * log_q).sum(-1)
    reverse = (q * log_q - q * log_p).sum(-1)
    return (1 - reverse_weight) * forward_ce + reverse_weight * reverse + (1 - reverse_weight) * (p * log_p).sum(-1)


register(DivergenceSpec(
    name="symmetric_kl", family="psi", temperature_squared=True, formula=_symmetric_kl,
    params=(Param("reverse_weight", 0.5, 0.0, 1.0, doc="weight w of the reverse KL"),),
    doc="symmetric KL", formula_doc="(1 - w) KL(p || q) + w KL(q || p)",
    anchor="torchtune SymmetricKLWithChunkedOutputLoss(sym_kl_ratio=w), DistiLLM symmetric_kl(lam=w) (both with "
           "the cross-entropy for the forward KL)",
    function="symmetric_kl_loss", module="SymmetricKLLoss", anchor_formula=_distillm_symmetric_kl,
    infinite_on_padding=lambda reverse_weight: reverse_weight > 0.0,
    test_params=({"reverse_weight": 0.5}, {"reverse_weight": 0.9}, {"reverse_weight": 0.0},
                 {"reverse_weight": 1.0}),
    same_as=(({"reverse_weight": 0.0}, "kl", {}), ({"reverse_weight": 1.0}, "reverse_kl", {}))))


def _ab(p, q, log_p, log_q, alpha, beta):
    """From the definition (LOSSES.md), its limit cases included; 0 where p = q = 0."""
    a, b, s = alpha, beta, alpha + beta
    some = (log_p != -math.inf) | (log_q != -math.inf)  # from the logs: p and q may underflow
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    lp, lq = torch.where(some, log_p, zero), torch.where(some, log_q, zero)
    if a != 0 and b != 0 and s != 0:
        phi = -(torch.exp(a * lp + b * lq) - a / s * torch.exp(s * lp) - b / s * torch.exp(s * lq)) / (a * b)
    elif a != 0 and b == 0:
        phi = (torch.exp(a * lp) * a * (lp - lq) - torch.exp(a * lp) + torch.exp(a * lq)) / a ** 2
    elif a == 0 and b != 0:
        phi = (torch.exp(b * lq) * b * (lq - lp) - torch.exp(b * lq) + torch.exp(b * lp)) / b ** 2
    else:  # a + b = 0
        r = a * (lp - lq)
        phi = (torch.exp(r) - r - 1) / a ** 2 if a != 0 else 0.5 * (lp - lq) ** 2
    return torch.where(some, phi, zero)


register(DivergenceSpec(
    name="ab", family="psi", temperature_squared=True, formula=_ab, function="ab_divergence_loss",
    params=(Param("alpha", None, doc="the teacher's exponent a"), Param("beta", None, doc="the student's exponent b")),
    doc="alpha-beta divergence (ABKD)", module="ABDivergenceLoss",
    formula_doc="-sum_j (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) / (a b), and its limits",
    anchor="ABKD (ICML 2025): (1, 0) is KL(p || q), (0, 1) KL(q || p); +inf where a negative power meets p or q = 0, "
           "or where the value overflows the compute dtype (its gradient is then not defined: NaN)",
    infinite_on_padding=lambda alpha, beta: alpha <= 0.0 or alpha + beta <= 0.0,
    test_params=({"alpha": 0.5, "beta": 0.5}, {"alpha": 0.2, "beta": 0.7}, {"alpha": 1.5, "beta": -0.5},
                 {"alpha": 0.5, "beta": -0.5}, {"alpha": 0.0, "beta": 0.0}, {"alpha": 0.3, "beta": 0.0},
                 {"alpha": 0.0, "beta": 0.6}, {"alpha": 1.0, "beta": 0.0}, {"alpha": 0.0, "beta": 1.0}),
    same_as=(({"alpha": 1.0, "beta": 0.0}, "kl", {}), ({"alpha": 0.0, "beta": 1.0}, "reverse_kl", {}))))


def readme_table() -> str:
    """The README's table of divergences (a test checks that the README holds it)."""
    lines = ["| divergence | value per row | parameters | T^2 by default | function / module | matches |",
             "|---|---|---|---|---|---|"]
    for s in REGISTRY.values():
        params = ", ".join(f"`{p.name}`" + (f" = {p.default:g}" if p.default is not None else " (required)") +
                           f" {p.range_text()}" for p in s.params) or "-"
        value = s.formula_doc.replace("|", "\\|")
        lines.append(f"| `{s.name}` | `{value}`: {s.doc} | {params} | {'yes' if s.temperature_squared else 'no'}"
                     f" | `{s.function}` / `{s.module}` | {s.anchor.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
