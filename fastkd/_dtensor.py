r"""DTensor inputs (``torch.distributed.tensor``) for every response loss and for the fused head.

Every response loss of :mod:`fastkd.functional` (:func:`fastkd.kd_loss`, :func:`fastkd.reverse_kl_loss`,
:func:`fastkd.jsd_loss`, :func:`fastkd.tvd_loss`, :func:`fastkd.dkd_loss`, :func:`fastkd.topk_kd_loss`,
:func:`fastkd.divergence_loss` and the generated ones such as :func:`fastkd.skew_kl_loss`), their
``nn.Module`` forms, and :func:`fastkd.fused_linear_kd_loss` accept DTensors on a **1-D device mesh**. Each
entry point carries the :func:`accepts_dtensor` decorator: with no DTensor among its arguments it runs as
before (one scan of the arguments, about 1 us; none at all unless ``torch.distributed.tensor`` is loaded); with
one, :func:`route` picks the path from the placements.

Response losses, by the placement of ``student_logits`` ``[..., V]`` (the teacher's must be the same):

* ``Shard(-1)`` (the vocabulary; tensor parallel): the vocabulary-parallel path,
  :func:`fastkd.distributed.vocab_parallel_kd_loss` on the local slices over the mesh's process group (three
  all-reduces of ``O(rows)`` numbers; logits never gathered). ``labels`` must be replicated (a ``Replicate()``
  DTensor, or a plain tensor identical on every rank). The result is a ``Replicate()`` DTensor (the same value
  on every rank), the student's gradient a ``Shard(-1)`` DTensor. ``token_weights`` and ``standardize`` are
  passed on (the weights placed as the labels). Differences from the local paths, those of
  :func:`fastkd.distributed.vocab_parallel_kd_loss`: the teacher never receives a gradient (even if it
  requires grad), and ``"dkd"``, :func:`fastkd.topk_kd_loss` and the hard-label cross-entropy of
  :func:`fastkd.kd_loss` (``alpha != 0``) are not available there (ValueError). ``num_items_in_batch``,
  ``return_parts`` (``alpha = 0``) and :func:`fastkd.jsd_loss`'s TRL division of ``[B, T, V]`` input by ``B``
  are kept.
* ``Shard(d)`` of a row dimension ``d < ndim - 1`` (sequence or data parallel; ``Shard(0)`` most often): the
  single-device kernels on the local rows, with the **global** divisor: ``"batchmean"`` / ``"mean"`` divide by
  the rows counted on all ranks (one all-reduce of the local count of ``labels != ignore_index``; the global
  shape without labels), or by ``num_items_in_batch`` when given (read as the global count, not all-reduced).
  Each rank's loss is its local sum over that global divisor, returned as a ``Partial()`` (sum) DTensor for a
  scalar reduction (``full_tensor()`` all-reduces it into the global loss; ``.backward()`` works on it
  directly) and as a ``Shard(d)`` DTensor of the global shape ``[...]`` for ``reduction="none"``. Labels are a
  ``Shard(d)`` DTensor or a plain tensor holding this rank's local rows, and so are ``token_weights``. Uneven
  shards (``torch.chunk`` sizes, a rank with no row included) are fine.
* ``Replicate()``: computed locally on every rank (the same value), returned as a ``Replicate()`` DTensor.

The fused head, by the placements of ``student_hidden`` ``[..., H]`` and ``student_weight`` ``[V, H]``:

* hidden ``Replicate()``, weight ``Shard(0)`` (vocabulary rows; tensor parallel): the vocabulary-parallel
  fused head, ``fastkd.distributed.vocab_parallel_fused_linear_kd_loss`` (looked up when called), with
  ``student_bias`` ``Shard(0)``, a dense teacher ``Shard(-1)``, a :class:`fastkd.TeacherHead` with a
  ``Replicate()`` hidden and a ``Shard(0)`` weight (and bias), or a :class:`fastkd.TopKTeacher` replicated
  (global indices); the result is ``Replicate()``; gradients: weight and bias ``Shard(0)``, hidden
  ``Replicate()`` (all-reduced by that function). ``token_weights`` (placed as the labels: ``Replicate()`` or a
  plain tensor identical on every rank), a tensor ``temperature`` and ``standardize`` are passed on.
* hidden ``Shard(d)`` of a row dimension, weight ``Replicate()``: local chunks with the global divisor as
  above; the bias and the teacher's weight are ``Replicate()``, the teacher's rows (dense logits, TeacherHead
  hidden, TopKTeacher values and indices) ``Shard(d)``. The weight's and bias's gradients are ``Partial()``
  DTensors (each rank's local rows' share; ``full_tensor()`` or a redistribution sums them), as DTensor's own
  matmul gives them. ``token_weights`` are placed as the labels (``Shard(d)``, or this rank's local rows).
* everything ``Replicate()``: local, ``Replicate()`` result.

A ``temperature`` DTensor (every path): one per row is placed as the labels; a 0-dim one is ``Replicate()``,
and with row-sharded rows its gradient is ``Partial()`` (each rank's rows' share, as the replicated head
weight's). A plain tensor temperature is used as given on every rank.

Any other layout raises a ValueError naming the argument, its placements and the ones accepted: a mesh with
more than one dimension, a ``Partial`` input, a ``Shard`` of another dimension (the hidden or the top-k
dimension, the weight's columns), placements of the teacher, labels or bias that do not match the student's,
DTensors on different meshes. A plain tensor mixed with DTensors is a TypeError, except ``labels`` /
``target`` and ``token_weights`` (read as this rank's local rows), a ``temperature`` tensor (used as given on
every rank) and ``num_items_in_batch`` (a number, a plain 0-dim tensor or a ``Replicate()`` DTensor). Results are always DTensors (``return_parts`` gives a :class:`fastkd.LossParts`
of DTensors). Eager mode only: under ``torch.compile`` the arguments are passed through unchanged.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from fastkd import _validation as v

__all__ = ["accepts_dtensor", "route", "any_dtensor"]

_REPLICATE = "replicate"
_VOCAB = "vocab"
_ROWS = "rows"

# A placement as the checks see it: ("R",) replicate, ("S", dim) shard with a nonnegative dim, ("P", op)
# partial, ("?", repr) anything else.
Layout = Tuple[Any, ...]


def _dtensor_type():
    """The DTensor class if ``torch.distributed.tensor`` is loaded (no DTensor can exist otherwise); None else.
    Importing it costs ~0.5 s: fastkd never imports it for plain-tensor calls."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def any_dtensor(*values) -> bool:
    """Whether any of ``values`` (or an element of a tuple among them: a TeacherHead, a TopKTeacher) is a
    DTensor."""
    cls = _dtensor_type()
    if cls is None:
        return False
    for x in values:
        if type(x) in _PLAIN:  # the common arguments, without an isinstance check each
            continue
        if isinstance(x, cls):
            return True
        if isinstance(x, tuple) and any(isinstance(y, cls) for y in x):
            return True
    return False


