"""What the benchmark measures: every loss (its title, its eager anchor baseline, fastkd's version, its default
shapes), the suites (``quick``: one representative case per family; ``full``: every default loss on its
default shapes), the cases built from them, and the inputs of one case.

Calling conventions of the implementations (one fwd+bwd step each): the logit and feature losses take
``(student, teacher_inputs, T)``, where ``teacher_inputs`` is ``(teacher logits, target, top-k values, top-k
indices)`` for logits and ``(teacher features,)`` for features; the LLM-head losses take ``(hidden, weight,
teacher_inputs, T)`` with ``teacher_inputs = (teacher logits, labels, teacher hidden states, teacher lm_head
weight)`` (the last two only where a teacher-head implementation runs).

The logit losses come from the divergence registry (:data:`fastkd.divergences.REGISTRY`): the hand-written
ones against their anchors' code (:mod:`fastkd.bench.anchors`), every generated one, at its first test
parameters, against the eager composition of its formula (:mod:`fastkd.reference`) in the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

import fastkd
from fastkd.bench import anchors, liger, tp

TOPK_K = 64
CC_GAMMA, CC_MAX_P = 0.4, 2
LLM_TEMPERATURE = 1.0  # TRL / DistillKit / Liger-Kernel: T = 1, no T^2 factor
LLM_IGNORE_EVERY = 10  # every 10th token's label is IGNORE_INDEX (prompt and padding tokens)
IGNORE_INDEX = anchors.IGNORE_INDEX
LLM_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}  # the LLM-head losses' dtype unless --dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KINDS = ("logits", "features", "llm")

Step = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BenchLoss:
    """One loss of the benchmark. ``kind``: "logits" ([N, V] shapes), "features" ([N, ...] feature shapes,
    STUDENT:TEACHER where they differ) or "llm" (TOKENSxHIDDENxVOCAB). ``eager`` is None for the sweeps that
    run fastkd alone; ``slow_compile`` says why torch.compile of the eager code is left out unless asked
    for; ``shapes`` are the full suite's shapes per device."""

    name: str
    kind: str
    title: str
    fastkd: Step
    eager: Optional[Step]
    shapes: Mapping[str, str]
    slow_compile: str = ""
    sweep: bool = False  # the rows are one curve over the shapes (ratios to the previous point)

    @property
    def fastkd_impl(self) -> str:
        """The name of fastkd's row that speedups and plots refer to."""
        return "fastkd fused" if self.kind == "llm" else "fastkd"


@dataclass(frozen=True)
class Case:
    """One loss at one shape: logits (N, V); features (student shape) and ``teacher_shape`` where it differs;
    LLM head (tokens, hidden, vocab)."""

    loss: str
    shape: Tuple[int, ...]
    teacher_shape: Tuple[int, ...] = ()

    @property
    def teacher(self) -> Tuple[int, ...]:
        return self.teacher_shape or self.shape

    @property
    def label(self) -> str:
        """The shape as the tables and the JSON write it: "2048x32000", "64x512:64x2048"."""
        text = "x".join(map(str, self.shape))
        return text if self.teacher == self.shape else text + ":" + "x".join(map(str, self.teacher))


# ---------------------------------------------------------------------------------------------------------
# the eager baselines in the benchmark's calling convention (thin adapters to the anchors' code)
# ---------------------------------------------------------------------------------------------------------
def _eager_kd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_distill_kl(s, inp[0], T)


