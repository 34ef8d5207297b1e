"""The benchmark scripts: the baselines are the losses they claim to be, the inputs gate
what they say, the CSV rows are well formed, OOM is recorded, and plots are drawn."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from selhn_ext.reference import selhn_loss_reference

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import baselines  # noqa: E402
import common  # noqa: E402

pytestmark = pytest.mark.backend("bench")


def _loss_and_grads(loss_fn, img, txt):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    loss = loss_fn(img, txt)
    loss.backward()
    return loss.detach(), img.grad, txt.grad


def _near_tie_inputs(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 inputs where some anchors are gated at eps = 0.05 and the rest are not."""
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    txt = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    # Image 0 and caption 0 are caption 1 plus a little: image anchor 0's positive and its
    # hardest negative (caption 1) both score about 1, a near tie.
    img[0] = txt[1] + 1e-3 * img[0]
    txt[0] = txt[1] + 1e-3 * txt[0]
    return img, txt


@pytest.mark.parametrize("batch,dim,seed", [(2, 3, 0), (3, 5, 1), (17, 8, 2), (64, 16, 3)])
def test_authors_loss_equals_reference_selhn(batch, dim, seed):
    img, txt = _near_tie_inputs(batch, dim, seed)
    eps = 0.05
    stats: dict = {}
    ours = _loss_and_grads(
        lambda a, b: baselines.authors_selhn_loss(a, b, eps=eps, stats=stats), img, txt
    )
    reference, ref_stats = selhn_loss_reference(img, txt, eps=eps, mode="selhn")
    expected = _loss_and_grads(
        lambda a, b: selhn_loss_reference(a, b, eps=eps, mode="selhn")[0], img, txt
    )
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert stats["gated_fraction"] == pytest.approx(ref_stats["gated_fraction"].mean().item())
    if batch > 2:  # the near tie is a gated anchor: the mean-over-negatives path is covered
        assert stats["gated_fraction"] > 0


def test_authors_loss_gate_changes_the_loss():
    """Guard against a gate that never fires: eps = 0 and a huge eps give other losses."""
    img, txt = _near_tie_inputs(32, 8, seed=5)
    hard = baselines.authors_selhn_loss(img, txt, eps=0.0)
    dense = baselines.authors_selhn_loss(img, txt, eps=10.0)
    torch.testing.assert_close(hard, selhn_loss_reference(img, txt, mode="hardest")[0])
    torch.testing.assert_close(dense, selhn_loss_reference(img, txt, mode="all")[0])
    assert not torch.isclose(hard, dense)


def test_pml_baseline_is_hardest_mode():
    pytest.importorskip("pytorch_metric_learning")
    img, txt = _near_tie_inputs(40, 12, seed=7)
    ours = _loss_and_grads(baselines.PMLHardestLoss(margin=0.2), img, txt)
    expected = _loss_and_grads(lambda a, b: selhn_loss_reference(a, b, mode="hardest")[0], img, txt)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ours[0] > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_make_inputs_gate_mixes(dtype):
    fractions = {}
    for mix in common.GATE_MIXES:
        img, txt = common.make_inputs(256, 64, common.DTYPES[dtype], mix, seed=3)
        assert img.dtype == common.DTYPES[dtype] and img.shape == (256, 64)
        norms = img.float().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
        _, stats = selhn_loss_reference(img, txt)
        fractions[mix] = stats["gated_fraction"].mean().item()
    assert fractions["none"] < 0.02
    assert abs(fractions["half"] - 0.5) < 0.05
    assert fractions["all"] > 0.98