_PLAIN = frozenset((torch.Tensor, float, int, str, bool, type(None)))


def accepts_dtensor(fn: Callable) -> Callable:
    """Decorator of a public entry point: DTensor arguments go to :func:`route`, others straight to ``fn``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # plain tensors: about 1 us (2-3 us with torch.distributed.tensor loaded), against the tens of us of an
        # op call; under torch.compile nothing is checked; without torch.distributed.tensor loaded no DTensor exists
        if not torch.compiler.is_compiling() and "torch.distributed.tensor" in sys.modules and (
                any_dtensor(*args) or any_dtensor(*kwargs.values())):
            return route(fn, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def route(fn: Callable, args: tuple, kwargs: dict):
    """Runs ``fn`` (an entry point, undecorated) on DTensor arguments: see the module docstring."""
    bound = _signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    if fn.__name__ == "fused_linear_kd_loss":
        return _route_fused(fn, bound)
    return _route_response(fn, bound)


# --------------------------------------------------------------------------------------------------------
# placements
# --------------------------------------------------------------------------------------------------------
def _layout(x, ndim: int) -> Layout:
    from torch.distributed.tensor import Replicate, Shard

    (p,) = x.placements
    if type(p) is Replicate:
        return ("R",)
    if type(p) is Shard:
        return ("S", p.dim % ndim if ndim > 0 else p.dim)
    if p.is_partial():
        return ("P", p)
    return ("?", p)


def _text(layout: Layout, ndim: int) -> str:
    if layout[0] == "R":
        return "Replicate()"
    if layout[0] == "S":
        d = layout[1]
        return f"Shard({d})" + (" (the last dimension)" if d == ndim - 1 and ndim > 1 else "")
    return repr(layout[1])


def _placements_text(x) -> str:
    return repr(tuple(x.placements))


class _Call:
    """The checks shared by the arguments of one call: one 1-D mesh, the argument names in messages."""

    def __init__(self, where: str, mesh_owner, name: str):
        self.where = where
        self.cls = _dtensor_type()
        self.mesh = mesh_owner.device_mesh
        self._check_mesh(mesh_owner, name)

    def _check_mesh(self, x, name: str) -> None:
        mesh = x.device_mesh
        if mesh.ndim != 1:
            raise ValueError(
                f"{self.where}: {name} is a DTensor on a {mesh.ndim}-D device mesh of shape {tuple(mesh.shape)} "
                f"with placements {_placements_text(x)}; fastkd supports DTensors on a 1-D mesh only (for a 2-D "
                f"mesh, pass the local tensors of the other mesh dimension: x.to_local() / a 1-D submesh)"
            )
        if mesh != self.mesh:
            raise ValueError(
                f"{self.where}: {name} is a DTensor on another device mesh ({mesh}) than the student's "
                f"({self.mesh}): every DTensor argument must be on the same mesh"
            )

    def layout(self, x, name: str, accepted: str) -> Layout:
        """``x``'s placement (on the common 1-D mesh), or a ValueError for a Partial or an unknown placement."""
        self._check_mesh(x, name)
        lay = _layout(x, x.dim())
        if lay[0] in ("P", "?"):
            raise ValueError(
                f"{self.where}: {name} is a DTensor with placements {_placements_text(x)}, which fastkd does not "
                f"support; accepted: {accepted}" + (" (redistribute a Partial input to Replicate() first)"
                                                   if lay[0] == "P" else "")
            )
        return lay

    def expect(self, x, name: str, expected: Layout, why: str, plain_ok: bool = False) -> None:
        """``x`` (None allowed) must be a DTensor with placement ``expected`` (or, with ``plain_ok``, a plain
        tensor: this rank's local values)."""
        if x is None:
            return
        if not isinstance(x, self.cls):
            if plain_ok:
                return
            raise TypeError(
                f"{self.where}: {name} must be a DTensor as well ({why}: {_text(expected, max(1, _ndim(x)))}), "
                f"got a {type(x).__name__}: pass every tensor argument as a DTensor on the same mesh, or none"
            )
        lay = self.layout(x, name, _text(expected, x.dim()))
        if lay != expected:
            raise ValueError(
                f"{self.where}: {name} has placements {_placements_text(x)}, but {why} it must be "
                f"{_text(expected, x.dim())}"
            )

    def local(self, x, grad_placements=None):
        if isinstance(x, self.cls):
            return x.to_local(grad_placements=grad_placements)
        return x

    def group(self):
        return self.mesh.get_group()

    def wrap(self, out, layout: Layout, shape=None):
        """The result as a DTensor: ``layout`` "R", "P" (partial sum) or ("S", d) with the global ``shape``."""
        from fastkd.outputs import LossParts

        if isinstance(out, LossParts):
            return LossParts(*(self.wrap(o, layout, shape) for o in out))
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        if layout[0] == "R":
            return DTensor.from_local(out, self.mesh, [Replicate()], run_check=False)
        if layout[0] == "P":
            return DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
        shape = torch.Size(shape)
        return DTensor.from_local(out, self.mesh, [Shard(layout[1])], run_check=False, shape=shape,
                                  stride=_contiguous_strides(shape))


