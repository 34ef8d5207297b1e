"""Time and peak extra memory of the SelHN loss: every backend against baselines, one run.

    python bench/bench_loss.py                        # the default CPU plan (a few minutes)
    python bench/bench_loss.py --preset gpu-headline  # B = 16384, D = 1024, bf16 on a GPU
    python bench/bench_loss.py --backends cpu,authors --sizes 1024,2048 --dims 512 \\
        --dtypes fp32 --gate-mixes none,all --passes forward_backward

Each case (a backend at one shape, dtype, mode, gate mix and option set) is timed for the
passes ``forward``, ``backward`` and ``forward_backward`` and appended to
``bench/results/<cpu|gpu>.csv``; ``torch_mm`` (one ``torch.mm(img, txt.T)``) is measured
first for every shape and each row carries its time as ``ratio_to_mm``. On CPU every case
runs in a fresh child process under ``RLIMIT_AS`` so that its peak RSS is its own and an
oversized case fails with ``oom`` instead of waking the OOM killer. Why a case was
skipped or failed goes to the log next to the CSV (``<kind>.log``) and to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BASELINES, DTYPES, FUSED_BACKENDS, GATE_MIXES, PASSES, STATS_SUFFIX  # noqa: E402

BACKEND_NAMES = FUSED_BACKENDS + BASELINES
# Exit code of a run that stopped because the GPU context died (a fatal kernel error);
# the failing backend's name is written to the file given by --fatal-file.
EXIT_FATAL_DEVICE_ERROR = 3


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

    def key(self) -> str:
        mode = self.mode + (STATS_SUFFIX if self.stats else "")
        det = "det" if self.deterministic else "nondet"
        return (
            f"{self.backend}/B{self.batch}/D{self.dim}/{self.dtype}/{mode}/"
            f"{self.gate_mix}/{det}/{'+'.join(self.passes)}"
        )

    @property
    def shape(self) -> tuple[int, int, str]:
        return (self.batch, self.dim, self.dtype)

    @property
    def is_selhn_ext(self) -> bool:
        return self.backend in FUSED_BACKENDS or self.backend == "chunked"


def matmul_case(batch: int, dim: int, dtype: str) -> Case:
    return Case("torch_mm", batch, dim, dtype, mode="", gate_mix="", passes=("forward",))


@dataclass
class Settings:
    device: torch.device
    min_time_s: float
    max_reps: int
    min_reps: int = 1
    warmup: int = 1
    seed: int = 0


# --------------------------------------------------------------------------------------
# Measuring one case in this process
# --------------------------------------------------------------------------------------


class CpuMemory:
    """Resident memory from /proc: VmHWM is the peak, reset by writing 5 to clear_refs."""

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def set_base(self) -> None:
        self.base = self._status("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")

    def peak_extra(self) -> int:
        return self._status("VmHWM") - self.base


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


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end_event.record()
            self.end_event.synchronize()
            self.ms = self.start_event.elapsed_time(self.end_event)
        else:
            self.ms = (time.perf_counter() - self.start) * 1e3


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "bad_alloc" in text


class FatalDeviceError(RuntimeError):
    """The CUDA context is unusable after an error; later cases cannot run in this process."""


def device_is_dead(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:
        return True
    return False


def unavailable_reason(case: Case, device: torch.device) -> str | None:
    """Why ``case`` cannot run here, or None."""
    dtype = DTYPES[case.dtype]
    if case.is_selhn_ext:
        import selhn_ext

        probe = torch.zeros(2, 1, dtype=dtype, device=device)
        reason = selhn_ext.backend_status(probe, probe, mode=case.mode)[case.backend]
        return None if reason is None else f"backend {case.backend!r}: {reason}"
    if case.backend in ("authors", "authors_compiled", "keops") and case.mode != "selhn":
        return f"{case.backend} computes mode 'selhn' only"
    if case.backend == "pml":
        if case.mode != "hardest":
            return "pml's TripletMarginLoss + BatchHardMiner is mode 'hardest'"
        try:
            import pytorch_metric_learning  # noqa: F401
        except Exception as error:
            return f"pytorch-metric-learning is not usable: {type(error).__name__}: {error}"
    if case.backend == "keops":
        from baselines import keops_unavailable_reason

        return keops_unavailable_reason(device)
    return None


def loss_function(case: Case, img: torch.Tensor, txt: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A callable ``fn(stats=None) -> loss`` for the case; ``stats`` gets gated_fraction."""
    import baselines

    if case.is_selhn_ext:
        import selhn_ext

        def fused(stats: dict | None = None) -> torch.Tensor:
            want_stats = case.stats or stats is not None
            out = selhn_ext.selhn_loss(
                img,
                txt,
                mode=case.mode,
                backend=case.backend,
                deterministic=case.deterministic,
                return_stats=want_stats,
            )
            if not want_stats:
                return out
            loss, selhn_stats = out
            if stats is not None:
                stats["gated_fraction"] = selhn_stats.gated.float().mean().item()
            return loss

        return fused
    if case.backend == "authors":
        return lambda stats=None: baselines.authors_selhn_loss(img, txt, stats=stats)
    if case.backend == "authors_compiled":
        compiled = baselines.compiled_authors_loss()
        return lambda stats=None: compiled(img, txt)
    if case.backend == "pml":
        pml = baselines.PMLHardestLoss()

        def hardest(stats: dict | None = None) -> torch.Tensor:
            if stats is not None:
                stats["gated_fraction"] = 0.0  # mode hardest gates no anchor
            return pml(img, txt)

        return hardest
    if case.backend == "keops":
        return lambda stats=None: baselines.keops_selhn_loss(img, txt, stats=stats)
    if case.backend == "torch_mm":
        return lambda stats=None: baselines.matmul_floor(img, txt)
    raise ValueError(f"unknown backend {case.backend!r}; expected one of {BACKEND_NAMES}")


