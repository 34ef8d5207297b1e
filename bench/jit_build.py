"""Fallback build of the compiled kernels with ``torch.utils.cpp_extension.load`` (ninja).

Used by ``bench/gpu_check.sh`` when ``pip install --no-build-isolation .`` fails. The
library is built under the name and in the folder where ``selhn_ext._cpp`` looks for a JIT
build, so later processes that import ``selhn_ext`` from the source tree load it.

    python3 bench/jit_build.py [--cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="build the CUDA kernels too")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from torch.utils import cpp_extension

    from selhn_ext import _cpp

    csrc = REPO / "csrc"
    sources = [
        csrc / f"{name}.cpp"
        for name in (
            "selhn_ops",
            "selhn_cpu",
            "selhn_cpu_kernels",
            "selhn_cpu_avx512_emulated",
            "selhn_cpu_forward",
            "selhn_cpu_backward",
        )
    ]
    include_dirs = [str(csrc)]
    if args.cuda:
        sources.append(csrc / "selhn_cuda.cu")
        # ATen's CUDA headers include headers that the pip CUDA runtime ships.
        include_dirs += [
            str(Path(entry, sub))
            for entry in sys.path
            for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include")
            if Path(entry, sub).is_dir()
        ]
    build_dir = _cpp._jit_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        _cpp._JIT_NAME, [str(s) for s in sources],
        extra_cflags=["-O3", "-fopenmp", "-g0", "-ffp-contract=off"],
        extra_cuda_cflags=["-O3", "-g0", "--expt-relaxed-constexpr", "-lineinfo"],
        extra_ldflags=["-lgomp"], extra_include_paths=include_dirs,
        build_directory=str(build_dir), is_python_module=False, with_cuda=args.cuda,
        verbose=True,
    )  # fmt: skip
    print(f"built {build_dir / (_cpp._JIT_NAME + '.so')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
