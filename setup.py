"""Builds selhn_ext._C (the C++ CPU kernels, and the CUDA kernels when a CUDA toolkit and
a CUDA build of torch are present) when torch is importable, and always ships the C++
sources inside the package, so that an install built without torch (pip's default
isolated build) compiles them on first use (see selhn_ext/build.py).

    pip install --no-build-isolation .   # compiles now, against the installed torch
    pip install .                        # compiles on first use, into a per-user cache

Environment:
    SELHN_CUDA=1  build the CUDA kernels too, and fail if that is impossible
    SELHN_CUDA=0  never build the CUDA kernels
    (unset)       build them when torch is a CUDA build and CUDA_HOME points at a toolkit
    TORCH_CUDA_ARCH_LIST  the CUDA targets; unset, the visible GPUs', or sm_80 and sm_90
                  when none is visible
"""

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# The one list of sources and flags, read without importing the package.
_spec = importlib.util.spec_from_file_location("selhn_build", ROOT / "selhn_ext" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as selhn_ext/csrc, for first-use builds."""

    def run(self):
        super().run()
        target = Path(self.build_lib, "selhn_ext", "csrc")
        target.mkdir(parents=True, exist_ok=True)
        for path in build.source_files(CSRC):
            shutil.copy2(path, target / path.name)


try:
    with warnings.catch_warnings():
        # torch warns when NumPy is not installed yet; NumPy is only needed at run time.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch
except ImportError:  # isolated build: the kernels compile on first use
    torch = None


def _cuda_wanted() -> bool:
    """Decide whether to build the CUDA part; SELHN_CUDA=1 raises when it cannot."""
    setting = os.environ.get("SELHN_CUDA", "").strip()
    if setting == "0":
        return False
    problems = build.cuda_problems()
    if setting == "1" and problems:
        sys.exit("SELHN_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}
if torch is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in build.cpu_sources(CSRC)]
    common = dict(include_dirs=[str(CSRC)], extra_link_args=list(build.LINK_FLAGS))
    if _cuda_wanted():
        arch_list = build.cuda_arch_list()
        if arch_list is not None:  # no GPU visible: torch's own probe would fail
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        ext = CUDAExtension(
            "selhn_ext._C",
            sources + [str(p.relative_to(ROOT)) for p in build.cuda_sources(CSRC)],
            extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS)},
            **{**common, "include_dirs": common["include_dirs"] + build.cuda_include_dirs()},
        )
    else:
        ext = CppExtension(
            "selhn_ext._C", sources, extra_compile_args={"cxx": list(build.CXX_FLAGS)}, **common
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