def _ndim(x) -> int:
    return x.dim() if isinstance(x, torch.Tensor) else 0


def _contiguous_strides(shape) -> Tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def _require_dtensor(call_where: str, x, name: str):
    cls = _dtensor_type()
    if not isinstance(x, cls):
        raise TypeError(
            f"{call_where}: {name} must be a DTensor when other arguments are DTensors (pass every tensor argument "
            f"as a DTensor on the same mesh, or none; only labels / target and num_items_in_batch may be plain), "
            f"got a {type(x).__name__}"
        )


def _num_items(call: _Call, n, name: str = "num_items_in_batch"):
    """A DTensor num_items_in_batch must be Replicate() (the global count, the same on every rank)."""
    if isinstance(n, call.cls):
        call.expect(n, name, ("R",), "as the global count (the same on every rank)")
        return n.to_local()
    return n


def _global_count(call: _Call, labels, ignore_index, rows: int, jsd_batch: Optional[int]):
    """The global divisor of "batchmean"/"mean" for row-sharded input: the rows counted on every rank (an
    all-reduce), the global number of rows without labels (or TRL's batch size ``jsd_batch``)."""
    import torch.distributed as dist

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            return None  # the function's own check raises (TypeError naming labels)
        count = (labels != ignore_index).sum().to(torch.float64).reshape(())
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=call.group())
        return count.clamp_min(1.0)
    if jsd_batch is not None:
        return jsd_batch
    return max(rows, 1)