def _clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def _one_pass(
    pass_name: str,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
    memory,
) -> tuple[float, int]:
    """(median ms, peak extra bytes) of ``pass_name`` over adaptive repetitions."""
    timer_device = settings.device
    times: list[float] = []
    peak = 0
    started = time.perf_counter()
    grad_enabled = pass_name != "forward" or inputs[0].requires_grad
    while len(times) < settings.min_reps or (
        time.perf_counter() - started < settings.min_time_s and len(times) < settings.max_reps
    ):
        _clear_grads(*inputs)
        with torch.set_grad_enabled(grad_enabled):
            if pass_name == "backward":
                loss = fn()
                memory.reset_peak()
                with Timer(timer_device) as timer:
                    loss.backward()
            else:
                memory.reset_peak()
                with Timer(timer_device) as timer:
                    loss = fn()
                    if pass_name == "forward_backward":
                        loss.backward()
        peak = max(peak, memory.peak_extra())
        times.append(timer.ms)
        del loss
    _clear_grads(*inputs)
    return statistics.median(times), peak


def result(pass_name: str, status: str, **fields) -> dict:
    return {"pass": pass_name, "status": status, **fields}


def run_case(case: Case, settings: Settings, memory=None, before_measure=None) -> list[dict]:
    """Measure ``case`` in this process: one result dict per pass.

    ``before_measure`` runs once the inputs exist (the CPU child sets its memory limit
    there). Raises FatalDeviceError when the GPU context died.
    """
    device = settings.device
    reason = unavailable_reason(case, device)
    if reason is not None:
        return [result(p, "skipped", reason=reason) for p in case.passes]
    if memory is None:
        memory = CudaMemory(device) if device.type == "cuda" else CpuMemory()
    gated_fraction = None
    try:
        img, txt = common.make_inputs(
            case.batch,
            case.dim,
            DTYPES[case.dtype],
            case.gate_mix or "half",
            device,
            seed=settings.seed,
        )
        if case.backend != "torch_mm":
            img.requires_grad_(True)
            txt.requires_grad_(True)
        if before_measure is not None:
            before_measure()
        fn = loss_function(case, img, txt)
        # Warm-up: compiles, autotunes and loads what the first call needs; also reads the
        # fraction of anchors actually gated for these inputs.
        for step in range(settings.warmup):
            stats: dict | None = {} if step == 0 else None
            with torch.set_grad_enabled(case.backend != "torch_mm"):
                loss = fn(stats) if stats is not None else fn()
                if case.backend != "torch_mm":
                    loss.backward()
            if stats:
                gated_fraction = stats.get("gated_fraction")
            del loss
        _clear_grads(img, txt)
        gc.collect()
        memory.set_base()
    except Exception as error:
        return _failed_results(case, error, device)

    results = []
    for pass_name in case.passes:
        try:
            median_ms, peak = _one_pass(pass_name, fn, (img, txt), settings, memory)
        except Exception as error:
            one_pass = dataclasses.replace(case, passes=(pass_name,))
            results.extend(_failed_results(one_pass, error, device))
            if results[-1]["status"] == "error" and device_is_dead(device):
                raise FatalDeviceError(results[-1]["reason"]) from error
            continue
        results.append(
            result(
                pass_name,
                "ok",
                median_ms=median_ms,
                peak_extra_bytes=peak,
                gated_fraction=gated_fraction,
            )
        )
    return results


