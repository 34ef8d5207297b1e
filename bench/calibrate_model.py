"""Model over measured: a GPU run's rows joined with the static sm_90 model's predictions.

    python bench/calibrate_model.py GPU_CSV [--model bench/results/model_sm90.csv] [--out CSV]

GPU_CSV is a bench/run.py CSV (bench/common.py CSV_COLUMNS), e.g. the gpu.csv of
bench/gpu_check.sh; the model's rows come from bench/static_profile.py. A measured row
meets a model row when they have:
- the card: the model's "H100-SXM (model)" for a device name with H100 in it, "H200
  (model)" for H200;
- the triton version: the model's rows under the same major.minor version, else under
  the closest version the model has (said in the output);
- B, D and the dtype, and the gate mix whose nominal fraction (bench/common.py
  GATE_MIXES) is the model's gated fraction (the model has 0, 1, 10 and 100 %);
- a Triton backend (``triton`` or ``triton:<variant>``, each reported on its own),
  mode ``selhn``, not deterministic, status ok.
Measured per pass: the median of the matching rows' median_ms. The model's forward is
its forward kernel plus forward glue, its backward the backward kernels plus backward
glue, forward_backward their sum; ``torch.mm`` is joined on B, D and dtype alone.

Every model case of the run's card(s) gets one line per pass, ``missing`` where the run
has no row for it (a stage cut short): missing rows never make the exit status non-zero.
A ratio above 1 means the model is pessimistic (predicts slower than measured).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import GATE_MIXES  # noqa: E402

MODEL_CSV = BENCH / "results" / "model_sm90.csv"
MODEL_DEVICES = {"H100": "H100-SXM (model)", "H200": "H200 (model)"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PASSES = ("forward", "backward", "forward_backward")
OUT_COLUMNS = [
    "device", "model_device", "triton", "model_triton", "backend", "B", "D", "dtype",
    "gated_fraction", "pass", "model_ms", "measured_ms", "model_over_measured",
    "model_ratio_to_mm", "measured_ratio_to_mm",
]  # fmt: skip


def model_device(device: str) -> str | None:
    """The model's card for a measured device name, None if the model has none."""
    return next((model for key, model in MODEL_DEVICES.items() if key in device), None)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def closest_version(measured: str, versions: set[str]) -> str | None:
    """The model version for a measured triton version: same major.minor, else the
    closest by (major, minor, patch)."""
    if not versions:
        return None
    want = version_key(measured) or (0,)
    same = sorted(v for v in versions if version_key(v)[:2] == want[:2])
    if same:
        return same[-1]

    def distance(v: str) -> tuple[int, ...]:
        return tuple(abs(a - b) for a, b in zip(version_key(v), want, strict=False))

    return min(sorted(versions), key=distance)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def model_ms(row: dict, pass_name: str) -> float:
    forward = float(row["forward_kernel_ms"]) + float(row["forward_glue_ms"])
    backward = float(row["backward_kernels_ms"]) + float(row["backward_glue_ms"])
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}[
        pass_name
    ]


