"""Time and peak extra memory of the SelHN loss: every backend against baselines, one run.

    python bench/run.py                        # the default CPU plan -> bench/out/cpu.csv
    python bench/run.py --update-committed     # the same, appended to bench/results/cpu.csv
    python bench/run.py --plan-only            # the plan and its memory estimate; runs nothing
    python bench/run.py --preset gpu-headline  # B = 16384, D = 1024, bf16 on a GPU
    python bench/run.py --backends cpu,authors --sizes 1024,2048 --dims 512 \\
        --dtypes fp32 --gate-mixes none,all --passes forward_backward

Each case (a backend at one shape, dtype, mode, gate mix and option set) is timed for the
passes ``forward``, ``backward`` and ``forward_backward`` and appended to
``<folder>/<cpu|gpu>.csv``: ``bench/out`` (ignored by git) unless ``--out-dir`` or
``--update-committed`` names another. ``torch_mm`` (one ``torch.mm(img, txt.T)``) is
measured first for every shape and each row carries its time as ``ratio_to_mm``. Before
the first case the run states how much memory it will need, by a model of each case.
On CPU every case runs in a fresh child process under ``RLIMIT_AS`` (see timing.py); on
a GPU the run first warms the clocks with matmuls. Why a case was skipped or failed goes
to the log next to the CSV (``<kind>.log``) and to stdout.

Modules: cases.py (cases, plans, Triton backward variants), timing.py (one case: inputs,
warm-up, timed passes, the child process), memory.py (memory probes and the estimate),
results.py (CSV rows, log, progress), common.py (CSV schema, device label, inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import common  # noqa: E402
import memory  # noqa: E402
import timing  # noqa: E402
from cases import BACKEND_NAMES, PRESETS, Case  # noqa: E402
from common import DTYPES, GATE_MIXES, PASSES  # noqa: E402
from results import RunRecord, default_csv_path  # noqa: E402

# Repetitions of each pass at least, on CPU: the median of a few, as one repetition of a
# slow case on a shared host is often an outlier.
CPU_MIN_REPS = 3
# Exit code of a run that stopped because the GPU context died (a fatal kernel error);
# the failing backend's name is written to the file given by --fatal-file.
EXIT_FATAL_DEVICE_ERROR = 3


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "--stats-row", action="store_true", help="also time the fused backends with return_stats"
    )
    out = parser.add_argument_group("where rows go")
    out.add_argument("--out-dir", type=Path, help="folder for <kind>.csv (default: bench/out)")
    out.add_argument(
        "--update-committed",
        action="store_true",
        help="append to the committed bench/results/<kind>.csv instead",
    )
    out.add_argument("--csv", type=Path, help="this CSV file instead of <folder>/<kind>.csv")
    out.add_argument("--log", type=Path, help="default: the CSV's path with .log")
    out.add_argument("--progress", type=Path, help="JSON lines of finished cases; reruns skip them")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and exit")
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
        help="RLIMIT_AS of a CPU child, over its size once its inputs exist",
    )
    parser.add_argument(
        "--cpu-simd-path", default="", help="force the CPU kernels' S-tile path (avx2, ...)"
    )
    parser.add_argument(
        "--triton-backward",
        default="",
        help=f"the Triton backward variant (sets {cases.TRITON_BACKWARD_ENV}; rows read "
        "triton:<variant>)",
    )
    parser.add_argument("--min-time", type=float, help="seconds of repetitions per pass")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument(
        "--min-reps", type=int, help=f"repetitions at least (default {CPU_MIN_REPS} CPU, 1 GPU)"
    )
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 2 GPU)")
    parser.add_argument(
        "--warm-clocks", type=float, default=3.0, help="seconds of matmuls first (GPU only)"
    )
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per child")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole run")
    parser.add_argument("--deadline", type=float, help="stop by this Unix time")
    parser.add_argument(
        "--keops-max-b", type=int, default=512, help="largest B for keops on CPU (no BLAS there)"
    )
    parser.add_argument("--exclude", default="", help="backends to leave out, comma list")
    parser.add_argument(
        "--fatal-file",
        type=Path,
        help=f"on a dead GPU context, write the backend here, exit {EXIT_FATAL_DEVICE_ERROR}",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace, device: torch.device) -> list[Case]:
    if args.backends:
        dets = {"off": [False], "on": [True], "both": [False, True]}[args.deterministic]
        try:
            plan = cases.custom_plan(
                _split(args.backends),
                [int(b) for b in _split(args.sizes)],
                [int(d) for d in _split(args.dims)],
                _split(args.dtypes),
                _split(args.modes),
                _split(args.gate_mixes),
                tuple(_split(args.passes)),
                dets,
                stats_row=args.stats_row,
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
    else:
        preset = args.preset or ("gpu-headline" if device.type == "cuda" else "cpu")
        plan = PRESETS[preset](args.keops_max_b)
    if args.triton_backward:
        plan = cases.with_variant(plan, args.triton_backward)
    excluded = set(_split(args.exclude))
    return cases.with_floors([c for c in plan if c.backend not in excluded])


def choose_triton_backward(variant: str) -> None:
    """Select the Triton backward variant for this process and its children; must run
    before selhn_ext is imported (the backend reads it once)."""
    if not variant:
        return
    env = cases.TRITON_BACKWARD_ENV
    if os.environ.get(env, variant) != variant:
        raise SystemExit(f"--triton-backward {variant} contradicts {env}={os.environ[env]}")
    os.environ[env] = variant
    offered = cases.triton_backward_variants()
    if variant not in offered:
        raise SystemExit(f"the Triton backend offers backward variants {offered}, not {variant!r}")


def memory_statement(plan: list[Case], device: torch.device, isolate: bool, args) -> str:
    """The estimate of what the plan needs at once, and a warning if that is not free."""
    free = memory.available_bytes(device)
    if device.type == "cuda":
        # A case over the free device memory fails alone with oom; the run goes on.
        need = memory.plan_memory(plan, base_bytes=0, limit_bytes=free)
        return need.describe("GPU memory (the limit: what is free now)")
    import selhn_ext  # noqa: F401  (a child loads it too: count it in the base)

    own = memory.proc_status_bytes("VmRSS")
    limit = int(args.mem_limit_gib * memory.GIB) if isolate else None
    need = memory.plan_memory(
        plan, own, limit, parent_bytes=own if isolate else 0, paired_mm=_paired_mm(device)
    )
    text = need.describe("RAM")
    if free is not None and need.peak_bytes > free:
        text += (
            f". WARNING: only {free / memory.GIB:.1f} GiB is free now; lower --mem-limit-gib "
            "or --exclude the largest backends"
        )
    return text


class Budget:
    """Skips what cannot fit: a larger B of a family that ran out of memory, and cases
    whose predicted time (quadratic in B from the family's last case) passes the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.costs: dict[tuple, tuple[int, float]] = {}  # family -> (B, wall seconds)
        self.oom_at: dict[tuple, int] = {}

    @staticmethod
    def family(case: Case) -> tuple:
        return (case.label, case.dim, case.dtype, case.mode)

    def skip_reason(self, case: Case) -> str | None:
        family = self.family(case)
        if family in self.oom_at and case.batch > self.oom_at[family]:
            return f"out of memory already at B = {self.oom_at[family]}"
        if self.deadline is None:
            return None
        left = self.deadline - time.time()
        if family in self.costs:
            batch, seconds = self.costs[family]
            predicted = seconds * (case.batch / batch) ** 2
            if predicted > left:
                return f"time budget: ~{predicted:.0f} s predicted, {left:.0f} s left"
        elif left < 5:
            return f"time budget: {left:.0f} s left"
        return None

    def record(self, case: Case, results: list[dict], seconds: float) -> None:
        statuses = {res["status"] for res in results}
        family = self.family(case)
        if "oom" in statuses:
            self.oom_at[family] = min(case.batch, self.oom_at.get(family, case.batch))
        if statuses <= {"ok"}:
            self.costs[family] = (case.batch, seconds)

    def seconds_left(self, default: float) -> float:
        return default if self.deadline is None else min(default, self.deadline - time.time())


def _paired_mm(device: torch.device) -> bool:
    """On CPU every case times its own torch.mm baseline between its repetitions (the
    speed of a shared host drifts between cases); a GPU's is stable within a run."""
    return device.type == "cpu"


def _settings(args, device: torch.device) -> timing.Settings:
    on_gpu = device.type == "cuda"
    return timing.Settings(
        device=device,
        min_time_s=args.min_time if args.min_time is not None else (0.3 if on_gpu else 0.5),
        max_reps=args.max_reps,
        min_reps=args.min_reps if args.min_reps is not None else (1 if on_gpu else CPU_MIN_REPS),
        paired_mm=_paired_mm(device),
        warmup=args.warmup if args.warmup is not None else (2 if on_gpu else 1),
        seed=args.seed,
        cpu_simd_path=args.cpu_simd_path,
    )


def _deadline(args) -> float | None:
    deadline = args.deadline
    if args.time_budget is not None:
        budget_end = time.time() + args.time_budget
        deadline = budget_end if deadline is None else min(deadline, budget_end)
    return deadline


def main(argv=None) -> int:
    args = parse_args(argv)
    choose_triton_backward(args.triton_backward)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = build_plan(args, device)
    isolate = args.isolate if args.isolate is not None else device.type == "cpu"
    if isolate and device.type != "cpu":
        raise SystemExit("--isolate measures peak RSS of CPU children; it is for --device cpu")
    settings = _settings(args, device)
    try:
        timing.use_cpu_simd_path(args.cpu_simd_path)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    statement = memory_statement(plan, device, isolate, args)
    if args.plan_only:
        print("\n".join(case.key() for case in plan))
        print(f"{len(plan)} cases; {statement}")
        return 0

    csv_path = args.csv or default_csv_path(device, args.update_committed, args.out_dir)
    fixed = {
        "commit": common.git_commit(),
        "device": common.device_name(device, args.cpu_simd_path or None),
        "torch": torch.__version__,
        "triton": common.triton_version(),
    }
    record = RunRecord(csv_path, args.log, fixed, args.progress)
    record.log(
        f"run on {fixed['device']} ({device}), commit {fixed['commit']}, torch {fixed['torch']}, "
        f"triton {fixed['triton'] or '-'}: {len(plan)} cases -> {record.csv_path}"
    )
    record.log(statement)
    warmed = timing.warm_clocks(device, args.warm_clocks)
    if warmed:
        record.log(f"warmed the GPU clocks with {warmed} bf16 matmuls in {args.warm_clocks:g} s")
    budget = Budget(_deadline(args))
    for case in plan:
        if case.key() in record.done:
            continue
        reason = budget.skip_reason(case)
        if reason is not None:
            record.write(case, [timing.result(p, "skipped", reason=reason) for p in case.passes])
            continue
        started = time.time()
        try:
            if isolate:
                timeout = budget.seconds_left(args.case_timeout)
                results = timing.run_case_in_child(
                    case, settings, args.mem_limit_gib, timeout, record.log
                )
            else:
                results = timing.run_case(case, settings)
        except timing.FatalDeviceError as error:
            record.write(case, [timing.result(p, "error", reason=str(error)) for p in case.passes])
            if args.fatal_file is not None:
                args.fatal_file.write_text(case.backend)
            record.log(f"the GPU context died in {case.key()}; stopping this run")
            return EXIT_FATAL_DEVICE_ERROR
        budget.record(case, results, time.time() - started)
        record.write(case, results)
        record.record_done(case)
    record.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