# --------------------------------------------------------------------------------------------------------
# response losses
# --------------------------------------------------------------------------------------------------------
_ACCEPTED_LOGITS = ("Shard(-1) (the vocabulary: vocab-parallel), Shard(d) of a row dimension d < ndim - 1 "
                    "(rows: sequence / data parallel) or Replicate()")


def _route_response(fn: Callable, bound: inspect.BoundArguments):
    a = bound.arguments
    where = a["where"] if fn.__name__ == "_divergence" else fn.__name__
    s = a["student_logits"]
    _require_dtensor(where, s, "student_logits")
    call = _Call(where, s, "student_logits")
    if s.dim() == 0:
        raise ValueError(f"{where}: student_logits must have at least one dimension (the vocabulary), got a 0-dim "
                         f"DTensor")
    lay = call.layout(s, "student_logits", _ACCEPTED_LOGITS)
    ndim = s.dim()
    if lay[0] == "R":
        mode, row_dim = _REPLICATE, None
    elif lay[1] == ndim - 1:
        mode, row_dim = _VOCAB, None
    else:
        mode, row_dim = _ROWS, lay[1]
    label_name = "target" if "target" in a else "labels"
    label_layout = ("S", row_dim) if mode == _ROWS else ("R",)
    label_why = ("with row-sharded logits" if mode == _ROWS else
                 "with vocabulary-sharded logits (every rank holds every row)" if mode == _VOCAB else
                 "with replicated logits")

    if "teacher_logits" in a:
        call.expect(a["teacher_logits"], "teacher_logits", lay, "as the student_logits' placement")
    for name in ("teacher_topk_values", "teacher_topk_indices"):
        if name in a:
            if mode == _VOCAB:
                raise ValueError(f"{where}: vocabulary-sharded student_logits (Shard(-1)) are not supported by "
                                 f"topk_kd_loss; shard the rows (Shard(0)) or replicate them")
            call.expect(a[name], name, label_layout if mode == _ROWS else ("R",), label_why)
    call.expect(a.get(label_name), label_name, label_layout, label_why, plain_ok=True)
    call.expect(a.get("token_weights"), "token_weights", label_layout, label_why, plain_ok=True)  # one per row
    _place_temperature(call, a, label_layout, label_why, mode)
    a["num_items_in_batch"] = _num_items(call, a["num_items_in_batch"])

    if mode == _VOCAB:
        return _vocab_response(fn, call, a, where)

    for name in ("student_logits", "teacher_logits", "teacher_topk_values", "teacher_topk_indices", label_name,
                 "token_weights"):
        if name in a:
            a[name] = call.local(a[name])
    reduction = a["reduction"]
    if mode == _REPLICATE:
        return call.wrap(fn(*bound.args, **bound.kwargs), ("R",))

    lead = tuple(s.shape[:-1])
    if reduction in ("batchmean", "mean") and a["num_items_in_batch"] is None:
        jsd_batch = None
        if (fn.__name__ == "jsd_loss" and reduction == "batchmean" and a[label_name] is None and ndim >= 3
                and s.shape[0] > 0):
            jsd_batch = s.shape[0]  # TRL: jsd.sum() / jsd.size(0), over the global batch
        a["num_items_in_batch"] = _global_count(call, a[label_name], a["ignore_index"], math.prod(lead), jsd_batch)
    out = fn(*bound.args, **bound.kwargs)
    return call.wrap(out, ("S", row_dim) if reduction == "none" else ("P",), lead)


