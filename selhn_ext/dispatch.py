"""The one place a backend is chosen.

Each backend is registered below with what it supports; ``unsupported_reasons`` says
why it cannot take given inputs. Precedence: an explicit ``backend`` argument other than
``"auto"`` > the ``SELHN_BACKEND`` environment variable > the auto order. A backend that
was asked for by name and cannot run raises with every reason; nothing falls back
silently.

Everything read from the environment is read once, at import, so that the choice
depends only on devices, dtypes, options and flags ``torch.compile`` guards on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("auto", "reference", "chunked", "cpu", "triton", "cuda")

# ``auto`` chooses the CUDA kernels only once a GPU run of bench/gpu_check.sh has passed
# their tests; flipped in the commit that records those results under bench/results/.
CUDA_BACKEND_IN_AUTO = False

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "chunked") if CUDA_BACKEND_IN_AUTO else ("triton", "chunked"),
    "cpu": ("cpu", "chunked"),
}

_ENV_BACKEND = os.environ.get("SELHN_BACKEND", "").strip() or None
# Triton runs on CPU tensors only through its interpreter, which triton selects when
# TRITON_INTERPRET=1 is set before kernels are defined.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

_FLOAT16 = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = _FLOAT16 + (torch.float64,)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run these inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Why the backend's code cannot be loaded at all (not built, not installed), or None.
    missing: Callable[[str], str | None]
    # Returns the object implementing kernel_interface (None for the reference).
    load: Callable[[], Any]


def _always_present(device_type: str) -> str | None:
    return None


def _load_chunked():
    from .reference import ChunkedKernels

    return ChunkedKernels()


def _compiled_missing(device_type: str) -> str | None:
    if importlib.util.find_spec(__package__ + "._cpp") is None:
        return (
            "the compiled kernels are not part of this install: with torch installed, "
            "reinstall with `pip install --no-build-isolation .`"
        )
    from . import _cpp

    return _cpp.load_error(device_type)


def _load_compiled():
    from . import _cpp

    return _cpp.COMPILED_KERNELS


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_missing(device_type: str) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install 'selhn[triton]')"
    if device_type == "cpu" and not TRITON_INTERPRET:
        return (
            "triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
            "before selhn_ext and triton are imported"
        )
    if importlib.util.find_spec(__package__ + "._triton") is None:
        return "the Triton kernels are not part of this install"
    return None


def _load_triton():
    module = importlib.import_module(__package__ + "._triton")
    return module.KERNELS


REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", ("cpu", "cuda"), _ALL_FLOATS, _always_present, lambda: None),
        Backend("chunked", ("cpu", "cuda"), _ALL_FLOATS, _always_present, _load_chunked),
        Backend("cpu", ("cpu",), _ALL_FLOATS, _compiled_missing, _load_compiled),
        Backend("triton", ("cuda", "cpu"), _FLOAT16, _triton_missing, _load_triton),
        Backend("cuda", ("cuda",), _FLOAT16, _compiled_missing, _load_compiled),
    )
}

# Read once at import, so that tracing the dispatch never imports or builds anything.
_MISSING: dict[tuple[str, str], str | None] = {
    (backend.name, device_type): backend.missing(device_type)
    for backend in REGISTRY.values()
    for device_type in backend.devices
}

_LOADED: dict[str, Any] = {}


def kernels(name: str) -> Any:
    """The kernel-interface object of a fused backend (loaded once)."""
    if name not in _LOADED:
        _LOADED[name] = REGISTRY[name].load()
    return _LOADED[name]


def unsupported_reasons(name: str, device_type: str, dtype: torch.dtype) -> list[str]:
    """Every reason backend ``name`` cannot run inputs of this device type and dtype."""
    backend = REGISTRY[name]
    reasons = []
    if device_type not in backend.devices:
        reasons.append(f"does not run on {device_type} tensors (runs on {backend.devices})")
    if dtype not in backend.dtypes:
        names = ", ".join(str(t).removeprefix("torch.") for t in backend.dtypes)
        reasons.append(f"does not take {str(dtype).removeprefix('torch.')} (takes {names})")
    if device_type in backend.devices:
        missing = _MISSING[(name, device_type)]
        if missing is not None:
            reasons.append(missing)
    return reasons


def choose_backend(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """Resolve ``requested`` (a name or ``"auto"``) to the backend that will run."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto" and _ENV_BACKEND is not None:
        if _ENV_BACKEND not in BACKENDS:
            raise ValueError(
                f"SELHN_BACKEND={_ENV_BACKEND!r} is not a backend; expected one of {BACKENDS}"
            )
        requested = _ENV_BACKEND
    if requested != "auto":
        reasons = unsupported_reasons(requested, device_type, dtype)
        if reasons:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run these inputs: " + "; ".join(reasons)
            )
        return requested
    order = AUTO_ORDER.get(device_type, ("chunked",))
    for name in order:
        if not unsupported_reasons(name, device_type, dtype):
            return name
    raise BackendUnavailableError(  # unreachable while chunked takes every float dtype
        f"no backend can run {device_type} {dtype} inputs"
    )


def status(device_type: str, dtype: torch.dtype) -> dict[str, str | None]:
    """For each backend: None if it can run such inputs, else the reasons."""
    out: dict[str, str | None] = {}
    for name in REGISTRY:
        reasons = unsupported_reasons(name, device_type, dtype)
        out[name] = "; ".join(reasons) if reasons else None
    return out
