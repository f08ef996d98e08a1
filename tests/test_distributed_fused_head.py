"""fastkd.distributed.vocab_parallel_fused_linear_kd_loss on 2 and 3 gloo ranks against the single-process
fused head (fastkd.fused_linear_kd_loss) on the gathered weight, bias and teacher: value, and the gradients of
the hidden states, of each rank's weight shard and bias shard (and of a tensor temperature). Softcap /
logit-scale cases against the eager composition with torch.tanh (fastkd.reference's losses on the transformed
logits), float64; the per-row options (token_weights, a 0-dim or per-row tensor temperature, standardize) against
the single-process fused head, with the transforms too.

As tests/test_distributed.py: one group of processes per world size (spawned once per module), every worker
runs all the scenarios, saves its results with torch.save, and the tests compare them in the parent.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import zlib
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import assert_close, eager_head_transform

import fastkd
from fastkd import reference
from fastkd.distributed import vocab_parallel_fused_linear_kd_loss as vp_head

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build",
)

VOCAB, HIDDEN, T_HIDDEN, K = 13, 5, 4, 4
SPLITS = {2: (8, 5), 3: (5, 0, 8)}  # uneven vocabulary slices in rank order; world 3 has an empty slice
ROWS = (7,)  # the default rows: chunk 3 does not divide them


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    teacher: str = "dense"  # "dense", "head", "topk" (logits), "topk_lp" (logprobs, renormalize), "bucket"
    loss: str = "kl"
    params: Tuple[Tuple[str, float], ...] = ()
    reduction: str = "batchmean"
    hard: float = 0.0  # hard_label_weight (the fused cross-entropy)
    soft: Optional[float] = None
    chunk: Optional[int] = 3
    lead: Tuple[int, ...] = ROWS
    dtype: torch.dtype = torch.float64
    labels: str = "some"  # "none", "some" (rows 0 and 4 ignored), "first_chunk" (rows 0-2), "all"
    temperature: float = 2.0
    bias: bool = True
    num_items: Optional[float] = None
    split: Optional[Tuple[int, ...]] = None
    k: int = K
    frozen: bool = False  # the weight shard (and bias) do not require grad
    transforms: Tuple[Tuple[str, float], ...] = ()  # softcaps / logit scales: checked against the eager tanh
    # the per-row options, checked against the single-process fused head (also with transforms)
    weights: bool = False  # token_weights (one per row, in [-0.5, 2.5), one row 0)
    t_tensor: str = ""  # "" (the float), "scalar" (0-dim, requires grad), "rows" (per row, requires grad),
    #                     "rows-const" (per row, no grad)
    standardize: bool = False

    @property
    def options(self) -> bool:
        return self.weights or bool(self.t_tensor) or self.standardize


def _cases(world: int) -> Dict[str, Case]:
    cases = []
    divs = [("kl", ()), ("jsd", (("beta", 0.3),)), ("reverse_kl", ()), ("tvd", ()), ("skew_kl", (("skew", 0.1),))]
    for teacher in ("dense", "head"):
        for loss, params in divs:
            for hard in (0.0, 0.4):
                k = f"{teacher}-{loss}-ce{hard}"
                cases.append(Case(f"{k}-batchmean", teacher, loss, params, hard=hard))
                cases.append(Case(f"{k}-none", teacher, loss, params, "none", hard=hard))
    # every other divergence of the registry the fused head runs, at its first test parameters
    named = {name for name, _ in divs}
    for spec in fastkd.divergences.REGISTRY.values():
        if spec.fused_head and spec.name not in named:
            params = tuple(sorted(spec.test_params[0].items()))
            cases.append(Case(f"head-{spec.name}-ce0.4-batchmean", "head", spec.name, params, hard=0.4))
            cases.append(Case(f"dense-{spec.name}-none", "dense", spec.name, params, "none"))
    for red in ("sum", "mean"):
        for hard in (0.0, 0.4):
            cases.append(Case(f"dense-kl-ce{hard}-{red}", reduction=red, hard=hard))
            cases.append(Case(f"head-jsd-ce{hard}-{red}", "head", "jsd", (("beta", 0.3),), red, hard=hard))
    for teacher in ("topk", "topk_lp", "bucket"):
        for red in ("batchmean", "none", "sum", "mean"):
            for hard in (0.0, 0.4):
                cases.append(Case(f"{teacher}-{red}-ce{hard}", teacher, reduction=red, hard=hard))
    cases.append(Case("bucket-k=V", "bucket", k=VOCAB))  # the kept set is the vocabulary: no tail
    # chunk sizes: 1, the rows, more than the rows, the default; a 3-D [B, T, H] input with chunk 3 over 8 rows
    for chunk in (1, 7, 50, None):
        cases.append(Case(f"dense-kl-ce0.4-chunk{chunk}", hard=0.4, chunk=chunk))
        cases.append(Case(f"topk-ce0.4-chunk{chunk}", "topk", hard=0.4, chunk=chunk))
    cases.append(Case("head-jsd-ce0.4-3d", "head", "jsd", (("beta", 0.3),), hard=0.4, lead=(2, 4)))
    cases.append(Case("bucket-none-3d", "bucket", reduction="none", lead=(2, 4), hard=0.4))
    # no counted row: in the first chunk, anywhere; no labels at all; num_items_in_batch; independent weights
    for teacher in ("dense", "topk"):
        cases.append(Case(f"{teacher}-ce0.4-first-chunk-ignored", teacher, hard=0.4, labels="first_chunk"))
        cases.append(Case(f"{teacher}-ce0.4-all-ignored", teacher, hard=0.4, labels="all"))
        cases.append(Case(f"{teacher}-ce0.4-all-ignored-none", teacher, reduction="none", hard=0.4, labels="all"))
    cases.append(Case("head-kl-no-labels", "head", labels="none"))
    cases.append(Case("head-kl-no-labels-mean", "head", reduction="mean", labels="none"))
    cases.append(Case("dense-kl-ce0.4-num-items", hard=0.4, num_items=3.0))
    cases.append(Case("topk-mean-num-items", "topk", reduction="mean", num_items=5.0))
    cases.append(Case("dense-kl-weights-0.7-1.5", hard=0.7, soft=1.5))
    cases.append(Case("head-kl-ce1-soft0", "head", hard=1.0))  # the cross-entropy alone
    cases.append(Case("dense-kl-no-bias", bias=False, hard=0.4))
    cases.append(Case("head-kl-frozen-head", "head", hard=0.4, frozen=True))
    cases.append(Case("dense-kl-T1", temperature=1.0, hard=0.4))
    cases.append(Case("dense-kl-empty-input", lead=(0,), hard=0.4))
    cases.append(Case("topk-none-empty-input", "topk", reduction="none", lead=(0,)))
    # float32 (against the float64 single-process head on the same numbers)
    for teacher, loss, params in (("dense", "jsd", (("beta", 0.3),)), ("head", "kl", ()), ("topk", "kl", ()),
                                  ("bucket", "kl", ()), ("head", "tvd", ())):
        for red in ("batchmean", "none"):
            cases.append(Case(f"{teacher}-{loss}-{red}-float32", teacher, loss, params, red, hard=0.4,
                              dtype=torch.float32))
    # every rank's slice at one end: one rank with all the vocabulary, the others none
    cases.append(Case("dense-kl-ce0.4-one-rank-has-all", hard=0.4, split=(0,) * (world - 1) + (VOCAB,)))
    cases.append(Case("topk-ce0.4-one-rank-has-all", "topk", hard=0.4, split=(VOCAB,) + (0,) * (world - 1)))
    # softcaps and logit scales (Gemma-2, Cohere) against the eager composition with torch.tanh
    both = (("student_softcap", 3.0), ("teacher_softcap", 2.5), ("student_logit_scale", 0.7),
            ("teacher_logit_scale", 1.3))
    for teacher in ("dense", "head"):
        for red in ("batchmean", "none"):
            cases.append(Case(f"{teacher}-kl-ce0.4-{red}-softcap-scale", teacher, reduction=red, hard=0.4,
                              transforms=both))
        cases.append(Case(f"{teacher}-jsd-softcap-only", teacher, "jsd", (("beta", 0.3),), hard=0.4,
                          transforms=(("student_softcap", 2.0), ("teacher_softcap", 4.0))))
        cases.append(Case(f"{teacher}-reverse_kl-scale-only", teacher, "reverse_kl", reduction="sum",
                          transforms=(("student_logit_scale", 0.5), ("teacher_logit_scale", 2.0))))
    cases.append(Case("head-kl-float32-softcap", "head", hard=0.4, dtype=torch.float32, transforms=both))
    # bfloat16 head: float32 logits and loss, as the single-process head (gradients rounded to bf16 only)
    cases.append(Case("head-kl-ce0.4-bfloat16", "head", hard=0.4, dtype=torch.bfloat16))
    cases.append(Case("dense-jsd-none-bfloat16", "dense", "jsd", (("beta", 0.3),), "none", dtype=torch.bfloat16))
    for teacher in ("topk", "bucket"):
        cases.append(Case(f"{teacher}-ce0.4-student-softcap-scale", teacher, reduction="none", hard=0.4,
                          transforms=(("student_softcap", 3.0), ("student_logit_scale", 0.7))))
    cases += _option_cases() + _random_option_cases(world)
    return {c.name: c for c in cases}


def _random_option_cases(world: int, count: int = 16):
    """A seeded sweep over the class of inputs the row options take (the same list in the workers and the
    parent): teacher kind, divergence, reduction, cross-entropy, chunk size, rows, labels, vocabulary split
    (empty slices included) and any subset of the options."""
    g = torch.Generator().manual_seed(1000 + world)
    fused = sorted(spec.name for spec in fastkd.divergences.REGISTRY.values() if spec.fused_head)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=g))]

    cases = []
    for i in range(count):
        teacher = pick(("dense", "head", "dense", "head", "topk", "topk_lp", "bucket"))
        loss = "kl" if teacher not in ("dense", "head") else pick(fused)
        spec = fastkd.divergences.get(loss)
        params = tuple(sorted(spec.test_params[0].items())) if spec.test_params else ()
        cuts = sorted(int(c) for c in torch.randint(0, VOCAB + 1, (world - 1,), generator=g))
        split = tuple(b - a for a, b in zip([0] + cuts, cuts + [VOCAB]))
        options = dict(weights=bool(torch.rand((), generator=g) < 0.6),
                       t_tensor=pick(("", "scalar", "rows", "rows", "rows-const")),
                       standardize=teacher in ("dense", "head") and bool(torch.rand((), generator=g) < 0.5))
        if not (options["weights"] or options["t_tensor"] or options["standardize"]):
            options["weights"] = True
        rows = int(torch.randint(1, 12, (), generator=g))
        labels = pick(("none", "some", "first_chunk"))
        hard = 0.0 if labels == "none" else pick((0.0, 0.4, 1.0))  # the cross-entropy needs the labels
        cases.append(Case(f"random{i}-{teacher}-{loss}", teacher, loss, params,
                          pick(("batchmean", "none", "sum", "mean")), hard=hard, chunk=pick((1, 2, 5, None)),
                          lead=(rows,), labels=labels, split=split, **options))
    return cases


def _option_cases():
    """The per-row options: token_weights, the tensor temperature, standardize; every teacher kind where
    supported (standardize: not a TopKTeacher), every reduction, the cross-entropy on and off."""
    cases = []
    teachers = ("dense", "head", "topk", "topk_lp", "bucket")
    divs = {"dense": ("jsd", (("beta", 0.3),)), "head": ("kl", ())}
    for teacher in teachers:
        loss, params = divs.get(teacher, ("kl", ()))
        for red in ("batchmean", "none", "sum", "mean"):
            for hard in (0.0, 0.4):
                k = f"{teacher}-{red}-ce{hard}"
                cases.append(Case(f"{k}-weights", teacher, loss, params, red, hard=hard, weights=True))
                cases.append(Case(f"{k}-T-rows", teacher, loss, params, red, hard=hard, t_tensor="rows"))
                if teacher in ("dense", "head"):
                    cases.append(Case(f"{k}-standardize", teacher, loss, params, red, hard=hard, standardize=True))
        cases.append(Case(f"{teacher}-ce0.4-T-scalar", teacher, loss, params, hard=0.4, t_tensor="scalar"))
        cases.append(Case(f"{teacher}-none-T-rows-const", teacher, loss, params, "none", t_tensor="rows-const"))
        cases.append(Case(f"{teacher}-ce0.4-weights-T-rows-float32", teacher, loss, params, hard=0.4, weights=True,
                          t_tensor="rows", dtype=torch.float32))
        cases.append(Case(f"{teacher}-ce0.4-weights-T-rows-all-ignored", teacher, loss, params, hard=0.4,
                          weights=True, t_tensor="rows", labels="all"))
        cases.append(Case(f"{teacher}-weights-T-scalar-no-labels", teacher, loss, params, labels="none",
                          weights=True, t_tensor="scalar"))
    for spec in fastkd.divergences.REGISTRY.values():  # every divergence of the fused head with every option
        if spec.fused_head:
            params = tuple(sorted(spec.test_params[0].items()))
            cases.append(Case(f"dense-{spec.name}-ce0.4-all-options", "dense", spec.name, params, hard=0.4,
                              weights=True, t_tensor="rows", standardize=True))
            cases.append(Case(f"head-{spec.name}-none-all-options", "head", spec.name, params, "none",
                              weights=True, t_tensor="scalar", standardize=True))
    both = (("student_softcap", 3.0), ("teacher_softcap", 2.5), ("student_logit_scale", 0.7),
            ("teacher_logit_scale", 1.3))
    for teacher in ("dense", "head"):
        for red in ("batchmean", "none"):
            cases.append(Case(f"{teacher}-kl-ce0.4-{red}-all-options-softcap-scale", teacher, reduction=red, hard=0.4,
                              transforms=both, weights=True, t_tensor="rows", standardize=True))
    for teacher in ("topk", "bucket"):
        cases.append(Case(f"{teacher}-ce0.4-weights-T-rows-student-softcap", teacher, reduction="none", hard=0.4,
                          weights=True, t_tensor="rows",
                          transforms=(("student_softcap", 3.0), ("student_logit_scale", 0.7))))
    for chunk in (1, None):
        cases.append(Case(f"head-kl-ce0.4-all-options-chunk{chunk}", "head", hard=0.4, chunk=chunk, weights=True,
                          t_tensor="rows", standardize=True))
        cases.append(Case(f"topk-ce0.4-weights-T-rows-chunk{chunk}", "topk", hard=0.4, chunk=chunk, weights=True,
                          t_tensor="rows"))
    cases.append(Case("dense-kl-ce0.4-all-options-num-items", hard=0.4, num_items=3.0, weights=True,
                      t_tensor="rows", standardize=True))
    cases.append(Case("head-kl-all-options-3d", "head", hard=0.4, lead=(2, 4), weights=True, t_tensor="rows",
                      standardize=True))
    cases.append(Case("head-kl-all-options-T-scalar-3d", "head", lead=(2, 4), weights=True, t_tensor="scalar",
                      standardize=True))
    cases.append(Case("dense-kl-ce0.4-standardize-scale-off", hard=0.4, standardize=True, t_tensor="rows",
                      params=(("scale_by_temperature", False),)))
    cases.append(Case("dense-kl-ce0.4-all-options-float32", hard=0.4, standardize=True, weights=True,
                      t_tensor="rows", dtype=torch.float32))
    cases.append(Case("head-kl-none-standardize-float32", "head", reduction="none", standardize=True,
                      dtype=torch.float32))
    cases.append(Case("head-kl-ce0.4-all-options-frozen-head", "head", hard=0.4, frozen=True, weights=True,
                      t_tensor="rows", standardize=True))
    cases.append(Case("dense-kl-ce0.4-all-options-empty-input", lead=(0,), hard=0.4, weights=True,
                      t_tensor="rows", standardize=True))
    cases.append(Case("dense-kl-ce0.4-all-options-empty-input-const-T", lead=(0,), hard=0.4, weights=True,
                      t_tensor="rows-const", standardize=True))
    cases.append(Case("head-kl-ce0.4-all-options-bfloat16", "head", hard=0.4, dtype=torch.bfloat16, weights=True,
                      t_tensor="rows", standardize=True))
    return cases


# --------------------------------------------------------------------------------------------------------
# inputs, rebuilt identically in the workers and in the parent
# --------------------------------------------------------------------------------------------------------
def _inputs(case: Case):
    """(hidden, weight, bias, full teacher, labels, grad_out) in float64; the teacher is dense logits, a
    TeacherHead or a TopKTeacher (global indices)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    f64 = dict(generator=g, dtype=torch.float64)
    hidden = torch.randn(case.lead + (HIDDEN,), **f64)
    weight = torch.randn(VOCAB, HIDDEN, **f64)
    bias = torch.randn(VOCAB, **f64) if case.bias else None
    if case.teacher == "dense":
        teacher = torch.randn(case.lead + (VOCAB,), **f64) * 2.0
    elif case.teacher == "head":
        teacher = fastkd.TeacherHead(torch.randn(case.lead + (T_HIDDEN,), **f64), torch.randn(VOCAB, T_HIDDEN, **f64),
                                     torch.randn(VOCAB, **f64))
    else:
        scores = torch.randn(case.lead + (VOCAB,), **f64) * 2.0
        if case.teacher == "topk":
            values, indices = scores.topk(case.k, dim=-1)
            teacher = fastkd.TopKTeacher(values, indices)
        else:
            values, indices = scores.log_softmax(-1).topk(case.k, dim=-1)
            tail = "bucket" if case.teacher == "bucket" else "renormalize"
            teacher = fastkd.TopKTeacher(values, indices, values_are="logprobs", tail=tail)
    labels = None
    if case.labels != "none":
        labels = torch.randint(0, VOCAB, case.lead, generator=g)
        flat = labels.view(-1)
        if case.labels == "all":
            flat.fill_(-100)
        elif case.labels == "first_chunk":
            flat[:3] = -100
        elif flat.numel():
            flat[0] = -100
            flat[min(4, flat.numel() - 1)] = -100
    if case.reduction == "none":
        grad_out = torch.rand(case.lead, **f64) + 0.5
    else:
        grad_out = torch.tensor(0.75, dtype=torch.float64)
    return hidden, weight, bias, teacher, labels, grad_out


