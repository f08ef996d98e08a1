"""DTensor inputs (fastkd/_dtensor.py) on a 1-D CPU gloo device mesh of 2 processes: every placement
(Shard(-1) vocabulary-parallel, Shard(0) / Shard(1) rows, Replicate) of the response losses (kd, jsd, skew_kl,
tvd, reverse_kl, symmetric_kl, dkd, topk, the hard-label mix, return_parts, the nn.Module forms) and of the fused
head (dense, TeacherHead and TopKTeacher teachers; token_weights placed as the labels, standardize and a tensor
temperature on every layout, the vocabulary-sharded head's included), against the single-process loss on the gathered tensors
(float64): the value (``full_tensor()``), the placement of the result, and the gradients of the DTensor inputs
(``.grad.full_tensor()``) and their placements; labels chosen so that the counted rows differ between the ranks
(the global divisor), all rows ignored, a rank with no row; every reduction; ``num_items_in_batch``; unsupported
layouts -> clear errors.

The fused head's vocabulary-parallel layout (weight ``Shard(0)``) runs
``fastkd.distributed.vocab_parallel_fused_linear_kd_loss`` (tested on its own in test_distributed_fused_head.py).

One group of 2 processes is spawned for the module (a module-scoped cache): every worker runs all the
scenarios and saves its results with torch.save; the tests compare them in the parent.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import zlib
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

import fastkd

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build",
)

WORLD = 2
VOCAB = 11  # uneven vocabulary shards: 6 / 5
HIDDEN = 4
REDUCTIONS = ("batchmean", "sum", "mean", "none")
RTOL, ATOL = 1e-10, 1e-12  # float64 throughout


# --------------------------------------------------------------------------------------------------------
# scenarios: deterministic inputs rebuilt identically in the workers and in the parent
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: str                         # a key of _RESPONSE or "fused"
    placement: str                  # "vocab" (Shard(-1)), "rows" (Shard(0)), "rows1" (Shard(1)), "replicate"
    reduction: str
    lead: Tuple[int, ...] = (5,)    # the rows' shape: 5 rows split 3 / 2
    labels: str = "uneven"          # "none", "uneven" (counted rows differ between ranks), "all" (all ignored)
    plain_labels: bool = False      # labels as a plain tensor of this rank's local rows
    num_items: Optional[float] = None
    teacher_grad: bool = False      # the teacher requires grad (the local paths give it one)
    teacher: str = "dense"          # fused head: "dense", "head", "topk"
    fused: Tuple[Tuple[str, object], ...] = ()  # fused head keywords


def _response(fn):
    """The public call of a response loss case: (s, t, labels, reduction, num_items) -> loss."""
    def kw(labels, reduction, num_items):
        out = dict(reduction=reduction, labels=labels)
        if num_items is not None:
            out["num_items_in_batch"] = num_items
        return out

    calls = {
        "kd": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 2.0, **kw(y, r, n)),
        "kd_parts": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 2.0, beta=0.7, return_parts=True, **kw(y, r, n)),
        "kd_mix": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 2.0, alpha=0.3, return_parts=True, **kw(y, r, n)),
        "jsd": lambda s, t, y, r, n: fastkd.jsd_loss(s, t, beta=0.3, temperature=1.5, **kw(y, r, n)),
        "skew_kl": lambda s, t, y, r, n: fastkd.divergence_loss(s, t, "skew_kl", 2.0, skew=0.2, **kw(y, r, n)),
        "symmetric_kl": lambda s, t, y, r, n: fastkd.symmetric_kl_loss(s, t, reverse_weight=0.3, temperature=1.5,
                                                                      **kw(y, r, n)),
        "tvd": lambda s, t, y, r, n: fastkd.tvd_loss(s, t, 1.5, **kw(y, r, n)),
        "reverse_kl": lambda s, t, y, r, n: fastkd.reverse_kl_loss(s, t, 2.0, **kw(y, r, n)),
        "dkd": lambda s, t, y, r, n: fastkd.dkd_loss(s, t, y, 1.0, 4.0, 2.0, reduction=r,
                                                     **({} if n is None else {"num_items_in_batch": n})),
        "topk": lambda s, t, y, r, n: fastkd.topk_kd_loss(s, t[0], t[1], 2.0, **kw(y, r, n)),
        # a 0-dim tensor temperature (a plain tensor, the same on every rank) on every path
        "kd_T": lambda s, t, y, r, n: fastkd.kd_loss(s, t, torch.tensor(1.7, dtype=torch.float64), **kw(y, r, n)),
        "jsd_T": lambda s, t, y, r, n: fastkd.jsd_loss(s, t, 0.3, torch.tensor(1.3, dtype=torch.float64),
                                                       **kw(y, r, n)),
        "topk_T": lambda s, t, y, r, n: fastkd.topk_kd_loss(s, t[0], t[1], torch.tensor(1.7, dtype=torch.float64),
                                                            **kw(y, r, n)),
        # the per-row options: weights placed as the labels (derived from them), standardization
        "kd_w": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 2.0, token_weights=_weights_of(y), **kw(y, r, n)),
        "kd_std": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 2.0, standardize=True, **kw(y, r, n)),
        "jsd_std_w": lambda s, t, y, r, n: fastkd.jsd_loss(s, t, 0.3, 1.5, standardize=True,
                                                           token_weights=_weights_of(y), **kw(y, r, n)),
        # a DTensor temperature: one per row placed as the labels (derived from them), or a learnable 0-dim one
        # (Replicate(); a leaf "T" of the case: row-sharded, its gradient is each rank's share, Partial())
        "kd_Trow": lambda s, t, y, r, n: fastkd.kd_loss(s, t, 1.0 + 0.5 * _weights_of(y), **kw(y, r, n)),
        "kd_Tlearn": lambda s, t, y, r, n, T: fastkd.kd_loss(s, t, T, **kw(y, r, n)),
        # the nn.Module losses call the functions
        "KDLoss": lambda s, t, y, r, n: fastkd.KDLoss(temperature=2.0, reduction=r)(s, t, y, num_items_in_batch=n),
        "JSDLoss": lambda s, t, y, r, n: fastkd.JSDLoss(beta=0.3, reduction=r)(s, t, y, num_items_in_batch=n),
        "SkewKLLoss": lambda s, t, y, r, n: fastkd.SkewKLLoss(skew=0.2, temperature=2.0, reduction=r)(
            s, t, y, num_items_in_batch=n),
        "DKDLoss": lambda s, t, y, r, n: fastkd.DKDLoss(1.0, 4.0, 2.0, warmup=4, reduction=r)(s, t, y, epoch=2),
    }
    return calls[fn]


def _weights_of(labels):
    """Per-row weights in [1, 3] from the labels, with their placement (a DTensor or a plain tensor)."""
    return None if labels is None else labels.remainder(3).to(torch.float64) + 1.0


_LOCAL_ONLY = ("kd_mix", "dkd", "topk", "topk_T", "DKDLoss")  # not available on the vocabulary-parallel path


def _cases() -> Dict[str, Case]:
    cases = []
    for fn in ("kd", "jsd", "skew_kl", "tvd"):
        for placement in ("vocab", "rows", "replicate"):
            for red in REDUCTIONS:
                for labels in ("uneven", "none"):
                    cases.append(Case(f"{fn}-{placement}-{red}-{labels}", fn, placement, red, labels=labels))
    for placement in ("vocab", "rows", "rows1", "replicate"):
        lead = (2, 3) if placement == "rows1" else (5,)  # Shard(1) of [B, T, V]: the sequence dimension
        for fn in ("jsd", "kd"):  # [B, T, V]: jsd_loss's TRL division by B without labels
            for red in ("batchmean", "none"):
                cases.append(Case(f"{fn}-{placement}-{red}-3d", fn, placement, red, lead=(2, 3), labels="none"))
            cases.append(Case(f"{fn}-{placement}-mean-3d-labels", fn, placement, "mean", lead=(2, 3)))
        for fn in ("kd", "reverse_kl", "symmetric_kl", "kd_parts", "KDLoss", "JSDLoss", "SkewKLLoss"):
            cases.append(Case(f"{fn}-{placement}-batchmean", fn, placement, "batchmean", lead=lead))
        cases.append(Case(f"kd-{placement}-batchmean-num-items", "kd", placement, "batchmean", lead=lead,
                          num_items=7.0))
        cases.append(Case(f"jsd-{placement}-mean-num-items", "jsd", placement, "mean", lead=lead, num_items=3.0))
        cases.append(Case(f"kd-{placement}-batchmean-all-ignored", "kd", placement, "batchmean", lead=lead,
                          labels="all"))
        cases.append(Case(f"kd-{placement}-batchmean-plain-labels", "kd", placement, "batchmean", lead=lead,
                          plain_labels=True))
        if placement != "vocab":
            for fn in _LOCAL_ONLY:
                for red in ("batchmean", "mean", "none"):
                    cases.append(Case(f"{fn}-{placement}-{red}", fn, placement, red, lead=lead))
            cases.append(Case(f"kd-{placement}-sum-teacher-grad", "kd", placement, "sum", lead=lead,
                              teacher_grad=True))
            cases.append(Case(f"kd-{placement}-none-teacher-grad", "kd", placement, "none", lead=lead,
                              teacher_grad=True))
    for placement in ("vocab", "rows", "replicate"):
        for fn in (("kd_T", "jsd_T", "kd_w", "kd_std", "jsd_std_w", "kd_Trow", "kd_Tlearn")
                   + (() if placement == "vocab" else ("topk_T",))):
            for red in ("batchmean", "none"):
                cases.append(Case(f"{fn}-{placement}-{red}", fn, placement, red))
    # one row on 2 ranks: rank 1 holds no row
    for red in REDUCTIONS:
        cases.append(Case(f"kd-rows-{red}-one-row", "kd", "rows", red, lead=(1,), labels="none"))
    # the fused head
    for placement in ("rows", "rows1", "replicate", "vocab"):
        for red in REDUCTIONS:
            cases.append(Case(f"fused-{placement}-{red}", "fused", placement, red, lead=(2, 3),
                              fused=(("loss", "jsd"), ("beta", 0.3), ("chunk_size", 2))))
        cases.append(Case(f"fused-{placement}-head-batchmean-ce", "fused", placement, "batchmean", lead=(2, 3),
                          teacher="head", fused=(("loss", "kl"), ("hard_label_weight", 0.4), ("chunk_size", 4),
                                                 ("temperature", 2.0))))
        cases.append(Case(f"fused-{placement}-topk-mean", "fused", placement, "mean", lead=(2, 3), teacher="topk",
                          fused=(("loss", "kl"),)))
        cases.append(Case(f"fused-{placement}-head-sum-parts", "fused", placement, "sum", lead=(2, 3),
                          teacher="head", labels="none", fused=(("loss", "skew_kl"), ("skew", 0.2),
                                                                ("return_parts", True))))
        # the per-row options: token_weights placed as the labels, standardize, a tensor temperature
        for red in ("batchmean", "none"):
            cases.append(Case(f"fused-{placement}-weights-{red}", "fused", placement, red, lead=(2, 3),
                              fused=(("loss", "jsd"), ("beta", 0.3), ("chunk_size", 2), ("weights", True))))
            cases.append(Case(f"fused-{placement}-head-standardize-weights-T-ce-{red}", "fused", placement, red,
                              lead=(2, 3), teacher="head",
                              fused=(("loss", "kl"), ("hard_label_weight", 0.4), ("chunk_size", 4),
                                     ("standardize", True), ("weights", True), ("temperature_tensor", 1.7))))
        cases.append(Case(f"fused-{placement}-dense-standardize-mean", "fused", placement, "mean", lead=(2, 3),
                          fused=(("loss", "kl"), ("standardize", True))))
        cases.append(Case(f"fused-{placement}-topk-weights-T-parts", "fused", placement, "batchmean", lead=(2, 3),
                          teacher="topk", fused=(("loss", "kl"), ("weights", True), ("temperature_tensor", 1.3),
                                                 ("hard_label_weight", 0.4), ("return_parts", True))))
        if placement != "vocab":
            for red in ("batchmean", "none"):
                cases.append(Case(f"fused-{placement}-head-{red}-weighted", "fused", placement, red, lead=(2, 3),
                                  teacher="head", fused=(("loss", "kl"), ("hard_label_weight", 0.4),
                                                         ("chunk_size", 2), ("weights", True))))
    return {c.name: c for c in cases}


def _inputs(case: Case):
    """Full tensors in float64: a dict of the roles (s, t, labels, w_none = the weights of a "none" loss in its
    backward; for the fused head h, w, b, th, tw, tb)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    lead = case.lead
    out = {}
    labels = torch.randint(0, VOCAB, lead, generator=g)
    flat = labels.view(-1)
    if case.labels == "uneven":
        flat[:2] = -100  # rank 0's rows under Shard(0): it counts fewer rows than rank 1
    elif case.labels == "all":
        flat[:] = -100
    out["labels"] = None if case.labels == "none" and case.fn not in ("kd_mix", "dkd", "DKDLoss") else labels
    if case.fn == "fused":
        out["h"] = torch.randn(lead + (HIDDEN,), generator=g, dtype=torch.float64)
        out["w"] = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
        out["b"] = torch.randn(VOCAB, generator=g, dtype=torch.float64)
        out["th"] = torch.randn(lead + (HIDDEN + 1,), generator=g, dtype=torch.float64)
        out["tw"] = torch.randn(VOCAB, HIDDEN + 1, generator=g, dtype=torch.float64)
        out["tb"] = torch.randn(VOCAB, generator=g, dtype=torch.float64)
        out["t"] = torch.randn(lead + (VOCAB,), generator=g, dtype=torch.float64) * 2.0
    else:
        out["s"] = torch.randn(lead + (VOCAB,), generator=g, dtype=torch.float64) * 2.0
        out["t"] = torch.randn(lead + (VOCAB,), generator=g, dtype=torch.float64) * 2.0
    if case.fn in ("topk", "topk_T") or case.teacher == "topk":
        out["vals"], out["idx"] = out["t"].topk(4, dim=-1)
    out["w_none"] = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    return out


