"""Build fastkd's compiled extension.

Libraries built:
  fastkd/_C                  operator schemas (TORCH_LIBRARY), CUDA kernels when enabled, build info
  fastkd/_cpu_<isa>          CPU kernels, compiled once per instruction set (default, avx2, avx512 on x86-64);
                             fastkd loads the best one the running CPU supports (see fastkd/_ops_loader.py)

Environment:
  FASTKD_CUDA=auto|0|1       build the CUDA kernels: auto (default) = when torch is a CUDA build and nvcc exists
  TORCH_CUDA_ARCH_LIST       CUDA archs (default "8.0;8.6;9.0+PTX")
  MAX_JOBS                   parallel compile jobs (torch's ninja builder honours it)
  FASTKD_NATIVE=1            add -march=native to the CPU kernels (not portable; off by default)
  FASTKD_CPU_ISAS            comma-separated subset of the CPU libraries to build (e.g. "default,avx512" for a
                             faster development build; "default" is always built, it is the fallback)

Build against the installed torch: pip install --no-build-isolation .
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# nvcc on PATH can be a wrapper in /usr/local/bin, which makes torch guess CUDA_HOME=/usr/local. Prefer the
# real toolkit before torch.utils.cpp_extension reads the environment.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")


def _cuda_requested() -> bool:
    mode = os.environ.get("FASTKD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        sys.exit(f"FASTKD_CUDA must be auto, 0 or 1, got {mode!r}")
    have_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not have_toolkit:
        sys.exit(
            "FASTKD_CUDA=1 but no CUDA build can be made: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    return mode == "1" or (mode == "auto" and have_toolkit)


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA torch wheels ship headers (cusparse.h, ...) in site-packages/nvidia/*/include."""
    dirs = []
    for site in map(Path, sys.path):
        nv = site / "nvidia"
        if nv.is_dir():
            dirs += [str(d) for d in sorted(nv.glob("*/include")) if d.is_dir()]
    return dirs


WITH_CUDA = _cuda_requested()
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX")
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""

COMMON_CXX = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare"]
DEFINES = [("FASTKD_TORCH_VERSION", f'"{torch.__version__}"')]
INCLUDES = [str(ROOT / "csrc" / "include")]

# Per-ISA CPU libraries, the same flags ATen uses for its own kernels.
IS_X86 = platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}
ISA_FLAGS = {"default": []}
if IS_X86:
    ISA_FLAGS["avx2"] = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"]
    ISA_FLAGS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
                      "-Wno-maybe-uninitialized"]
_isas = os.environ.get("FASTKD_CPU_ISAS", "").strip()
if _isas:
    _wanted = {"default"} | {name.strip() for name in _isas.split(",") if name.strip()}
    _unknown = _wanted - set(ISA_FLAGS)
    if _unknown:
        sys.exit(f"FASTKD_CPU_ISAS: unknown or unsupported here: {sorted(_unknown)} (known: {sorted(ISA_FLAGS)})")
    ISA_FLAGS = {name: flags for name, flags in ISA_FLAGS.items() if name in _wanted}
if os.environ.get("FASTKD_NATIVE") == "1":
    ISA_FLAGS = {name: flags + ["-march=native"] for name, flags in ISA_FLAGS.items()}

cpu_sources = sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
ext_modules = []
for isa, flags in ISA_FLAGS.items():
    cap = isa.upper()
    ext_modules.append(
        cpp_extension.CppExtension(
            name=f"fastkd._cpu_{isa}",
            sources=cpu_sources,
            include_dirs=INCLUDES,
            define_macros=[("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)],
            extra_compile_args={"cxx": COMMON_CXX + flags},
            extra_link_args=["-fopenmp"],
        )
    )

core_sources = [str(CSRC / "registration.cpp"), str(CSRC / "autograd.cpp"), str(CSRC / "relation_autograd.cpp"),
                str(CSRC / "autocast.cpp")]
core_defines = list(DEFINES)
core_args = {"cxx": ["-O3", "-Wall"]}
if WITH_CUDA:
    core_sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    core_defines += [("FASTKD_WITH_CUDA", None), ("FASTKD_CUDA_ARCHS", f'"{CUDA_ARCHS}"')]
    core_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall"]
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name="fastkd._C",
            sources=core_sources,
            include_dirs=INCLUDES + _pip_cuda_include_dirs(),
            define_macros=core_defines,
            extra_compile_args=core_args,
        )
    )
else:
    ext_modules.append(
        cpp_extension.CppExtension(
            name="fastkd._C",
            sources=core_sources,
            include_dirs=INCLUDES,
            define_macros=core_defines,
            extra_compile_args=core_args,
        )
    )



class BuildExt(cpp_extension.BuildExtension):
    """Gives each extension its own object folder: the per-ISA libraries compile the same sources with
    different flags, and must not share (or overwrite) object files."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