def _bounds(case: Case, world: int, rank: int) -> Tuple[int, int]:
    split = case.split or SPLITS[world]
    lo = sum(split[:rank])
    return lo, lo + split[rank]


def _cast_teacher(teacher, dtype):
    if isinstance(teacher, torch.Tensor):
        return teacher.to(dtype)
    if isinstance(teacher, fastkd.TeacherHead):
        return fastkd.TeacherHead(*(x.to(dtype) for x in teacher))
    return teacher._replace(values=teacher.values.to(dtype))


def _shard_teacher(teacher, lo: int, hi: int):
    if isinstance(teacher, torch.Tensor):
        return teacher[..., lo:hi].clone().requires_grad_(True)  # a constant even if it requires grad
    if isinstance(teacher, fastkd.TeacherHead):
        return fastkd.TeacherHead(teacher.hidden, teacher.weight[lo:hi].clone(), teacher.bias[lo:hi].clone())
    return teacher  # global indices, the same on every rank


def _row_options(case: Case, dtype: torch.dtype):
    """``(keywords, temperature leaf or None)``: the case's token_weights, temperature (a fresh tensor in
    ``dtype``, requiring grad unless "rows-const") and standardize, rebuilt identically everywhere."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    kw, leaf = {}, None
    if case.weights:
        w = torch.rand(case.lead, generator=g, dtype=torch.float64) * 3.0 - 0.5
        if w.numel():
            w.view(-1)[-1] = 0.0  # a counted row of weight 0
            if case.labels != "none":
                w.view(-1)[0] = math.nan  # an ignored row (label ignore_index): dropped whatever its weight
        kw["token_weights"] = w.to(dtype)
    if case.t_tensor:
        shape = () if case.t_tensor == "scalar" else case.lead
        t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2.5 + 0.5).to(dtype)
        leaf = t.requires_grad_(case.t_tensor != "rows-const")
        kw["temperature"] = leaf
    if case.standardize:
        kw["standardize"] = True
    return kw, (leaf if leaf is not None and leaf.requires_grad else None)


def _options_dtype(case: Case) -> torch.dtype:
    """The row options' dtype on the ranks: the input's, float32 for bf16 input (the temperature's gradient comes
    back in its own dtype)."""
    return torch.float32 if case.dtype == torch.bfloat16 else case.dtype


def _kwargs(case: Case, labels, dtype: torch.dtype = torch.float64):
    """The keywords of both calls (the row options' tensors in ``dtype``) and the temperature leaf."""
    kw = dict(loss=case.loss, temperature=case.temperature, labels=labels, reduction=case.reduction,
              hard_label_weight=case.hard, soft_weight=case.soft, num_items_in_batch=case.num_items,
              chunk_size=case.chunk, **dict(case.params))
    options, leaf = _row_options(case, dtype)
    kw.update(options)
    return kw, leaf


# --------------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------------
def _run_case(case: Case, world: int, rank: int):
    hidden, weight, bias, teacher, labels, grad_out = _inputs(case)
    lo, hi = _bounds(case, world, rank)
    h = hidden.to(case.dtype).requires_grad_(True)
    w = weight[lo:hi].to(case.dtype).requires_grad_(not case.frozen)
    b = None if bias is None else bias[lo:hi].to(case.dtype).requires_grad_(not case.frozen)
    t = _shard_teacher(_cast_teacher(teacher, case.dtype), lo, hi)
    kw, t_leaf = _kwargs(case, labels, _options_dtype(case))
    out = vp_head(h, w, t, student_bias_shard=b, **kw, **dict(case.transforms), return_parts=True)
    out.loss.backward(grad_out.to(out.loss.dtype))
    return {"loss": out.loss.detach(), "soft": out.soft, "hard": out.hard, "grad_hidden": h.grad,
            "grad_weight": w.grad, "grad_bias": None if b is None else b.grad,
            "teacher_grad": t.grad if isinstance(t, torch.Tensor) else None,
            "grad_temperature": None if t_leaf is None else t_leaf.grad}


def _expect_error(fn) -> Optional[str]:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _bad_runs(world: int, rank: int) -> Dict[str, Optional[str]]:
    """Errors that need the other ranks or the global vocabulary: raised on every rank, and the group is
    still usable afterwards (the next scenario runs)."""
    case = Case("bad")
    hidden, weight, bias, teacher, labels, _ = _inputs(case)
    lo, hi = _bounds(case, world, rank)
    w, t = weight[lo:hi], teacher[..., lo:hi]
    out = {}
    bad_labels = labels.clone()
    bad_labels[3] = VOCAB  # a global index out of range (in range of no single shard either)
    out["label-range"] = _expect_error(lambda: vp_head(hidden, w, t, labels=bad_labels, hard_label_weight=0.5))
    rows = 7 if rank == 0 else 6
    out["rows-differ"] = _expect_error(lambda: vp_head(hidden[:rows], w, t[:rows]))
    out["chunk-differs"] = _expect_error(lambda: vp_head(hidden, w, t, chunk_size=2 + rank))
    values, indices = torch.randn(7, K, dtype=torch.float64).sort(descending=True).values, \
        torch.arange(K).expand(7, K).clone()
    indices[2, 1] = VOCAB + 1
    out["topk-index-range"] = _expect_error(lambda: vp_head(hidden, w, fastkd.TopKTeacher(values, indices)))
    hg, wg = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = vp_head(hg, wg, t)
    loss.backward(retain_graph=True)
    try:  # the gradients were computed in the forward and handed over once (no copy): a second backward refuses
        loss.backward()
        out["second-backward"] = None
    except RuntimeError as e:
        out["second-backward"] = f"RuntimeError: {e}"
    big = torch.randn(7, VOCAB + 1, dtype=torch.float64)
    out["topk-k>V"] = _expect_error(lambda: vp_head(hidden, w, fastkd.TopKTeacher(big, big.argsort(-1))))
    # the per-row options: the global vocabulary of one class, ranks that disagree
    one = 1 if rank == 0 else 0
    out["standardize-one-class"] = _expect_error(lambda: vp_head(hidden, weight[:one], teacher[..., :one],
                                                                 standardize=True))
    out["standardize-differs"] = _expect_error(lambda: vp_head(hidden, w, t, standardize=rank == 0))
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=rank == 0)
    out["temperature-grad-differs"] = _expect_error(lambda: vp_head(hidden, w, t, temperature=temperature))
    return out