def _failed_results(case: Case, error: BaseException, device: torch.device) -> list[dict]:
    status = "oom" if is_out_of_memory(error) else "error"
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    if device.type == "cuda" and status == "oom":
        torch.cuda.empty_cache()
    if status == "error" and device_is_dead(device):
        raise FatalDeviceError(reason) from error
    return [result(p, status, reason=reason[:500]) for p in case.passes]


# --------------------------------------------------------------------------------------
# A case in a fresh child process (CPU)
# --------------------------------------------------------------------------------------


def _child_main(spec: str) -> None:
    """Run one case, print its results as the last stdout line (``RESULT <json>``)."""
    payload = json.loads(spec)
    case = Case(**{**payload["case"], "passes": tuple(payload["case"]["passes"])})
    settings = Settings(device=torch.device("cpu"), **payload["settings"])
    limit_bytes = int(payload["mem_limit_gib"] * 2**30)

    def limit_address_space() -> None:
        # Start OpenMP's threads first: failing to create them under the limit aborts.
        torch.ones(1 << 16).sum()
        torch.ones(64, 64) @ torch.ones(64, 64)
        current = CpuMemory._status("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (current + limit_bytes, current + limit_bytes))

    results = run_case(case, settings, CpuMemory(), before_measure=limit_address_space)
    print("RESULT " + json.dumps(results), flush=True)


def run_case_in_child(
    case: Case, settings: Settings, mem_limit_gib: float, timeout_s: float, log
) -> list[dict]:
    payload = {
        "case": dataclasses.asdict(case),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "device"},
        "mem_limit_gib": mem_limit_gib,
    }
    env = dict(os.environ)
    # Freed large buffers go back to the OS at once, so RSS tracks live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=max(timeout_s, 1), env=env
        )
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout_s:.0f} s"
        return [result(p, "error", reason=reason) for p in case.passes]
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    # Killed by a signal without a result: SIGKILL is the kernel's OOM killer.
    status = "oom" if done.returncode == -9 else "error"
    reason = f"child exited with {done.returncode}: " + " | ".join(tail)
    log(f"child stderr for {case.key()}:\n{done.stderr[-4000:]}")
    return [result(p, status, reason=reason[:500]) for p in case.passes]


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------


def _cases(backends, sizes, dims, dtypes, **options) -> list[Case]:
    return [
        Case(backend, batch, dim, dtype, **options)
        for dtype in dtypes
        for dim in dims
        for batch in sizes
        for backend in backends
    ]


def plan_cpu_default(keops_max_b: int) -> list[Case]:
    """A few minutes on 2 cores; includes the two CPU headline rows."""
    fwd_bwd = ("forward_backward",)
    sweep = [512, 1024, 2048, 4096]
    plan = _cases(("cpu", "chunked", "authors"), sweep, [512], ["fp32"])
    plan += _cases(("keops",), [b for b in sweep if b <= keops_max_b], [512], ["fp32"])
    plan += _cases(("cpu", "pml"), [1024, 4096], [512], ["fp32"], mode="hardest")
    # Headline 1: B = 4096, D = 512, fp32, forward+backward, three gate mixes and options.
    for mix in ("none", "all"):
        plan += _cases(
            ("cpu", "chunked", "authors"), [4096], [512], ["fp32"], gate_mix=mix, passes=fwd_bwd
        )
    plan += _cases(("authors_compiled",), [4096], [512], ["fp32"], passes=fwd_bwd)
    plan += _cases(("cpu",), [4096], [512], ["fp32"], deterministic=True, passes=fwd_bwd)
    plan += _cases(("cpu",), [4096], [512], ["fp32"], stats=True, passes=fwd_bwd)
    # Other dims and bf16, smaller.
    plan += _cases(("cpu", "authors"), [2048], [256, 1024], ["fp32"], passes=fwd_bwd)
    plan += _cases(("cpu", "chunked", "authors"), [1024], [512], ["bf16"], passes=fwd_bwd)
    plan += _cases(("cpu", "authors"), [1024], [512], ["fp16"], passes=fwd_bwd)
    # Headline 2: B = 32768, D = 256: the fused loss stays small, the authors' cannot fit.
    plan += _cases(("cpu", "authors"), [32768], [256], ["fp32"], gate_mix="none", passes=fwd_bwd)
    return plan


