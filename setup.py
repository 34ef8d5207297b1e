"""Builds selhn_ext._C (the C++ CPU kernels, and the CUDA kernels when a CUDA toolkit and
a CUDA build of torch are present). Without torch, installs the pure-Python package.

    pip install --no-build-isolation .

Environment:
    SELHN_CUDA=1  build the CUDA kernels too, and fail if that is impossible
    SELHN_CUDA=0  never build the CUDA kernels
    (unset)       build them when torch is a CUDA build and CUDA_HOME points at a toolkit
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = "csrc"
CPU_SOURCES = [
    f"{CSRC}/{name}.cpp"
    for name in (
        "selhn_ops",
        "selhn_cpu",
        "selhn_cpu_kernels",
        "selhn_cpu_avx512_emulated",
        "selhn_cpu_forward",
        "selhn_cpu_backward",
    )
]
CUDA_SOURCES = [f"{CSRC}/selhn_cuda.cu"]
# -ffp-contract=off: the CPU tile kernel fuses multiply-adds only where it says so, so
# every element of S is computed the same way (see csrc/selhn_cpu_kernels.cpp).
CXX_FLAGS = ["-O3", "-fopenmp", "-g0", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

ext_modules = []
cmdclass = {}
try:
    import torch
except ImportError:  # pure-Python install: the fused C++/CUDA backends report they are missing
    torch = None


def _cuda_wanted() -> bool:
    """Decide whether to build the CUDA part; SELHN_CUDA=1 raises when it cannot."""
    from torch.utils.cpp_extension import CUDA_HOME

    setting = os.environ.get("SELHN_CUDA", "").strip()
    if setting == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        problems.append(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r})")
    if setting == "1" and problems:
        sys.exit("SELHN_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems


def _cuda_include_dirs() -> list:
    """ATen's CUDA headers include headers the pip CUDA runtime ships under nvidia/cu13."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidate = Path(entry, sub)
            if candidate.is_dir():
                dirs.append(str(candidate))
    return dirs


if torch is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    common = dict(include_dirs=[str(ROOT / CSRC)], extra_link_args=["-lgomp"])
    if _cuda_wanted():
        ext = CUDAExtension(
            "selhn_ext._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            **{**common, "include_dirs": common["include_dirs"] + _cuda_include_dirs()},
        )
    else:
        ext = CppExtension(
            "selhn_ext._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, **common
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
