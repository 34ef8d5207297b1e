"""The one place a backend is chosen: the registry of backends and every reason one of
them cannot take given inputs.

Each backend is registered below with its devices, dtypes, size limits and named
variants, and ``unsupported_reasons`` lists everything that rules it out for inputs of a
device type, dtype and size, in the style of xformers' ``not_supported_reasons``:
checkable from shapes alone, without allocating anything. Precedence: an explicit
``backend`` argument other than ``"auto"`` > the ``SELHN_BACKEND`` environment variable >
the auto order. A backend asked for by name that cannot run raises with every reason;
nothing falls back silently.

Everything read from the environment is read here, once, at import, so that the choice
depends only on devices, dtypes, shapes and options (what ``torch.compile`` guards on):
``SELHN_BACKEND``, ``TRITON_INTERPRET`` and each backend's variant variable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ._cpp import compiled_backend, load_error
from .chunked import ChunkedBackend
from .kernel_interface import Backend
from .options import BACKENDS

# ``auto`` chooses the CUDA kernels only once a GPU run of bench/gpu_check.sh has passed
# their tests; flipped in the commit that records those results under bench/results/.
CUDA_BACKEND_IN_AUTO = False

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "chunked") if CUDA_BACKEND_IN_AUTO else ("triton", "chunked"),
    "cpu": ("cpu", "chunked"),
}

ENV_BACKEND = os.environ.get("SELHN_BACKEND", "").strip() or None
# Triton runs on CPU tensors only through its interpreter, which triton selects when
# TRITON_INTERPRET=1 is set before kernels are defined.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

_FLOAT16 = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = _FLOAT16 + (torch.float64,)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run these inputs."""


# ---------------------------------------------------------------------------------------
# Size limits of the kernels (csrc/ and _triton/ guard the same numbers)

# The C++ kernels index columns with int32.
COMPILED_MAX_COLUMNS = 2**31 - 1
# CUDA grids: at most 65535 blocks on a grid's y axis (and the kernels use one tile of
# 64 rows or 64 columns per block on either axis), see csrc/selhn_cuda.cu.
CUDA_TILE, CUDA_MAX_TILES = 64, 65535
# The Triton forward indexes rows and columns with int32 (and packs an anchor's best
# score and its index in one int64 key, see _triton/tile.py).
TRITON_MAX_COLUMNS = 2**31 - 1


# A limits function takes (N, b, variant); N and b may be None (not known).
Limits = Callable[[int | None, int | None, str | None], list[str]]


def _size_reasons(columns: int | None, max_columns: int, why: str) -> list[str]:
    if columns is not None and columns > max_columns:
        return [f"takes at most N = {max_columns:,} pairs ({why}), got N = {columns:,}"]
    return []


def _compiled_limits(columns: int | None, rows: int | None, variant: str | None) -> list[str]:
    return _size_reasons(columns, COMPILED_MAX_COLUMNS, "the C++ kernels index with int32")


def _cuda_limits(columns: int | None, rows: int | None, variant: str | None) -> list[str]:
    reasons = _compiled_limits(columns, rows, variant)
    for name, size in (("N", columns), ("b", rows)):
        if size is not None and -(-size // CUDA_TILE) > CUDA_MAX_TILES:
            reasons.append(
                f"takes at most {CUDA_MAX_TILES * CUDA_TILE:,} rows or columns ({CUDA_MAX_TILES} "
                f"tiles of {CUDA_TILE} per grid axis), got {name} = {size:,}"
            )
    return reasons


def _triton_limits(columns: int | None, rows: int | None, variant: str | None) -> list[str]:
    return _size_reasons(columns, TRITON_MAX_COLUMNS, "the Triton kernels index with int32")


def _no_limits(columns: int | None, rows: int | None, variant: str | None) -> list[str]:
    return []


# ---------------------------------------------------------------------------------------
# Whether a backend's code is here at all


def _always_present(device_type: str) -> str | None:
    return None


def _compiled_missing(device_type: str) -> str | None:
    return load_error(device_type)


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_missing(device_type: str) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install 'selhn[triton]')"
    if device_type == "cpu" and not TRITON_INTERPRET:
        return (
            "triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
            "before selhn_ext and triton are imported"
        )
    return None


