"""What a run writes besides checkpoints: ``steps.csv``, ``metrics.csv``, TensorBoard
events, ``curves.png``, and the line printed after each epoch."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, write_error
from .config import TrainConfig
from .progress import Progress

STEP_COLUMNS = (
    "step", "epoch", "mode", "loss", "lr", "gated_r", "gated_c", "near_tie_r", "near_tie_c",
    "grad_norm_image", "grad_norm_text",
)  # fmt: skip
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
METRICS_COLUMNS = (
    "epoch", "step", "mode", "lr", "train_loss", "gated_r", "gated_c", "near_tie_r",
    "near_tie_c", *METRIC_KEYS, "rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
    "seconds",
)  # fmt: skip


class CsvLog:
    """Appends rows to a CSV file, flushed per row; on resume, rows past the checkpoint
    (written after it, before a crash) are dropped first. The file starts as the header
    and the kept rows, written atomically; a failing write names the file."""

    def __init__(self, path: Path, columns: tuple[str, ...], *, keep: Callable | None) -> None:
        self.path = path
        self.columns = columns
        kept: list[dict[str, str]] = []
        if keep is not None and path.is_file():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if keep(row)]
        start = io.StringIO()
        writer = csv.DictWriter(start, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(path, start.getvalue().encode("utf-8"))
        try:
            self.handle = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
        except OSError as error:
            raise write_error(path, error) from None
        self.writer = csv.DictWriter(self.handle, fieldnames=columns)

    def write(self, row: Mapping[str, Any]) -> None:
        try:
            self.writer.writerow({key: _format_cell(row[key]) for key in self.columns})
            self.handle.flush()
        except OSError as error:
            raise write_error(self.path, error) from None

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass  # a failed flush was already reported by write()


def _format_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tensorboard_writer(out_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def plot_curves(out_dir: str | os.PathLike) -> Path | None:
    """Draw ``curves.png`` from ``steps.csv`` and ``metrics.csv``; None without matplotlib.

    The title names the run (its folder), its loss mode(s) and best dev rsum. Panels: loss,
    dev rsum, the gated and near-tie fractions (one panel when they are the same series,
    as in mode selhn, where the gate is the near-tie test), gradient norms.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: curves.png not drawn", file=sys.stderr)
        return None
    out_dir = Path(out_dir)
    steps = read_csv(out_dir / "steps.csv")
    metrics = read_csv(out_dir / "metrics.csv") if (out_dir / "metrics.csv").is_file() else []

    def column(rows: list[dict[str, str]], name: str) -> list[float]:
        return [float(row[name]) for row in rows]

    x = column(steps, "step")
    fractions = _fraction_panels(steps)
    panels = 3 + len(fractions)
    figure, axes = plt.subplots(panels, 1, figsize=(8, 2.8 * panels), sharex=True)
    title = _curves_title(out_dir, steps, metrics)
    figure.suptitle(title, fontsize=10)
    axes[0].plot(x, column(steps, "loss"), lw=0.8)
    axes[0].set_ylabel("loss")
    if metrics:
        axes[1].plot(column(metrics, "step"), column(metrics, "rsum"), marker="o")
    axes[1].set_ylabel("dev rsum")
    for axis, (name, label) in zip(axes[2:], fractions, strict=False):
        axis.plot(x, column(steps, f"{name}_r"), lw=0.8, label="image anchors (r)")
        axis.plot(x, column(steps, f"{name}_c"), lw=0.8, label="caption anchors (c)")
        axis.set_ylabel(label)
        axis.legend(loc="upper right")
    axes[-1].plot(x, column(steps, "grad_norm_image"), lw=0.8, label="image encoder")
    axes[-1].plot(x, column(steps, "grad_norm_text"), lw=0.8, label="text encoder")
    axes[-1].set_ylabel("gradient norm")
    axes[-1].legend(loc="upper right")
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    path = out_dir / "curves.png"
    image = io.BytesIO()
    labels = [axis.get_ylabel().replace("\n", " ") for axis in axes]
    # The title and the panels also go into the PNG's text chunks (readable without eyes).
    metadata = {"Title": title, "Description": "panels: " + "; ".join(labels)}
    figure.savefig(image, dpi=80, format="png", metadata=metadata)
    plt.close(figure)
    atomic_write_bytes(path, image.getbuffer())
    return path


def _fraction_panels(steps: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The gated and near-tie panels to draw: one when the two series are the same."""
    same = all(
        row["gated_r"] == row["near_tie_r"] and row["gated_c"] == row["near_tie_c"] for row in steps
    )
    if same:
        return [("gated", "gated = near-tie\nfraction")]
    never_gated = all(float(row["gated_r"]) == 0 == float(row["gated_c"]) for row in steps)
    if never_gated:
        return [("near_tie", "near-tie fraction\n(none gated)")]
    return [("gated", "gated fraction"), ("near_tie", "near-tie fraction")]


def _curves_title(out_dir: Path, steps: list[dict[str, str]], metrics: list) -> str:
    modes = list(dict.fromkeys(row["mode"] for row in steps))
    title = f"run {out_dir}: loss mode {' then '.join(modes) or '-'}, {len(steps)} steps"
    if metrics:
        best = max(metrics, key=lambda row: float(row["rsum"]))
        title += f", best dev rsum {float(best['rsum']):.2f} at epoch {best['epoch']}"
    return title


def format_epoch_line(epoch: int, metrics: Mapping[str, float], gated: tuple[float, float]) -> str:
    """The line printed after each epoch (its layout is part of the command-line contract)."""
    i2t = " ".join(f"{metrics[k]:.2f}" for k in METRIC_KEYS[:3])
    t2i = " ".join(f"{metrics[k]:.2f}" for k in METRIC_KEYS[3:])
    return (
        f"epoch {epoch}  dev rsum {metrics['rsum']:.2f}  i2t {i2t}  t2i {t2i}  "
        f"gated r/c {gated[0]:.3f}/{gated[1]:.3f}"
    )


class RunLogs:
    """``steps.csv``, ``metrics.csv`` and TensorBoard of one run; on resume, rows written
    after the checkpoint (before a crash) are dropped first."""

    def __init__(self, out_dir: Path, config: TrainConfig, resumed: Progress | None) -> None:
        keep_steps = keep_epochs = None
        if resumed is not None:
            step, epoch = resumed.step, resumed.epoch
            keep_steps = lambda row: int(row["step"]) <= step  # noqa: E731
            keep_epochs = lambda row: int(row["epoch"]) <= epoch  # noqa: E731
        self.steps = CsvLog(out_dir / "steps.csv", STEP_COLUMNS, keep=keep_steps)
        self.metrics = CsvLog(out_dir / "metrics.csv", METRICS_COLUMNS, keep=keep_epochs)
        self.tensorboard = tensorboard_writer(out_dir, config.tensorboard)

    def write_step(self, row: Mapping[str, Any], step: int) -> None:
        self.steps.write(row)
        if self.tensorboard is not None:
            for key in STEP_COLUMNS[3:]:
                self.tensorboard.add_scalar(f"train/{key}", row[key], step)

    def write_epoch(self, row: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        self.metrics.write(row)
        if self.tensorboard is not None:
            for key in (*METRIC_KEYS, "rsum"):
                self.tensorboard.add_scalar(f"dev/{key}", metrics[key], step)

    def close(self) -> None:
        self.steps.close()
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
