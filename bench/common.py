"""What the benchmark scripts share: the CSV format, the machine description, the inputs."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch import Tensor

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
# Committed results: written only when asked (``--update-committed``).
RESULTS_DIR = BENCH_DIR / "results"
# Where a run writes by default: ignored by git, so a run changes no tracked file.
OUT_DIR = BENCH_DIR / "out"

# The CSV schema, one column per entry, in file order (the README lists the same names).
CSV_COLUMNS = {
    "date": "UTC time the row was written",
    "commit": "short git commit of the checkout, +dirty with uncommitted changes",
    "device": "GPU name, or cpu:<model> x<cores> <S-tile vector path> (see device_name)",
    "torch": "torch version",
    "triton": "triton version, empty without triton",
    "backend": "selhn_ext backend or baseline; triton:<variant> for a chosen Triton backward",
    "B": "batch size (pairs)",
    "D": "embedding size",
    "dtype": "input dtype: fp32, bf16 or fp16",
    "mode": "loss mode, +stats when timed with return_stats=True; empty for torch_mm",
    "gate_mix": "the input builder's gate mix (GATE_MIXES); empty for torch_mm",
    "gated_fraction": "fraction of the 2B anchors actually gated by these inputs",
    "deterministic": "1 or 0 for selhn_ext backends, empty for baselines",
    "pass": "forward, backward or forward_backward",
    "median_ms": "median wall time of the pass (CUDA events on a GPU)",
    "mm_ms": "median time of one torch.mm of the same shape: on CPU timed before each of "
    "the pass's repetitions in the same process, on a GPU timed earlier in the run",
    "ratio_to_mm": "median_ms over mm_ms",
    "peak_extra_bytes": "peak memory over what the inputs already held",
    "status": "ok, oom, error or skipped (the reason is in the log)",
}
CSV_HEADER = list(CSV_COLUMNS)
STATUSES = ("ok", "oom", "error", "skipped")
PASSES = ("forward", "backward", "forward_backward")
FUSED_BACKENDS = ("cpu", "triton", "cuda")
BASELINES = ("authors", "authors_compiled", "chunked", "pml", "keops", "torch_mm")
# The fraction of pairs built to be gated (see ``make_inputs``). In training the gate
# fires on about 10 % of anchors early and 1 % later, so those two are the users' regime.
GATE_MIXES = {"none": 0.0, "1pct": 0.01, "10pct": 0.1, "half": 0.5, "all": 1.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A mode with this suffix is timed with ``return_stats=True``.
STATS_SUFFIX = "+stats"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd_paths() -> list[str]:
    """The CPU kernels' S-tile vector paths on this machine, fastest first (the first is
    the one they use unless told otherwise); empty when the compiled kernels are missing."""
    try:
        import selhn_ext  # noqa: F401  (loads the compiled ops)

        return list(torch.ops.selhn._cpu_simd_paths())
    except (ImportError, AttributeError, RuntimeError):
        return []


def device_name(device: torch.device, simd_path: str | None = None) -> str:
    """``torch.cuda.get_device_name()`` on CUDA; on CPU ``cpu:<model> x<cores> <path>``,
    where ``<path>`` is the S-tile vector path of the CPU kernels (``simd_path`` when one
    was forced, else the fastest this CPU has, ``unknown`` without the compiled kernels),
    so rows from machines with and without AVX-512 never share a label."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if simd_path is None:
        simd_path = (cpu_simd_paths() or ["unknown"])[0]
    return f"cpu:{cpu_model()} x{os.cpu_count()} {simd_path}"


def device_kind(device: torch.device) -> str:
    """The results file a device's rows go to: ``cpu`` or ``gpu``."""
    return "gpu" if device.type == "cuda" else "cpu"


def git_commit() -> str:
    """The short commit of the checkout, ``+dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SELHN_COMMIT", "unknown")
    return commit + ("+dirty" if dirty else "")


def triton_version() -> str:
    try:
        import triton
    except Exception:  # absent, or broken on this machine
        return ""
    return triton.__version__


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_csv(path: Path):
    """Open ``path`` for appending rows, writing the header if the file is new.

    Refuses a file whose header differs, so rows of different formats never mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), None)
        if header != CSV_HEADER:
            raise ValueError(
                f"{path} has header {header}, expected {CSV_HEADER}: it was written by "
                "another version of this benchmark; move it away or pick another --csv "
                "or --out-dir"
            )
        handle = open(path, "a", newline="")
        return handle, csv.DictWriter(handle, fieldnames=CSV_HEADER)
    handle = open(path, "w", newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_HEADER)
    writer.writeheader()
    handle.flush()
    return handle, writer


def read_rows(paths) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def make_inputs(
    batch: int,
    dim: int,
    dtype: torch.dtype,
    gate_mix: str,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Unit-vector pairs where about ``GATE_MIXES[gate_mix]`` of the anchors are gated.

    Gated pairs sit in one tight cluster: every score among them is within a few
    thousandths of the others, so each anchor's hardest negative is within eps = 0.01 of
    its positive. The other pairs share a random direction with a positive score near 0.5
    while their negatives score near 0 (N(0, 1/D)), so their gap is far above eps. The
    pairs are shuffled, so gated anchors are spread over every tile. A mix that asks for
    a single gated pair gets two (one pair alone has no near negative). The fraction that
    is actually gated is measured (``return_stats=True``) and recorded with each row.
    """
    if gate_mix not in GATE_MIXES:
        raise ValueError(f"unknown gate mix {gate_mix!r}; expected one of {list(GATE_MIXES)}")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def gaussian(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    n_cluster = round(GATE_MIXES[gate_mix] * batch)
    if n_cluster == 1:  # a lone cluster pair has no near negative, so it would not gate
        n_cluster = min(2, batch)
    # Cluster noise: |noise|^2 = 0.01; spread noise: |noise|^2 = 1, so cos(img, txt) ~ 0.5.
    centre = _unit(gaussian(1, dim))
    directions = torch.cat([centre.expand(n_cluster, dim), _unit(gaussian(batch - n_cluster, dim))])
    scale = torch.full((batch, 1), 1.0 / math.sqrt(dim), device=device)
    scale[:n_cluster] = 0.1 / math.sqrt(dim)
    img = _unit(directions + scale * gaussian(batch, dim))
    txt = _unit(directions + scale * gaussian(batch, dim))
    order = torch.randperm(batch, generator=generator, device=device)
    return img[order].to(dtype).contiguous(), txt[order].to(dtype).contiguous()