def measured_medians(rows: list[dict]) -> dict[tuple, float]:
    """(device, triton, backend, B, D, dtype, gated fraction, pass) -> median of the ok
    rows' median_ms; torch.mm under backend "torch_mm", gated fraction None."""
    found: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        backend = r["backend"]
        if backend == "torch_mm":
            fraction = None
        elif backend.split(":")[0] == "triton" and (r["mode"], r["deterministic"]) == (
            "selhn",
            "0",
        ):
            if r["gate_mix"] not in GATE_MIXES:
                continue
            fraction = GATE_MIXES[r["gate_mix"]]
        else:
            continue
        key = (r["device"], r["triton"], backend, int(r["B"]), int(r["D"]),
               DTYPE_NAMES.get(r["dtype"], r["dtype"]), fraction, r["pass"])  # fmt: skip
        found.setdefault(key, []).append(float(r["median_ms"]))
    return {key: statistics.median(values) for key, values in found.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def calibration_rows(measured_rows: list[dict], model: list[dict]) -> list[dict]:
    """One row per (run device and triton, Triton backend, model case, pass), and one per
    torch.mm shape; measured fields are None where the run has no row."""
    medians = measured_medians(measured_rows)
    runs = sorted({(k[0], k[1]) for k in medians})
    backends = sorted({k[2] for k in medians if k[2] != "torch_mm"}) or ["triton"]
    out = []
    for device, version in runs:
        card = model_device(device)
        cases = [m for m in model if m["device"] == card]
        model_version = closest_version(version, {m["triton"] for m in cases})
        cases = [m for m in cases if m["triton"] == model_version]
        shapes = sorted({(int(m["B"]), int(m["D"]), m["dtype"]) for m in cases})
        for b, d, dtype in shapes:  # torch.mm: one model figure per shape
            m = next(m for m in cases if (int(m["B"]), int(m["D"]), m["dtype"]) == (b, d, dtype))
            got = medians.get((device, version, "torch_mm", b, d, dtype, None, "forward"))
            mm_row = _row(device, card, version, model_version, "torch_mm", b, d, dtype, None,
                          "forward", float(m["mm_ms"]), got, 1.0, 1.0 if got else None)  # fmt: skip
            out.append(mm_row)
        for backend in backends:
            for m in cases:
                b, d, dtype, frac = int(m["B"]), int(m["D"]), m["dtype"], float(m["gated_fraction"])
                mm = medians.get((device, version, "torch_mm", b, d, dtype, None, "forward"))
                for pass_name in PASSES:
                    predicted = model_ms(m, pass_name)
                    key = (device, version, backend, b, d, dtype, frac, pass_name)
                    got = medians.get(key)
                    out.append(_row(device, card, version, model_version, backend, b, d, dtype,
                                    frac, pass_name, predicted, got,
                                    predicted / float(m["mm_ms"]), ratio(got, mm)))  # fmt: skip
    return out


def _row(device, card, version, model_version, backend, b, d, dtype, frac, pass_name,
         predicted, got, model_to_mm, measured_to_mm) -> dict:  # fmt: skip
    return dict(zip(OUT_COLUMNS, (
        device, card or "", version, model_version or "", backend, b, d, dtype,
        "" if frac is None else frac, pass_name, predicted, got, ratio(predicted, got),
        model_to_mm, measured_to_mm,
    ), strict=True))  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "missing" if value is None else format(value, spec)


def report(rows: list[dict]) -> str:
    lines = ["model over measured (the model's figures are MODEL PREDICTIONS; > 1: the model "
             "predicts slower than measured)"]  # fmt: skip
    if not rows:
        return lines[0] + "\n  no GPU rows of a card the model has (H100, H200): nothing to join"
    lines.append(
        f"  {'device':24} {'triton':7} {'backend':16} {'B':>6} {'D':>5} {'dtype':9} "
        f"{'gated':>6} {'pass':17} {'model ms':>9} {'meas. ms':>9} {'model/meas':>10}"
    )
    for r in rows:
        gated = "" if r["gated_fraction"] == "" else f"{r['gated_fraction']:.0%}"
        lines.append(
            f"  {r['device'][:24]:24} {r['triton']:7} {r['backend'][:16]:16} {r['B']:6} "
            f"{r['D']:5} {r['dtype']:9} {gated:>6} {r['pass']:17} {r['model_ms']:9.3f} "
            f"{_fmt(r['measured_ms'], '9.3f'):>9} {_fmt(r['model_over_measured'], '10.2f'):>10}"
        )
    missing = sum(r["measured_ms"] is None for r in rows)
    lines.append(f"  {len(rows) - missing} of {len(rows)} model cases measured, {missing} missing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpu_csv", type=Path, help="a bench/run.py CSV from a GPU run")
    parser.add_argument("--model", type=Path, default=MODEL_CSV, help="the model's CSV")
    parser.add_argument("--out", type=Path, help="also write the joined rows here (CSV)")
    args = parser.parse_args(argv)
    for path in (args.gpu_csv, args.model):
        if not path.is_file():
            print(f"no such file: {path} (expected a CSV)", file=sys.stderr)
            return 2
    rows = calibration_rows(read_csv(args.gpu_csv), read_csv(args.model))
    if args.out:  # first: the file is what the run keeps
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=OUT_COLUMNS)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
