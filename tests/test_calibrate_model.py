"""bench/calibrate_model.py on synthetic CSVs (no GPU): which measured rows meet which
model rows, the ratios, and that missing rows are reported, never an error."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import calibrate_model  # noqa: E402
from common import CSV_HEADER  # noqa: E402

MODEL_COLUMNS = ["source", "device", "triton", "dtype", "B", "D", "gated_fraction", "mm_ms",
                 "forward_kernel_ms", "forward_glue_ms", "backward_kernels_ms",
                 "backward_glue_ms"]  # fmt: skip


def model_row(device, triton, dtype, dim, frac, scale=1.0) -> dict:
    # forward = 1.5 * scale, backward = (2 + 10 f) * scale, mm = 0.5 * scale
    return dict(zip(MODEL_COLUMNS, ("model", device, triton, dtype, 16384, dim, frac,
                                    0.5 * scale, 1.0 * scale, 0.5 * scale,
                                    (1.5 + 10 * frac) * scale, 0.5 * scale),
                    strict=True))  # fmt: skip


def measured(backend, mix, pass_name, ms, *, dim=1024, dtype="bf16", device="NVIDIA H200",
             triton="3.6.0", status="ok", deterministic="0", mode="selhn") -> dict:  # fmt: skip
    row = dict.fromkeys(CSV_HEADER, "")
    row.update(device=device, triton=triton, backend=backend, B="16384", D=str(dim),
               dtype=dtype, mode=mode, gate_mix=mix, deterministic=deterministic,
               median_ms=str(ms), status=status, **{"pass": pass_name})  # fmt: skip
    return row


def write(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


MODEL = [
    model_row(card, version, dtype, dim, frac, scale=2.0 if version == "3.7.1" else 1.0)
    for card in ("H100-SXM (model)", "H200 (model)")
    for version in ("3.6.0", "3.7.1")
    for dtype in ("bfloat16", "float16")
    for dim in (256, 1024)
    for frac in (0.0, 0.01, 0.1, 1.0)
]


def by_case(rows):
    return {(r["backend"], r["D"], r["dtype"], r["gated_fraction"], r["pass"]): r for r in rows}


def test_joins_each_measured_row_with_its_model_case():
    rows = [
        measured("torch_mm", "", "forward", 0.25, mode=""),
        measured("torch_mm", "", "forward", 0.75, mode=""),  # median of the two: 0.5
        measured("triton", "none", "forward", 3.0),
        measured("triton", "none", "forward_backward", 7.0),
        measured("triton", "10pct", "backward", 1.5),
        measured("triton", "10pct", "backward", 99.0, status="error"),  # ignored
        measured("triton", "10pct", "forward", 99.0, deterministic="1"),  # ignored
        measured("triton", "10pct", "forward", 99.0, mode="selhn+stats"),  # ignored
        measured("triton", "half", "forward", 99.0),  # no model case
        measured("authors", "none", "forward", 99.0),  # not the Triton backend
        measured("triton:panels", "all", "forward", 0.75, dim=256, dtype="fp16"),
    ]
    out = calibrate_model.calibration_rows(rows, [dict((k, str(v)) for k, v in m.items())
                                                   for m in MODEL])  # fmt: skip
    # One run (H200, 3.6.0): its 16 model cases x 3 passes per backend, 4 torch.mm shapes.
    assert {r["model_device"] for r in out} == {"H200 (model)"}
    assert {r["model_triton"] for r in out} == {"3.6.0"}
    assert len(out) == 2 * 16 * 3 + 4
    got = by_case(out)
    mm = got[("torch_mm", 1024, "bfloat16", "", "forward")]
    assert mm["measured_ms"] == pytest.approx(0.5) and mm["model_over_measured"] == 1.0
    fwd = got[("triton", 1024, "bfloat16", 0.0, "forward")]
    assert fwd["model_ms"] == pytest.approx(1.5) and fwd["measured_ms"] == 3.0
    assert fwd["model_over_measured"] == pytest.approx(0.5)
    assert fwd["model_ratio_to_mm"] == pytest.approx(3.0)
    assert fwd["measured_ratio_to_mm"] == pytest.approx(6.0)
    both = got[("triton", 1024, "bfloat16", 0.0, "forward_backward")]
    assert both["model_ms"] == pytest.approx(3.5) and both["model_over_measured"] == 0.5
    bwd = got[("triton", 1024, "bfloat16", 0.1, "backward")]
    assert bwd["model_ms"] == pytest.approx(3.0) and bwd["model_over_measured"] == 2.0
    other = got[("triton:panels", 256, "float16", 1.0, "forward")]
    assert other["model_over_measured"] == pytest.approx(2.0)
    assert other["measured_ratio_to_mm"] is None  # no torch.mm row of that shape
    assert got[("triton", 1024, "bfloat16", 0.01, "forward")]["measured_ms"] is None
    measured_count = sum(r["measured_ms"] is not None for r in out)
    assert measured_count == 5  # torch.mm, three triton rows, one triton:panels row
    assert "5 of 100 model cases measured, 95 missing" in calibrate_model.report(out)


def test_triton_versions_meet_the_closest_model_version():
    versions = {"3.6.0", "3.7.1"}
    assert calibrate_model.closest_version("3.6.2", versions) == "3.6.0"
    assert calibrate_model.closest_version("3.7.0", versions) == "3.7.1"
    assert calibrate_model.closest_version("3.9.0", versions) == "3.7.1"
    assert calibrate_model.closest_version("3.5.1", versions) == "3.6.0"
    assert calibrate_model.model_device("NVIDIA H100 80GB HBM3") == "H100-SXM (model)"
    assert calibrate_model.model_device("cpu:AMD EPYC x2 avx2") is None


def test_script_writes_its_csv_and_exits_0_with_rows_missing(tmp_path, capsys):
    model = write(tmp_path / "model.csv", MODEL, MODEL_COLUMNS)
    gpu = write(tmp_path / "gpu.csv", [
        measured("torch_mm", "", "forward", 1.0, device="NVIDIA H100 80GB HBM3", triton="3.7.1",
                 mode=""),
        measured("triton", "all", "forward_backward", 30.0, device="NVIDIA H100 80GB HBM3",
                 triton="3.7.1"),
    ], CSV_HEADER)  # fmt: skip
    out = tmp_path / "calibration.csv"
    assert calibrate_model.main([str(gpu), "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MODEL PREDICTIONS" in printed and "2 of 52 model cases measured" in printed
    with open(out, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 52
    fb = [r for r in written if r["pass"] == "forward_backward" and r["measured_ms"]]
    assert len(fb) == 1 and fb[0]["model_triton"] == "3.7.1"
    # 3.7.1 model rows are scaled by 2: (1.5 + 12) * 2 = 27 ms against 30 measured
    assert float(fb[0]["model_over_measured"]) == pytest.approx(0.9)
    assert float(fb[0]["measured_ratio_to_mm"]) == pytest.approx(30.0)


def test_cpu_rows_and_bad_paths(tmp_path, capsys):
    model = write(tmp_path / "model.csv", MODEL, MODEL_COLUMNS)
    cpu_row = measured("triton", "none", "forward", 1.0, device="cpu:AMD EPYC x2 avx2")
    cpu = write(tmp_path / "cpu.csv", [cpu_row], CSV_HEADER)
    assert calibrate_model.main([str(cpu), "--model", str(model)]) == 0
    assert "nothing to join" in capsys.readouterr().out
    assert calibrate_model.main([str(tmp_path / "absent.csv"), "--model", str(model)]) == 2
    assert "expected a CSV" in capsys.readouterr().err