def _nan_runs(world: int, rank: int) -> Dict[str, torch.Tensor]:
    """NaN propagates through the token weights: a NaN weight of a counted row makes that row's loss and hidden-state
    gradient NaN; in an ignored row it is dropped. (A NaN temperature is refused before any communication.)"""
    case = Case("nan", hard=0.4)
    hidden, weight, bias, teacher, labels, _ = _inputs(case)  # rows 0 and 4 ignored
    lo, hi = _bounds(case, world, rank)
    w, b, t = weight[lo:hi], bias[lo:hi], teacher[..., lo:hi]
    out = {}
    for name, row in (("counted", 2), ("ignored", 0)):
        weights = torch.ones(7, dtype=torch.float64)
        weights[row] = math.nan
        h = hidden.clone().requires_grad_(True)
        rows = vp_head(h, w, t, student_bias_shard=b, labels=labels, hard_label_weight=0.4, reduction="none",
                       standardize=True, token_weights=weights, temperature=torch.full((7,), 2.0).double())
        rows.sum().backward()
        out[name] = (rows.detach(), h.grad)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {"cases": {name: _run_case(c, world, rank) for name, c in _cases(world).items()},
                   "bad": _bad_runs(world, rank), "nan": _nan_runs(world, rank)}
        # after the errors, the group still works
        results["after"] = _run_case(Case("after-errors"), world, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_RESULTS: Dict[int, object] = {}


def _results(world: int, tmp_path_factory) -> list:
    """Spawns `world` gloo processes once per world size; returns each rank's results (a failed run's error
    is re-raised by every test of that world size)."""
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"vphead{world}")
        try:
            with pytest.MonkeyPatch.context() as mpatch:
                mpatch.setenv("OMP_NUM_THREADS", "1")
                mp.spawn(_worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=True)
            _RESULTS[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        except Exception as e:  # noqa: BLE001 - re-raised below
            _RESULTS[world] = e
    if isinstance(_RESULTS[world], Exception):
        raise RuntimeError(f"the {world}-process run failed") from _RESULTS[world]
    return _RESULTS[world]


# --------------------------------------------------------------------------------------------------------
# the single-process expectations
# --------------------------------------------------------------------------------------------------------
def _single_process(case: Case):
    """fastkd.fused_linear_kd_loss on the gathered head in float64: (loss, soft, hard, grads)."""
    hidden, weight, bias, teacher, labels, grad_out = _inputs(case)
    h = hidden.to(case.dtype).double().requires_grad_(True)
    w = weight.to(case.dtype).double().requires_grad_(True)
    b = None if bias is None else bias.to(case.dtype).double().requires_grad_(True)
    t = _cast_teacher(_cast_teacher(teacher, case.dtype), torch.float64)
    kw, t_leaf = _kwargs(case, labels, _options_dtype(case))
    for key in ("token_weights", "temperature"):  # the row options as the ranks have them, in float64
        if isinstance(kw.get(key), torch.Tensor):
            kw[key] = kw[key].detach().double()
    if t_leaf is not None:
        t_leaf = kw["temperature"].requires_grad_(True)
    out = fastkd.fused_linear_kd_loss(h, w, t, student_bias=b, **kw, **dict(case.transforms), return_parts=True)
    out.loss.backward(grad_out)
    return out, h.grad, w.grad, None if b is None else b.grad, None if t_leaf is None else t_leaf.grad


def _eager(case: Case):
    """The eager composition with the logit scale and softcap (torch.tanh), in float64: the logits, then
    fastkd.reference's losses (as fastkd.reference.fused_linear_kd_loss composes them)."""
    hidden, weight, bias, teacher, labels, grad_out = _inputs(case)
    tr = dict(case.transforms)
    h = hidden.to(case.dtype).double().requires_grad_(True)
    w = weight.to(case.dtype).double().requires_grad_(True)
    b = bias.to(case.dtype).double().requires_grad_(True)
    logits = eager_head_transform(F.linear(h, w, b), tr.get("student_logit_scale"), tr.get("student_softcap"))
    logits = logits.reshape(-1, VOCAB)
    rows_labels = None if labels is None else labels.reshape(-1)
    common = dict(reduction=case.reduction, labels=rows_labels, num_items_in_batch=case.num_items)
    t = _cast_teacher(_cast_teacher(teacher, case.dtype), torch.float64)
    if isinstance(t, fastkd.TopKTeacher):
        soft_loss = reference.topk_kd_loss(logits, t.values.reshape(-1, case.k), t.indices.reshape(-1, case.k),
                                           case.temperature, values_are=t.values_are, tail=t.tail, **common)
    else:
        t_logits = t if isinstance(t, torch.Tensor) else F.linear(t.hidden, t.weight, t.bias)
        t_logits = eager_head_transform(t_logits, tr.get("teacher_logit_scale"), tr.get("teacher_softcap"))
        soft_loss = reference.divergence_loss(logits, t_logits.reshape(-1, VOCAB), case.loss, case.temperature,
                                              **common, **dict(case.params))
    hard_loss = reference.kd_loss(logits, logits.detach(), 1.0, alpha=1.0, beta=0.0, **common)
    soft = 1.0 - case.hard if case.soft is None else case.soft
    loss = soft * soft_loss + case.hard * hard_loss
    if case.reduction == "none":
        loss = loss.reshape(case.lead)
    loss.backward(grad_out)
    return loss.detach(), h.grad, w.grad, b.grad


# --------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------
def _params(world):
    return [pytest.param(world, name, id=f"world{world}-{name}") for name in _cases(world)]


@needs_gloo
@pytest.mark.parametrize("world,name", _params(2) + _params(3))
def test_vocab_parallel_head_matches_single_process(world, name, tmp_path_factory):
    case = _cases(world)[name]
    per_rank = [r["cases"][name] for r in _results(world, tmp_path_factory)]
    for rank, res in enumerate(per_rank):
        for key in ("loss", "soft", "hard", "grad_hidden"):
            torch.testing.assert_close(res[key], per_rank[0][key], rtol=0, atol=0,
                                       msg=f"rank {rank}'s {key} differs from rank 0's")
        lo, hi = _bounds(case, world, rank)
        assert res["teacher_grad"] is None, "the teacher must not receive a gradient"
        if case.frozen:
            assert res["grad_weight"] is None and res["grad_bias"] is None, "a frozen head gets no gradient"
        else:
            assert res["grad_weight"].dtype == case.dtype and res["grad_weight"].shape == (hi - lo, HIDDEN)
            if case.bias:
                assert res["grad_bias"].shape == (hi - lo,)
    res = per_rank[0]
    out_shape = case.lead if case.reduction == "none" else ()
    loss_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32  # also for bf16 input
    assert res["loss"].dtype == loss_dtype and res["loss"].shape == out_shape
    assert res["grad_hidden"].dtype == case.dtype and res["grad_hidden"].shape == case.lead + (HIDDEN,)

    tol = dict(rtol=1e-10, atol=1e-12) if case.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    # bf16: the loss as float32 (its logits are float32 from the bf16 operands); the gradients are returned in
    # bf16, each rounded once (relative 2^-9)
    grad_tol = dict(rtol=2.0**-8, atol=1e-6) if case.dtype == torch.bfloat16 else tol
    g_temp = None
    if case.transforms and not case.options:
        loss, g_hidden, g_weight, g_bias = _eager(case)
    else:
        out, g_hidden, g_weight, g_bias, g_temp = _single_process(case)
        loss = out.loss.detach()
        assert_close(res["soft"], out.soft, **tol, what="soft part")
        assert_close(res["hard"], out.hard, **tol, what="hard part")
    assert_close(res["loss"], loss, **tol, what="loss")
    assert_close(res["grad_hidden"], g_hidden, **grad_tol, what="hidden-state gradient")
    if not case.frozen:
        assert_close(torch.cat([r["grad_weight"] for r in per_rank]), g_weight, **grad_tol, what="weight gradient")
        if case.bias:
            assert_close(torch.cat([r["grad_bias"] for r in per_rank]), g_bias, **grad_tol, what="bias gradient")
    if case.t_tensor in ("scalar", "rows"):
        for r in per_rank:  # every rank gets the full gradient of the replicated loss
            torch.testing.assert_close(r["grad_temperature"], res["grad_temperature"], rtol=0, atol=0)
        assert res["grad_temperature"].dtype == _options_dtype(case)
        assert res["grad_temperature"].shape == (() if case.t_tensor == "scalar" else case.lead)
        assert_close(res["grad_temperature"], g_temp, **tol, what="temperature gradient")
    else:
        assert res["grad_temperature"] is None
    if case.labels == "all":
        assert (res["loss"] == 0).all() and (res["grad_hidden"] == 0).all()
    if math.prod(case.lead) == 0:
        assert res["loss"].numel() == 0 or res["loss"] == 0


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_errors_that_need_the_group(world, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    expected = {
        "label-range": f"ValueError: labels must hold class indices in [0, {VOCAB})",
        "rows-differ": "ValueError: vocab_parallel_fused_linear_kd_loss: every rank of the group must pass the same "
                       "rows",
        "chunk-differs": "ValueError: vocab_parallel_fused_linear_kd_loss: every rank of the group must pass the "
                         "same chunk_size",
        "topk-index-range": f"ValueError: teacher_topk_indices must be in [0, {VOCAB})",
        "topk-k>V": f"ValueError: k (the last dimension of teacher_topk_values) must be in [1, V={VOCAB}]",
        "second-backward": "RuntimeError: vocab_parallel_fused_linear_kd_loss: backward ran a second time",
        "standardize-one-class": "ValueError: standardize needs at least 2 classes (an unbiased std), got V=1",
        "standardize-differs": "ValueError: vocab_parallel_fused_linear_kd_loss: every rank of the group must pass "
                               "the same standardize",
        "temperature-grad-differs": "ValueError: vocab_parallel_fused_linear_kd_loss: every rank of the group must "
                                    "pass the same temperature.requires_grad",
    }
    for rank, r in enumerate(ranks):
        for key, start in expected.items():
            assert r["bad"][key] is not None and r["bad"][key].startswith(start), (rank, key, r["bad"][key])
        assert r["after"]["loss"] == ranks[0]["after"]["loss"]
    case = Case("after-errors")
    out, *_ = _single_process(case)
    assert_close(ranks[0]["after"]["loss"], out.loss, rtol=1e-10, atol=1e-12, what="loss after the errors")


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_nan_in_the_row_options(world, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    for r in ranks:
        rows, g_hidden = r["nan"]["counted"]
        assert rows[2].isnan() and not rows[torch.arange(7) != 2].isnan().any(), rows
        assert g_hidden[2].isnan().all() and not g_hidden[torch.arange(7) != 2].isnan().any()
        rows, g_hidden = r["nan"]["ignored"]
        assert rows[0] == 0 and not rows.isnan().any() and (g_hidden[0] == 0).all(), rows
        assert not g_hidden.isnan().any()


# --------------------------------------------------------------------------------------------------------
# argument checks: in-process, before any communication (no process group here)
# --------------------------------------------------------------------------------------------------------
def _args():
    h = torch.randn(4, HIDDEN)
    return h, torch.randn(3, HIDDEN), torch.randn(4, 3)


def test_exported():
    assert fastkd.distributed.vocab_parallel_fused_linear_kd_loss is vp_head
    assert "vocab_parallel_fused_linear_kd_loss" in fastkd.distributed.__all__


def test_requires_initialized_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    h, w, t = _args()
    with pytest.raises(RuntimeError, match="init_process_group"):
        vp_head(h, w, t)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(weight=torch.randn(3, HIDDEN + 1)), ValueError, r"student_weight_shard must have shape \[V, 5\]"),
        (dict(weight=torch.randn(3, HIDDEN).double()), TypeError, "student_weight_shard must have student_hidden's"),
        (dict(student_bias_shard=torch.randn(4)), ValueError, r"student_bias_shard must have shape \[3\]"),
        (dict(teacher=torch.randn(4, 4)), ValueError, r"teacher logits must have shape \(4, 3\)"),
        (dict(teacher=[1.0]), TypeError, "teacher must be dense teacher logits"),
        (dict(teacher=fastkd.TeacherHead(torch.randn(4, 2), torch.randn(4, 2))), ValueError,
         "teacher.weight must hold the student shard's vocabulary rows"),
        (dict(teacher=fastkd.TeacherHead(torch.randn(3, 2), torch.randn(3, 2))), ValueError,
         "teacher.hidden must have the leading dimensions"),
        (dict(teacher=fastkd.TopKTeacher(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long)), loss="jsd"),
         ValueError, "a TopKTeacher supports loss='kl' only"),
        (dict(teacher=fastkd.TopKTeacher(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long)),
              teacher_softcap=30.0), ValueError, "teacher_softcap: a TopKTeacher.s values are used as given"),
        (dict(teacher=fastkd.TopKTeacher(torch.randn(4, 2), torch.zeros(4, 3, dtype=torch.long))), ValueError,
         "teacher_topk_values and teacher_topk_indices must have the same shape"),
        (dict(loss="dkd"), ValueError, "loss must be one of"),
        (dict(loss="jsd", beta=1.5), ValueError, r"beta must be finite and in \[0, 1\]"),
        (dict(loss="kl", skew=0.1), TypeError, "skew"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction="sum", num_items_in_batch=4), ValueError, "num_items_in_batch replaces the row count"),
        (dict(hard_label_weight=0.5), ValueError, "labels is required"),
        (dict(hard_label_weight=1.5), ValueError, r"hard_label_weight must be in \[0, 1\] when soft_weight is None"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(student_softcap=0.0), ValueError, "student_softcap must be"),
        (dict(teacher_softcap=-1.0), ValueError, "teacher_softcap must be"),
        (dict(student_logit_scale=math.inf), ValueError, "student_logit_scale must be"),
        (dict(teacher_logit_scale="2"), TypeError, "teacher_logit_scale must be"),
        (dict(return_parts=1), TypeError, "return_parts must be a bool"),
        # the per-row options: one message per rule, fastkd/_validation.py's
        (dict(token_weights=[1.0] * 4), TypeError, "token_weights must be a tensor or None"),
        (dict(token_weights=torch.ones(4, dtype=torch.long)), TypeError,
         "token_weights must be a floating-point tensor"),
        (dict(token_weights=torch.ones(5)), ValueError, r"token_weights must have the logits' leading shape \[4\]"),
        (dict(token_weights=torch.ones(4, 1)), ValueError, r"token_weights must have the logits' leading shape"),
        (dict(temperature=torch.ones(4, dtype=torch.long)), TypeError,
         "temperature must be a float or a floating-point tensor"),
        (dict(temperature=torch.ones(5)), ValueError,
         r"temperature as a tensor must be 0-dim or have the logits' leading shape \[4\]"),
        (dict(temperature=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError,
         r"argument 'temperature': every entry must be a finite value in \[2\*\*-63, 2\*\*63\]"),
        (dict(temperature=torch.tensor(math.nan)), ValueError, "argument 'temperature': every entry must be a finite"),
        (dict(temperature="2"), TypeError, "temperature must be"),
        (dict(standardize=1), TypeError, "standardize must be a bool"),
        (dict(teacher=fastkd.TopKTeacher(torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long)), standardize=True),
         ValueError, "standardize: a top-k teacher has no full row to standardize"),
    ],
)
def test_bad_arguments_before_any_communication(change, error, match):
    h, w, t = _args()
    w = change.pop("weight", w)
    t = change.pop("teacher", t)
    with pytest.raises(error, match=match):
        vp_head(h, w, t, **change)


def test_empty_shard_passes_the_local_checks():
    # V_r = 0 is a valid slice: the local checks pass and the function asks for the process group
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    h = torch.randn(4, HIDDEN)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vp_head(h, torch.randn(0, HIDDEN), torch.randn(4, 0), student_bias_shard=torch.randn(0))
