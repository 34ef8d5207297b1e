"""Timing one case: build its inputs, warm it up, time each pass, and classify failures.

``run_case`` measures a case in this process (the GPU path). ``run_case_in_child`` runs
it in a fresh child process (the CPU path) under ``RLIMIT_AS``, so that its peak RSS is
its own and an oversized case fails with ``oom`` instead of waking the OOM killer; the
child is this file, run as a script with the case as JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import json
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
from cases import BACKEND_NAMES, Case  # noqa: E402
from common import DTYPES  # noqa: E402
from memory import CpuMemory, is_out_of_memory, memory_probe, proc_status_bytes  # noqa: E402


@dataclass
class Settings:
    device: torch.device
    min_time_s: float
    max_reps: int
    min_reps: int = 1
    warmup: int = 1
    # Time one torch.mm of the case's shape before each repetition, as the row's own
    # ratio baseline (CPU: a shared host's speed drifts between cases; see time_pass).
    paired_mm: bool = False
    seed: int = 0
    cpu_simd_path: str = ""  # force the CPU kernels' S-tile path ("": the fastest)


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


def use_cpu_simd_path(name: str) -> None:
    """Make the CPU kernels use S-tile path ``name`` in this process ("" keeps the default)."""
    if not name:
        return
    available = common.cpu_simd_paths()
    if name not in available:
        raise ValueError(f"S-tile path {name!r} is not available here; this CPU has {available}")
    torch.ops.selhn._cpu_set_simd_path(name)


class Timer:
    """Wall time of the block in ms: CUDA events on a GPU, perf_counter on CPU."""

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


def warm_clocks(device: torch.device, seconds: float, size: int = 8192) -> int:
    """Run bf16 matmuls for ``seconds`` so the GPU reaches its working clocks before the
    first timing (a cold card times its first torch.mm slow). Returns how many ran."""
    if device.type != "cuda" or seconds <= 0:
        return 0
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(8):
            torch.mm(a, a)
        torch.cuda.synchronize(device)
        count += 8
    del a
    torch.cuda.empty_cache()
    return count


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


def time_pass(
    pass_name: str,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
    memory,
) -> tuple[float, int, float | None]:
    """(median ms, peak extra bytes, paired torch.mm median ms or None) of ``pass_name``
    over adaptive repetitions: at least ``min_reps``, then more until ``min_time_s`` has
    passed or ``max_reps`` ran.

    With ``settings.paired_mm`` each repetition is preceded by one timed
    ``torch.mm(img, txt.T)``: the pass and its baseline then see the same state of a
    shared machine, and their ratio holds when the machine's speed drifts during a run.
    """
    times: list[float] = []
    mm_times: list[float] = []
    peak = 0
    started = time.perf_counter()
    grad_enabled = pass_name != "forward" or inputs[0].requires_grad
    img, txt = (x.detach() for x in inputs)
    while len(times) < settings.min_reps or (
        time.perf_counter() - started < settings.min_time_s and len(times) < settings.max_reps
    ):
        _clear_grads(*inputs)
        if settings.paired_mm:
            with Timer(settings.device) as timer:
                product = torch.mm(img, txt.T)
            mm_times.append(timer.ms)
            del product
        with torch.set_grad_enabled(grad_enabled):
            if pass_name == "backward":
                loss = fn()
                memory.reset_peak()
                with Timer(settings.device) as timer:
                    loss.backward()
            else:
                memory.reset_peak()
                with Timer(settings.device) as timer:
                    loss = fn()
                    if pass_name == "forward_backward":
                        loss.backward()
        peak = max(peak, memory.peak_extra())
        times.append(timer.ms)
        del loss
    _clear_grads(*inputs)
    paired = statistics.median(mm_times) if mm_times else None
    return statistics.median(times), peak, paired


def result(pass_name: str, status: str, **fields) -> dict:
    return {"pass": pass_name, "status": status, **fields}


def _prepare(case: Case, settings: Settings, before_measure) -> tuple:
    """Inputs, the loss callable and the realised gated fraction, after the warm-up."""
    img, txt = common.make_inputs(
        case.batch,
        case.dim,
        DTYPES[case.dtype],
        case.gate_mix or "half",
        settings.device,
        seed=settings.seed,
    )
    img.requires_grad_(case.needs_grad)
    txt.requires_grad_(case.needs_grad)
    if before_measure is not None:
        before_measure()
    fn = loss_function(case, img, txt)
    # Warm-up: compiles, autotunes and loads what the first call needs; also reads the
    # fraction of anchors actually gated for these inputs.
    gated_fraction = None
    for step in range(settings.warmup):
        stats: dict = {}
        with torch.set_grad_enabled(case.needs_grad):
            loss = fn(stats) if step == 0 else fn()
            if case.needs_grad:
                loss.backward()
        gated_fraction = stats.get("gated_fraction", gated_fraction)
        del loss
    _clear_grads(img, txt)
    gc.collect()
    return img, txt, fn, gated_fraction


def run_case(case: Case, settings: Settings, memory=None, before_measure=None) -> list[dict]:
    """Measure ``case`` in this process: one result dict per pass.

    ``before_measure`` runs once the inputs exist (the CPU child sets its memory limit
    there). Raises FatalDeviceError when the GPU context died.
    """
    device = settings.device
    reason = unavailable_reason(case, device)
    if reason is not None:
        return [result(p, "skipped", reason=reason) for p in case.passes]
    memory = memory or memory_probe(device)
    if case.backend == "torch_mm":  # the baseline itself: nothing to pair it with
        settings = dataclasses.replace(settings, paired_mm=False)
    try:
        img, txt, fn, gated_fraction = _prepare(case, settings, before_measure)
        if settings.paired_mm:  # warm it, and count its lasting buffers in the base
            torch.mm(img.detach(), txt.detach().T)
        memory.set_base()
    except Exception as error:
        return failed_results(case, error, device)

    results = []
    for pass_name in case.passes:
        try:
            median_ms, peak, mm_ms = time_pass(pass_name, fn, (img, txt), settings, memory)
        except Exception as error:
            results.extend(
                failed_results(dataclasses.replace(case, passes=(pass_name,)), error, device)
            )
            continue
        results.append(
            result(
                pass_name,
                "ok",
                median_ms=median_ms,
                mm_ms=mm_ms,
                peak_extra_bytes=peak,
                gated_fraction=gated_fraction,
            )
        )
    return results


def failed_results(case: Case, error: BaseException, device: torch.device) -> list[dict]:
    """``oom`` or ``error`` rows for the case's passes; raises FatalDeviceError instead if
    the error left the GPU context unusable."""
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


def child_main(spec: str) -> None:
    """Run one case, print its results as the last stdout line (``RESULT <json>``)."""
    payload = json.loads(spec)
    case = Case(**{**payload["case"], "passes": tuple(payload["case"]["passes"])})
    settings = Settings(device=torch.device("cpu"), **payload["settings"])
    limit_bytes = int(payload["mem_limit_gib"] * 2**30)
    use_cpu_simd_path(settings.cpu_simd_path)

    def limit_address_space() -> None:
        # Start OpenMP's threads first: failing to create them under the limit aborts.
        torch.ones(1 << 16).sum()
        torch.ones(64, 64) @ torch.ones(64, 64)
        current = proc_status_bytes("VmSize")
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
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(payload)]
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


if __name__ == "__main__":
    child_main(sys.argv[1])
