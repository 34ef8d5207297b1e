"""Memory: probes that measure a case's peak, and the estimate a run states up front.

Probes: on CPU the resident set from /proc (``VmHWM`` is the peak, reset through
``clear_refs``), on CUDA the caching allocator's statistics. Both report the peak over a
base taken once the inputs exist, so a row's ``peak_extra_bytes`` is what the loss itself
needed.

The estimate (``estimated_extra_bytes``) is a model, fitted to the rows in
``bench/results/cpu.csv`` (fp32 and bf16, B = 512 to 32768) and rounded up: B x B terms
for the losses that hold the score matrix, O(B·D) terms for the fused kernels. A run on
CPU measures one case at a time in a child process under an address-space limit, so what
it needs at once is one child (its base, the inputs, and the case's extra memory, capped
by the limit) next to the parent.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import Case  # noqa: E402
from common import DTYPES  # noqa: E402

GIB = 2**30


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, VmSize), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class CpuMemory:
    """Resident memory from /proc: VmHWM is the peak, reset by writing 5 to clear_refs."""

    def set_base(self) -> None:
        self.base = proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")

    def peak_extra(self) -> int:
        return proc_status_bytes("VmHWM") - self.base


class CudaMemory:
    """The caching allocator's statistics: bytes allocated by tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def set_base(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_extra(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def memory_probe(device: torch.device):
    return CudaMemory(device) if device.type == "cuda" else CpuMemory()


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "bad_alloc" in text


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------

# Bytes per element of the B x B score matrix held at the peak of forward + backward, for
# 4-byte and 2-byte inputs (fitted: authors 25.0 and 14.9, authors_compiled 18.0, pml 29.0,
# torch_mm 4 and 2 bytes per element).
SQUARE_BYTES = {
    "authors": {4: 27, 2: 16},
    "authors_compiled": {4: 20, 2: 12},
    "pml": {4: 31, 2: 18},
    "torch_mm": {4: 4, 2: 2},
}
# The chunked backend holds about seven fp32 (rows, B) panels of at most 2**23 elements.
CHUNKED_PANEL_ELEMENTS = 2**23
CHUNKED_BYTES_PER_ELEMENT = 28
# Bytes per input element (B x D) held by the fused kernels and KeOps: gradients, packed
# copies, fp32 copies of 16-bit inputs (fitted: cpu fp32 7.0, bf16 25.6 bytes).
BD_BYTES = {4: 32, 2: 32}
# Per-anchor statistics: about 16 vectors of B 4-byte values per direction.
PER_ANCHOR_BYTES = 128
# Pages and allocator slack on top of any case (the 4 KiB a torch.mm's RSS peak adds).
SLACK_BYTES = 2**20


def estimated_extra_bytes(case: Case) -> int:
    """A model of ``peak_extra_bytes`` for ``case`` (its largest pass); see the module."""
    element = DTYPES[case.dtype].itemsize
    batch, dim = case.batch, case.dim
    if case.backend in SQUARE_BYTES:
        return SQUARE_BYTES[case.backend][element] * batch * batch + SLACK_BYTES
    if case.backend == "chunked":
        panel = min(batch * batch, CHUNKED_PANEL_ELEMENTS)
        return CHUNKED_BYTES_PER_ELEMENT * panel + BD_BYTES[element] * batch * dim + SLACK_BYTES
    return BD_BYTES[element] * batch * dim + PER_ANCHOR_BYTES * batch + SLACK_BYTES


def input_bytes(case: Case) -> int:
    """The two inputs and their gradients, which exist before the base is taken."""
    return 4 * case.batch * case.dim * DTYPES[case.dtype].itemsize


@dataclass(frozen=True)
class PlanMemory:
    """What a plan needs at once, by the estimate."""

    peak_bytes: int  # the largest case, with the process base and its inputs
    largest: Case | None
    capped: list[Case]  # cases whose estimate is over the limit: they will record oom
    limit_bytes: int | None  # the child's limit on CPU, None on a GPU
    fitting_bytes: int = 0  # the same for the largest case within the limit
    fitting: Case | None = None

    def describe(self, where: str) -> str:
        if self.largest is None:
            return "memory: the plan is empty"
        text = (
            f"memory estimate (a model, not a measurement): this plan needs up to "
            f"{self.peak_bytes / GIB:.1f} GiB of {where} at once, for "
            f"{self.largest.key()}"
        )
        if self.capped:
            names = ", ".join(c.key() for c in self.capped[:3])
            more = f" and {len(self.capped) - 3} more" if len(self.capped) > 3 else ""
            text += (
                f"; {len(self.capped)} case(s) need more than the "
                f"{self.limit_bytes / GIB:.1f} GiB limit and should be recorded as oom "
                f"after filling it ({names}{more})"
            )
            if self.fitting is not None:
                text += (
                    f"; the largest case within the limit needs {self.fitting_bytes / GIB:.1f}"
                    f" GiB ({self.fitting.key()})"
                )
        return text


def plan_memory(
    plan: list[Case],
    base_bytes: int,
    limit_bytes: int | None,
    parent_bytes: int = 0,
    paired_mm: bool = False,
) -> PlanMemory:
    """The estimate for ``plan`` run one case at a time.

    ``base_bytes``: what the process running a case holds before it (torch and the
    kernels loaded); ``limit_bytes``: the children's address-space limit over their size
    once the inputs exist (None: no limit, as on a GPU); ``parent_bytes``: a parent
    process alive next to the children; ``paired_mm``: each case also times one torch.mm
    of its shape (timing.Settings), whose B x B product is freed before the case runs.
    """
    peak, largest, fitting_peak, fitting, capped = 0, None, 0, None, []
    for case in plan:
        extra = estimated_extra_bytes(case)
        if paired_mm:
            extra = max(extra, estimated_extra_bytes(dataclasses.replace(case, backend="torch_mm")))
        over = limit_bytes is not None and extra > limit_bytes
        if over:
            capped.append(case)
            extra = limit_bytes
        need = base_bytes + input_bytes(case) + extra + parent_bytes
        if need > peak:
            peak, largest = need, case
        if not over and need > fitting_peak:
            fitting_peak, fitting = need, case
    return PlanMemory(peak, largest, capped, limit_bytes, fitting_peak, fitting)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now: MemAvailable on CPU, free device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