def plan_gpu_headline(batch=16384, dim=1024, dtype="bf16") -> list[Case]:
    plan = []
    for mix in ("none", "half", "all"):
        plan += _cases(
            ("triton", "cuda", "authors", "chunked", "authors_compiled"),
            [batch],
            [dim],
            [dtype],
            gate_mix=mix,
        )
    plan += _cases(
        ("triton", "cuda"),
        [batch],
        [dim],
        [dtype],
        deterministic=True,
        passes=("forward_backward",),
    )
    plan += _cases(
        ("triton", "cuda"), [batch], [dim], [dtype], stats=True, passes=("forward_backward",)
    )
    return plan


def plan_gpu_sweep(sizes, dims, dtypes=("bf16", "fp32")) -> list[Case]:
    plan = []
    for dtype in dtypes:
        plan += _cases(
            ("triton", "cuda", "chunked", "authors"),
            sizes,
            dims,
            [dtype],
            passes=("forward", "forward_backward"),
        )
    return plan


PRESETS: dict[str, Callable[[argparse.Namespace], list[Case]]] = {
    "cpu": lambda a: plan_cpu_default(a.keops_max_b),
    "gpu-headline": lambda a: plan_gpu_headline(),
    "gpu-sweep": lambda a: plan_gpu_sweep([4096 * 2**k for k in range(7)], [256, 1024]),
    # --dry-run of bench/gpu_check.sh: the same stages on CPU at tiny sizes.
    "dry-run-headline": lambda a: plan_gpu_headline(batch=64, dim=32),
    "dry-run-sweep": lambda a: plan_gpu_sweep([32, 64], [16, 32]),
}


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