def _eager_reverse_kl(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.trl_generalized_jsd(s, inp[0], beta=1.0, temperature=T) * (T * T)


def _eager_jsd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.trl_generalized_jsd(s, inp[0], beta=0.5, temperature=T)


def _eager_tvd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.liger_tvd(s, inp[0], T).mean()


def _eager_dkd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.mdistiller_dkd(s, inp[0], inp[1], 1.0, 8.0, T)


def _eager_topk(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.gathered_topk_kd(s, inp[2], inp[3], T)


def _eager_rkd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_rkd(s, inp[0], 25.0, 50.0)


def _eager_sp(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_similarity_loss(s, inp[0])


def _eager_pkt(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_pkt(s.flatten(1), inp[0].flatten(1))  # the anchors take pooled [N, D] features


def _eager_cc(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.torchdistill_cckd(s.flatten(1), inp[0].flatten(1), "gaussian", CC_GAMMA, CC_MAX_P)


def _eager_at(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_at_loss(s, inp[0], 2)


def eager_fused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The TRL / DistillKit composition through the lm_head (:func:`anchors.trl_head_kl`)."""
    return anchors.trl_head_kl(h, w, inp[0], inp[1], T)


# ---------------------------------------------------------------------------------------------------------
# fastkd's versions
# ---------------------------------------------------------------------------------------------------------
def _fastkd_kd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.kd_loss(s, inp[0], T)


def _fastkd_reverse_kl(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.reverse_kl_loss(s, inp[0], T)


def _fastkd_jsd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.jsd_loss(s, inp[0], 0.5, T)


def _fastkd_tvd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.tvd_loss(s, inp[0], T)


def _fastkd_dkd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.dkd_loss(s, inp[0], inp[1], 1.0, 8.0, T)


def _fastkd_topk(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.topk_kd_loss(s, inp[2], inp[3], T)


def _fastkd_rkd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.rkd_loss(s, inp[0], 25.0, 50.0)


def _fastkd_sp(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.sp_loss(s, inp[0])


def _fastkd_pkt(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.pkt_loss(s, inp[0])


def _fastkd_cc(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.cc_loss(s, inp[0], "gaussian", CC_GAMMA, CC_MAX_P)


def _fastkd_at(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.at_loss(s, inp[0], 2)


def fastkd_unfused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The full logits, then fastkd's fused KD kernel on them (the [tokens, V] logits and their gradient)."""
    return fastkd.kd_loss(h @ w.t(), inp[0], T, labels=inp[1], ignore_index=IGNORE_INDEX, scale_by_temperature=False)


def fastkd_fused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """fastkd.fused_linear_kd_loss at its default chunk size: never more than one chunk of the logits."""
    return fastkd.fused_linear_kd_loss(h, w, inp[0], temperature=T, labels=inp[1], ignore_index=IGNORE_INDEX,
                                       scale_by_temperature=False)  # the bare KL, as the eager rows


def fastkd_fused_linear_softcap(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """fastkd fused with Gemma-2's final logit softcap (30) on the student head: its cost next to the row above."""
    return fastkd.fused_linear_kd_loss(h, w, inp[0], temperature=T, labels=inp[1], ignore_index=IGNORE_INDEX,
                                       scale_by_temperature=False, student_softcap=30.0)


def fastkd_fused_linear_head(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The teacher as hidden states + lm_head (its logits computed chunk by chunk too), as Liger-Kernel takes it."""
    return fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(inp[2], inp[3]), temperature=T, labels=inp[1],
                                       ignore_index=IGNORE_INDEX, scale_by_temperature=False)


def _registry_step(loss_fn: Callable, name: str) -> Step:
    """A generated divergence at its first test parameters through ``loss_fn`` (fastkd.divergence_loss or
    fastkd.reference.divergence_loss)."""
    params = dict(fastkd.divergences.get(name).test_params[0])

    def step(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
        return loss_fn(s, inp[0], name, T, **params)

    return step


# ---------------------------------------------------------------------------------------------------------
# the losses, in table order
# ---------------------------------------------------------------------------------------------------------
_CPU_LOGITS, _CUDA_LOGITS = "2048x32000", "4096x128256"  # the registry's divergences unless listed below
# The hand-written divergences of the registry (keyed by registry name): bench name, title, eager, fastkd,
# shapes (cpu, cuda).
_ANCHORED = {
    "kl": ("kd", "Hinton KD (RepDistiller DistillKL)", _eager_kd, _fastkd_kd,
           ("2048x32000,1024x1000,256x100", "16384x131072,4096x32000,1024x1000,256x100")),
    "reverse_kl": ("reverse_kl", "reverse KL (TRL, beta=1)", _eager_reverse_kl, _fastkd_reverse_kl,
                   (_CPU_LOGITS, _CUDA_LOGITS)),
    "jsd": ("jsd", "generalized JSD beta=0.5 (TRL GKD)", _eager_jsd, _fastkd_jsd, (_CPU_LOGITS, _CUDA_LOGITS)),
    "tvd": ("tvd", "total variation (Liger-Kernel TVD)", _eager_tvd, _fastkd_tvd, ("1024x32000", _CUDA_LOGITS)),
    "dkd": ("dkd", "DKD alpha=1 beta=8 (mdistiller)", _eager_dkd, _fastkd_dkd,
            ("1024x1000,256x100", "1024x1000,256x100")),
}


def _logit_losses() -> List[BenchLoss]:
    out = []
    for spec in fastkd.divergences.REGISTRY.values():
        if spec.name in _ANCHORED:
            name, title, eager, fast, (cpu, cuda) = _ANCHORED[spec.name]
            out.append(BenchLoss(name, "logits", title, fast, eager, {"cpu": cpu, "cuda": cuda}))
        elif spec.generated:
            out.append(BenchLoss(
                spec.name, "logits", f"{spec.doc} {dict(spec.test_params[0])} (eager: its formula, fastkd.reference)",
                _registry_step(fastkd.divergence_loss, spec.name),
                _registry_step(fastkd.reference.divergence_loss, spec.name),
                {"cpu": _CPU_LOGITS, "cuda": _CUDA_LOGITS}))
    out.append(BenchLoss("topk", "logits", f"top-k teacher KD, k={TOPK_K} (gathered log-softmax)", _fastkd_topk,
                         _eager_topk, {"cpu": "4096x50257", "cuda": "8192x128256"}))
    return out


_FEATURE_LOSSES = [
    BenchLoss("rkd", "features", "RKD distance 25 + angle 50 (RepDistiller RKDLoss), teacher without grad",
              _fastkd_rkd, _eager_rkd, {"cpu": "512x2048", "cuda": "512x2048,1024x2048"}),
    BenchLoss("rkd_sweep", "features", "RKD, fastkd alone, over the batch N (time ~ N^3, memory ~ N^2)",
              _fastkd_rkd, None, {"cpu": "256x2048,512x2048,1024x2048,2048x2048",
                                  "cuda": "256x2048,512x2048,1024x2048,2048x2048,4096x2048"}, sweep=True),
    BenchLoss("sp", "features", "similarity-preserving SP (RepDistiller Similarity)", _fastkd_sp, _eager_sp,
              {"cpu": "128x256x8x8,64x2048x7x7", "cuda": "128x256x8x8,64x2048x7x7"}),
    BenchLoss("pkt", "features", "PKT (RepDistiller PKT / torchdistill PKTLoss)", _fastkd_pkt, _eager_pkt,
              {"cpu": "256x512,256x2048", "cuda": "256x512,256x2048"}),
    BenchLoss("cc", "features", "CC gaussian gamma=0.4 max_p=2 (torchdistill CCKDLoss, per-row loop)", _fastkd_cc,
              _eager_cc, {"cpu": "256x128", "cuda": "256x128"},
              slow_compile="compiling the per-row Python loop unrolls N iterations: 7 min at N=256 on a 2-core "
                           "CPU; --slow-compile"),
    BenchLoss("at", "features", "attention transfer p=2 (RepDistiller Attention)", _fastkd_at, _eager_at,
              {"cpu": "128x256x8x8,64x2048x7x7", "cuda": "128x256x8x8,64x2048x7x7"}),
]
_LLM_CPU, _LLM_CUDA = "1024x32000", "4096x128256"  # HIDDEN x VOCAB of the full suite
_LLM_LOSSES = [
    BenchLoss("fused_linear", "llm",
              "LLM head: hidden states + lm_head -> forward KL vs dense teacher logits (TRL / DistillKit)",
              fastkd_fused_linear, eager_fused_linear, {"cpu": f"4096x{_LLM_CPU}", "cuda": f"8192x{_LLM_CUDA}"}),
    BenchLoss("fused_linear_sweep", "llm",
              "LLM head over the tokens, H x V fixed (memory: eager ~ tokens x V, fastkd ~ H x V)",
              fastkd_fused_linear, eager_fused_linear,
              {"cpu": ",".join(f"{t}x{_LLM_CPU}" for t in (512, 1024, 2048, 4096)),
               "cuda": ",".join(f"{t}x{_LLM_CUDA}" for t in (1024, 2048, 4096, 8192))}, sweep=True),
    BenchLoss("fused_linear_tp", "llm",
              f"LLM head, vocabulary-parallel: the lm_head and the teacher logits split over {tp.TP_WORLD} gloo "
              "processes (fastkd.distributed.vocab_parallel_fused_linear_kd_loss) vs one process",
              fastkd_fused_linear, None, {"cpu": "4096x1024x32000", "cuda": "4096x1024x32000"}),
]
LOSSES: Dict[str, BenchLoss] = {x.name: x for x in _logit_losses() + _FEATURE_LOSSES + _LLM_LOSSES}



# DIST (fastkd/dist.py) against torchdistill's DISTLoss (its eager code: the class itself when torchdistill is
# installed, else the same lines written out), tau = the case's temperature.
def _eager_dist(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    try:
        from torchdistill.losses.mid_level import DISTLoss
    except ImportError:
        return fastkd.reference.dist_loss(s, inp[0], 1.0, 1.0, T)
    return DISTLoss(".", "output", ".", "output", tau=T)({".": {"output": s}}, {".": {"output": inp[0]}})


def _fastkd_dist(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.dist_loss(s, inp[0], 1.0, 1.0, T)


LOSSES["dist"] = BenchLoss("dist", "logits", "DIST beta=gamma=1 (torchdistill DISTLoss)", _fastkd_dist, _eager_dist,
                           {"cpu": "2048x32000,1024x1000", "cuda": "4096x32000,1024x1000"})


# Cosine distillation (issue 14): Liger-Kernel's LigerFusedLinearCosineSimilarityFunction.distillation_loss_fn
# (normalize, cosine_similarity, beta (1 - cos)) on logits, eager, vs fastkd.cosine_loss; no temperature (T unused:
# the cosine is scale invariant).
def _eager_cosine(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    f = torch.nn.functional
    cos = f.cosine_similarity(f.normalize(s, p=2, dim=-1), f.normalize(inp[0], p=2, dim=-1), dim=-1)
    return (1 - cos).sum() / s.shape[0]


def _fastkd_cosine(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.cosine_loss(s, inp[0])


LOSSES["cosine"] = BenchLoss("cosine", "logits", "cosine distillation beta (1 - cos(s, t)) on raw logits "
                             "(Liger-Kernel's cosine loss, eager)", _fastkd_cosine, _eager_cosine,
                             {"cpu": _CPU_LOGITS, "cuda": _CUDA_LOGITS})


# KD with a learnable temperature (CTKD): a 0-dim T that requires grad, so backward also gives dL/dT (eager:
# autograd through RepDistiller's DistillKL with a tensor T; fastkd: the row dots of its one pass).
def _eager_kd_learnable_t(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return anchors.repdistiller_distill_kl(s, inp[0], torch.tensor(T, requires_grad=True))


def _fastkd_kd_learnable_t(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.kd_loss(s, inp[0], torch.tensor(T, requires_grad=True))


# KD on standardized logits (LSKD, CVPR 2024): torchdistill's LogitStdKDLoss (its standardize, then the KL at T,
# bare branch: no T^2) vs kd_loss(standardize=True).
def _eager_kd_standardize(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    def std(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))

    f = torch.nn.functional
    return f.kl_div(f.log_softmax(std(s) / T, dim=1), f.softmax(std(inp[0]) / T, dim=1), reduction="batchmean")


def _fastkd_kd_standardize(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    return fastkd.kd_loss(s, inp[0], T, standardize=True, scale_by_temperature=False)


LOSSES["kd_learnable_t"] = BenchLoss("kd_learnable_t", "logits", "KD with a learnable temperature (CTKD; dL/dT too)",
                                     _fastkd_kd_learnable_t, _eager_kd_learnable_t,
                                     {"cpu": "2048x32000,1024x1000", "cuda": "4096x32000,1024x1000"})
LOSSES["kd_standardize"] = BenchLoss("kd_standardize", "logits", "KD on standardized logits (torchdistill "
                                     "LogitStdKDLoss)", _fastkd_kd_standardize, _eager_kd_standardize,
                                     {"cpu": "2048x32000,1024x1000", "cuda": "4096x32000,1024x1000"})


def names(kind: str) -> Tuple[str, ...]:
    """The losses of one kind, in table order."""
    return tuple(n for n, x in LOSSES.items() if x.kind == kind)


_ANCHORED_NAMES = tuple(v[0] for v in _ANCHORED.values()) + ("topk",)
LOSS_GROUPS = {"response": names("logits"), "relation": names("features"), "llm": names("llm"),
               "all": tuple(LOSSES)}
# the full suite: the anchored logit losses, every relation loss, the LLM head (the registry's other divergences:
# --loss NAME or --loss response)
FULL_LOSSES = (_ANCHORED_NAMES + ("dist", "kd_learnable_t", "kd_standardize", "cosine") + names("features")
               + names("llm"))

# The quick suite: one representative case per family, and the small scaling data the plot draws (fastkd's RKD
# over N, the fused head's memory over the tokens), sized so that the whole default run, torch.compile's
# compilation of the eight baselines on a cold cache included (~75 s of it), ends within about two minutes on a
# 2-core CPU (measured: see the package docs).
QUICK = {
    "cpu": {"kd": "256x32000", "jsd": "128x32000", "dkd": "512x1000", "topk": "256x32000", "rkd": "128x512",
            "sp": "128x256x8x8", "at": "128x256x8x8", "fused_linear": "128x256x32000",
            "rkd_sweep": "32x512,64x512,128x512", "fused_linear_sweep": "32x256x8000,64x256x8000,128x256x8000"},
    "cuda": {"kd": "4096x32000", "jsd": "4096x32000", "dkd": "1024x1000", "topk": "4096x32000", "rkd": "512x2048",
             "sp": "128x256x8x8", "at": "128x256x8x8", "fused_linear": "4096x2048x32000",
             "rkd_sweep": "512x2048,1024x2048,2048x2048",
             "fused_linear_sweep": "1024x2048x32000,2048x2048x32000,4096x2048x32000"},
}
SUITES = ("quick", "full")


def implementations(loss: str, device: str, compile_baseline: bool = True,
                    slow_compile: bool = False) -> Dict[str, Union[Step, str]]:
    """The implementations of one case, in table order: each a step function, or the reason its row is
    skipped. Eager (the anchor's code) and its torch.compile (``dynamic=False``), Liger-Kernel's where one
    exists (GPU), fastkd; the LLM head adds fastkd on the full logits ("fastkd unfused") and, on a GPU, the
    teacher-head forms (Liger-Kernel, "fastkd head"); its token sweep runs eager and "fastkd fused" only; its
    vocabulary-parallel case "fastkd fused" and the same step in spawned processes (a :class:`tp.SpawnedHead`,
    CPU only)."""
    spec = LOSSES[loss]
    impls: Dict[str, Union[Step, str, tp.SpawnedHead]] = {}
    if loss == "fused_linear_tp":  # the single-process fused head, then the same step in TP_WORLD processes
        impls["fastkd fused"] = fastkd_fused_linear
        head = tp.SpawnedHead()
        impls[head.name] = head if device == "cpu" else "the spawned run uses gloo on the CPU"
        return impls
    if spec.eager is not None:
        impls["eager"] = spec.eager
        if compile_baseline and not (spec.kind == "llm" and spec.sweep):
            impls["torch.compile"] = (spec.slow_compile if spec.slow_compile and not slow_compile
                                      else torch.compile(spec.eager, dynamic=False))
    if spec.kind == "llm":
        if not spec.sweep:
            impls["fastkd unfused"] = fastkd_unfused_linear
        impls["fastkd fused"] = fastkd_fused_linear
        if not spec.sweep:
            impls["fastkd fused softcap"] = fastkd_fused_linear_softcap
        if not spec.sweep and device == "cuda":
            impls.update(liger.fused_linear_steps(LLM_TEMPERATURE))
            impls["fastkd head"] = fastkd_fused_linear_head
        return impls
    step = liger.logit_step(loss) if device == "cuda" and spec.kind == "logits" else None
    if step is not None:
        impls["liger"] = step
    impls["fastkd"] = spec.fastkd
    return impls


# Estimated peak extra memory of the unfused LLM-head baselines in [tokens, V] tensors of the input dtype
# (measured on the CPU, fp32, V = 32000: eager 6.0 at 1024 and 2048 tokens); fastkd fused needs no guard.
_LLM_TOKENS_X_V = {"eager": 6, "torch.compile": 6, "fastkd unfused": 2}


def estimated_bytes(case: Case, impl: str, itemsize: int) -> Optional[int]:
    """The estimated peak extra memory of the baselines that can exhaust the machine (None: not guarded).

    Eager / compiled RKD: the teacher's N x N x D differences and normalized differences (alive to the end of
    forward), the student's plus their two gradients, and the N^3 angle tensors (measured on the CPU, fp32,
    D = 2048: N = 128: 0.83 GB, 256: 3.23 GB, 512: 12.9 GB, against 0.87 / 3.49 / 14.0 GB estimated;
    torch.compile of it peaks at about half of that). LLM head: ~6 [tokens, V] tensors for eager and
    torch.compile, 2 for fastkd unfused, plus the weight and hidden-state gradients."""
    if case.loss in ("rkd", "rkd_sweep") and impl != "fastkd":
        n, d_s, d_t = case.shape[0], math.prod(case.shape[1:]), math.prod(case.teacher[1:])
        return itemsize * (n * n * (2 * d_t + 4 * d_s) + 2 * n**3)
    if LOSSES[case.loss].kind == "llm" and impl in _LLM_TOKENS_X_V:
        n, h, v = case.shape
        return itemsize * (_LLM_TOKENS_X_V[impl] * n * v + v * h + n * h)
    return None


def suite_shapes(suite: str, device: str) -> Dict[str, str]:
    """Loss -> comma-separated shapes of a suite on a device."""
    if suite == "quick":
        return dict(QUICK[device])
    if suite == "full":
        return {name: LOSSES[name].shapes[device] for name in FULL_LOSSES}
    raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")


# ---------------------------------------------------------------------------------------------------------
# shapes and cases
# ---------------------------------------------------------------------------------------------------------
def _dims(text: str, what: str) -> Tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not {what}") from None
    if any(d <= 0 for d in dims):
        raise ValueError(f"shape {text!r} must be positive")
    return dims


def parse_cases(loss: str, text: str) -> List[Case]:
    """The cases of ``loss`` at comma-separated shapes (ValueError says what is wrong): ROWSxVOCAB for logits,
    NxD[xHxW...][:NxD...] for features (AT: NxCxHxW), TOKENSxHIDDENxVOCAB for the LLM head."""
    spec = LOSSES[loss]
    cases = []
    for part in text.split(","):
        if spec.kind == "logits":
            dims = _dims(part, "ROWSxVOCAB")
            if len(dims) != 2:
                raise ValueError(f"shape {part!r} is not ROWSxVOCAB")
            if loss == "topk" and dims[1] < TOPK_K:
                raise ValueError(f"topk needs a vocabulary of at least {TOPK_K}, got {dims[1]}")
            cases.append(Case(loss, dims))
        elif spec.kind == "llm":
            dims = _dims(part, "TOKENSxHIDDENxVOCAB")
            if len(dims) != 3:
                raise ValueError(f"shape {part!r}: three positive sizes TOKENSxHIDDENxVOCAB")
            cases.append(Case(loss, dims))
        else:
            sides = part.split(":")
            if len(sides) > 2:
                raise ValueError(f"shape {part!r}: at most one ':' (STUDENT:TEACHER)")
            pair = [_dims(side, "NxD[xHxW...][:NxD...]") for side in sides]
            min_dim = 3 if loss == "at" else 2
            if any(len(d) < min_dim for d in pair):
                raise ValueError(f"shape {part!r}: each side needs at least {min_dim} positive dimensions")
            if pair[0][0] != pair[-1][0]:
                raise ValueError(f"shape {part!r}: student and teacher batch sizes differ")
            cases.append(Case(loss, pair[0], pair[-1] if pair[-1] != pair[0] else ()))
    return cases


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def logit_inputs(loss: str, n: int, v: int, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, tuple]:
    """Student logits (requiring grad) and the teacher side: (teacher logits, target, top-k values, indices)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
    if loss == "topk":
        t = torch.randn(n, v, device=device, generator=g) * 3
        values, indices = t.topk(TOPK_K, dim=-1)
        del t
        return s, (None, None, values.to(dtype), indices)
    t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=device, generator=g)
    return s, (t, target, None, None)


def feature_inputs(s_shape: tuple, t_shape: tuple, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, tuple]:
    """Student features (requiring grad) and the teacher side (teacher features, no grad: the teacher is
    frozen in training)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(s_shape, device=device, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(t_shape, device=device, generator=g).to(dtype)
    return s, (t,)


def llm_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str,
               teacher_head: bool) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """The student's hidden states and lm_head weight (both requiring grad; logits of standard deviation ~2)
    and the teacher side: (teacher logits [n, v], labels with every LLM_IGNORE_EVERY-th token ignored, and with
    ``teacher_head`` the teacher's hidden states and lm_head weight, else None, None)."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=g) * (2 / math.sqrt(h))).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::LLM_IGNORE_EVERY] = IGNORE_INDEX
    t_hidden = t_weight = None
    if teacher_head:
        t_hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
        t_weight = (torch.randn(v, h, device=device, generator=g) * (3 / math.sqrt(h))).to(dtype)
    return hidden, weight, (teacher, labels, t_hidden, t_weight)
