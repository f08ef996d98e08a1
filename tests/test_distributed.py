"""fastkd.distributed.vocab_parallel_kd_loss on 2 and 3 gloo ranks against the single-process losses on the
gathered logits (float64), DistributedDataParallel training with fastkd losses (the fused linear head
included) against single-process training, and argument checks.

The multi-process tests spawn one group of processes per world size (module-scoped fixtures): every worker
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
from helpers import assert_close
from torch import nn

import fastkd
from fastkd.distributed import vocab_parallel_kd_loss

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build",
)

VOCAB = 13
SPLITS = {2: (7, 6), 3: (5, 5, 3)}  # uneven vocabulary slices, in rank order
KINDS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
# every other divergence of the registry the vocab-parallel path runs, at its test parameters
REGISTRY_KINDS = [(s.name, tuple(sorted(p.items()))) for s in fastkd.divergences.REGISTRY.values()
                  if s.fused_head and s.name not in ("kl", "reverse_kl", "jsd") for p in s.test_params]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


# --------------------------------------------------------------------------------------------------------
# scenarios: deterministic inputs rebuilt identically in the workers and in the parent
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    loss: str
    beta: float
    reduction: str
    lead: Tuple[int, ...] = (2, 3)  # the rows' shape: (2, 3) is [B, T, V] input
    temperature: float = 2.0
    scale: bool = False
    labels: str = "none"  # "none", "some" (a few rows ignored) or "all" (every row ignored)
    ignore_index: int = -100
    dtype: torch.dtype = torch.float64
    teacher_dtype: Optional[torch.dtype] = None
    # "none", "last_shard" (last rank's slice -inf on both sides), "empty_row", "nan", "nan_masked" (NaN / +inf
    # only in ignored rows), "constant_row" (student row 2 constant: std 0 when standardized), "offset"
    # (|logits| ~ 300 with a small spread: at T = 1e-3, s / T ~ 3e5)
    pad: str = "none"
    split: Optional[Tuple[int, ...]] = None  # default: SPLITS[world]
    params: Tuple[Tuple[str, float], ...] = ()  # a registry divergence's parameters (REGISTRY_KINDS)
    weighted: bool = False  # token_weights (the same on every rank)
    temp: str = "float"  # the temperature: "float" (case.temperature), "scalar" (a 0-dim tensor) or "row" (one per row)
    standardize: bool = False  # logit standardization over the global vocabulary


def _kind_name(loss, beta):
    return f"jsd{beta}" if loss == "jsd" else loss


def _cases(world: int) -> Dict[str, Case]:
    cases = []
    for loss, beta in KINDS:
        k = _kind_name(loss, beta)
        scale = loss != "jsd"
        for red in REDUCTIONS:
            # [B, T, V], ignored rows, T^2 where it applies
            cases.append(Case(f"{k}-{red}-3d-labels", loss, beta, red, scale=scale, labels="some"))
            # [N, V], no labels, another temperature, bare divergence
            cases.append(Case(f"{k}-{red}-2d", loss, beta, red, lead=(5,), temperature=0.7))
        for red in ("batchmean", "none"):
            cases.append(Case(f"{k}-{red}-float32", loss, beta, red, scale=scale, labels="some", dtype=torch.float32))
            cases.append(Case(f"{k}-{red}-all-masked", loss, beta, red, labels="all"))
            cases.append(Case(f"{k}-{red}-padded-shard", loss, beta, red, labels="some", pad="last_shard"))
            cases.append(Case(f"{k}-{red}-empty-row", loss, beta, red, lead=(4,), pad="empty_row"))
            if world == 3:
                cases.append(Case(f"{k}-{red}-zero-width-shard", loss, beta, red, split=(8, 0, 5)))
        for red in ("batchmean", "none"):
            cases.append(Case(f"{k}-{red}-nan-logits", loss, beta, red, lead=(5,), labels="some", pad="nan"))
            cases.append(Case(f"{k}-{red}-nan-in-masked-rows", loss, beta, red, lead=(5,), labels="some",
                              pad="nan_masked"))
            # the row maximum must be subtracted before the 1/T scaling (float32: z - lse at |z| ~ 3e5 loses ~1e-2)
            cases.append(Case(f"{k}-{red}-offset-float32-T1e-3", loss, beta, red, lead=(6,), temperature=1e-3,
                              scale=scale, dtype=torch.float32, pad="offset"))
        for red in REDUCTIONS:
            cases.append(Case(f"{k}-{red}-empty-input", loss, beta, red, lead=(0,)))
    for loss, params in REGISTRY_KINDS:
        k = loss + "".join(f"-{n}{x:g}" for n, x in params)
        spec = fastkd.divergences.get(loss)
        infinite_on_padding = spec.infinite_on_padding is not None and spec.infinite_on_padding(**dict(params))
        for red in ("batchmean", "none"):
            cases.append(Case(f"{k}-{red}-3d-labels", loss, 0.5, red, scale=spec.temperature_squared, labels="some",
                              params=params))
            if not infinite_on_padding:  # padded entries have teacher probability 0, where the student has mass
                cases.append(Case(f"{k}-{red}-padded-shard", loss, 0.5, red, labels="some", pad="last_shard",
                                  params=params))
        cases.append(Case(f"{k}-mean-2d-float32", loss, 0.5, "mean", lead=(5,), temperature=0.7,
                          dtype=torch.float32, params=params))
        cases.append(Case(f"{k}-batchmean-nan-logits", loss, 0.5, "batchmean", lead=(5,), labels="some", pad="nan",
                          params=params))
    cases.append(Case("kl-mean-ignore-index-7", "kl", 0.5, "mean", labels="some", ignore_index=7))
    for loss, beta in (("kl", 0.5), ("jsd", 0.3)):
        for red in REDUCTIONS:
            cases.append(Case(f"{loss}-{red}-token-weights", loss, beta, red, scale=loss == "kl", labels="some",
                              weighted=True))
    cases.append(Case("kl-sum-bf16-student", "kl", 0.5, "sum", scale=True, dtype=torch.bfloat16,
                      teacher_dtype=torch.float32))
    # a tensor temperature that requires grad (0-dim or one per row): its gradient on every rank
    for loss, beta in KINDS:
        k = _kind_name(loss, beta)
        scale = loss != "jsd"
        for temp in ("scalar", "row"):
            for red in REDUCTIONS:
                cases.append(Case(f"{k}-{red}-T-{temp}", loss, beta, red, scale=scale, labels="some",
                                  weighted=red != "sum", temp=temp))
        cases.append(Case(f"{k}-none-T-row-2d-bare", loss, beta, "none", lead=(5,), temp="row"))
        cases.append(Case(f"{k}-none-T-row-padded-shard", loss, beta, "none", labels="some", pad="last_shard",
                          temp="row"))
        cases.append(Case(f"{k}-batchmean-T-row-float32", loss, beta, "batchmean", scale=scale, labels="some",
                          dtype=torch.float32, temp="row"))
        cases.append(Case(f"{k}-none-T-row-empty-row", loss, beta, "none", lead=(4,), pad="empty_row", temp="row"))
        for red in ("batchmean", "none"):
            cases.append(Case(f"{k}-{red}-T-row-nan-logits", loss, beta, red, lead=(5,), labels="some", pad="nan",
                              temp="row"))
        if world == 3:
            cases.append(Case(f"{k}-none-T-row-zero-width-shard", loss, beta, "none", split=(8, 0, 5), temp="row"))
    # logit standardization (the global row statistics), with the other per-row options
    for loss, beta in KINDS:
        k = _kind_name(loss, beta)
        scale = loss != "jsd"
        for red in REDUCTIONS:
            cases.append(Case(f"{k}-{red}-std", loss, beta, red, scale=scale, labels="some", weighted=red != "sum",
                              standardize=True))
        cases.append(Case(f"{k}-none-std-T-row", loss, beta, "none", labels="some", temp="row", standardize=True))
        cases.append(Case(f"{k}-batchmean-std-T-scalar-float32", loss, beta, "batchmean", scale=scale,
                          dtype=torch.float32, temp="scalar", standardize=True))
        cases.append(Case(f"{k}-none-std-nan-logits", loss, beta, "none", lead=(5,), labels="some", pad="nan",
                          standardize=True))
        cases.append(Case(f"{k}-batchmean-std-nan-masked", loss, beta, "batchmean", lead=(5,), labels="some",
                          pad="nan_masked", standardize=True))
        if world == 3:
            cases.append(Case(f"{k}-none-std-zero-width-shard", loss, beta, "none", split=(8, 0, 5),
                              standardize=True))
    cases.append(Case("kl-sum-std-bf16-student", "kl", 0.5, "sum", scale=True, dtype=torch.bfloat16,
                      teacher_dtype=torch.float32, standardize=True))
    cases.append(Case("kl-none-std-constant-row", "kl", 0.5, "none", lead=(4,), pad="constant_row",
                      standardize=True))
    for loss, params in REGISTRY_KINDS:
        k = loss + "".join(f"-{n}{x:g}" for n, x in params)
        spec = fastkd.divergences.get(loss)
        cases.append(Case(f"{k}-batchmean-std", loss, 0.5, "batchmean", scale=spec.temperature_squared,
                          labels="some", params=params, standardize=True))
        for red, temp in (("batchmean", "scalar"), ("none", "row")):
            cases.append(Case(f"{k}-{red}-T-{temp}", loss, 0.5, red, scale=spec.temperature_squared, labels="some",
                              params=params, temp=temp))
    return {c.name: c for c in cases}


def _temperature(case: Case):
    """The case's temperature as the loss takes it: a float, or a fresh tensor that requires grad (float32 for
    float32 logits, else float64), the same in the workers and in the parent."""
    if case.temp == "float":
        return case.temperature
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 2)
    shape = () if case.temp == "scalar" else case.lead
    T = 0.5 + 2.0 * torch.rand(shape, generator=g, dtype=torch.float64)
    return T.to(torch.float32 if case.dtype == torch.float32 else torch.float64).requires_grad_(True)


def _out_dtype(case: Case) -> torch.dtype:
    return torch.promote_types(case.dtype, case.teacher_dtype or case.dtype)


def _inputs(case: Case):
    """Full student/teacher logits [*lead, VOCAB] in their dtypes, labels or None, and the loss's incoming
    gradient (rounded to the loss dtype, so both sides use the same numbers)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    shape = case.lead + (VOCAB,)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    if case.pad == "offset":
        s = 300.0 + s * 1e-3
        t = -300.0 + t * 1e-3
    if case.pad == "last_shard":
        pad = torch.zeros(VOCAB, dtype=torch.bool)
        pad[7:] = True  # the whole last slice in both worlds (7/6 and 5/5/3): padded vocabulary
        pad[1] = True  # and one masked entry inside the first slice
        s[..., pad] = -math.inf
        t[..., pad] = -math.inf
    if case.pad == "empty_row":
        s[1] = -math.inf
        t[1] = -math.inf
    if case.pad == "nan":  # rows 0 and 3 are ignored (below); rows 1 and 4 are NAN_ROWS
        t[0, 2] = math.nan
        t[1, 9] = math.inf
        s[4, 11] = math.nan
    if case.pad == "constant_row":  # a row with std 0: no gradient term through its std, as single-process
        s[2] = 1.5
    if case.pad == "nan_masked":  # rows 0 and 3 are ignored (below): dropped whatever they hold
        t[0, 2] = math.nan
        s[0, 5] = math.inf
        s[3, 1] = math.nan
    labels = None
    if case.labels != "none":
        labels = torch.randint(0, VOCAB, case.lead, generator=g)
        if case.labels == "all":
            labels.fill_(case.ignore_index)
        else:
            flat = labels.view(-1)
            if flat.numel():
                flat[0] = case.ignore_index
                flat[-2] = case.ignore_index
    if case.reduction == "none":
        grad_out = torch.rand(case.lead, generator=g, dtype=torch.float64) + 0.5
    else:
        grad_out = torch.tensor(0.75, dtype=torch.float64)
    return (s.to(case.dtype), t.to(case.teacher_dtype or case.dtype), labels, grad_out.to(_out_dtype(case)))


