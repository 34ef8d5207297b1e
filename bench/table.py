"""Print benchmark rows from the CSV as a short text table.

    python bench/table.py bench/results/cpu.csv --pass forward_backward
    python bench/table.py gpu.csv --batch 16384 --dim 1024 --dtype bf16
    python bench/table.py gpu.csv --pivot        # ratio to torch.mm: shapes x backends
    python bench/table.py gpu.csv --batch 16384 --dim 1024 --dtype bf16 --by-gate-mix

Rows are the latest of each (device, backend, B, D, dtype, mode, gate mix, deterministic,
pass) unless ``--all-rows``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GATE_MIXES, STATS_SUFFIX, read_rows  # noqa: E402

IDENTITY = ("device", "backend", "B", "D", "dtype", "mode", "gate_mix", "deterministic", "pass")


def latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The last row of each identity, in the order of first appearance."""
    last: dict[tuple, dict[str, str]] = {}
    for row in rows:
        last[tuple(row[k] for k in IDENTITY)] = row
    return list(last.values())


def _mib(value: str) -> str:
    return f"{int(value) / 2**20:.1f}" if value not in ("", None) else "-"


def format_rows(rows: list[dict[str, str]]) -> str:
    columns = (
        "backend",
        "B",
        "D",
        "dtype",
        "mode",
        "gate_mix",
        "gated_fraction",
        "deterministic",
        "pass",
        "median_ms",
        "ratio_to_mm",
        "peak_MiB",
        "status",
    )
    table = [columns]
    for row in rows:
        cells = {**row, "peak_MiB": _mib(row["peak_extra_bytes"])}
        table.append(tuple(cells[c] or "-" for c in columns))
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in table)


def format_pivot(rows: list[dict[str, str]], pass_name: str) -> str:
    """For each (dtype, D, B): each backend's ratio to torch.mm, or its status.

    Only the plain rows: gate mix 'half', not deterministic, without return_stats.
    """
    shapes: dict[tuple, dict[str, str]] = {}
    backends: list[str] = []
    for row in rows:
        if row["backend"] != "torch_mm" and (
            row["pass"] != pass_name
            or row["gate_mix"] != "half"
            or row["deterministic"] == "1"
            or row["mode"].endswith(STATS_SUFFIX)
        ):
            continue
        key = (row["dtype"], int(row["D"]), int(row["B"]))
        label = row["backend"] + ("/" + row["mode"] if row["mode"] not in ("selhn", "") else "")
        if row["backend"] == "torch_mm":
            label = "torch_mm ms"
            value = row["median_ms"] if row["status"] == "ok" else row["status"]
        else:
            value = row["ratio_to_mm"] if row["status"] == "ok" else row["status"]
        if label not in backends:
            backends.append(label)
        shapes.setdefault(key, {})[label] = value or "?"
    header = ("dtype", "D", "B") + tuple(backends)
    table = [header]
    for key in sorted(shapes):
        table.append(tuple(str(k) for k in key) + tuple(shapes[key].get(b, "") for b in backends))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    title = f"ratio to one torch.mm, pass {pass_name}, gate mix 'half'"
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in table)
    return title + "\n" + body


def format_by_gate_mix(rows: list[dict[str, str]]) -> str:
    """For each backend, option set and pass: its ratio to torch.mm at every gate mix.

    Meant for rows of one shape (the headline); cells read ``ratio (ms)`` or a status.
    """
    lines: dict[tuple, dict[str, str]] = {}
    mixes = [m for m in GATE_MIXES if any(r["gate_mix"] == m for r in rows)]
    for row in rows:
        if row["backend"] == "torch_mm":
            continue
        det = "det" if row["deterministic"] == "1" else ""
        key = (row["backend"], row["mode"], det, row["pass"])
        if row["status"] == "ok":
            value = f"{float(row['ratio_to_mm'] or 'nan'):.2f}x ({float(row['median_ms']):.3g} ms)"
        else:
            value = row["status"]
        lines.setdefault(key, {})[row["gate_mix"]] = value
    header = ("backend", "mode", "det", "pass", *mixes)
    table = [header] + [(*key, *(cells.get(m, "") for m in mixes)) for key, cells in lines.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    title = "ratio to one torch.mm (median ms) by gate mix"
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in table)
    return title + "\n" + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--pass", dest="pass_name", help="only this pass")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--backend", help="only these backends, comma list")
    parser.add_argument("--pivot", action="store_true", help="shapes x backends ratios")
    parser.add_argument("--by-gate-mix", action="store_true", help="backends x gate mixes")
    parser.add_argument("--all-rows", action="store_true", help="keep repeated measurements")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if not args.all_rows:
        rows = latest(rows)
    if args.batch is not None:
        rows = [r for r in rows if int(r["B"]) == args.batch]
    if args.dim is not None:
        rows = [r for r in rows if int(r["D"]) == args.dim]
    if args.dtype:
        rows = [r for r in rows if r["dtype"] == args.dtype]
    if args.backend:
        wanted = set(args.backend.split(","))
        rows = [r for r in rows if r["backend"] in wanted]
    if args.pivot:
        print(format_pivot(rows, args.pass_name or "forward_backward"))
        return 0
    if args.by_gate_mix:
        if args.pass_name:
            rows = [r for r in rows if r["pass"] == args.pass_name]
        print(format_by_gate_mix(rows) if rows else "(no rows)")
        return 0
    if args.pass_name:
        rows = [r for r in rows if r["pass"] == args.pass_name or r["backend"] == "torch_mm"]
    print(format_rows(rows) if rows else "(no rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
