"""Draw PNG figures from benchmark CSV rows.

    python bench/plot.py                        # bench/out/*.csv -> PNGs in bench/out
    python bench/plot.py --update-committed     # bench/results/*.csv -> PNGs in bench/results
    python bench/plot.py rows.csv --out figures

One figure per (device, dtype, D, gate mix) group with data: median time (top) and peak
extra memory (bottom) against B, log-log, one column per pass with data, one line per
backend and option (``/det`` deterministic, ``+stats`` with return_stats, ``/hardest``).
``torch_mm`` (one torch.mm of the same shape) is drawn dashed in every time panel: the
floor. Only ``ok`` rows are drawn; the latest row of each measurement wins.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, PASSES, RESULTS_DIR, read_rows  # noqa: E402
from table import latest  # noqa: E402


def _line_label(row: dict[str, str]) -> str:
    label = row["backend"]
    mode = row["mode"]
    if mode.startswith("hardest") or mode.startswith("all") or mode.startswith("sum_hinges"):
        label += "/" + mode.split("+")[0]
    if row["deterministic"] == "1":
        label += "/det"
    if mode.endswith("+stats"):
        label += "+stats"
    return label


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def figure_groups(rows: list[dict[str, str]]) -> dict[tuple, list[dict[str, str]]]:
    """(device, dtype, D, gate mix) -> its ok rows, with the torch_mm rows of its shapes."""
    ok = [r for r in latest(rows) if r["status"] == "ok" and r["median_ms"]]
    floors = [r for r in ok if r["backend"] == "torch_mm"]
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for row in ok:
        if row["backend"] != "torch_mm":
            groups[(row["device"], row["dtype"], row["D"], row["gate_mix"])].append(row)
    for (device, dtype, dim, _), members in groups.items():
        members += [f for f in floors if (f["device"], f["dtype"], f["D"]) == (device, dtype, dim)]
    return groups


def failures(rows: list[dict[str, str]]) -> dict[tuple, list[str]]:
    """(device, dtype, D, gate mix) -> 'backend pass B=...: status' for oom/error rows."""
    out: dict[tuple, list[str]] = defaultdict(list)
    for row in latest(rows):
        if row["status"] in ("oom", "error"):
            key = (row["device"], row["dtype"], row["D"], row["gate_mix"])
            out[key].append(f"{_line_label(row)} {row['pass']} B={row['B']}: {row['status']}")
    return out


def plot(rows: list[dict[str, str]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    failed = failures(rows)
    for (device, dtype, dim, mix), members in sorted(figure_groups(rows).items()):
        lines: dict[tuple[str, str], list[tuple[int, float, int]]] = defaultdict(list)
        floor: list[tuple[int, float, int]] = []
        for row in members:
            point = (int(row["B"]), float(row["median_ms"]), int(row["peak_extra_bytes"] or 0))
            if row["backend"] == "torch_mm":
                floor.append(point)
            else:
                lines[(_line_label(row), row["pass"])].append(point)
        labels = sorted({label for label, _ in lines})
        passes = [p for p in PASSES if any(pass_name == p for _, pass_name in lines)]
        width = max(7, 5 * len(passes))
        fig, axes = plt.subplots(2, len(passes), figsize=(width, 8), squeeze=False)
        # One colour per line across all panels of the figure.
        palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
        colours = {label: palette(i) for i, label in enumerate(labels)}
        for column, pass_name in enumerate(passes):
            time_ax, mem_ax = axes[0][column], axes[1][column]
            for label in labels:
                points = sorted(lines.get((label, pass_name), []))
                if not points:
                    continue
                batch = [p[0] for p in points]
                style = {"marker": "o", "label": label, "color": colours[label]}
                time_ax.plot(batch, [p[1] for p in points], **style)
                memory = [(b, p[2]) for b, p in zip(batch, points, strict=True) if p[2] > 0]
                if memory:
                    mem_ax.plot(*zip(*memory, strict=True), **style)
            if floor:
                floor_points = sorted(floor)
                time_ax.plot(
                    [p[0] for p in floor_points],
                    [p[1] for p in floor_points],
                    "k--",
                    marker="x",
                    label="torch_mm (floor)",
                )
            time_ax.set_title(pass_name)
            time_ax.set_ylabel("median time (ms)")
            mem_ax.set_ylabel("peak extra memory (bytes)")
            for ax in (time_ax, mem_ax):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch B")
                ax.grid(True, which="both", alpha=0.3)
                if ax.has_data():
                    ax.set_yscale("log")
                    ax.legend(fontsize=7)
        fig.suptitle(f"SelHN loss: {device}, {dtype}, D = {dim}, gate mix '{mix}'")
        notes = failed.get((device, dtype, dim, mix), [])
        if notes:  # what could not be drawn: out of memory or failed
            fig.text(0.01, 0.005, "; ".join(notes), fontsize=8, color="firebrick")
        fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
        path = out_dir / f"{_slug(device)}_{dtype}_D{dim}_{mix}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="*", type=Path, help="default: <folder>/*.csv")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: <folder>)")
    parser.add_argument(
        "--update-committed",
        action="store_true",
        help="<folder> is the committed bench/results instead of the ignored bench/out",
    )
    args = parser.parse_args(argv)
    folder = RESULTS_DIR if args.update_committed else OUT_DIR
    paths = args.csv or sorted(folder.glob("*.csv"))
    if not paths:
        raise SystemExit(f"no CSV given and none in {folder}")
    written = plot(read_rows(paths), args.out or folder)
    for path in written:
        print(path)
    if not written:
        print("no ok rows to draw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