def _token_weights(case: Case) -> Optional[torch.Tensor]:
    if not case.weighted:
        return None
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    return torch.rand(case.lead, generator=g, dtype=torch.float64).to(case.dtype) * 2.0


def _bounds(case: Case, world: int, rank: int) -> Tuple[int, int]:
    split = case.split or SPLITS[world]
    lo = sum(split[:rank])
    return lo, lo + split[rank]


NAN_ROWS = torch.tensor([False, True, False, False, True])  # the counted rows of the "nan" cases with a bad logit


def _single_process(case: Case, dtype: torch.dtype = torch.float64):
    """The single-process fastkd loss of the gathered logits, in float64 (or ``dtype``): (loss, student
    gradient, temperature gradient or None)."""
    s, t, labels, grad_out = _inputs(case)
    s, t = s.to(dtype), t.to(dtype)
    if case.pad == "empty_row":
        # fastkd's single-process losses give NaN for a row that is -inf everywhere; vocab_parallel_kd_loss
        # gives 0 with a zero gradient there, which is the value of a row with student == teacher
        s[1] = 0.0
        t[1] = 0.0
    s.requires_grad_(True)
    T = _temperature(case)
    if isinstance(T, torch.Tensor):
        T = T.detach().double().requires_grad_(True)
    kw = dict(labels=labels, ignore_index=case.ignore_index, reduction=case.reduction)
    if case.standardize:
        kw["standardize"] = True
    w = _token_weights(case)
    if w is not None:
        kw["token_weights"] = w.to(dtype)
    if case.params or case.loss not in ("kl", "reverse_kl", "jsd"):
        loss = fastkd.divergence_loss(s, t, case.loss, T, scale_by_temperature=case.scale, **kw, **dict(case.params))
    elif case.loss == "kl":
        loss = fastkd.kd_loss(s, t, T, scale_by_temperature=case.scale, **kw)
    elif case.loss == "reverse_kl":
        loss = fastkd.reverse_kl_loss(s, t, T, scale_by_temperature=case.scale, **kw)
    else:
        # vocab_parallel_kd_loss's "batchmean" always divides by the rows (no TRL batch-size convention)
        rows = math.prod(case.lead) if case.reduction == "batchmean" and labels is None else None
        rows = rows or None  # no rows: nothing to divide
        loss = fastkd.jsd_loss(s, t, beta=case.beta, temperature=T, num_items_in_batch=rows, **kw)
    loss.backward(grad_out.to(dtype))
    return loss.detach(), s.grad, T.grad if isinstance(T, torch.Tensor) else None


