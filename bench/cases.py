"""What a benchmark run measures: cases, the named plans, and the Triton backward variants.

A ``Case`` is one backend at one shape, dtype, mode, gate mix and option set; each of its
passes gives one CSV row. A plan is a list of cases; ``with_floors`` puts one ``torch_mm``
case before the first case of every shape, so every row has a floor measured in the same
run.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASELINES, DTYPES, FUSED_BACKENDS, GATE_MIXES, PASSES, STATS_SUFFIX  # noqa: E402

BACKEND_NAMES = FUSED_BACKENDS + BASELINES

# The Triton backend's dense-backward variants are chosen by this environment variable,
# read once when selhn_ext is imported. This and ``triton_backward_variants`` are the one
# place to change when the backend exposes its variants differently.
TRITON_BACKWARD_ENV = "SELHN_TRITON_BACKWARD"


def triton_backward_variants() -> list[str]:
    """The variants the installed Triton backend offers, or [] if it offers no choice."""
    try:
        from selhn_ext import (
            _triton,  # noqa: F401  (needs triton)
            dispatch,
        )
    except Exception:  # no triton, or a package without this registry
        return []
    return [str(name) for name in dispatch.REGISTRY["triton"].variants]


@dataclass(frozen=True)
class Case:
    """One backend at one shape and option set; each pass gives one CSV row."""

    backend: str
    batch: int
    dim: int
    dtype: str  # a key of DTYPES
    mode: str = "selhn"
    gate_mix: str = "half"
    deterministic: bool = False
    stats: bool = False
    passes: tuple[str, ...] = PASSES
    variant: str = ""  # the Triton backward variant, when one was chosen

    @property
    def label(self) -> str:
        """The CSV's backend column: the backend, with the chosen variant if any."""
        return f"{self.backend}:{self.variant}" if self.variant else self.backend

    @property
    def mode_label(self) -> str:
        return self.mode + (STATS_SUFFIX if self.stats else "")

    def key(self) -> str:
        det = "det" if self.deterministic else "nondet"
        return (
            f"{self.label}/B{self.batch}/D{self.dim}/{self.dtype}/{self.mode_label}/"
            f"{self.gate_mix}/{det}/{'+'.join(self.passes)}"
        )

    @property
    def shape(self) -> tuple[int, int, str]:
        return (self.batch, self.dim, self.dtype)

    @property
    def is_selhn_ext(self) -> bool:
        return self.backend in FUSED_BACKENDS or self.backend == "chunked"

    @property
    def needs_grad(self) -> bool:
        return self.backend != "torch_mm"


def matmul_case(batch: int, dim: int, dtype: str) -> Case:
    """One ``torch.mm(img, txt.T)``: the floor every row of its shape is divided by."""
    return Case("torch_mm", batch, dim, dtype, mode="", gate_mix="", passes=("forward",))


def make_cases(backends, sizes, dims, dtypes, **options) -> list[Case]:
    """Every backend at every shape, with the same options."""
    return [
        Case(backend, batch, dim, dtype, **options)
        for dtype in dtypes
        for dim in dims
        for batch in sizes
        for backend in backends
    ]


def with_variant(plan: Iterable[Case], variant: str) -> list[Case]:
    """The plan with ``variant`` recorded on its Triton cases."""
    return [dataclasses.replace(c, variant=variant) if c.backend == "triton" else c for c in plan]


# --------------------------------------------------------------------------------------
# Named plans
# --------------------------------------------------------------------------------------


def plan_cpu_default(keops_max_b: int = 512) -> list[Case]:
    """A few minutes on 2 cores; includes the two CPU headline rows."""
    fwd_bwd = ("forward_backward",)
    sweep = [512, 1024, 2048, 4096]
    plan = make_cases(("cpu", "chunked", "authors"), sweep, [512], ["fp32"])
    plan += make_cases(("keops",), [b for b in sweep if b <= keops_max_b], [512], ["fp32"])
    plan += make_cases(("cpu", "pml"), [1024, 4096], [512], ["fp32"], mode="hardest")
    # Headline 1: B = 4096, D = 512, fp32, forward+backward, three gate mixes and options.
    for mix in ("none", "all"):
        plan += make_cases(
            ("cpu", "chunked", "authors"), [4096], [512], ["fp32"], gate_mix=mix, passes=fwd_bwd
        )
    plan += make_cases(("authors_compiled",), [4096], [512], ["fp32"], passes=fwd_bwd)
    plan += make_cases(("cpu",), [4096], [512], ["fp32"], deterministic=True, passes=fwd_bwd)
    plan += make_cases(("cpu",), [4096], [512], ["fp32"], stats=True, passes=fwd_bwd)
    # Other dims and bf16, smaller.
    plan += make_cases(("cpu", "authors"), [2048], [256, 1024], ["fp32"], passes=fwd_bwd)
    plan += make_cases(("cpu", "chunked", "authors"), [1024], [512], ["bf16"], passes=fwd_bwd)
    plan += make_cases(("cpu", "authors"), [1024], [512], ["fp16"], passes=fwd_bwd)
    # Headline 2: B = 32768, D = 256: the fused loss stays small, the authors' cannot fit.
    plan += make_cases(
        ("cpu", "authors"), [32768], [256], ["fp32"], gate_mix="none", passes=fwd_bwd
    )
    return plan


# The GPU headline's gate mixes: the users' regime (1 % and 10 %) and the extremes.
HEADLINE_GATE_MIXES = ("none", "1pct", "10pct", "half", "all")


