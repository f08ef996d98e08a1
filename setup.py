"""Build fastkd's compiled extension.

Libraries built:
  fastkd/_C                  operator schemas (TORCH_LIBRARY), CUDA kernels when enabled, build info
  fastkd/_cpu_<isa>          CPU kernels, compiled once per instruction set (default, avx2, avx512 on x86-64);
                             fastkd loads the best one the running CPU supports (see fastkd/_ops_loader.py)

By default the build fits the machine at hand: the CPU kernels for this CPU's instruction set alone and
CUDA kernels only when a GPU is visible, for its architecture. CI and wheel builders ask for everything
explicitly (FASTKD_CPU_ISAS=all, FASTKD_CUDA=1 or TORCH_CUDA_ARCH_LIST).

Environment:
  FASTKD_CUDA=auto|0|1       CUDA kernels. auto (default): when torch is a CUDA build, the toolkit is found and
                             a GPU is visible (for the visible GPUs' architectures), or when TORCH_CUDA_ARCH_LIST
                             is set; 1: always (fails without a toolkit); 0: never
  TORCH_CUDA_ARCH_LIST       CUDA archs (FASTKD_CUDA=1 without it: "8.0;8.6;9.0+PTX")
  FASTKD_CPU_ISAS            auto (default): the library of the best instruction set this CPU runs, alone; all:
                             every one (a portable build: default, avx2, avx512 on x86-64); or a comma-separated
                             list
  MAX_JOBS                   parallel compile jobs (torch's ninja builder honours it; default: the core count)
  FASTKD_BUILD_DIR           where the object files persist between builds (default: build/fastkd-objects in
                             this checkout), so a second `pip install -e .` recompiles only what changed
  FASTKD_NATIVE=1            add -march=native to the CPU kernels (not portable; off by default)

Build against the installed torch: pip install --no-build-isolation .
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from pathlib import Path

# nvcc on PATH can be a wrapper in /usr/local/bin, which makes torch guess CUDA_HOME=/usr/local. Prefer the
# real toolkit before torch.utils.cpp_extension reads the environment.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
import torch.backends.cpu  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"

# Compile cost, in core-seconds on the 2-core development machine (AMD EPYC, gcc 12, nvcc 13; measured
# 2026-12-02), for the build's announcement: one CPU kernel library, the _C core, the CUDA kernels per arch.
CPU_LIBRARY_CORE_S = 210
CORE_CORE_S = 110
CUDA_ARCH_CORE_S = 600


def _note(msg: str) -> None:
    """A build message the user sees: pip captures a build's output (shown with -v, or on failure), so under
    pip in a terminal it goes to the terminal itself; elsewhere (CI logs, a plain setup.py run) to stderr."""
    line = f"fastkd build: {msg}\n"
    if not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(line)
                return
        except OSError:  # no controlling terminal
            pass
    sys.stderr.write(line)
    sys.stderr.flush()


def _visible_gpu_archs() -> list[str]:
    try:
        if not torch.cuda.is_available():
            return []
        return sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    except Exception:  # a driver that fails to initialize is no visible GPU
        return []


def _cuda_plan() -> tuple[bool, str, str]:
    """(build CUDA kernels, their archs, why) from FASTKD_CUDA, TORCH_CUDA_ARCH_LIST and the visible GPUs."""
    mode = os.environ.get("FASTKD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        sys.exit(f"FASTKD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "", "FASTKD_CUDA=0"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    have_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    asked = mode == "1" or bool(arch_list)
    if asked and not have_toolkit:
        sys.exit(
            f"{'FASTKD_CUDA=1' if mode == '1' else 'TORCH_CUDA_ARCH_LIST'} asks for CUDA kernels but no CUDA build "
            f"can be made: torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r} "
            "(FASTKD_CUDA=0 builds the CPU kernels alone)"
        )
    if arch_list:
        return True, arch_list, "TORCH_CUDA_ARCH_LIST is set"
    if mode == "1":
        return True, DEFAULT_CUDA_ARCHS, "FASTKD_CUDA=1"
    if not have_toolkit:
        return False, "", "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found"
    gpu_archs = _visible_gpu_archs()
    if not gpu_archs:
        return False, "", "no GPU visible (FASTKD_CUDA=1 compiles them anyway)"
    return True, ";".join(gpu_archs), f"GPU visible: {torch.cuda.get_device_name(0)}"


WITH_CUDA, CUDA_ARCHS, CUDA_WHY = _cuda_plan()
if WITH_CUDA:
    os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS  # what torch's nvcc flags are generated from

# -g0: Python's CFLAGS carry -g; without debug info the kernels compile in half the time (and the objects
# are 25x smaller).
COMMON_CXX = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare"]
DEFINES = [("FASTKD_TORCH_VERSION", f'"{torch.__version__}"')]
INCLUDES = [str(ROOT / "csrc" / "include")]

# Per-ISA CPU libraries, the same flags ATen uses for its own kernels; best first.
IS_X86 = platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}
ISA_FLAGS = {"default": []}
if IS_X86:
    ISA_FLAGS["avx2"] = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"]
    ISA_FLAGS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
                      "-Wno-maybe-uninitialized"]


def _machine_isa() -> str:
    """The best CPU library this CPU runs, by ATen's own rule (the one fastkd/_ops_loader.py loads with)."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    for isa in ("avx512", "avx2"):
        if isa in ISA_FLAGS and cap.startswith(isa):
            return isa
    return "default"