# --------------------------------------------------------------------------------------
# The run: plan -> results -> CSV rows
# --------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named plan")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    grid = parser.add_argument_group("a custom plan (used when --backends is given)")
    grid.add_argument("--backends", help=f"comma list of {', '.join(BACKEND_NAMES)}")
    grid.add_argument("--sizes", default="1024", help="batch sizes B, comma list")
    grid.add_argument("--dims", default="512", help="embedding sizes D, comma list")
    grid.add_argument("--dtypes", default="fp32", help=f"comma list of {', '.join(DTYPES)}")
    grid.add_argument("--modes", default="selhn", help="loss modes, comma list")
    grid.add_argument("--gate-mixes", default="half", help=f"of {', '.join(GATE_MIXES)}")
    grid.add_argument("--passes", default=",".join(PASSES), help="comma list of passes")
    grid.add_argument("--deterministic", choices=("off", "on", "both"), default="off")
    grid.add_argument(
        "--stats-row",
        action="store_true",
        help="also time the fused backends with return_stats=True",
    )
    parser.add_argument("--csv", type=Path, help="default: bench/results/<cpu|gpu>.csv")
    parser.add_argument("--log", type=Path, help="default: the CSV's path with .log")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="one fresh child process per case (default on CPU)",
    )
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument(
        "--mem-limit-gib",
        type=float,
        default=20.0,
        help="RLIMIT_AS of a CPU child, over its size once imports are done",
    )
    parser.add_argument("--min-time", type=float, help="seconds of repetitions per pass")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 2 GPU)")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per child")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole run")
    parser.add_argument("--deadline", type=float, help="stop by this Unix time")
    parser.add_argument(
        "--keops-max-b",
        type=int,
        default=512,
        help="largest B for keops on CPU (it has no BLAS there)",
    )
    parser.add_argument("--exclude", default="", help="backends to leave out, comma list")
    parser.add_argument(
        "--progress", type=Path, help="JSON lines of finished cases; a rerun skips them"
    )
    parser.add_argument(
        "--fatal-file",
        type=Path,
        help=f"on a dead GPU context, write the backend here, exit {EXIT_FATAL_DEVICE_ERROR}",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace, device: torch.device) -> list[Case]:
    if args.backends:
        unknown = set(_split(args.backends)) - set(BACKEND_NAMES)
        if unknown:
            raise SystemExit(f"unknown backends {sorted(unknown)}; expected {BACKEND_NAMES}")
        passes = tuple(_split(args.passes))
        if set(passes) - set(PASSES):
            raise SystemExit(f"unknown passes {passes}; expected {PASSES}")
        for mix in _split(args.gate_mixes):
            if mix not in GATE_MIXES:
                raise SystemExit(f"unknown gate mix {mix!r}; expected {list(GATE_MIXES)}")
        for dtype in _split(args.dtypes):
            if dtype not in DTYPES:
                raise SystemExit(f"unknown dtype {dtype!r}; expected {list(DTYPES)}")
        dets = {"off": [False], "on": [True], "both": [False, True]}[args.deterministic]
        plan = []
        for mode in _split(args.modes):
            for mix in _split(args.gate_mixes):
                for det in dets:
                    plan += _cases(
                        _split(args.backends),
                        [int(b) for b in _split(args.sizes)],
                        [int(d) for d in _split(args.dims)],
                        _split(args.dtypes),
                        mode=mode,
                        gate_mix=mix,
                        deterministic=det,
                        passes=passes,
                    )
                if args.stats_row:
                    fused = [b for b in _split(args.backends) if b in FUSED_BACKENDS]
                    plan += _cases(
                        fused,
                        [int(b) for b in _split(args.sizes)],
                        [int(d) for d in _split(args.dims)],
                        _split(args.dtypes),
                        mode=mode,
                        gate_mix=mix,
                        stats=True,
                        passes=passes,
                    )
        # Baselines have no deterministic switch: keep one of each.
        plan = [c for c in plan if c.is_selhn_ext or not c.deterministic]
    else:
        preset = args.preset or ("gpu-headline" if device.type == "cuda" else "cpu")
        plan = PRESETS[preset](args)
    excluded = set(_split(args.exclude))
    return with_floors([c for c in plan if c.backend not in excluded])