def plan_triton_variant(batch=16384, dim=1024, dtype="bf16") -> list[Case]:
    """The Triton backend alone at the headline shape and every headline gate mix; run
    once per backward variant (``--triton-backward``)."""
    plan = []
    for mix in HEADLINE_GATE_MIXES:
        plan += make_cases(("triton",), [batch], [dim], [dtype], gate_mix=mix)
    return plan


def plan_gpu_headline(batch=16384, dim=1024, dtype="bf16") -> list[Case]:
    """B = 16384, D = 1024, bf16: the fused backends and the authors' loss at every
    headline gate mix, each pass; the other baselines and the options at 10 % gated."""
    plan = []
    for mix in HEADLINE_GATE_MIXES:
        plan += make_cases(("triton", "cuda", "authors"), [batch], [dim], [dtype], gate_mix=mix)
    shape = ([batch], [dim], [dtype])
    fwd_bwd = ("forward_backward",)
    plan += make_cases(("authors_compiled", "chunked"), *shape, gate_mix="10pct")
    plan += make_cases(
        ("triton", "cuda"), *shape, gate_mix="10pct", deterministic=True, passes=fwd_bwd
    )
    plan += make_cases(("triton", "cuda"), *shape, gate_mix="10pct", stats=True, passes=fwd_bwd)
    return plan


# The static sm_90 model's cases (bench/static_model.py: B = 16384, D = 256 and 1024,
# bf16 and fp16, 0, 1, 10 and 100 % gated), timed so that a GPU run calibrates the model
# (bench/calibrate_model.py). bf16 at D = 1024 is the headline's own Triton rows.
MODEL_GATE_MIXES = ("none", "1pct", "10pct", "all")


def plan_model_cases(batch=16384, dims=(256, 1024), dtypes=("bf16", "fp16")) -> list[Case]:
    """The Triton backend at the model's cases the headline does not time."""
    plan = []
    for dtype in dtypes:
        for dim in dims:
            if (dim, dtype) == (dims[-1], dtypes[0]):
                continue  # the headline shape
            for mix in MODEL_GATE_MIXES:
                plan += make_cases(("triton",), [batch], [dim], [dtype], gate_mix=mix)
    return plan


def plan_gpu_sweep(sizes, dims, dtypes=("bf16", "fp32")) -> list[Case]:
    plan = []
    for dtype in dtypes:
        plan += make_cases(
            ("triton", "cuda", "chunked", "authors"),
            sizes,
            dims,
            [dtype],
            passes=("forward", "forward_backward"),
        )
    return plan


GPU_SWEEP_SIZES = [4096 * 2**k for k in range(7)]  # up to B = 262144
# The dry run of bench/gpu_check.sh: the same plans on CPU at tiny sizes.
DRY_RUN_SHAPE = (64, 32, "bf16")

PRESETS: dict[str, Callable[[int], list[Case]]] = {
    "cpu": lambda keops_max_b: plan_cpu_default(keops_max_b),
    "gpu-headline": lambda _: plan_gpu_headline(),
    "gpu-triton-variant": lambda _: plan_triton_variant(),
    "gpu-model-cases": lambda _: plan_model_cases(),
    "gpu-sweep": lambda _: plan_gpu_sweep(GPU_SWEEP_SIZES, [256, 1024]),
    "dry-run-headline": lambda _: plan_gpu_headline(*DRY_RUN_SHAPE),
    "dry-run-triton-variant": lambda _: plan_triton_variant(*DRY_RUN_SHAPE),
    "dry-run-model-cases": lambda _: plan_model_cases(DRY_RUN_SHAPE[0], (16, 32)),
    "dry-run-sweep": lambda _: plan_gpu_sweep([32, 64], [16]),
}


def custom_plan(
    backends: list[str],
    sizes: list[int],
    dims: list[int],
    dtypes: list[str],
    modes: list[str],
    gate_mixes: list[str],
    passes: tuple[str, ...],
    deterministic: list[bool],
    stats_row: bool = False,
) -> list[Case]:
    """Every combination of the lists; raises ValueError naming what is unknown."""
    for name, given, known in (
        ("backends", backends, BACKEND_NAMES),
        ("passes", passes, PASSES),
        ("gate mixes", gate_mixes, tuple(GATE_MIXES)),
        ("dtypes", dtypes, tuple(DTYPES)),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; expected some of {list(known)}")
    shape = (sizes, dims, dtypes)
    plan = []
    for mode in modes:
        for mix in gate_mixes:
            for det in deterministic:
                plan += make_cases(
                    backends, *shape, mode=mode, gate_mix=mix, deterministic=det, passes=passes
                )
            if stats_row:
                fused = [b for b in backends if b in FUSED_BACKENDS]
                plan += make_cases(
                    fused, *shape, mode=mode, gate_mix=mix, stats=True, passes=passes
                )
    # Baselines have no deterministic switch: keep one of each.
    return [c for c in plan if c.is_selhn_ext or not c.deterministic]


def with_floors(plan: list[Case]) -> list[Case]:
    """Put one torch_mm case before the first case of every shape (and drop duplicates)."""
    out: list[Case] = []
    seen_shapes: set = set()
    seen_keys: set = set()
    for case in plan:
        if case.shape not in seen_shapes:
            seen_shapes.add(case.shape)
            out.append(matmul_case(*case.shape))
        if case.backend != "torch_mm" and case.key() not in seen_keys:
            seen_keys.add(case.key())
            out.append(case)
    return out