def _fused_call(case: Case, h, w, b, teacher, labels, num_items=None):
    kw = dict(case.fused)
    if kw.pop("weights", False):  # token_weights placed as the labels (derived from them)
        kw["token_weights"] = _weights_of(labels)
    if "temperature_tensor" in kw:  # a plain 0-dim tensor, the same on every rank
        kw["temperature"] = torch.tensor(kw.pop("temperature_tensor"), dtype=torch.float64)
    if num_items is not None:
        kw["num_items_in_batch"] = num_items
    return fastkd.fused_linear_kd_loss(h, w, teacher, student_bias=b, labels=labels, reduction=case.reduction, **kw)


def _loss_of(out):
    return out.loss if isinstance(out, fastkd.LossParts) else out


def _backward(case: Case, out, w_none):
    loss = _loss_of(out)
    if case.reduction == "none":
        full = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        (full * w_none).sum().backward()
    else:
        loss.backward()  # on the DTensor itself (Partial or Replicate), as a training loop does


# --------------------------------------------------------------------------------------------------------
# the single-process reference
# --------------------------------------------------------------------------------------------------------
def _single_process(case: Case):
    """(values, gradients) of the plain-tensor call on the gathered tensors."""
    x = _inputs(case)
    grads = {}
    if case.fn == "fused":
        h, w, b = (x[k].clone().requires_grad_(True) for k in ("h", "w", "b"))
        out = _fused_call(case, h, w, b, _plain_teacher(case, x), x["labels"], case.num_items)
        _backward(case, out, x["w_none"])
        grads = {"h": h.grad, "w": w.grad, "b": b.grad}
    else:
        s = x["s"].clone().requires_grad_(True)
        t = x["t"].clone().requires_grad_(case.teacher_grad)
        teacher = (x["vals"], x["idx"]) if case.fn in ("topk", "topk_T") else t
        extra = {"T": torch.tensor(1.7, dtype=torch.float64, requires_grad=True)} if _learns_T(case) else {}
        out = _response(case.fn)(s, teacher, x["labels"], case.reduction, case.num_items, **extra)
        _backward(case, out, x["w_none"])
        grads = {"s": s.grad}
        if extra:
            grads["T"] = extra["T"].grad
        if case.teacher_grad:
            grads["t"] = t.grad
    values = list(out) if isinstance(out, fastkd.LossParts) else [out]
    return [o.detach() for o in values], grads


