"""Loads fastkd's compiled libraries: ``_C`` (schemas, CUDA kernels) and the one CPU kernel library that
matches the running CPU (``_cpu_avx512``, ``_cpu_avx2`` or ``_cpu_default``).

The ISA is chosen with ATen's own rule, ``torch.backends.cpu.get_cpu_capability()``, so the environment
variable ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` that steers PyTorch's kernels steers fastkd's too.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from typing import Optional

import torch
import torch.backends.cpu

_ISA_ORDER = ("avx512", "avx2", "default")

LOADED: bool = False
LOAD_ERROR: Optional[str] = None
CPU_ISA: Optional[str] = None
COMPILED_CPU_ISAS: tuple = ()


def _lib_path(module: str) -> Optional[str]:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None else None


def _wanted_isa(available: tuple) -> str:
    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512") and "avx512" in available:
        return "avx512"
    if cap.startswith(("avx2", "avx512")) and "avx2" in available:
        return "avx2"
    return "default"


def load() -> None:
    global LOADED, LOAD_ERROR, CPU_ISA, COMPILED_CPU_ISAS
    try:
        from fastkd import _C  # noqa: F401  (defines the schemas and the CUDA kernels)

        paths = {isa: _lib_path(f"fastkd._cpu_{isa}") for isa in _ISA_ORDER}
        COMPILED_CPU_ISAS = tuple(isa for isa in _ISA_ORDER if paths[isa])
        if "default" not in COMPILED_CPU_ISAS:
            raise ImportError("fastkd._cpu_default is missing: the CPU kernels were not built")
        CPU_ISA = _wanted_isa(COMPILED_CPU_ISAS)
        torch.ops.load_library(paths[CPU_ISA])
        LOADED = True
    except (ImportError, OSError) as e:  # no build, or a build for another torch
        LOAD_ERROR = f"{type(e).__name__}: {e}"