def _cpu_isas() -> list[str]:
    text = os.environ.get("FASTKD_CPU_ISAS", "auto").strip().lower() or "auto"
    if text == "all":
        return list(ISA_FLAGS)
    wanted = {_machine_isa()} if text == "auto" else {x.strip() for x in text.split(",") if x.strip()}
    unknown = wanted - set(ISA_FLAGS)
    if unknown or not wanted:
        sys.exit(f"FASTKD_CPU_ISAS: unknown or unsupported here: {sorted(unknown)} (known: auto, all, {', '.join(ISA_FLAGS)})")
    return [isa for isa in ISA_FLAGS if isa in wanted]


CPU_ISAS = _cpu_isas()
NATIVE = os.environ.get("FASTKD_NATIVE") == "1"

cpu_sources = sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
ext_modules = []
for isa in CPU_ISAS:
    cap = isa.upper()
    ext_modules.append(
        cpp_extension.CppExtension(
            name=f"fastkd._cpu_{isa}",
            sources=cpu_sources,
            include_dirs=INCLUDES,
            define_macros=[("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)],
            extra_compile_args={"cxx": COMMON_CXX + ISA_FLAGS[isa] + (["-march=native"] if NATIVE else [])},
            extra_link_args=["-fopenmp"],
        )
    )


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA torch wheels ship headers (cusparse.h, ...) in site-packages/nvidia/*/include."""
    dirs = []
    for site in map(Path, sys.path):
        nv = site / "nvidia"
        if nv.is_dir():
            dirs += [str(d) for d in sorted(nv.glob("*/include")) if d.is_dir()]
    return dirs


core_sources = [str(CSRC / "registration.cpp"), str(CSRC / "autograd.cpp"), str(CSRC / "relation_autograd.cpp"),
                str(CSRC / "autocast.cpp"), str(CSRC / "dist_autograd.cpp")]
core_defines = list(DEFINES)
core_args = {"cxx": ["-O3", "-g0", "-Wall"]}
# _C first: with its CUDA kernels it is the longest build, and the CPU libraries fill the other slot.
if WITH_CUDA:
    core_sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    core_defines += [("FASTKD_WITH_CUDA", None), ("FASTKD_CUDA_ARCHS", f'"{CUDA_ARCHS}"')]
    core_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall"]
    ext_modules.insert(0, cpp_extension.CUDAExtension(
        name="fastkd._C",
        sources=core_sources,
        include_dirs=INCLUDES + _pip_cuda_include_dirs(),
        define_macros=core_defines,
        extra_compile_args=core_args,
    ))
else:
    ext_modules.insert(0, cpp_extension.CppExtension(
        name="fastkd._C",
        sources=core_sources,
        include_dirs=INCLUDES,
        define_macros=core_defines,
        extra_compile_args=core_args,
    ))

BUILD_DIR = Path(os.environ.get("FASTKD_BUILD_DIR") or ROOT / "build" / "fastkd-objects").resolve()


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _jobs() -> int:
    max_jobs = os.environ.get("MAX_JOBS", "")
    if max_jobs.isdigit() and int(max_jobs) > 0:
        return int(max_jobs)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _announce() -> None:
    """What this build compiles, why, and about how long it takes (from the measured costs above)."""
    archs = [a for a in CUDA_ARCHS.replace(",", ";").split(";") if a.strip()]
    core_s = len(CPU_ISAS) * CPU_LIBRARY_CORE_S + CORE_CORE_S + len(archs) * CUDA_ARCH_CORE_S
    jobs = _jobs()
    minutes = max(1, round(core_s / min(jobs, 2 * len(cpu_sources)) / 60))  # two libraries build at a time
    _note(f"CPU kernels for {', '.join(CPU_ISAS)} (FASTKD_CPU_ISAS={os.environ.get('FASTKD_CPU_ISAS', 'auto')}; "
          f"this CPU runs {_machine_isa()})")
    _note(f"CUDA kernels for {CUDA_ARCHS} ({CUDA_WHY})" if WITH_CUDA else f"no CUDA kernels: {CUDA_WHY}")
    plural = "s" if jobs > 1 else ""
    _note(f"about {minutes} min from scratch with {jobs} parallel job{plural} ({core_s / 60:.0f} core-minutes on "
          f"the development machine); objects kept in {BUILD_DIR}: a rebuild compiles only what changed")


class BuildExt(cpp_extension.BuildExtension):
    """Compiles each extension into its own persistent object folder under BUILD_DIR, two extensions at a time.

    Own folder: the per-ISA libraries compile the same sources with different flags and must not share
    object files. Persistent: pip's editable build runs in a fresh temporary folder each time, which would
    recompile everything; ninja, given the same folder, rebuilds only what changed (it tracks each object's
    command line and headers). Two at a time: each extension is one ninja run whose last, longest object
    leaves cores idle; the next extension's objects fill them (2 cores: 4.6 min one at a time, 3.7 two at a
    time)."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = 2

    def run(self):
        _announce()
        self._started = time.monotonic()
        super().run()
        _note(f"done in {_minutes(time.monotonic() - self._started)}")

    def build_extension(self, ext):
        _note(f"compiling {ext.name} ({len(ext.sources)} sources)")
        # The extensions build in threads: each gets a copy of this command with its own object folder.
        job = copy.copy(self)
        job.build_temp = str(BUILD_DIR / ext.name)
        super(BuildExt, job).build_extension(ext)
        _note(f"{ext.name} ready at {_minutes(time.monotonic() - self._started)}")


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