def _plain_teacher(case: Case, x):
    if case.teacher == "head":
        return fastkd.TeacherHead(x["th"], x["tw"], x["tb"])
    if case.teacher == "topk":
        return fastkd.TopKTeacher(x["vals"], x["idx"])
    return x["t"]


# --------------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------------
def _placements(case: Case, ndim_rows: int):
    """(logits/rows placement, vocabulary-rows placement of a weight, labels placement)."""
    from torch.distributed.tensor import Replicate, Shard

    if case.placement == "vocab":
        return Shard(-1), Shard(0), Replicate()
    if case.placement == "rows":
        return Shard(0), Replicate(), Shard(0)
    if case.placement == "rows1":
        assert ndim_rows >= 2
        return Shard(1), Replicate(), Shard(1)
    return Replicate(), Replicate(), Replicate()


def _run_case(case: Case, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    x = _inputs(case)
    rows_p, vocab_rows_p, labels_p = _placements(case, len(case.lead))
    if case.placement == "vocab":
        rows_only = Replicate()  # the rows are replicated over the tensor-parallel group
    else:
        rows_only = rows_p

    def dt(t, p, grad=False):
        return distribute_tensor(t, mesh, [p]).requires_grad_(grad)

    labels = x["labels"]
    if labels is not None:
        labels = dt(labels, labels_p)
        if case.plain_labels:
            labels = labels.to_local()
    leaves = {}
    if case.fn == "fused":
        leaves["h"] = dt(x["h"], rows_only, True)
        leaves["w"] = dt(x["w"], vocab_rows_p, True)
        leaves["b"] = dt(x["b"], vocab_rows_p, True)
        if case.teacher == "head":
            teacher = fastkd.TeacherHead(dt(x["th"], rows_only), dt(x["tw"], vocab_rows_p),
                                         dt(x["tb"], vocab_rows_p))
        elif case.teacher == "topk":
            teacher = fastkd.TopKTeacher(dt(x["vals"], rows_only), dt(x["idx"], rows_only))
        else:
            teacher = dt(x["t"], rows_p if case.placement != "vocab" else Shard(-1))
        out = _fused_call(case, leaves["h"], leaves["w"], leaves["b"], teacher, labels, case.num_items)
    else:
        leaves["s"] = dt(x["s"], rows_p, True)
        t = dt(x["t"], rows_p, case.teacher_grad)
        if case.teacher_grad:
            leaves["t"] = t
        teacher = (dt(x["vals"], rows_only), dt(x["idx"], rows_only)) if case.fn in ("topk", "topk_T") else t
        extra = {}
        if _learns_T(case):
            leaves["T"] = extra["T"] = dt(torch.tensor(1.7, dtype=torch.float64), Replicate(), True)
        out = _response(case.fn)(leaves["s"], teacher, labels, case.reduction, case.num_items, **extra)
    values = list(out) if isinstance(out, fastkd.LossParts) else [out]
    assert all(isinstance(o, DTensor) for o in values), [type(o) for o in values]
    result = {
        "values": [o.full_tensor().detach() for o in values],
        "placements": [repr(tuple(o.placements)) for o in values],
        "shapes": [tuple(o.shape) for o in values],
    }
    _backward(case, out, x["w_none"])
    result["grads"] = {k: None if leaf.grad is None else leaf.grad.full_tensor() for k, leaf in leaves.items()}
    result["grad_placements"] = {k: None if leaf.grad is None else repr(tuple(leaf.grad.placements))
                                 for k, leaf in leaves.items()}
    if case.fn != "fused" and not case.teacher_grad:
        assert t.grad is None
    return result


def _errors(mesh):
    """Unsupported layouts: {name: (exception type name, message)}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, VOCAB, generator=g, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    h = torch.randn(4, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)

    def dt(x, *p, m=None):
        return distribute_tensor(x, m or mesh, list(p))

    mesh2 = init_device_mesh("cpu", (WORLD, 1))  # a 2-D mesh (collective: every rank builds it)
    thunks = {
        "2d-mesh": lambda: fastkd.kd_loss(dt(s, Shard(0), Replicate(), m=mesh2), dt(s, Shard(0), Replicate(), m=mesh2)),
        "partial": lambda: fastkd.kd_loss(DTensor.from_local(s, mesh, [Partial()]),
                                          DTensor.from_local(s, mesh, [Partial()])),
        "mismatched-teacher": lambda: fastkd.jsd_loss(dt(s, Shard(-1)), dt(s, Shard(0))),
        "plain-teacher": lambda: fastkd.kd_loss(dt(s, Shard(0)), s),
        "dtensor-teacher-plain-student": lambda: fastkd.kd_loss(s, dt(s, Shard(0))),
        "labels-placement": lambda: fastkd.kd_loss(dt(s, Shard(0)), dt(s, Shard(0)), labels=dt(labels, Replicate())),
        "labels-vocab-sharded-rows": lambda: fastkd.kd_loss(dt(s, Shard(-1)), dt(s, Shard(-1)),
                                                            labels=dt(labels, Shard(0))),
        "dkd-vocab": lambda: fastkd.dkd_loss(dt(s, Shard(-1)), dt(s, Shard(-1)), labels),
        "divergence-dkd-vocab": lambda: fastkd.divergence_loss(dt(s, Shard(-1)), dt(s, Shard(-1)), "dkd",
                                                               labels=labels),
        "kd-alpha-vocab": lambda: fastkd.kd_loss(dt(s, Shard(-1)), dt(s, Shard(-1)), labels=labels, alpha=0.5),
        "topk-vocab": lambda: fastkd.topk_kd_loss(dt(s, Shard(-1)), *(dt(x, Replicate()) for x in s.topk(3))),
        "topk-k-sharded": lambda: fastkd.topk_kd_loss(dt(s, Shard(0)), *(dt(x, Shard(1)) for x in s.topk(4))),
        "num-items-sharded": lambda: fastkd.kd_loss(dt(s, Shard(0)), dt(s, Shard(0)),
                                                    num_items_in_batch=dt(torch.ones(2), Shard(0))),
        "fused-hidden-dim-sharded": lambda: fastkd.fused_linear_kd_loss(dt(h, Shard(1)), dt(w, Shard(1)),
                                                                        dt(s, Shard(0))),
        "fused-both-sharded": lambda: fastkd.fused_linear_kd_loss(dt(h, Shard(0)), dt(w, Shard(0)), dt(s, Shard(0))),
        "fused-plain-weight": lambda: fastkd.fused_linear_kd_loss(dt(h, Shard(0)), w, dt(s, Shard(0))),
        "fused-teacher-placement": lambda: fastkd.fused_linear_kd_loss(dt(h, Shard(0)), dt(w, Replicate()),
                                                                       dt(s, Replicate())),
        "fused-bias-placement": lambda: fastkd.fused_linear_kd_loss(dt(h, Shard(0)), dt(w, Replicate()),
                                                                    dt(s, Shard(0)),
                                                                    student_bias=dt(w[:, 0].clone(), Shard(0))),
        "fused-head-weight-placement": lambda: fastkd.fused_linear_kd_loss(
            dt(h, Shard(0)), dt(w, Replicate()), fastkd.TeacherHead(dt(h, Shard(0)), dt(w, Shard(0)))),
    }
    errors = {}
    for name, thunk in thunks.items():
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 - recorded and checked in the parent
            errors[name] = (type(e).__name__, str(e))
        else:
            errors[name] = (None, "no error")
    return errors


def _worker(rank: int, init_file: str, out_dir: str):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {"cases": {}, "errors": _errors(mesh)}
        for name, case in _cases().items():
            try:
                results["cases"][name] = _run_case(case, mesh)
            except Exception as e:  # noqa: BLE001 - reported by the case's test
                results["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_RESULTS: Dict[str, object] = {}


def _results(tmp_path_factory) -> list:
    """Spawns the 2 gloo processes once; returns each rank's results (a failed run's error is re-raised)."""
    if "run" not in _RESULTS:
        out = tmp_path_factory.mktemp("dtensor")
        try:
            with pytest.MonkeyPatch.context() as mpatch:
                mpatch.setenv("OMP_NUM_THREADS", "1")
                mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
            _RESULTS["run"] = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
        except Exception as e:  # noqa: BLE001 - re-raised below, and by every later test
            _RESULTS["run"] = e
    if isinstance(_RESULTS["run"], Exception):
        raise RuntimeError("the 2-process DTensor run failed") from _RESULTS["run"]
    return _RESULTS["run"]


# --------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------
def _expected_placement(case: Case, i: int) -> str:
    if case.placement in ("vocab", "replicate"):
        return "(Replicate(),)"
    if case.reduction == "none":
        return f"(Shard(dim={1 if case.placement == 'rows1' else 0}),)"
    return "(Partial(sum),)"


def _learns_T(case: Case) -> bool:
    return case.fn == "kd_Tlearn"


def _expected_grad_placement(case: Case, key: str) -> str:
    vocab = case.placement == "vocab"
    if key == "T":  # a replicated temperature: each rank's rows' share with row-sharded logits
        return "(Partial(sum),)" if case.placement.startswith("rows") else "(Replicate(),)"
    if case.fn != "fused":  # the logits' own placement
        return {"vocab": f"(Shard(dim={len(case.lead)}),)", "rows": "(Shard(dim=0),)", "rows1": "(Shard(dim=1),)",
                "replicate": "(Replicate(),)"}[case.placement]
    if key == "h":
        return {"rows": "(Shard(dim=0),)", "rows1": "(Shard(dim=1),)"}.get(case.placement, "(Replicate(),)")
    if vocab:
        return "(Shard(dim=0),)"
    # a replicated head used with row-sharded hidden states: each rank's share, summed by full_tensor()
    return "(Partial(sum),)" if case.placement.startswith("rows") else "(Replicate(),)"


@pytest.mark.parametrize("name", list(_cases()))
def test_dtensor_matches_single_process(name, tmp_path_factory):
    case = _cases()[name]
    per_rank = [r["cases"][name] for r in _results(tmp_path_factory)]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
    values, grads = _single_process(case)
    for rank, res in enumerate(per_rank):
        assert len(res["values"]) == len(values)
        for i, (mine, ref) in enumerate(zip(res["values"], values)):
            assert res["shapes"][i] == tuple(ref.shape)
            assert res["placements"][i] == _expected_placement(case, i), f"rank {rank}, output {i}"
            assert mine.dtype == ref.dtype
            assert_close(mine, ref, rtol=RTOL, atol=ATOL, what=f"rank {rank}, output {i}")
        for key, ref in grads.items():
            mine = res["grads"][key]
            if case.placement == "vocab" and key == "t":
                assert mine is None, "vocabulary-parallel: the teacher gets no gradient"
                continue
            assert mine is not None, f"rank {rank}: no gradient for {key}"
            assert res["grad_placements"][key] == _expected_grad_placement(case, key), f"rank {rank}, {key}"
            assert_close(mine, ref, rtol=RTOL, atol=ATOL, what=f"rank {rank}, gradient of {key}")
    if case.labels == "all" and case.reduction != "none":
        assert (per_rank[0]["values"][0] == 0).all() and (per_rank[0]["grads"]["s"] == 0).all()


ERRORS = {
    "2d-mesh": ("ValueError", r"student_logits is a DTensor on a 2-D device mesh of shape \(2, 1\) with placements "
                              r"\(Shard\(dim=0\), Replicate\(\)\).*1-D mesh only"),
    "partial": ("ValueError", r"student_logits is a DTensor with placements \(Partial\(sum\),\), which fastkd does "
                              r"not support; accepted: Shard\(-1\).*Replicate\(\)"),
    "mismatched-teacher": ("ValueError", r"jsd_loss: teacher_logits has placements \(Shard\(dim=0\),\), but as the "
                                         r"student_logits' placement it must be Shard\(1\)"),
    "plain-teacher": ("TypeError", r"kd_loss: teacher_logits must be a DTensor as well"),
    "dtensor-teacher-plain-student": ("TypeError", r"kd_loss: student_logits must be a DTensor"),
    "labels-placement": ("ValueError", r"labels has placements \(Replicate\(\),\), but with row-sharded logits it "
                                       r"must be Shard\(0\)"),
    "labels-vocab-sharded-rows": ("ValueError", r"labels has placements \(Shard\(dim=0\),\), but with "
                                                r"vocabulary-sharded logits .* must be Replicate\(\)"),
    "dkd-vocab": ("ValueError", r"dkd_loss: 'dkd' is not supported with vocabulary-sharded DTensor logits"),
    "divergence-dkd-vocab": ("ValueError", r"divergence_loss: 'dkd' is not supported with vocabulary-sharded"),
    "kd-alpha-vocab": ("ValueError", r"kd_loss: the hard-label cross-entropy \(alpha != 0\) is not supported with "
                                     r"vocabulary-sharded"),
    "topk-vocab": ("ValueError", r"vocabulary-sharded student_logits \(Shard\(-1\)\) are not supported by "
                                 r"topk_kd_loss"),
    "topk-k-sharded": ("ValueError", r"teacher_topk_values has placements \(Shard\(dim=1\),\), but with row-sharded "
                                     r"logits it must be Shard\(0\)"),
    "num-items-sharded": ("ValueError", r"num_items_in_batch has placements \(Shard\(dim=0\),\), but as the global "
                                        r"count \(the same on every rank\) it must be Replicate\(\)"),
    "fused-hidden-dim-sharded": ("ValueError", r"fused_linear_kd_loss: student_hidden with placements "
                                               r"\(Shard\(dim=1\),\) and student_weight with placements "
                                               r"\(Shard\(dim=1\),\) is a layout fastkd does not support"),
    "fused-both-sharded": ("ValueError", r"student_hidden with placements \(Shard\(dim=0\),\) and student_weight "
                                         r"with placements \(Shard\(dim=0\),\) is a layout"),
    "fused-plain-weight": ("TypeError", r"fused_linear_kd_loss: student_weight must be a DTensor"),
    "fused-teacher-placement": ("ValueError", r"teacher has placements \(Replicate\(\),\), but with row-sharded "
                                              r"hidden states it must be Shard\(0\)"),
    "fused-bias-placement": ("ValueError", r"student_bias has placements \(Shard\(dim=0\),\), but with row-sharded "
                                           r"hidden states it must be Replicate\(\)"),
    "fused-head-weight-placement": ("ValueError", r"teacher.weight has placements \(Shard\(dim=0\),\), but with "
                                                  r"row-sharded hidden states it must be Replicate\(\)"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_unsupported_layouts_raise_clear_errors(name, tmp_path_factory):
    import re

    kind, pattern = ERRORS[name]
    for rank, res in enumerate(_results(tmp_path_factory)):
        got_kind, message = res["errors"][name]
        assert got_kind == kind, f"rank {rank}: {got_kind}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} does not match {pattern!r}"


def test_plain_tensors_do_not_import_dtensor():
    """The hook costs plain-tensor calls nothing: it never imports torch.distributed.tensor (~0.5 s) itself."""
    import subprocess
    import sys

    code = ("import sys, torch, fastkd; s = torch.randn(3, 5); fastkd.kd_loss(s, s.flip(0)); "
            "fastkd.fused_linear_kd_loss(torch.randn(3, 2), torch.randn(5, 2), s); "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