def test_csv_refuses_a_different_header(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("date,backend,median_ms\n")
    with pytest.raises(ValueError, match="header"):
        common.open_csv(path)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == common.CSV_HEADER
    return common.read_rows([path])


def _check_rows(rows: list[dict[str, str]]) -> None:
    """Statuses and passes valid, a torch_mm row before each shape's rows, ratios that
    match the times (each run measures torch_mm first, so a row's floor is the latest
    torch_mm row of its shape above it)."""
    assert rows
    floors: dict[tuple, float | None] = {}
    for row in rows:
        assert row["status"] in common.STATUSES
        assert row["pass"] in common.PASSES
        shape = (row["B"], row["D"], row["dtype"])
        if row["backend"] == "torch_mm":
            assert row["pass"] == "forward"
            floors[shape] = float(row["median_ms"]) if row["status"] == "ok" else None
            continue
        assert shape in floors, f"no torch_mm row before {shape}"
        if row["status"] != "ok":
            assert row["median_ms"] == "" and row["ratio_to_mm"] == ""
            continue
        median = float(row["median_ms"])
        assert median > 0 and int(row["peak_extra_bytes"]) >= 0
        if floors[shape] is None:
            assert row["ratio_to_mm"] == ""
        else:
            assert math.isclose(float(row["ratio_to_mm"]), median / floors[shape], rel_tol=1e-4)
        if row["gated_fraction"]:
            assert 0.0 <= float(row["gated_fraction"]) <= 1.0


@pytest.fixture
def own_tmp_dir():
    """A folder outside pytest's numbered temp dirs, which concurrent runs may prune."""
    with tempfile.TemporaryDirectory(prefix="selhn_bench_test_") as name:
        yield Path(name)


@pytest.mark.slow
def test_gpu_check_dry_run(own_tmp_dir):
    tmp_path = own_tmp_dir
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--budget", "110"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for stage in (
        "stage 0 env: exit 0",
        "stage 1 build: exit 0",
        "stage 2 tests: exit 0",
        "stage 3 headline: exit 0",
        "stage 5 ncu",
    ):
        assert stage in summary, summary
    assert "ncu is absent" in (out / "stage5_ncu.log").read_text()
    assert "triton" in (out / "stage1_build.log").read_text()

    rows = _rows(out / "dry_run.csv")
    _check_rows(rows)
    headline = [r for r in rows if (r["B"], r["D"], r["dtype"]) == ("64", "32", "bf16")]
    by_backend = {}
    for row in headline:
        by_backend.setdefault(row["backend"], set()).add(row["status"])
    for name in ("triton", "authors", "authors_compiled", "chunked", "torch_mm"):
        assert by_backend.get(name) == {"ok"}, (name, by_backend)
    assert by_backend["cuda"] == {"skipped"}  # no CUDA device on the dry run
    triton = {
        r["gate_mix"]: float(r["gated_fraction"])
        for r in headline
        if r["backend"] == "triton" and r["mode"] == "selhn" and r["deterministic"] == "0"
    }
    assert triton["none"] < triton["half"] < triton["all"]
    options = {(r["mode"], r["deterministic"]) for r in headline if r["backend"] == "triton"}
    assert ("selhn", "1") in options and ("selhn+stats", "0") in options
    assert "ratio to one torch.mm" in done.stdout  # the table printed last


def test_oom_is_recorded_not_a_crash(tmp_path):
    csv_path = tmp_path / "oom.csv"
    batch = 4096
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--device",
            "cpu",
            "--isolate",
            "--backends",
            "authors",
            "--sizes",
            str(batch),
            "--dims",
            "16",
            "--passes",
            "forward_backward",
            "--mem-limit-gib",
            "0.2",
            "--min-time",
            "0",
            "--csv",
            str(csv_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(csv_path)
    _check_rows(rows)
    status = {r["backend"]: r["status"] for r in rows}
    # One B x B fp32 matrix (64 MiB) fits under the 0.2 GiB limit; the authors' ~7 do not.
    assert status == {"torch_mm": "ok", "authors": "oom"}
    floor = next(r for r in rows if r["backend"] == "torch_mm")
    matrix_bytes = batch * batch * 4
    assert 0.9 * matrix_bytes <= int(floor["peak_extra_bytes"]) <= 2 * matrix_bytes
    assert "can't allocate memory" in (tmp_path / "oom.log").read_text()


def _synthetic_row(**fields) -> dict[str, str]:
    row = dict.fromkeys(common.CSV_HEADER, "")
    row.update(date="2026-01-01T00:00:00Z", commit="abc", device="cpu:test x2", torch="2")
    row.update({k: str(v) for k, v in fields.items()})
    return row


def test_plot_draws_one_png_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    csv_path = tmp_path / "rows.csv"
    handle, writer = common.open_csv(csv_path)
    for batch in (512, 1024, 2048):
        writer.writerow(
            _synthetic_row(
                backend="torch_mm",
                B=batch,
                D=64,
                dtype="fp32",
                **{"pass": "forward"},
                median_ms=batch / 100,
                ratio_to_mm=1,
                peak_extra_bytes=batch * batch * 4,
                status="ok",
            )
        )
        for mix in ("none", "all"):
            for backend in ("cpu", "authors"):
                for pass_name in common.PASSES:
                    writer.writerow(
                        _synthetic_row(
                            backend=backend,
                            B=batch,
                            D=64,
                            dtype="fp32",
                            mode="selhn",
                            gate_mix=mix,
                            **{"pass": pass_name},
                            median_ms=batch / 50,
                            ratio_to_mm=2,
                            peak_extra_bytes=batch * 1000,
                            status="ok",
                        )
                    )
        writer.writerow(
            _synthetic_row(
                backend="authors",
                B=batch,
                D=128,
                dtype="fp32",
                mode="selhn",
                gate_mix="half",
                **{"pass": "forward"},
                status="oom",
            )
        )
    handle.close()
    out = tmp_path / "figures"
    assert plot.main([str(csv_path), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    # Two gate mixes at D = 64 have ok rows; the D = 128 group has only an oom row.
    assert pngs == ["cpu_test_x2_fp32_D64_all.png", "cpu_test_x2_fp32_D64_none.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
