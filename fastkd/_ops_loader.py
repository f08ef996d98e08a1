"""Loads fastkd's compiled libraries: ``_C`` (schemas, CUDA kernels) and the one CPU kernel library that
matches the running CPU (``_cpu_avx512``, ``_cpu_avx2`` or ``_cpu_default``): the best one compiled that
the CPU runs. A build for the machine at hand holds that CPU's library alone; a portable one
(``FASTKD_CPU_ISAS=all``) holds all three.

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


def _runnable_isas() -> tuple:
    """The CPU libraries ATen's capability allows here, best first (ATEN_CPU_CAPABILITY lowers it)."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return ("avx512", "avx2", "default")
    if cap.startswith("avx2"):
        return ("avx2", "default")
    return ("default",)


def load() -> None:
    global LOADED, LOAD_ERROR, CPU_ISA, COMPILED_CPU_ISAS
    try:
        from fastkd import _C  # noqa: F401  (defines the schemas and the CUDA kernels)

        paths = {isa: _lib_path(f"fastkd._cpu_{isa}") for isa in _ISA_ORDER}
        COMPILED_CPU_ISAS = tuple(isa for isa in _ISA_ORDER if paths[isa])
        if not COMPILED_CPU_ISAS:
            raise ImportError("no fastkd._cpu_* library: the CPU kernels were not built")
        usable = [isa for isa in _runnable_isas() if isa in COMPILED_CPU_ISAS]
        if not usable:
            # A build for the machine at hand (FASTKD_CPU_ISAS=auto) holds that CPU's library alone.
            raise ImportError(
                f"fastkd's CPU kernels were built for {', '.join(COMPILED_CPU_ISAS)} only, and ATen's CPU capability "
                f"here is {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY lowers it): rebuild with "
                "FASTKD_CPU_ISAS=all for a portable build"
            )
        CPU_ISA = usable[0]
        torch.ops.load_library(paths[CPU_ISA])
        LOADED = True
    except (ImportError, OSError) as e:  # no build, or a build for another torch
        LOAD_ERROR = f"{type(e).__name__}: {e}"