def _load_triton(variant: str | None) -> Backend:
    # Imported on first use: importing triton takes a second and must follow
    # TRITON_INTERPRET, so the package does not import it before it is needed.
    from ._triton import TritonBackend

    return TritonBackend(variant)


@dataclass(frozen=True)
class Registration:
    """A backend as the registry knows it."""

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Why the backend's code cannot run at all on a device type (not built, not installed).
    missing: Callable[[str], str | None]
    # The backend object for a variant (None for the reference, which is not a backend
    # object but the spec, run by functional.py).
    load: Callable[[str | None], Backend | None]
    # Reasons from the sizes of the inputs, for a variant.
    limits: Limits = _no_limits
    # Named implementations, the default first, chosen by the environment variable.
    variants: tuple[str, ...] = ()
    variant_env: str | None = None


REGISTRY: dict[str, Registration] = {
    entry.name: entry
    for entry in (
        Registration("reference", ("cpu", "cuda"), _ALL_FLOATS, _always_present, lambda v: None),
        Registration("chunked", ("cpu", "cuda"), _ALL_FLOATS, _always_present,
                lambda v: ChunkedBackend()),
        Registration("cpu", ("cpu",), _ALL_FLOATS, _compiled_missing,
                lambda v: compiled_backend(), _compiled_limits),
        # The Triton dense backward's variants (one so far, "panels"; _triton/backward.py).
        Registration("triton", ("cuda", "cpu"), _FLOAT16, _triton_missing, _load_triton,
                _triton_limits, variants=("panels",), variant_env="SELHN_TRITON_BACKWARD"),
        Registration("cuda", ("cuda",), _FLOAT16, _compiled_missing,
                lambda v: compiled_backend(), _cuda_limits),
    )
}  # fmt: skip
if tuple(REGISTRY) != BACKENDS[1:]:
    raise ImportError("options.BACKENDS must list the registered backends after 'auto'")


def _variant_from_environment(entry: Registration) -> tuple[str | None, str | None]:
    """(the variant, None) or (None, why the environment's setting is refused)."""
    if not entry.variants:
        return None, None
    value = os.environ.get(entry.variant_env, "").strip() or entry.variants[0]
    if value not in entry.variants:
        return None, (
            f"{entry.variant_env}={value!r} is not a variant of {entry.name!r}; "
            f"expected one of {', '.join(entry.variants)}"
        )
    return value, None


# Read once at import, so that tracing the dispatch never imports or builds anything.
_MISSING: dict[tuple[str, str], str | None] = {
    (entry.name, device_type): entry.missing(device_type)
    for entry in REGISTRY.values()
    for device_type in entry.devices
}
_VARIANT_SETTINGS = {name: _variant_from_environment(b) for name, b in REGISTRY.items()}
_VARIANT: dict[str, str | None] = {name: s[0] for name, s in _VARIANT_SETTINGS.items()}
_VARIANT_ERROR: dict[str, str | None] = {name: s[1] for name, s in _VARIANT_SETTINGS.items()}

_LOADED: dict[str, Backend | None] = {}


def variant(name: str) -> str | None:
    """The variant backend ``name`` runs (None if it has no variants)."""
    return _VARIANT[name]


def backend(name: str) -> Backend:
    """The object of backend ``name`` (not the reference), for its variant (loaded once)."""
    if name not in _LOADED:
        _LOADED[name] = REGISTRY[name].load(_VARIANT[name])
    return _LOADED[name]


@contextlib.contextmanager
def use_backend(name: str, backend_object: Backend) -> Iterator[None]:
    """Run backend ``name`` on ``backend_object`` inside the block (tests, benchmarks)."""
    missing = object()
    previous = _LOADED.get(name, missing)
    _LOADED[name] = backend_object
    try:
        yield
    finally:
        if previous is missing:
            del _LOADED[name]
        else:
            _LOADED[name] = previous