def _fmt(value, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


class Run:
    """Writes rows and remembers floors, per-backend costs and failures as it goes."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.device = device
        kind = common.device_kind(device)
        self.csv_path = args.csv or common.RESULTS_DIR / f"{kind}.csv"
        self.log_path = args.log or self.csv_path.with_suffix(".log")
        self.handle, self.writer = common.open_csv(self.csv_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_handle = open(self.log_path, "a")
        self.fixed = {
            "commit": common.git_commit(),
            "device": common.device_name(device),
            "torch": torch.__version__,
            "triton": common.triton_version(),
        }
        self.floors: dict[tuple, float] = {}
        # (backend, D, dtype, mode) -> (B, wall seconds) of the last case, to predict cost.
        self.costs: dict[tuple, tuple[int, float]] = {}
        self.oom_at: dict[tuple, int] = {}
        self.progress_path = args.progress
        self.done: set[str] = set()
        if self.progress_path is not None and self.progress_path.exists():
            for line in self.progress_path.read_text().splitlines():
                entry = json.loads(line)
                self.done.add(entry["key"])
                if entry.get("floor_ms") is not None:
                    self.floors[tuple(entry["shape"])] = entry["floor_ms"]

    def log(self, message: str) -> None:
        print(message, flush=True)
        self.log_handle.write(f"{common.utc_now()} {message}\n")
        self.log_handle.flush()

    def write(self, case: Case, results: list[dict]) -> None:
        for res in results:
            median = res.get("median_ms")
            floor = self.floors.get(case.shape)
            ratio = median / floor if (median is not None and floor) else None
            row = {
                "date": common.utc_now(),
                **self.fixed,
                "backend": case.backend,
                "B": case.batch,
                "D": case.dim,
                "dtype": case.dtype,
                "mode": case.mode + (STATS_SUFFIX if case.stats else ""),
                "gate_mix": case.gate_mix,
                "gated_fraction": _fmt(res.get("gated_fraction"), 4),
                "deterministic": int(case.deterministic) if case.is_selhn_ext else "",
                "pass": res["pass"],
                "median_ms": _fmt(median),
                "ratio_to_mm": _fmt(ratio),
                "peak_extra_bytes": res.get("peak_extra_bytes", ""),
                "status": res["status"],
            }
            self.writer.writerow(row)
            line = f"{res['status']:7s} {case.key()} {res['pass']}"
            if median is not None:
                line += f" {median:.3f} ms x{_fmt(ratio, 3) or '?'} mm"
                line += f" {res.get('peak_extra_bytes', 0) / 2**20:.1f} MiB"
            if res.get("reason"):
                line += f" ({res['reason']})"
            self.log(line)
        self.handle.flush()

    def record_done(self, case: Case) -> None:
        if self.progress_path is None:
            return
        floor = self.floors.get(case.shape) if case.backend == "torch_mm" else None
        entry = {"key": case.key(), "shape": list(case.shape), "floor_ms": floor}
        with open(self.progress_path, "a") as progress:
            progress.write(json.dumps(entry) + "\n")


def skip_reason(run: Run, case: Case, deadline: float | None) -> str | None:
    family = (case.backend, case.dim, case.dtype, case.mode)
    if family in run.oom_at and case.batch > run.oom_at[family]:
        return f"out of memory already at B = {run.oom_at[family]}"
    if deadline is None:
        return None
    left = deadline - time.time()
    if family in run.costs:
        batch, seconds = run.costs[family]
        predicted = seconds * (case.batch / batch) ** 2
        if predicted > left:
            return f"time budget: ~{predicted:.0f} s predicted, {left:.0f} s left"
    elif left < 5:
        return f"time budget: {left:.0f} s left"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        _child_main(args.child)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = build_plan(args, device)
    isolate = args.isolate if args.isolate is not None else device.type == "cpu"
    if isolate and device.type != "cpu":
        raise SystemExit("--isolate measures peak RSS of CPU children; it is for --device cpu")
    on_gpu = device.type == "cuda"
    settings = Settings(
        device=device,
        min_time_s=args.min_time if args.min_time is not None else (0.3 if on_gpu else 0.5),
        max_reps=args.max_reps,
        warmup=args.warmup if args.warmup is not None else (2 if on_gpu else 1),
        seed=args.seed,
    )
    deadline = args.deadline
    if args.time_budget is not None:
        budget_end = time.time() + args.time_budget
        deadline = budget_end if deadline is None else min(deadline, budget_end)

    run = Run(args, device)
    run.log(
        f"run on {run.fixed['device']} ({device}), commit {run.fixed['commit']}, "
        f"torch {run.fixed['torch']}, triton {run.fixed['triton'] or '-'}: "
        f"{len(plan)} cases -> {run.csv_path}"
    )
    for case in plan:
        if case.key() in run.done:
            continue
        reason = skip_reason(run, case, deadline)
        if reason is not None:
            run.write(case, [result(p, "skipped", reason=reason) for p in case.passes])
            continue
        started = time.time()
        try:
            if isolate:
                left = args.case_timeout if deadline is None else deadline - time.time()
                results = run_case_in_child(
                    case, settings, args.mem_limit_gib, min(args.case_timeout, left), run.log
                )
            else:
                results = run_case(case, settings)
        except FatalDeviceError as error:
            run.write(case, [result(p, "error", reason=str(error)) for p in case.passes])
            if args.fatal_file is not None:
                args.fatal_file.write_text(case.backend)
            run.log(f"the GPU context died in {case.key()}; stopping this run")
            return EXIT_FATAL_DEVICE_ERROR
        family = (case.backend, case.dim, case.dtype, case.mode)
        statuses = {res["status"] for res in results}
        if "oom" in statuses:
            run.oom_at[family] = min(case.batch, run.oom_at.get(family, case.batch))
        if statuses <= {"ok"}:
            run.costs[family] = (case.batch, time.time() - started)
        if case.backend == "torch_mm" and results and results[0]["status"] == "ok":
            run.floors[case.shape] = results[0]["median_ms"]
        run.write(case, results)
        run.record_done(case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
