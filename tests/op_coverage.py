"""Which compiled fastkd operators (and which of their variants) a piece of code runs.

:class:`OpRecorder` is a ``TorchDispatchMode``: every call of a ``torch.ops.fastkd`` operator that reaches a
kernel passes through it (below autograd, so the calls autograd makes in backward count too), and it records
a key per call: the op's name, and for the ops with variants the variant as well (the divergence of the
response and shard ops, the teacher kind of the fused head, the top-k teacher's flavour). :func:`required`
lists the keys that code touching every kernel must produce, from the registries themselves (the operators the
dispatcher knows in the ``fastkd`` namespace, the compiled divergence registry): a new operator, divergence or
teacher kind without a case then shows up in :func:`missing`.

Used by tests/test_smoke.py and benchmarks/sanitize_workload.py (``--check-coverage``).
"""

from __future__ import annotations

from typing import Dict, Iterable, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "fastkd"

# Ops whose schema is declared but which are not kernels to run (none today).
NOT_KERNELS: Set[str] = set()

Key = Tuple[str, ...]


def registered_ops() -> Set[str]:
    """Every operator the dispatcher knows in the fastkd namespace (schemas from csrc/registration.cpp)."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, rest = qualified.partition("::")
        if ns == NAMESPACE:
            names.add(rest.split(".")[0])
    return names - NOT_KERNELS


def _named_args(func, args, kwargs) -> Dict[str, object]:
    named = dict(zip((a.name for a in func._schema.arguments), args))
    named.update(kwargs)
    return named


def _teacher_kind(named: Dict[str, object]) -> str:
    if named.get("teacher_logits") is not None:
        return "logits"
    if named.get("teacher_hidden") is not None:
        return "head"
    return "topk"


def _topk_flavour(named: Dict[str, object]) -> str:
    values = "logprobs" if named["values_are_logprobs"] else "logits"
    return f"{values}/{'bucket' if named['tail_bucket'] else 'renormalize'}"


def key_of(name: str, named: Dict[str, object]) -> Key:
    """The variant key of one call of op ``name`` with arguments ``named``."""
    if name in ("response_forward", "response_shard_terms", "response_shard_grad"):
        return (name, str(named["divergence"]))
    if name == "fused_linear_kd_forward":
        kind = _teacher_kind(named)
        return (name, kind, str(named["divergence"]) if kind != "topk" else _topk_flavour(named))
    if name == "topk_kd_forward":
        return (name, _topk_flavour(named))
    return (name,)


class OpRecorder(TorchDispatchMode):
    """Records :func:`key_of` for every fastkd operator call run while active (``with OpRecorder() as rec``);
    ``rec.keys`` holds them, ``rec.devices`` the devices of the tensors they ran on."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch >= 2.12 wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says False: the
        # wrapper's first call imports torch._dynamo (seconds). Nothing is compiled under this mode.
        return False

    def __init__(self):
        super().__init__()
        self.keys: Set[Key] = set()
        self.devices: Set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, _, rest = func._schema.name.partition("::")
        if ns == NAMESPACE:
            named = _named_args(func, args, kwargs)
            self.keys.add(key_of(rest, named))
            self.devices.update(str(x.device.type) for x in named.values() if isinstance(x, torch.Tensor))
        return func(*args, **kwargs)


def required() -> Set[Key]:
    """The keys code touching every kernel must produce: every registered op; the response op with every
    compiled divergence; the shard ops with every divergence they run (all but the decoupled family); the
    fused head with every such divergence for a logits teacher, with "kl" and "jsd" for a head teacher, and
    with each top-k flavour; the top-k op with each flavour ("bucket" needs log-probabilities)."""
    from fastkd import _C

    ops = registered_ops()
    divergences = [d["name"] for d in _C.divergences()]
    fused = [d["name"] for d in _C.divergences() if d["family"] != "decoupled"]
    topk = ["logits/renormalize", "logprobs/renormalize", "logprobs/bucket"]
    keys: Set[Key] = {(op,) for op in ops}
    variants = {
        "response_forward": [(d,) for d in divergences],
        "response_shard_terms": [(d,) for d in fused],
        "response_shard_grad": [(d,) for d in fused],
        "fused_linear_kd_forward": [("logits", d) for d in fused] + [("head", "kl"), ("head", "jsd")]
        + [("topk", f) for f in topk],
        "topk_kd_forward": [(f,) for f in topk],
    }
    for op, vs in variants.items():
        keys.discard((op,))
        keys.update((op,) + v for v in vs)
    return keys


def missing(recorded: Iterable[Key]) -> Set[Key]:
    """The required keys :class:`OpRecorder` did not record. An op that records only its bare name stands for
    every variant-less op (relation ops); one with variants must record the variants."""
    return required() - set(recorded)
