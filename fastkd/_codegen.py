"""Functions and modules generated from the divergence specs (fastkd/divergences.py), with real signatures
(``help()``, ``inspect.signature`` and IDEs see the parameters) and no per-call binding overhead.

A generated function ``name(student_logits, teacher_logits, <params>, temperature=1.0, *, reduction=...,
labels=None, ignore_index=-100, scale_by_temperature=<spec default>, num_items_in_batch=None, token_weights=None, standardize=False)`` calls
``impl(spec, name, student_logits, teacher_logits, {param: value}, temperature, **keywords)``; the module
holds the same arguments (``standardize`` included) and calls the function in ``forward(student_logits,
teacher_logits, labels=None, num_items_in_batch=None, *, token_weights=None)``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from fastkd.divergences import DivergenceSpec


def _params_src(spec: DivergenceSpec) -> str:
    return "".join(f"{p.name}, " if p.default is None else f"{p.name}={p.default!r}, " for p in spec.params)


def _docstring(spec: DivergenceSpec, kind: str) -> str:
    lines = [f"{spec.doc[0].upper()}{spec.doc[1:]}, fused: per row :math:`{spec.formula_doc}` with "
             f"``p = softmax(t/T)`` (teacher) and ``q = softmax(s/T)`` (student)"
             f"{', times T^2 by default' if spec.temperature_squared else ' (no T^2 factor by default)'}.",
             "", f"Matches: {spec.anchor}.", "", "Args:"]
    for p in spec.params:
        default = "required" if p.default is None else f"default {p.default!r}"
        lines.append(f"    {p.name}: {p.doc} ({default}; {p.range_text()}).")
    lines += ["", f"The other arguments are those of :func:`fastkd.divergence_loss` (``divergence={spec.name!r}``); "
              f"generated from the divergence registry ({kind})."]
    return "\n".join(lines)


def make_function(spec: DivergenceSpec, impl: Callable, module: str, kind: str) -> Callable:
    keys = "".join(f"{p.name!r}: {p.name}, " for p in spec.params)
    src = (
        f"def {spec.function}(student_logits, teacher_logits, {_params_src(spec)}temperature=1.0, *, "
        f"reduction='batchmean', labels=None, ignore_index=-100, "
        f"scale_by_temperature={spec.temperature_squared!r}, num_items_in_batch=None, token_weights=None, "
        f"standardize=False):\n"
        f"    return _impl(_spec, {spec.function!r}, student_logits, teacher_logits, {{{keys}}}, temperature, "
        f"reduction=reduction, labels=labels, ignore_index=ignore_index, "
        f"scale_by_temperature=scale_by_temperature, num_items_in_batch=num_items_in_batch, "
        f"token_weights=token_weights, standardize=standardize)\n"
    )
    scope: Dict[str, object] = {"_impl": impl, "_spec": spec}
    exec(compile(src, f"<fastkd generated {spec.function}>", "exec"), scope)
    fn = scope[spec.function]
    fn.__module__ = module
    fn.__qualname__ = spec.function
    fn.__doc__ = _docstring(spec, kind)
    return fn


def make_divergence_loss(impl: Callable, module: str, doc: str) -> Callable:
    """``divergence_loss(student_logits, teacher_logits, divergence, temperature=1.0, *, ..., **params)`` over
    ``impl`` (the fused or the plain-PyTorch implementation)."""

    def divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str,
                        temperature: float = 1.0, *, reduction: str = "batchmean",
                        labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                        scale_by_temperature: Optional[bool] = None, num_items_in_batch=None,
                        token_weights: Optional[torch.Tensor] = None, standardize: bool = False,
                        **params: float) -> torch.Tensor:
        from fastkd import divergences

        return impl(divergences.get(divergence), "divergence_loss", student_logits, teacher_logits, params,
                    temperature, reduction=reduction, labels=labels, ignore_index=ignore_index,
                    scale_by_temperature=scale_by_temperature, num_items_in_batch=num_items_in_batch,
                    token_weights=token_weights, standardize=standardize)

    divergence_loss.__module__ = module
    divergence_loss.__doc__ = doc
    return divergence_loss


def generate_functions(namespace: Dict[str, object], impl: Callable, module: str, kind: str) -> List[str]:
    """Puts the function of every registered divergence that is not written by hand into ``namespace``;
    returns their names (for ``__all__``)."""
    from fastkd import divergences

    made = []
    for spec in divergences.REGISTRY.values():
        if spec.generated:
            namespace[spec.function] = make_function(spec, impl, module, kind)
            made.append(spec.function)
    return made


class DivergenceModule(nn.Module):
    """Base of the generated loss modules: the arguments of the function, held; see the subclass's doc."""

    _function: Callable
    _spec: DivergenceSpec

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None,
                num_items_in_batch=None, *, token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return type(self)._function(student_logits, teacher_logits, **self._params, temperature=self.temperature,
                                    reduction=self.reduction, labels=labels, ignore_index=self.ignore_index,
                                    scale_by_temperature=self.scale_by_temperature,
                                    num_items_in_batch=num_items_in_batch, token_weights=token_weights,
                                    standardize=self.standardize)

    def extra_repr(self) -> str:
        params = "".join(f"{k}={v!r}, " for k, v in self._params.items())
        return (f"{params}temperature={self.temperature!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index!r}, scale_by_temperature={self.scale_by_temperature!r}, "
                f"standardize={self.standardize!r}")


def _check_params(module: nn.Module, spec: DivergenceSpec, params: Dict[str, object], where: str) -> None:
    """A module's arguments, checked when it is built (the parameters' types and ranges, the temperature, the
    reduction, ignore_index and the flags), as the hand-written modules check theirs."""
    from fastkd import _validation as v

    spec.check_ranges(spec.resolve(params, where))
    module.temperature = v.check_temperature(module.temperature)
    v.check_reduction(module.reduction)
    v.check_ignore_index(module.ignore_index)
    v.resolve_scale_by_temperature(module.scale_by_temperature, spec.name)  # None: the spec's default
    v.check_bool("standardize", module.standardize)


def make_module(spec: DivergenceSpec, function: Callable, module: str) -> type:
    keys = "".join(f"{p.name!r}: {p.name}, " for p in spec.params)
    src = (
        f"def __init__(self, {_params_src(spec)}temperature=1.0, *, reduction='batchmean', ignore_index=-100, "
        f"scale_by_temperature={spec.temperature_squared!r}, standardize=False):\n"
        f"    _nn.Module.__init__(self)\n"
        f"    self._params = {{{keys}}}\n"
        f"    self.temperature = temperature\n"
        f"    self.reduction = reduction\n"
        f"    self.ignore_index = ignore_index\n"
        f"    self.scale_by_temperature = scale_by_temperature\n"
        f"    self.standardize = standardize\n"
        f"    _check(self, _spec, self._params, {spec.module!r})\n"
    )
    scope: Dict[str, object] = {"_nn": nn, "_spec": spec, "_check": _check_params}
    exec(compile(src, f"<fastkd generated {spec.module}>", "exec"), scope)
    doc = (f"Module form of :func:`fastkd.{spec.function}` ({spec.doc}): the constructor takes its parameters, "
           f"``temperature``, ``reduction``, ``ignore_index``, ``scale_by_temperature`` and ``standardize``; "
           f"``forward(student_logits, teacher_logits, labels=None, num_items_in_batch=None, *, token_weights=None)``.")
    cls = type(spec.module, (DivergenceModule,), {"__init__": scope["__init__"], "_function": staticmethod(function),
                                                   "_spec": spec, "__doc__": doc, "__module__": module})
    return cls