def _vocab_response(fn: Callable, call: _Call, a: Dict[str, Any], where: str):
    """The vocab-parallel path: the function's arguments translated to vocab_parallel_kd_loss."""
    from fastkd.distributed import vocab_parallel_kd_loss
    from fastkd.outputs import LossParts

    name = fn.__name__
    params: Dict[str, float] = {}
    weight, return_parts, scale = 1.0, False, a.get("scale_by_temperature")
    if name == "kd_loss":
        divergence = "kl"
        alpha, weight = v.check_mix_weights(a["alpha"], a["beta"])
        return_parts = v.check_bool("return_parts", a["return_parts"])
        if alpha != 0.0:
            raise ValueError(f"{where}: the hard-label cross-entropy (alpha != 0) is not supported with "
                             f"vocabulary-sharded DTensor logits (Shard(-1)); compute it separately, or shard "
                             f"the rows (Shard(0))")
    elif name in ("reverse_kl_loss", "tvd_loss"):
        divergence = name[: -len("_loss")]
    elif name == "jsd_loss":
        divergence, params, scale = "jsd", {"beta": v.check_beta_unit(a["beta"])}, None
    elif name == "_divergence":
        spec = a["spec"]
        divergence = spec.name
        if spec.family != "decoupled":
            params = dict(zip(spec.param_names, spec.resolve(a["params"], where)))
    else:  # dkd_loss
        divergence = "dkd"
    if divergence == "dkd":
        raise ValueError(f"{where}: 'dkd' is not supported with vocabulary-sharded DTensor logits (Shard(-1)) (it "
                         f"needs each row's target class); shard the rows (Shard(0)) or replicate them")

    s, t = a["student_logits"], a["teacher_logits"]
    labels, reduction = a["labels"], a["reduction"]
    v.check_reduction(reduction)
    n = v.check_num_items(a["num_items_in_batch"], reduction)
    if (name == "jsd_loss" and n is None and reduction == "batchmean" and labels is None and s.dim() >= 3
            and s.shape[0] > 0):
        n = s.shape[0]  # TRL's division of [B, T, V] input by B, as jsd_loss
    own = reduction if n is None else "sum"
    loss = vocab_parallel_kd_loss(
        call.local(s), call.local(t), loss=divergence, temperature=a["temperature"], labels=call.local(labels),
        ignore_index=a["ignore_index"], reduction=own, scale_by_temperature=scale, group=call.group(),
        token_weights=call.local(a.get("token_weights")), standardize=a.get("standardize", False), **params)
    if n is not None:
        divisor = n.to(device=loss.device, dtype=torch.float64) if isinstance(n, torch.Tensor) else float(n)
        if reduction == "mean":
            divisor = divisor * s.shape[-1]
        loss = (loss / divisor).to(loss.dtype)
    if return_parts:
        soft = loss.detach()
        loss = LossParts(loss * weight if weight != 1.0 else loss, soft, torch.zeros_like(soft))
    elif weight != 1.0:
        loss = loss * weight
    return call.wrap(loss, ("R",))


# --------------------------------------------------------------------------------------------------------
# the fused head
# --------------------------------------------------------------------------------------------------------
_ACCEPTED_HEAD = ("student_hidden Replicate() with student_weight Shard(0) (vocabulary rows: vocab-parallel), "
                  "student_hidden Shard(d) of a row dimension with student_weight Replicate() (rows), or both "
                  "Replicate()")


