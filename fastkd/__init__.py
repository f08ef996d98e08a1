"""fastkd: fused, exact knowledge-distillation losses for PyTorch.

Every loss is a PyTorch custom operator (``torch.ops.fastkd.*``) with an optimized CPU kernel and a CUDA
kernel, under drop-in functions and ``nn.Module`` losses::

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=4.0)
    criterion = fastkd.KDLoss(temperature=4.0)          # or fastkd.DistillKL(T) for RepDistiller users
    loss = fastkd.jsd_loss(student_logits, teacher_logits, beta=0.5, labels=labels)   # TRL GKD semantics
    loss = fastkd.DKDLoss(alpha=1.0, beta=8.0)(student_logits, teacher_logits, target, epoch=epoch)

LLM distillation through the student's lm_head, never holding the [tokens, V] logits (chunked, fused)::

    loss = fastkd.fused_linear_kd_loss(hidden_s, lm_head_s.weight, fastkd.TeacherHead(hidden_t, lm_head_t.weight),
                                       loss="jsd", beta=0.5, labels=labels)

and the relation- and feature-based losses (RepDistiller / mdistiller / torchdistill semantics)::

    loss = fastkd.rkd_loss(feat_s, feat_t)                  # or fastkd.RKDLoss(25.0, 50.0)
    loss = fastkd.at_loss(maps_s, maps_t, p=2)              # lists of layer maps: the sum over layers
    losses = fastkd.Attention(p=2)(maps_s, maps_t)          # RepDistiller's per-layer list

``fastkd.reference`` holds the same losses in plain PyTorch; ``fastkd.build_info()`` says what the
installed build contains.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from fastkd import _ops_loader

_ops_loader.load()
if _ops_loader.LOADED:
    from fastkd import ops  # noqa: F401  (fake kernels + autograd for the compiled ops)

from fastkd import reference  # noqa: E402
from fastkd.functional import *  # noqa: E402,F401,F403  (every loss function, generated ones included)
from fastkd.fused_linear import TeacherHead, TopKTeacher, fused_linear_kd_loss  # noqa: E402
from fastkd.losses import *  # noqa: E402,F401,F403  (every loss module, generated ones included)
from fastkd.outputs import LossParts  # noqa: E402
from fastkd import distributed  # noqa: E402,F401
from fastkd import divergences  # noqa: E402
from fastkd import functional as _functional  # noqa: E402
from fastkd import losses as _losses  # noqa: E402

__version__ = "0.1.0"
__all__ = _functional.__all__ + _losses.__all__ + [
    "fused_linear_kd_loss",
    "TeacherHead",
    "TopKTeacher",
    "divergences",
    "LossParts",
    "reference",
    "distributed",
    "build_info",
    "__version__",
]


def build_info() -> Dict[str, Any]:
    """What this installation of fastkd contains and uses.

    Keys: ``version``; ``compiled`` (the C++ kernels loaded; if not, ``load_error`` says why and the
    plain-PyTorch reference runs instead); ``cuda`` (CUDA kernels compiled in), ``cuda_archs``,
    ``cuda_version`` (CUDA version compiled with); ``gpu_visible`` (whether torch sees a GPU now);
    ``cpu_isa`` (the CPU kernel library in use: avx512, avx2 or default) and ``cpu_isas_compiled``;
    ``openmp`` and ``num_threads`` (CPU threads used); ``torch`` (running) and ``built_with_torch``;
    ``summary``: all of that in one line, e.g. "CPU kernels: avx512; CUDA kernels for 9.0 compiled, no GPU
    visible" (what the benchmark's header prints).
    """
    info: Dict[str, Any] = {
        "version": __version__,
        "compiled": _ops_loader.LOADED,
        "load_error": _ops_loader.LOAD_ERROR,
        "cpu_isa": _ops_loader.CPU_ISA,
        "cpu_isas_compiled": list(_ops_loader.COMPILED_CPU_ISAS),
        "openmp": torch.backends.openmp.is_available(),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": False,
        "cuda_archs": "",
        "cuda_version": None,
        "built_with_torch": None,
        "gpu_visible": torch.cuda.is_available(),
    }
    if _ops_loader.LOADED:
        from fastkd import _C

        info.update(_C.build_info())
    info["summary"] = _build_summary(info)
    return info


def _build_summary(info: Dict[str, Any]) -> str:
    if not info["compiled"]:
        return f"not compiled ({info['load_error']}): the plain-PyTorch reference runs"
    others = [isa for isa in info["cpu_isas_compiled"] if isa != info["cpu_isa"]]
    cpu = f"CPU kernels: {info['cpu_isa']}" + (f" (also compiled: {', '.join(others)})" if others else "")
    if not info["cuda"]:
        cuda = "no CUDA kernels" + (" (a GPU is visible: rebuild with FASTKD_CUDA=1)" if info["gpu_visible"] else "")
    elif info["gpu_visible"]:
        cuda = f"CUDA kernels for {info['cuda_archs']}, running on {torch.cuda.get_device_name()}"
    else:
        cuda = f"CUDA kernels for {info['cuda_archs']} compiled, no GPU visible"
    return f"{cpu}; {cuda}"


# DIST (fastkd/dist.py): the module (the function comes with fastkd.functional)
from fastkd.dist import DISTLoss  # noqa: E402

__all__ = __all__ + ["DISTLoss"]
