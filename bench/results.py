"""Where a run's results go: CSV rows, a log, and an optional progress file.

Rows follow ``common.CSV_COLUMNS``; each row's ``ratio_to_mm`` divides its time by its
``mm_ms``: the torch.mm timed beside the pass (CPU), else the latest ``torch_mm`` time of
its shape in this run. The log (``<csv>.log`` unless given)
holds one line per row, with the reason for every skip or failure, and anything else the
run reports. The progress file (JSON lines) lets a rerun skip the cases already done.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from cases import Case  # noqa: E402


def format_number(value, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def default_csv_path(device: torch.device, update_committed: bool, out_dir: Path | None) -> Path:
    """``<folder>/<cpu|gpu>.csv``: the committed results only when asked to update them,
    else ``out_dir`` or the ignored ``bench/out``."""
    if update_committed:
        folder = common.RESULTS_DIR
    else:
        folder = out_dir or common.OUT_DIR
    return folder / f"{common.device_kind(device)}.csv"


class RunRecord:
    """Writes rows, log lines and progress, and remembers each shape's torch.mm time."""

    def __init__(
        self,
        csv_path: Path,
        log_path: Path | None,
        fixed: dict[str, str],
        progress_path: Path | None = None,
    ) -> None:
        self.csv_path = csv_path
        self.log_path = log_path or csv_path.with_suffix(".log")
        self.handle, self.writer = common.open_csv(csv_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_handle = open(self.log_path, "a")
        self.fixed = fixed  # commit, device, torch, triton: the same on every row
        self.floors: dict[tuple, float] = {}
        self.progress_path = progress_path
        self.done: set[str] = set()
        if progress_path is not None and progress_path.exists():
            for line in progress_path.read_text().splitlines():
                entry = json.loads(line)
                self.done.add(entry["key"])
                if entry.get("floor_ms") is not None:
                    self.floors[tuple(entry["shape"])] = entry["floor_ms"]

    def log(self, message: str) -> None:
        print(message, flush=True)
        self.log_handle.write(f"{common.utc_now()} {message}\n")
        self.log_handle.flush()

    def row(self, case: Case, res: dict) -> dict:
        median = res.get("median_ms")
        # The pass's own paired torch.mm (CPU), else the run's torch_mm row of the shape.
        mm_ms = res.get("mm_ms") if res.get("mm_ms") is not None else self.floors.get(case.shape)
        ratio = median / mm_ms if (median is not None and mm_ms) else None
        return {
            "date": common.utc_now(),
            **self.fixed,
            "backend": case.label,
            "B": case.batch,
            "D": case.dim,
            "dtype": case.dtype,
            "mode": case.mode_label,
            "gate_mix": case.gate_mix,
            "gated_fraction": format_number(res.get("gated_fraction"), 4),
            "deterministic": int(case.deterministic) if case.is_selhn_ext else "",
            "pass": res["pass"],
            "median_ms": format_number(median),
            "mm_ms": format_number(mm_ms) if median is not None else "",
            "ratio_to_mm": format_number(ratio),
            "peak_extra_bytes": res.get("peak_extra_bytes", ""),
            "status": res["status"],
        }

    def write(self, case: Case, results: list[dict]) -> None:
        """One row and one log line per pass; a torch_mm row becomes its shape's floor."""
        if case.backend == "torch_mm" and results and results[0]["status"] == "ok":
            self.floors[case.shape] = results[0]["median_ms"]
        for res in results:
            row = self.row(case, res)
            self.writer.writerow(row)
            line = f"{res['status']:7s} {case.key()} {res['pass']}"
            if res.get("median_ms") is not None:
                line += f" {res['median_ms']:.3f} ms x{format_number(row_ratio(row), 3) or '?'} mm"
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

    def close(self) -> None:
        self.handle.close()
        self.log_handle.close()


def row_ratio(row: dict) -> float | None:
    return float(row["ratio_to_mm"]) if row["ratio_to_mm"] else None