def _route_fused(fn: Callable, bound: inspect.BoundArguments):
    from fastkd.teachers import TeacherHead, TopKTeacher

    a = bound.arguments
    where = fn.__name__
    h, w = a["student_hidden"], a["student_weight"]
    _require_dtensor(where, h, "student_hidden")
    call = _Call(where, h, "student_hidden")
    _require_dtensor(where, w, "student_weight")
    if h.dim() < 1 or w.dim() != 2:
        raise ValueError(f"{where}: student_hidden must be [..., H] and student_weight [V, H], got shapes "
                         f"{tuple(h.shape)} and {tuple(w.shape)}")
    hl = call.layout(h, "student_hidden", _ACCEPTED_HEAD)
    wl = call.layout(w, "student_weight", _ACCEPTED_HEAD)
    ndim = h.dim()
    if hl == ("R",) and wl == ("R",):
        mode, row_dim = _REPLICATE, None
    elif hl == ("R",) and wl == ("S", 0):
        mode, row_dim = _VOCAB, None
    elif hl[0] == "S" and hl[1] < ndim - 1 and wl == ("R",):
        mode, row_dim = _ROWS, hl[1]
    else:
        raise ValueError(
            f"{where}: student_hidden with placements {_placements_text(h)} and student_weight with placements "
            f"{_placements_text(w)} is a layout fastkd does not support; accepted: {_ACCEPTED_HEAD}"
        )
    rows_l = ("S", row_dim) if mode == _ROWS else ("R",)
    vocab_l = ("S", 0) if mode == _VOCAB else ("R",)
    why = {_ROWS: "with row-sharded hidden states", _VOCAB: "with a vocabulary-sharded head",
           _REPLICATE: "with a replicated head"}[mode]
    call.expect(a["student_bias"], "student_bias", vocab_l, why)
    teacher = a["teacher"]
    if isinstance(teacher, TeacherHead):
        call.expect(teacher.hidden, "teacher.hidden", rows_l, why)
        call.expect(teacher.weight, "teacher.weight", vocab_l, why)
        call.expect(teacher.bias, "teacher.bias", vocab_l, why)
    elif isinstance(teacher, TopKTeacher):
        call.expect(teacher.values, "teacher.values", rows_l, why)
        call.expect(teacher.indices, "teacher.indices", rows_l, why)
    elif isinstance(teacher, torch.Tensor):
        dense = ("S", teacher.dim() - 1) if mode == _VOCAB else rows_l
        call.expect(teacher, "teacher", dense, why)
    call.expect(a["labels"], "labels", rows_l, why, plain_ok=True)
    call.expect(a.get("token_weights"), "token_weights", rows_l, why, plain_ok=True)  # placed as the labels
    _place_temperature(call, a, rows_l, why, mode)
    a["num_items_in_batch"] = _num_items(call, a["num_items_in_batch"])

    # local tensors; a replicated weight used with row-sharded hidden states gets each rank's share of its
    # gradient: a Partial() gradient (DTensor's own matmul rule)
    head_grads = [_partial()] if mode == _ROWS else None
    if isinstance(teacher, TeacherHead):
        teacher = TeacherHead(call.local(teacher.hidden), call.local(teacher.weight), call.local(teacher.bias))
    elif isinstance(teacher, TopKTeacher):
        teacher = teacher._replace(values=call.local(teacher.values), indices=call.local(teacher.indices))
    else:
        teacher = call.local(teacher)
    a["teacher"] = teacher
    a["student_hidden"] = call.local(h)
    a["student_weight"] = call.local(w, head_grads)
    a["student_bias"] = call.local(a["student_bias"], head_grads)
    a["labels"] = call.local(a["labels"])
    if "token_weights" in a:
        a["token_weights"] = call.local(a["token_weights"])

    if mode == _VOCAB:
        from fastkd import distributed

        # every keyword of the fused head is passed on (token_weights, standardize and a tensor temperature
        # included); its bias is the shard's
        kwargs = dict(bound.kwargs)
        kwargs["student_bias_shard"] = kwargs.pop("student_bias", None)
        out = distributed.vocab_parallel_fused_linear_kd_loss(*bound.args, group=call.group(), **kwargs)
        return call.wrap(out, ("R",))
    if mode == _REPLICATE:
        return call.wrap(fn(*bound.args, **bound.kwargs), ("R",))

    reduction = a["reduction"]
    lead = tuple(h.shape[:-1])
    if reduction in ("batchmean", "mean") and a["num_items_in_batch"] is None:
        a["num_items_in_batch"] = _global_count(call, a["labels"], a["ignore_index"], math.prod(lead), None)
    out = fn(*bound.args, **bound.kwargs)
    return call.wrap(out, ("S", row_dim) if reduction == "none" else ("P",), lead)


def _place_temperature(call: "_Call", a: Dict[str, Any], rows_layout: Layout, why: str, mode: str) -> None:
    """A DTensor ``temperature``: one per row placed as the labels, or a 0-dim ``Replicate()`` one, replaced by
    its local tensor. With row-sharded rows a replicated temperature's gradient is ``Partial()`` (each rank's
    rows' share), as the replicated head weight's."""
    T = a.get("temperature")
    if not isinstance(T, call.cls):
        return
    call.expect(T, "temperature", rows_layout if T.dim() > 0 else ("R",), why)
    a["temperature"] = call.local(T, [_partial()] if mode == _ROWS and T.dim() == 0 else None)


def _partial():
    from torch.distributed.tensor import Partial

    return Partial()