# --------------------------------------------------------------------------------------------------------
# DDP scenario: a tiny student distilled from a fixed random teacher with per-sample-mean fastkd losses
# --------------------------------------------------------------------------------------------------------
DDP_BATCH, DDP_STEPS, DDP_LR = 8, 4, 0.5


class _Net(nn.Module):
    """x [N, 6] -> (feature map [N, 4, 2, 2], logits [N, 10], hidden state [N, 16] before the head)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return h.reshape(x.shape[0], 4, 2, 2), self.head(h), h


def _ddp_setup():
    with torch.random.fork_rng():  # the same initial weights in every process, without touching the global RNG
        torch.manual_seed(0)
        student = _Net().double()
        teacher = _Net().double().requires_grad_(False)
    x = torch.randn(DDP_BATCH, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return student, teacher, x


def _train(model: nn.Module, teacher: nn.Module, x: torch.Tensor):
    """DDP_STEPS SGD steps on kd_loss(T=4) + 10 * at_loss + hint_loss + the fused linear-head JSD through the
    student's head (its weight and bias used outside the module's forward, as an LLM's lm_head is); returns
    the loss of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    head = getattr(model, "module", model).head
    losses = []
    for _ in range(DDP_STEPS):
        with torch.no_grad():
            f_t, z_t, h_t = teacher(x)
        f_s, z_s, h_s = model(x)
        loss = fastkd.kd_loss(z_s, z_t, temperature=4.0) + 10.0 * fastkd.at_loss(f_s, f_t) + fastkd.hint_loss(f_s, f_t)
        loss = loss + fastkd.fused_linear_kd_loss(
            h_s, head.weight, fastkd.TeacherHead(h_t, teacher.head.weight, teacher.head.bias),
            student_bias=head.bias, loss="jsd", beta=0.5, temperature=2.0, chunk_size=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_run(rank: int, world: int):
    student, teacher, x = _ddp_setup()
    initial = {k: p.detach().clone() for k, p in student.named_parameters()}
    model = nn.parallel.DistributedDataParallel(student)
    half = DDP_BATCH // world
    losses = _train(model, teacher, x[rank * half:(rank + 1) * half])
    final = {k: p.detach().clone() for k, p in student.named_parameters()}
    return {"initial": initial, "final": final, "losses": losses}


# --------------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------------
def _run_case(case: Case, world: int, rank: int):
    s, t, labels, grad_out = _inputs(case)
    lo, hi = _bounds(case, world, rank)
    s_shard = s[..., lo:hi].clone().requires_grad_(True)
    t_shard = t[..., lo:hi].clone().requires_grad_(True)  # the teacher is a constant even if it requires grad
    extra = dict(case.params) if case.params or case.loss not in ("kl", "reverse_kl", "jsd") else {"beta": case.beta}
    T = _temperature(case)
    loss = vocab_parallel_kd_loss(
        s_shard, t_shard, loss=case.loss, temperature=T, labels=labels,
        ignore_index=case.ignore_index, reduction=case.reduction, scale_by_temperature=case.scale,
        token_weights=_token_weights(case), standardize=case.standardize, **extra,
    )
    loss.backward(grad_out)
    return {"loss": loss.detach(), "grad": s_shard.grad, "teacher_grad": t_shard.grad,
            "temperature_grad": T.grad if isinstance(T, torch.Tensor) else None}


def _one_class_error(world: int, rank: int) -> str:
    """The error of standardize=True on a global vocabulary of one entry (rank 0 holds it, the others none):
    raised alike on every rank, after the width's all-reduce."""
    width = 1 if rank == 0 else 0
    try:
        vocab_parallel_kd_loss(torch.randn(3, width), torch.randn(3, width), standardize=True)
    except ValueError as e:
        return str(e)
    return "no error"


def _disagreement_errors(rank: int) -> Dict[str, str]:
    """The errors when rank 0 alone passes standardize=True, or a temperature that requires grad: raised alike
    on every rank (before the collectives that would otherwise hang or abort)."""
    out = {}
    s, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for name, kw in (("standardize", dict(standardize=rank == 0)),
                     ("temperature", dict(temperature=torch.tensor(2.0, dtype=torch.float64)
                                          .requires_grad_(rank == 0)))):
        try:
            vocab_parallel_kd_loss(s, t, **kw)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, with_ddp: bool):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {"cases": {name: _run_case(c, world, rank) for name, c in _cases(world).items()},
                   "one_class": _one_class_error(world, rank), "disagree": _disagreement_errors(rank)}
        if with_ddp:
            results["ddp"] = _ddp_run(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_RESULTS: Dict[int, object] = {}


def _results(world: int, tmp_path_factory) -> list:
    """Spawns `world` gloo processes once per world size; returns each rank's results. A failed run is not
    retried by every test: its error is re-raised."""
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"dist{world}")
        try:
            with pytest.MonkeyPatch.context() as mpatch:
                mpatch.setenv("OMP_NUM_THREADS", "1")
                mp.spawn(_worker, args=(world, str(out / "init"), str(out), world == 2), nprocs=world, join=True)
            _RESULTS[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        except Exception as e:  # noqa: BLE001 - re-raised below, and by every later test of this world size
            _RESULTS[world] = e
    if isinstance(_RESULTS[world], Exception):
        raise RuntimeError(f"the {world}-process run failed") from _RESULTS[world]
    return _RESULTS[world]


def _params(world):
    return [pytest.param(world, name, id=f"world{world}-{name}") for name in _cases(world)]


# --------------------------------------------------------------------------------------------------------
# vocab_parallel_kd_loss == the single-process loss of the gathered logits
# --------------------------------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.parametrize("world,name", _params(2) + _params(3))
def test_vocab_parallel_matches_single_process(world, name, tmp_path_factory):
    case = _cases(world)[name]
    per_rank = [r["cases"][name] for r in _results(world, tmp_path_factory)]
    expected, expected_grad, expected_t_grad = _single_process(case)

    loss = per_rank[0]["loss"]
    for rank, res in enumerate(per_rank):
        torch.testing.assert_close(res["loss"], loss, rtol=0, atol=0, equal_nan=True,
                                   msg=f"rank {rank} has a different loss than rank 0")
        assert res["teacher_grad"] is None, "the teacher shard must not receive a gradient"
        assert res["grad"].dtype == case.dtype
        assert res["grad"].shape == case.lead + (_bounds(case, world, rank)[1] - _bounds(case, world, rank)[0],)
    grad = torch.cat([res["grad"] for res in per_rank], dim=-1)
    assert loss.dtype == _out_dtype(case)
    assert loss.shape == expected.shape
    if case.temp != "float":  # every rank gets the full gradient of the (replicated) loss
        t_grad = per_rank[0]["temperature_grad"]
        for rank, res in enumerate(per_rank):
            torch.testing.assert_close(res["temperature_grad"], t_grad, rtol=0, atol=0, equal_nan=True,
                                       msg=f"rank {rank} has a different temperature gradient than rank 0")
        assert t_grad.shape == expected_t_grad.shape
        assert t_grad.dtype == (torch.float32 if case.dtype == torch.float32 else torch.float64)
        if case.pad == "nan":  # the rows with a NaN / +inf logit: NaN, as single-process
            assert t_grad[NAN_ROWS].isnan().all() and expected_t_grad[NAN_ROWS].isnan().all()
            assert torch.isfinite(t_grad[~NAN_ROWS]).all()
        tol = dict(rtol=1e-10, atol=1e-12) if case.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t_grad.double(), expected_t_grad, equal_nan=True, **tol)
        if case.labels == "some" and case.temp == "row":  # an ignored row's temperature has no effect
            _, _, labels, _ = _inputs(case)
            assert (t_grad[labels == case.ignore_index] == 0).all()
    if case.pad == "nan":
        # a NaN or +inf logit on one rank makes its row NaN (value and gradient) everywhere, as single-process;
        # a reduced loss with such a counted row is NaN
        assert grad[NAN_ROWS].isnan().all()
        if case.reduction == "none":
            assert torch.equal(expected.isnan(), NAN_ROWS)
            assert torch.equal(loss.isnan(), NAN_ROWS)
            loss, expected = loss[~NAN_ROWS], expected[~NAN_ROWS]
        else:
            assert loss.isnan() and expected.isnan()
            loss, expected = loss.new_zeros(()), expected.new_zeros(())
        if case.reduction == "none":
            grad, expected_grad = grad[~NAN_ROWS], expected_grad[~NAN_ROWS]
        else:  # the reduced loss is NaN, so is every gradient of the single-process loss: check the rows only
            grad = grad[~NAN_ROWS]
            assert torch.isfinite(grad).all()
            expected_grad = grad
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()

    if case.dtype == torch.float64:
        loss_rtol, grad_rtol, atol = 1e-10, 1e-10, 1e-12
    elif case.dtype == torch.float32:
        loss_rtol, grad_rtol, atol = 1e-5, 1e-5, 1e-7
    else:  # bfloat16 student, float32 computation: only the gradient is rounded (to 8 significant bits)
        loss_rtol, grad_rtol, atol = 1e-5, 2.0**-8, 1e-7
    if case.pad == "offset":
        # float32 at T = 1e-3 and |logits| ~ 300: within 16 float32 epsilons of the largest value (the error of
        # the single-process float32 kernel on this input is of the same order, ~1e-7 relative; forming
        # s / T - lse without the row shift was ~1e-3 off in value and ~1e-2 in the gradient)
        for what, mine, ref in (("loss", loss, expected), ("gradient", grad, expected_grad)):
            bound = 2.0**-19 * ref.abs().max().item()
            err = (mine.double() - ref).abs().max().item()
            assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"
        return
    assert_close(loss, expected, rtol=loss_rtol, atol=atol, what="loss")
    assert_close(grad, expected_grad, rtol=grad_rtol, atol=atol, what="student gradient")

    s, t, _, _ = _inputs(case)
    if case.labels == "all":
        assert (loss == 0).all(), "all rows ignored: the loss must be exactly 0"
        assert (grad == 0).all(), "all rows ignored: the gradient must be exactly 0"
    if case.pad in ("last_shard", "empty_row"):
        both_inf = (s == -math.inf) & (t == -math.inf)
        assert both_inf.any()
        assert (grad[both_inf] == 0).all(), "entries -inf on both sides must get an exactly zero gradient"
    if case.pad == "empty_row" and case.reduction == "none":
        assert loss[1] == 0
    if case.pad == "empty_row":  # the all -inf row gives exactly 0 with a zero gradient, and it is counted
        assert (grad[1] == 0).all()
    if math.prod(case.lead) == 0:
        assert loss.shape == ((0,) if case.reduction == "none" else ())
        assert (loss == 0).all() and grad.numel() == 0


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_standardize_needs_two_classes_globally(world, tmp_path_factory):
    for res in _results(world, tmp_path_factory):
        assert res["one_class"] == "standardize needs at least 2 classes (an unbiased std), got V=1"


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_must_agree_on_the_options_that_change_the_collectives(world, tmp_path_factory):
    for res in _results(world, tmp_path_factory):
        assert res["disagree"] == {
            "standardize": "vocab_parallel_kd_loss: every rank of the group must pass the same standardize, got True "
                           "on some ranks and False on others",
            "temperature": "vocab_parallel_kd_loss: every rank of the group must pass the same "
                           "temperature.requires_grad, got True on some ranks and False on others",
        }


