"""The compiled kernels (``selhn_ext._C``): loading, fake kernels, and the backend objects.

``import selhn_ext._C`` loads the library, which registers ``torch.ops.selhn.partials`` and
``torch.ops.selhn.dense_backward``, each with a CPU and (in CUDA builds) a CUDA kernel. When the
install could not build it (for example an isolated build environment without torch),
``build_extension()`` JIT-builds the CPU part into a per-user cache; later processes load
it from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from .kernel_interface import DirectionStats, compute_dtype

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_JIT_NAME = "selhn_ext_cpu"
_HOW_TO_FIX = (
    "run `pip install --no-build-isolation .` in the source tree (with torch installed) "
    "or call `selhn_ext.build_extension()`"
)


def _jit_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "selhn_ext" / f"torch-{torch.__version__}"


def _load_library() -> tuple[Path | None, str | None]:
    """Load the compiled ops once: (the library's path, None) or (None, why not)."""
    if importlib.util.find_spec(__package__ + "._C") is None:
        installed_error = "selhn_ext._C is not part of this install"
    else:
        try:
            from . import _C

            return Path(_C.__file__), None
        except ImportError as error:
            installed_error = f"selhn_ext._C could not be imported ({error})"
    built = _jit_dir() / f"{_JIT_NAME}.so"
    if built.exists():
        try:
            torch.ops.load_library(str(built))
            return built, None
        except OSError as error:
            return None, f"{installed_error}; the JIT build {built} failed to load ({error})"
    return None, installed_error


_LIBRARY_PATH, _LIBRARY_ERROR = _load_library()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"selhn::{op}", dispatch_key)
    except RuntimeError:  # the op itself is not defined
        return False


def load_error(device_type: str) -> str | None:
    """None if the compiled ops for this device type are registered, else why and how to fix."""
    if _LIBRARY_ERROR is not None:
        return f"the compiled kernels are not built: {_LIBRARY_ERROR}; {_HOW_TO_FIX}"
    if device_type == "cpu":
        if _has_kernel("partials", "CPU"):
            return None
        return f"the C++ CPU kernels are not registered; {_HOW_TO_FIX}"
    if device_type == "cuda":
        if not _has_kernel("partials", "CUDA"):
            return (
                "the CUDA kernels were not built: install with a CUDA build of torch and "
                "CUDA_HOME set to a CUDA toolkit (SELHN_CUDA=1 makes a failure loud): "
                "`SELHN_CUDA=1 pip install --no-build-isolation .`"
            )
        if not torch.cuda.is_available():
            return "the CUDA kernels are built but no CUDA device is available"
        return None
    return f"no compiled kernels for device type {device_type!r}"


# ---------------------------------------------------------------- fake (meta) kernels


def _fake_partials(rows, cols, col_pos, row_offset, row_ids, col_ids, margin, deterministic,
                   allow_tf32):  # fmt: skip
    cdt = compute_dtype(rows.dtype)
    out = []
    for length in (rows.shape[0], cols.shape[0]):
        out += [
            rows.new_empty((length,), dtype=cdt),
            rows.new_empty((length,), dtype=torch.int64),
            rows.new_empty((length,), dtype=cdt),
            rows.new_empty((length,), dtype=torch.int32),
        ]
    return tuple(out)


def _fake_dense_backward(rows, cols, col_pos, row_offset, row_ids, col_ids, margin, row_coef,
                         col_coef, row_gated, col_gated, deterministic, allow_tf32):  # fmt: skip
    cdt = compute_dtype(rows.dtype)
    return rows.new_empty(rows.shape, dtype=cdt), cols.new_empty(cols.shape, dtype=cdt)


if _LIBRARY_ERROR is None:
    torch.library.register_fake("selhn::partials", _fake_partials)
    torch.library.register_fake("selhn::dense_backward", _fake_dense_backward)


# ---------------------------------------------------------------- backend objects


class CompiledKernels:
    """The kernel interface (kernel_interface.py) on the ``selhn::*`` ops; the dispatcher
    runs the CPU or the CUDA kernel by the inputs' device."""

    def partials(
        self,
        rows: Tensor,
        cols: Tensor,
        col_pos: Tensor,
        row_offset: int,
        row_ids: Tensor | None,
        col_ids: Tensor | None,
        margin: float,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[DirectionStats, DirectionStats]:
        out = torch.ops.selhn.partials(
            rows, cols, col_pos, int(row_offset), row_ids, col_ids, float(margin),
            bool(deterministic), bool(allow_tf32),
        )  # fmt: skip
        return DirectionStats(*out[:4]), DirectionStats(*out[4:])

    def dense_backward(
        self,
        rows: Tensor,
        cols: Tensor,
        col_pos: Tensor,
        row_offset: int,
        row_ids: Tensor | None,
        col_ids: Tensor | None,
        margin: float,
        row_coef: Tensor,
        col_coef: Tensor,
        row_gated: Tensor,
        col_gated: Tensor,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        return torch.ops.selhn.dense_backward(
            rows, cols, col_pos, int(row_offset), row_ids, col_ids, float(margin),
            row_coef, col_coef, row_gated, col_gated, bool(deterministic), bool(allow_tf32),
        )  # fmt: skip


COMPILED_KERNELS = CompiledKernels()


def build_extension(verbose: bool = False) -> Path:
    """JIT-build the C++ CPU kernels into a per-user cache and return the library's path.

    For installs whose build ran without torch (an isolated build environment). Needs a
    C++ compiler and ninja. Loads the ops into this process when no library was loaded;
    the backend dispatch sees them in the next Python process.
    """
    from torch.utils import cpp_extension

    build_dir = _jit_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [
        str(_CSRC / f"{name}.cpp")
        for name in (
            "selhn_ops",
            "selhn_cpu",
            "selhn_cpu_kernels",
            "selhn_cpu_avx512_emulated",
            "selhn_cpu_forward",
            "selhn_cpu_backward",
        )
    ]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise RuntimeError(
            f"the C++ sources are not part of this install ({missing}); "
            "install from a source checkout with `pip install --no-build-isolation .`"
        )
    if _LIBRARY_PATH is not None:
        # The ops are already registered in this process (by _C or an earlier JIT build);
        # a second copy of the library would register them twice.
        return _LIBRARY_PATH
    cpp_extension.load(
        _JIT_NAME, sources, extra_cflags=["-O3", "-fopenmp", "-g0", "-ffp-contract=off"],
        extra_ldflags=["-lgomp"], extra_include_paths=[str(_CSRC)],
        build_directory=str(build_dir), verbose=verbose, is_python_module=False,
        with_cuda=False,
    )  # fmt: skip
    return build_dir / f"{_JIT_NAME}.so"