@contextlib.contextmanager
def use_variant(name: str, chosen: str) -> Iterator[None]:
    """Run variant ``chosen`` of backend ``name`` inside the block (tests, benchmarks)."""
    entry = REGISTRY[name]
    if chosen not in entry.variants:
        raise ValueError(
            f"{chosen!r} is not a variant of {name!r}; expected one of {entry.variants}"
        )
    previous = _VARIANT[name], _VARIANT_ERROR[name]
    _VARIANT[name], _VARIANT_ERROR[name] = chosen, None
    try:
        with use_backend(name, entry.load(chosen)):
            yield
    finally:
        _VARIANT[name], _VARIANT_ERROR[name] = previous


def unsupported_reasons(
    name: str,
    device_type: str,
    dtype: torch.dtype,
    columns: int | None = None,
    rows: int | None = None,
) -> list[str]:
    """Every reason backend ``name`` cannot run inputs of this device type and dtype with
    N = ``columns`` pairs (``rows`` of them in this process); sizes may be omitted."""
    entry = REGISTRY[name]
    reasons = []
    if device_type not in entry.devices:
        reasons.append(f"does not run on {device_type} tensors (runs on {entry.devices})")
    if dtype not in entry.dtypes:
        names = ", ".join(str(t).removeprefix("torch.") for t in entry.dtypes)
        reasons.append(f"does not take {str(dtype).removeprefix('torch.')} (takes {names})")
    if device_type in entry.devices:
        missing = _MISSING[(name, device_type)]
        if missing is not None:
            reasons.append(missing)
    if _VARIANT_ERROR[name] is not None:
        reasons.append(_VARIANT_ERROR[name])
    reasons += entry.limits(columns, columns if rows is None else rows, _VARIANT[name])
    return reasons


def choose_backend(
    requested: str,
    device_type: str,
    dtype: torch.dtype,
    columns: int | None = None,
    rows: int | None = None,
) -> str:
    """Resolve ``requested`` (a name or ``"auto"``) to the backend that will run."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto" and ENV_BACKEND is not None:
        if ENV_BACKEND not in BACKENDS:
            raise ValueError(
                f"SELHN_BACKEND={ENV_BACKEND!r} is not a backend; expected one of {BACKENDS}"
            )
        requested = ENV_BACKEND
    if requested != "auto":
        reasons = unsupported_reasons(requested, device_type, dtype, columns, rows)
        if reasons:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run these inputs: " + "; ".join(reasons)
            )
        return requested
    order = AUTO_ORDER.get(device_type, ("chunked",))
    for name in order:
        if not unsupported_reasons(name, device_type, dtype, columns, rows):
            return name
    raise BackendUnavailableError(  # unreachable while chunked takes every float dtype
        f"no backend can run {device_type} {dtype} inputs"
    )


class BackendStatus(dict):
    """For each backend: None if it can run the inputs, else its reasons (one string).

    ``variants`` holds the variant each backend with variants would run.
    """

    def __init__(self, reasons: dict[str, str | None], variants: dict[str, str]) -> None:
        super().__init__(reasons)
        self.variants = variants

    def __repr__(self) -> str:
        chosen = ", ".join(f"{name}: {value!r}" for name, value in self.variants.items())
        return f"{dict.__repr__(self)} (variants: {chosen})"


def status(
    device_type: str, dtype: torch.dtype, columns: int | None = None, rows: int | None = None
) -> BackendStatus:
    """For each backend: None if it can run such inputs, else the reasons."""
    out: dict[str, str | None] = {}
    for name in REGISTRY:
        reasons = unsupported_reasons(name, device_type, dtype, columns, rows)
        out[name] = "; ".join(reasons) if reasons else None
    variants = {name: v for name, v in _VARIANT.items() if REGISTRY[name].variants}
    return BackendStatus(out, {name: v or "(refused)" for name, v in variants.items()})