@needs_gloo
def test_vocab_parallel_zero_gradient_on_masked_rows(tmp_path_factory):
    # rows whose label is ignore_index get exactly zero gradient (not merely close to it), on every rank
    for world in (2, 3):
        for name, case in _cases(world).items():
            if case.labels != "some":
                continue
            _, _, labels, _ = _inputs(case)
            ignored = labels == case.ignore_index
            for res in _results(world, tmp_path_factory):
                assert (res["cases"][name]["grad"][ignored] == 0).all(), name
                if case.reduction == "none":
                    assert (res["cases"][name]["loss"][ignored] == 0).all(), name


# --------------------------------------------------------------------------------------------------------
# DistributedDataParallel with fastkd losses == single-process training on the whole batch
# --------------------------------------------------------------------------------------------------------
@needs_gloo
def test_ddp_training_matches_single_process(tmp_path_factory):
    ranks = [r["ddp"] for r in _results(2, tmp_path_factory)]
    student, teacher, x = _ddp_setup()
    initial = {k: p.detach().clone() for k, p in student.named_parameters()}
    losses = _train(student, teacher, x)

    assert losses[-1] < 0.9 * losses[0], f"training did not reduce the loss: {losses}"
    # equal halves of per-sample-mean losses: the mean of the ranks' losses is the full-batch loss
    for step in range(DDP_STEPS):
        mean_of_ranks = sum(r["losses"][step] for r in ranks) / len(ranks)
        assert mean_of_ranks == pytest.approx(losses[step], rel=1e-12, abs=1e-14), f"step {step}"
    for name, p in student.named_parameters():
        for rank, r in enumerate(ranks):
            assert torch.equal(r["initial"][name], initial[name]), f"rank {rank} started from other parameters"
            assert torch.equal(r["final"][name], ranks[0]["final"][name]), f"DDP ranks diverged on {name}"
        assert (p.detach() - initial[name]).abs().max() > 1e-3, f"{name} did not move"
        assert_close(ranks[0]["final"][name], p.detach(), rtol=1e-12, atol=1e-13, what=name)


