"""The compiled kernels (csrc/): loading, fake kernels, and the backend object.

Loading the library registers ``torch.ops.selhn.partials`` and
``torch.ops.selhn.dense_backward``, each with a CPU and (in CUDA builds) a CUDA kernel, and
``torch.ops.selhn.sparse_and_diagonal_backward`` (CPU only; CUDA keeps the PyTorch glue).
The library is, in order of preference: ``selhn_ext._C`` built at install; a first-use
build of the cache (``build.py``) for this torch; or, when neither exists, a build made
on the first call of a compiled backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from . import build
from .kernel_interface import (
    AnchorWeights,
    Block,
    DirectionStats,
    GatedAnchors,
    PyTorchGlue,
    compute_dtype,
)

_HOW_TO_FIX = (
    "run `pip install --no-build-isolation .` in the source tree (with torch installed) "
    "or call `selhn_ext.build_extension()`"
)


def _find_library() -> tuple[Path | None, str | None]:
    """(a library to load, None) or (None, why there is none yet)."""
    spec = importlib.util.find_spec(__package__ + "._C")
    if spec is not None and spec.origin:
        return Path(spec.origin), None
    for cuda in (True, False):
        cached = build.cached_library(cuda)
        if cached is not None:
            return cached, None
    return None, "the compiled kernels are not built yet"


def _load(path: Path) -> str | None:
    """Load the library at ``path``; None, or why it failed."""
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        return f"{path} failed to load ({error})"
    return None


_LIBRARY_PATH, _LIBRARY_ERROR = _find_library()
if _LIBRARY_PATH is not None:
    _LIBRARY_ERROR = _load(_LIBRARY_PATH)
    if _LIBRARY_ERROR is not None:
        _LIBRARY_PATH = None


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"selhn::{op}", dispatch_key)
    except RuntimeError:  # the op itself is not defined
        return False


def load_error(device_type: str) -> str | None:
    """None if the compiled ops for this device type are (or will be, on first use)
    available, else why not and how to fix it."""
    if _LIBRARY_PATH is None:
        if device_type != "cpu":
            return f"the compiled kernels are not built: {_LIBRARY_ERROR}; {_HOW_TO_FIX}"
        problem = build.compiler_problem() or (
            None if build.cpu_sources() else "the C++ sources are not part of this install"
        )
        if problem is None:
            return None  # built on first use
        return f"the compiled kernels are not built ({_LIBRARY_ERROR}) and cannot be: {problem}"
    if device_type == "cpu":
        if _has_kernel("partials", "CPU"):
            return None
        return f"the C++ CPU kernels are not registered; {_HOW_TO_FIX}"
    if device_type == "cuda":
        if not _has_kernel("partials", "CUDA"):
            return (
                "the CUDA kernels were not built: install with a CUDA build of torch and "
                "CUDA_HOME set to a CUDA toolkit (SELHN_CUDA=1 makes a failure loud): "
                "`SELHN_CUDA=1 pip install --no-build-isolation .`, or call "
                "`selhn_ext.build_extension(cuda=True)`"
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


def _fake_sparse_and_diagonal_backward(rows, cols, row_offset, grad_rows, grad_cols, *weights):
    return None  # updates grad_rows and grad_cols in place


def _register_fakes() -> None:
    torch.library.register_fake("selhn::partials", _fake_partials)
    torch.library.register_fake("selhn::dense_backward", _fake_dense_backward)
    torch.library.register_fake(
        "selhn::sparse_and_diagonal_backward", _fake_sparse_and_diagonal_backward
    )


if _LIBRARY_PATH is not None:
    _register_fakes()


def build_extension(cuda: bool = False, verbose: bool = False) -> Path:
    """Compile the C++ kernels (with ``cuda=True`` the CUDA kernels too) once into a
    per-user cache and load them, when the install did not build them (pip's default
    isolated build has no torch to build against); the compiled backends otherwise do
    this on their first use. Needs a C++ compiler and ninja. Returns the library's path;
    when a library is already loaded, returns it without building.
    """
    global _LIBRARY_PATH, _LIBRARY_ERROR
    if _LIBRARY_PATH is not None:
        # The ops are already registered in this process; a second copy of the library
        # would register them twice.
        if cuda and not _has_kernel("partials", "CUDA"):
            raise RuntimeError(
                f"a library without the CUDA kernels is already loaded ({_LIBRARY_PATH}): "
                "build the CUDA kernels in a process that has not loaded it (remove it, or "
                "run bench/jit_build.py --cuda from another folder)"
            )
        return _LIBRARY_PATH
    _LIBRARY_PATH = build.build_extension(cuda=cuda, verbose=verbose)
    _LIBRARY_ERROR = None
    _register_fakes()
    return _LIBRARY_PATH


# ---------------------------------------------------------------- the backend object


class CompiledBackend(PyTorchGlue):
    """The kernel interface on the ``selhn::*`` ops (backends ``cpu`` and ``cuda``); the
    dispatcher runs the CPU or the CUDA kernel by the inputs' device."""

    def partials(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats, DirectionStats]:
        out = torch.ops.selhn.partials(
            block.rows, block.cols, block.col_pos, int(block.row_offset), block.row_ids,
            block.col_ids, float(margin), bool(deterministic), bool(allow_tf32),
        )  # fmt: skip
        return DirectionStats(*out[:4]), DirectionStats(*out[4:])

    def dense_backward(
        self,
        block: Block,
        margin: float,
        gated: GatedAnchors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        return torch.ops.selhn.dense_backward(
            block.rows, block.cols, block.col_pos, int(block.row_offset), block.row_ids,
            block.col_ids, float(margin), gated.row_coef, gated.col_coef, gated.row_gated,
            gated.col_gated, bool(deterministic), bool(allow_tf32),
        )  # fmt: skip

    def sparse_and_diagonal_backward(
        self,
        block: Block,
        dense_grads: tuple[Tensor, Tensor],
        row: AnchorWeights,
        col: AnchorWeights,
        *,
        deterministic: bool,
        out_dtypes: tuple[torch.dtype, torch.dtype],
    ) -> tuple[Tensor, Tensor]:
        """The CPU kernel adds the same terms in the same order as the PyTorch glue (the
        same bits, whatever the thread count); CUDA inputs take the glue."""
        if block.rows.device.type != "cpu":
            return super().sparse_and_diagonal_backward(
                block, dense_grads, row, col, deterministic=deterministic, out_dtypes=out_dtypes
            )
        grad_rows, grad_cols = dense_grads
        torch.ops.selhn.sparse_and_diagonal_backward(
            block.rows, block.cols, int(block.row_offset), grad_rows, grad_cols, *row, *col
        )
        return grad_rows.to(out_dtypes[0]), grad_cols.to(out_dtypes[1])


COMPILED_BACKEND = CompiledBackend()


def compiled_backend() -> CompiledBackend:
    """The backend object, building the library first if this is its first use."""
    build_extension()
    return COMPILED_BACKEND
