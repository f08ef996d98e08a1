"""README tables generated from the code, so that the documentation cannot drift from the signatures
(tests/test_docs.py checks that README.md holds them verbatim)."""

from __future__ import annotations

import inspect
from typing import Callable, List, Tuple

_RESPONSE = "gradient iff it requires grad"

# (function, module, what the teacher gets); the defaults are read from the signatures.
_ROWS: List[Tuple[str, str, str]] = [
    ("kd_loss", "KDLoss", _RESPONSE),
    ("reverse_kl_loss", "ReverseKLLoss", _RESPONSE),
    ("jsd_loss", "JSDLoss", _RESPONSE),
    ("tvd_loss", "TVDLoss", _RESPONSE),
    ("dkd_loss", "DKDLoss", _RESPONSE),
    ("skew_kl_loss", "SkewKLLoss", _RESPONSE),
    ("skew_reverse_kl_loss", "SkewReverseKLLoss", _RESPONSE),
    ("symmetric_kl_loss", "SymmetricKLLoss", _RESPONSE),
    ("ab_divergence_loss", "ABDivergenceLoss", _RESPONSE),
    ("divergence_loss", "DivergenceLoss", _RESPONSE),
    ("topk_kd_loss", "TopKKDLoss", "values must not require grad"),
    ("fused_linear_kd_loss", "FusedLinearKDLoss", "never a gradient (logits, TeacherHead or TopKTeacher)"),
    ("rkd_loss", "RKDLoss", "never a gradient (the anchors run it under no_grad)"),
    ("sp_loss", "SPLoss", _RESPONSE),
    ("pkt_loss", "PKTLoss", _RESPONSE),
    ("cc_loss", "CCLoss", _RESPONSE),
    ("at_loss", "ATLoss", _RESPONSE),
    ("nst_loss", "NSTLoss", "the cross term's gradient, as RepDistiller"),
    ("hint_loss", "HintLoss", _RESPONSE),
]


def _default(fn: Callable, name: str):
    param = inspect.signature(fn).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _temperature(fn: Callable, module: type) -> str:
    f, m = _default(fn, "temperature"), _default(module.__init__, "temperature")
    if f is None and m is None:
        return "-"
    if m is None or m == f:
        return f"{f:g}"
    return f"{f:g} (module: {m:g})"


def _t_squared(name: str, fn: Callable) -> str:
    from fastkd import divergences

    if _default(fn, "temperature") is None:
        return "-"
    if "scale_by_temperature" in inspect.signature(fn).parameters:
        scale = _default(fn, "scale_by_temperature")
        if scale is None:
            return "the divergence's default"
        return "yes" if scale else "no"
    spec = {s.function: s for s in divergences.REGISTRY.values() if s.function}.get(name)
    return "yes" if spec is not None and spec.temperature_squared else "no"


def defaults_table() -> str:
    """Markdown: every loss's default temperature, T^2 factor and reduction, and what its teacher gets."""
    import fastkd

    lines = [
        "| function / module | temperature | T^2 | reduction | the teacher |",
        "|---|---|---|---|---|",
    ]
    for fn_name, module_name, teacher in _ROWS:
        fn, module = getattr(fastkd, fn_name), getattr(fastkd, module_name)
        reduction = _default(fn, "reduction")
        lines.append(
            f"| `{fn_name}` / `{module_name}` | {_temperature(fn, module)} | {_t_squared(fn_name, fn)} | "
            f"{'-' if reduction is None else f'`{reduction}`'} | {teacher} |"
        )
    return "\n".join(lines)