# --------------------------------------------------------------------------------------------------------
# argument checks (in-process: arguments are checked before the process group is looked at)
# --------------------------------------------------------------------------------------------------------
def _shards(shape=(4, 5)):
    return torch.randn(shape), torch.randn(shape)


def test_exported():
    assert "distributed" in fastkd.__all__
    assert fastkd.distributed.vocab_parallel_kd_loss is vocab_parallel_kd_loss


def test_requires_initialized_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    s, t = _shards()
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kd_loss(s, t)


@pytest.mark.parametrize(
    "kwargs,shapes,error,match",
    [
        ({}, ((4, 5), (4, 6)), ValueError, r"teacher_logits_shard must have the student shard's shape \(4, 5\)"),
        ({}, ((4, 5), (3, 5)), ValueError, "teacher_logits_shard must have the student shard's shape"),
        ({"loss": "kld"}, None, ValueError, r"loss must be one of \('kl', 'reverse_kl', 'jsd', 'tvd'.*\), got 'kld'"),
        ({"loss": "dkd"}, None, ValueError, "loss must be one of"),  # every registered divergence but dkd
        ({"temperature": 0.0}, None, ValueError, "temperature must be finite and > 0"),
        ({"temperature": -2.0}, None, ValueError, "temperature must be finite and > 0"),
        ({"temperature": math.inf}, None, ValueError, "temperature must be finite and > 0"),
        ({"temperature": math.nan}, None, ValueError, "temperature must be finite and > 0"),
        ({"temperature": torch.ones(3)}, None, ValueError, "temperature as a tensor must be 0-dim or have the logits'"),
        ({"temperature": torch.ones(4, dtype=torch.long)}, None, TypeError, "temperature must be a float or a float"),
        ({"temperature": torch.tensor([1.0, 0.0, 1.0, 1.0])}, None, ValueError,
         "argument 'temperature': every entry must be a finite value"),
        ({"temperature": torch.tensor(math.nan)}, None, ValueError,
         "argument 'temperature': every entry must be a finite value"),
        ({"reduction": "avg"}, None, ValueError, "reduction must be one of"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, None, ValueError, r"labels must have shape \(4,\)"),
        ({"labels": torch.zeros(4)}, None, TypeError, "labels must be an integer tensor"),
        ({"ignore_index": 1.5}, None, TypeError, "ignore_index must be an int"),
        ({"loss": "jsd", "beta": 1.5}, None, ValueError, r"beta must be finite and in \[0, 1\]"),
        ({"loss": "jsd", "scale_by_temperature": True}, None, ValueError, "no T\\^2"),
        ({"standardize": 1}, None, TypeError, "standardize must be a bool"),
    ],
)
def test_bad_arguments(kwargs, shapes, error, match):
    s_shape, t_shape = shapes or ((4, 5), (4, 5))
    with pytest.raises(error, match=match):
        vocab_parallel_kd_loss(torch.randn(s_shape), torch.randn(t_shape), **kwargs)


def test_bad_logits_dtype():
    s, t = _shards()
    with pytest.raises(TypeError, match="student_logits_shard must be float32, float16, bfloat16 or float64"):
        vocab_parallel_kd_loss(s.long(), t)
    with pytest.raises(ValueError, match="student_logits_shard must have at least one dimension"):
        vocab_parallel_kd_loss(torch.tensor(1.0), torch.tensor(1.0))
