"""The benchmark scripts: the baselines are the losses they claim to be, the inputs gate
what they say, the CSV rows are well formed, OOM is recorded, and plots are drawn."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import tarfile
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
    """Every gate mix gates about the fraction it asks for (over the 2B anchors, by the
    reference's statistics), with unit-norm inputs; a gated anchor is one pair in B, so
    the allowance is 10 % of the fraction plus two pairs."""
    batch = 2048
    fractions = {}
    for mix, asked in common.GATE_MIXES.items():
        img, txt = common.make_inputs(batch, 256, common.DTYPES[dtype], mix, seed=3)
        assert img.dtype == common.DTYPES[dtype] and img.shape == (batch, 256)
        norms = img.float().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
        _, stats = selhn_loss_reference(img, txt)
        fractions[mix] = stats["gated_fraction"].mean().item()
        assert abs(fractions[mix] - asked) <= 0.1 * asked + 2 / batch, (mix, fractions)
    assert set(common.GATE_MIXES) >= {"none", "1pct", "10pct", "half", "all"}
    assert fractions["1pct"] > 0 and fractions["10pct"] > 5 * fractions["1pct"]


def test_make_inputs_never_builds_a_lone_gated_pair():
    """A mix that rounds to one cluster pair gets two: one pair alone has no near
    negative and would not gate, so '1pct' at a small batch would gate nothing."""
    img, txt = common.make_inputs(64, 32, torch.float32, "1pct", seed=0)
    _, stats = selhn_loss_reference(img, txt)
    assert stats["gated"].sum().item() >= 4  # two pairs, both directions


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
    match the times: over the row's own paired torch.mm on CPU, else over the latest
    torch_mm row of its shape above it (each run measures torch_mm first)."""
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
            assert row["median_ms"] == "" and row["mm_ms"] == "" and row["ratio_to_mm"] == ""
            continue
        median = float(row["median_ms"])
        assert median > 0 and int(row["peak_extra_bytes"]) >= 0
        if row["device"].startswith("cpu:"):  # its own paired torch.mm
            mm_ms = float(row["mm_ms"])
            assert mm_ms > 0
        elif floors[shape] is None:
            assert row["mm_ms"] == "" and row["ratio_to_mm"] == ""
            continue
        else:
            mm_ms = floors[shape]
            assert math.isclose(float(row["mm_ms"]), mm_ms, rel_tol=1e-5)
        assert math.isclose(float(row["ratio_to_mm"]), median / mm_ms, rel_tol=1e-4)
        if row["gated_fraction"]:
            assert 0.0 <= float(row["gated_fraction"]) <= 1.0


@pytest.mark.parametrize("paired", [False, True])
def test_time_pass_pairs_each_repetition_with_one_torch_mm(monkeypatch, paired):
    """With paired_mm every repetition of the pass is preceded by one torch.mm of the
    inputs (the row's own baseline); without it none runs and no baseline comes back."""
    import memory
    import timing

    img, txt = torch.randn(8, 4), torch.randn(6, 4)
    calls: list[str] = []
    real_mm = torch.mm

    def counting_mm(a, b):
        calls.append("mm")
        assert a.shape == img.shape and b.shape == txt.T.shape and not a.requires_grad
        return real_mm(a, b)

    def loss() -> torch.Tensor:
        calls.append("loss")
        return (img * 2).sum()

    monkeypatch.setattr(torch, "mm", counting_mm)
    settings = timing.Settings(
        device=torch.device("cpu"), min_time_s=0.0, max_reps=50, min_reps=4, paired_mm=paired
    )
    probe = memory.CpuMemory()
    probe.set_base()
    median, peak, mm_ms = timing.time_pass("forward", loss, (img, txt), settings, probe)
    assert calls == (["mm", "loss"] if paired else ["loss"]) * 4
    assert median >= 0 and peak is not None
    assert (mm_ms is not None and mm_ms >= 0) if paired else mm_ms is None


def test_a_row_divides_by_its_paired_mm_else_by_the_run_floor(own_tmp_dir):
    import results
    from cases import Case

    record = results.RunRecord(own_tmp_dir / "rows.csv", None, {})
    case = Case(backend="cpu", batch=64, dim=32, dtype="fp32")
    record.floors[case.shape] = 2.0
    paired = record.row(case, {"pass": "forward", "status": "ok", "median_ms": 3.0, "mm_ms": 1.5})
    unpaired = record.row(case, {"pass": "forward", "status": "ok", "median_ms": 3.0})
    failed = record.row(case, {"pass": "forward", "status": "error"})
    record.close()
    assert (paired["mm_ms"], paired["ratio_to_mm"]) == ("1.5", "2")
    assert (unpaired["mm_ms"], unpaired["ratio_to_mm"]) == ("2", "1.5")
    assert (failed["mm_ms"], failed["ratio_to_mm"]) == ("", "")


@pytest.fixture
def own_tmp_dir():
    """A folder outside pytest's numbered temp dirs, which concurrent runs may prune."""
    with tempfile.TemporaryDirectory(prefix="selhn_bench_test_") as name:
        yield Path(name)


def _run(args: list[str], timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
    """A bench script in a child process. The timeout only stops a hung child: no outcome
    of these tests depends on how fast the machine is."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_csv_columns_are_documented_in_the_readme():
    """The README's column table lists CSV_COLUMNS, in file order."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("| column | meaning |")
    table = readme[start:].split("\n\n")[0].splitlines()[2:]
    names = [line.split("|")[1].strip().strip("`") for line in table]
    assert names == common.CSV_HEADER


def test_default_output_is_ignored_by_git_and_committed_results_only_when_asked():
    import results

    cpu = torch.device("cpu")
    default = results.default_csv_path(cpu, update_committed=False, out_dir=None)
    committed = results.default_csv_path(cpu, update_committed=True, out_dir=None)
    assert default == common.OUT_DIR / "cpu.csv"
    assert committed == common.RESULTS_DIR / "cpu.csv"
    ignored = _run(["git", "-C", str(REPO), "check-ignore", "-q", str(default)])
    assert ignored.returncode == 0, "bench/out must be ignored by git"
    tracked = _run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(committed)])
    assert tracked.returncode == 0, tracked.stderr
    # make bench: run.py and plot.py write to bench/out unless UPDATE_RESULTS is set.
    for update, flag_expected in (("", False), ("UPDATE_RESULTS=1", True)):
        dry = _run(["make", "-n", "-C", str(REPO), "bench", *([update] if update else [])])
        assert dry.returncode == 0, dry.stderr
        commands = [line for line in dry.stdout.splitlines() if "bench/" in line]
        assert any("bench/run.py" in c for c in commands)
        assert any("bench/plot.py" in c for c in commands)
        assert all(("--update-committed" in c) == flag_expected for c in commands), commands


def test_device_label_names_the_cpu_vector_path():
    paths = common.cpu_simd_paths()
    # The compiled kernels are installed here: the portable path always exists (the
    # SIMDe-emulated AVX-512 path, test-only, may follow it).
    assert "portable" in paths and paths[0] != "avx512-emulated"
    label = common.device_name(torch.device("cpu"))
    assert label.startswith("cpu:") and label.endswith(f" {paths[0]}")
    assert common.device_name(torch.device("cpu"), "portable").endswith(" portable")


@pytest.mark.slow
def test_tiny_run_writes_the_schema_with_the_forced_vector_path(own_tmp_dir):
    """A real CPU run at small sizes: the columns, the device label with the path the
    kernels were forced to, one floor per shape, the new gate mixes, and the memory
    estimate stated before the first case."""
    out = own_tmp_dir / "out"
    done = _run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--device",
            "cpu",
            "--no-isolate",
            "--backends",
            "cpu,authors",
            "--sizes",
            "64,96",
            "--dims",
            "16",
            "--gate-mixes",
            "none,1pct,10pct",
            "--passes",
            "forward,forward_backward",
            "--min-time",
            "0",
            "--max-reps",
            "1",
            "--cpu-simd-path",
            "portable",
            "--out-dir",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(out / "cpu.csv")
    _check_rows(rows)
    assert {r["device"] for r in rows} == {common.device_name(torch.device("cpu"), "portable")}
    assert {r["status"] for r in rows} == {"ok"}
    measured = {(r["backend"], r["B"], r["gate_mix"], r["pass"]) for r in rows}
    for backend in ("cpu", "authors"):
        for batch in ("64", "96"):
            for mix in ("none", "1pct", "10pct"):
                for pass_name in ("forward", "forward_backward"):
                    assert (backend, batch, mix, pass_name) in measured
    assert sum(r["backend"] == "torch_mm" for r in rows) == 2  # one floor per shape
    log = (out / "cpu.log").read_text()
    assert "memory estimate (a model, not a measurement)" in log.splitlines()[1]


def test_an_unavailable_vector_path_is_refused_with_the_choices():
    done = _run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--device",
            "cpu",
            "--backends",
            "cpu",
            "--cpu-simd-path",
            "avx1024",
            "--plan-only",
        ]
    )
    assert done.returncode != 0
    assert "avx1024" in done.stderr and "portable" in done.stderr


def test_plan_memory_estimate_of_the_default_cpu_plan():
    """Children run one at a time, so the plan needs its largest case, not the sum; a case
    whose model exceeds the child's limit counts as the limit and is named as capped."""
    import cases
    import memory

    plan = cases.with_floors(cases.plan_cpu_default())
    gib = memory.GIB
    need = memory.plan_memory(plan, base_bytes=gib // 2, limit_bytes=20 * gib, parent_bytes=gib)
    authors_32k = [c for c in plan if c.backend == "authors" and c.batch == 32768]
    assert need.capped == authors_32k
    assert need.largest == authors_32k[0]
    assert need.peak_bytes == gib // 2 + memory.input_bytes(authors_32k[0]) + 20 * gib + gib
    # Within the limit, the largest is one torch.mm at B = 32768: its 4 GiB score matrix.
    assert need.fitting.backend == "torch_mm" and need.fitting.batch == 32768
    assert 4 * gib < need.fitting_bytes < 6 * gib
    assert "authors/B32768/D256" in need.describe("RAM")
    # Without a limit (a GPU) nothing is capped and the model counts in full.
    unlimited = memory.plan_memory(plan, 0, None)
    assert unlimited.capped == [] and unlimited.peak_bytes > 25 * gib
    # A case timed beside its paired torch.mm (CPU) needs at least the mm's B x B product.
    fused = [c for c in plan if c.backend == "cpu" and c.batch == 32768][:1]
    alone = memory.plan_memory(fused, 0, None).peak_bytes
    paired = memory.plan_memory(fused, 0, None, paired_mm=True).peak_bytes
    assert fused and alone < 4 * gib < paired


@pytest.mark.slow
def test_plan_only_states_the_memory_estimate_and_runs_nothing(own_tmp_dir):
    done = _run(
        [sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--plan-only"],
        cwd=own_tmp_dir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("46 cases; memory estimate"), last
    needed = float(last.split("needs up to ")[1].split(" GiB")[0])
    assert 20.0 < needed < 23.0  # the 20 GiB child limit, the inputs, two processes
    assert "authors/B32768/D256" in last
    assert not any(own_tmp_dir.iterdir())


def _gpu_check_settings() -> tuple[int, list[int]]:
    script = (BENCH / "gpu_check.sh").read_text()
    budget = int(re.search(r"^BUDGET=(\d+)$", script, re.M).group(1))
    limits = re.search(r"^STAGE_LIMITS=\(([\d ]+)\)$", script, re.M).group(1)
    return budget, [int(x) for x in limits.split()]


def test_gpu_check_default_budget_fits_the_device():
    """The stage limits fit the default budget, and one call of that budget with a
    start-up of up to 2 minutes leaves the 4 minutes a second machine needs to start,
    within the 15 device minutes of a task."""
    budget, limits = _gpu_check_settings()
    assert len(limits) == 7 and sum(limits) <= budget
    assert budget + 120 <= 15 * 60 - 4 * 60
    assert limits[1] >= 100 + 100  # the CUDA file's ~100 s, and the JIT fallback's own time


def test_gpu_check_refuses_stage_limits_over_the_budget(own_tmp_dir):
    budget, limits = _gpu_check_settings()
    script = str(BENCH / "gpu_check.sh")
    env = {**os.environ, "OUT": str(own_tmp_dir / "out"), "WORK": str(own_tmp_dir / "work")}
    done = _run(["bash", script, "--budget", str(sum(limits) - 1)], env=env)
    assert done.returncode == 2
    assert f"sum to {sum(limits)} s, more than --budget {sum(limits) - 1} s" in done.stderr
    done = _run(["bash", script, "--stages", "3,9"], env=env)
    assert done.returncode == 2 and "unknown stage '9'" in done.stderr
    assert not (own_tmp_dir / "out").exists()  # refused before anything ran


GPU_CHECK_STAGES = ("env", "build", "tests", "headline", "sweep", "ncu", "mm_end")


@pytest.mark.slow
def test_gpu_check_dry_run(own_tmp_dir):
    """Every stage runs on CPU at tiny sizes, chosen by flags alone (no time limits, so
    the outcome does not depend on the machine's speed); each wrote what it should, and
    what comes back fits the device's 8 files."""
    import cases

    out, work = own_tmp_dir / "out", own_tmp_dir / "work"
    env = {
        **os.environ,
        "OUT": str(out),
        "WORK": str(work),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = _run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], env=env, cwd=own_tmp_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "dry_run.csv", "logs.tar.gz", "model_calibration.csv", "summary.txt"
    ]  # fmt: skip
    summary = (out / "summary.txt").read_text()
    for number, name in enumerate(GPU_CHECK_STAGES):
        assert f"stage {number} {name}: exit 0" in summary, summary
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {
            Path(m.name).name: archive.extractfile(m).read().decode()
            for m in archive.getmembers()
            if m.isfile()
        }
    stage = {name: logs[f"stage{n}_{name}.log"] for n, name in enumerate(GPU_CHECK_STAGES)}
    assert "dry run: 1" in stage["env"] and "torch" in stage["env"]
    assert re.search(r"triton +available", stage["build"]), stage["build"]
    assert "deselected" in stage["tests"]  # pytest -m gpu ran (its tests skip without a GPU)
    variants = cases.triton_backward_variants()
    assert f"Triton backward variants: {' '.join(variants) or 'none offered'}" in stage["headline"]
    assert "compile caches warmed in parallel" in stage["headline"]
    for name in ["authors_compiled", "triton_fp16"] + [f"triton_{v}" for v in variants]:
        assert re.search(r"^warmed ", logs[f"warm_{name}.log"], re.M), logs[f"warm_{name}.log"]
    assert "compile caches warmed in parallel (2 processes" in stage["sweep"]
    # The calibration ran last in the headline stage: a CPU run meets no modelled card.
    assert stage["headline"].rstrip().endswith("nothing to join"), stage["headline"][-2000:]
    assert (out / "model_calibration.csv").read_text().startswith("device,model_device,")
    assert "ncu is absent (dry run on CPU)" in stage["ncu"]
    assert "--clock-control none" in stage["ncu"] and "regex:partials_kernel" in stage["ncu"]
    assert "--kernel-name" in stage["ncu"]
    assert "ratio to one torch.mm (median ms) by gate mix" in summary

    rows = _rows(out / "dry_run.csv")
    _check_rows(rows)
    head = [r for r in rows if (r["B"], r["D"], r["dtype"]) == ("64", "32", "bf16")]
    statuses: dict[tuple, set] = {}
    for row in head:
        statuses.setdefault((row["backend"], row["gate_mix"]), set()).add(row["status"])
    mixes = cases.HEADLINE_GATE_MIXES
    first_plain = next(i for i, r in enumerate(rows) if r["backend"] == "triton")
    for variant in variants:  # the variants ran first, at every mix
        label = f"triton:{variant}"
        assert all(i < first_plain for i, r in enumerate(rows) if r["backend"] == label)
        for mix in mixes:
            assert statuses[(f"triton:{variant}", mix)] == {"ok"}, (variant, mix)
    for mix in mixes:
        assert statuses[("triton", mix)] == {"ok"} and statuses[("authors", mix)] == {"ok"}
        assert statuses[("cuda", mix)] == {"skipped"}  # no CUDA device on the dry run
    for backend in ("authors_compiled", "chunked"):
        assert statuses[(backend, "10pct")] == {"ok"}
    triton = {
        r["gate_mix"]: float(r["gated_fraction"])
        for r in head
        if r["backend"] == "triton" and r["mode"] == "selhn" and r["deterministic"] == "0"
    }
    gated = [triton[mix] for mix in mixes]
    assert gated == sorted(set(gated)), triton  # more gated at every step up the mixes
    options = {(r["mode"], r["deterministic"]) for r in head if r["backend"] == "triton"}
    assert ("selhn", "1") in options and ("selhn+stats", "0") in options
    # The static model's other cases (bench/cases.py plan_model_cases), at dry-run sizes.
    model_cases = {
        (r["D"], r["dtype"], r["gate_mix"]) for r in rows
        if r["backend"] == "triton" and r["B"] == "64" and r["status"] == "ok"
    }  # fmt: skip
    for dim, dtype in (("16", "bf16"), ("16", "fp16"), ("32", "fp16")):
        for mix in cases.MODEL_GATE_MIXES:
            assert (dim, dtype, mix) in model_cases, (dim, dtype, mix)
    sweep = {(r["B"], r["D"], r["dtype"]) for r in rows if r["backend"] == "triton"}
    assert sweep >= {(b, "16", t) for b in ("32", "64") for t in ("bf16", "fp32")}
    # Stage 6 timed torch.mm at the headline shape again, after everything else.
    assert rows[-1]["backend"] == "torch_mm" and (rows[-1]["B"], rows[-1]["D"]) == ("64", "32")
    assert sum(r["backend"] == "torch_mm" for r in head) >= 2
    assert "torch.mm at the headline shape" in stage["mm_end"]


@pytest.mark.slow
def test_oom_is_recorded_and_the_estimate_bounds_the_measured_peaks(tmp_path):
    """Isolated children under a 0.2 GiB limit: torch.mm (one 64 MiB matrix) and the fused
    loss fit, the authors' loss (about 7 matrices) is recorded as oom, not a crash. The
    memory model names exactly that case as over the limit, and bounds what fit."""
    import cases
    import memory

    csv_path = tmp_path / "oom.csv"
    batch, limit_gib = 4096, 0.2
    done = _run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--device",
            "cpu",
            "--isolate",
            "--backends",
            "authors,cpu",
            "--sizes",
            str(batch),
            "--dims",
            "16",
            "--passes",
            "forward_backward",
            "--mem-limit-gib",
            str(limit_gib),
            "--min-time",
            "0",
            "--csv",
            str(csv_path),
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(csv_path)
    _check_rows(rows)
    status = {r["backend"]: r["status"] for r in rows}
    assert status == {"torch_mm": "ok", "authors": "oom", "cpu": "ok"}
    floor = next(r for r in rows if r["backend"] == "torch_mm")
    matrix_bytes = batch * batch * 4
    assert 0.9 * matrix_bytes <= int(floor["peak_extra_bytes"]) <= 2 * matrix_bytes
    assert "can't allocate memory" in (tmp_path / "oom.log").read_text()

    plan = cases.with_floors(
        cases.custom_plan(
            ["authors", "cpu"], [batch], [16], ["fp32"], ["selhn"], ["half"],
            ("forward_backward",), [False],
        )
    )  # fmt: skip
    need = memory.plan_memory(plan, 0, int(limit_gib * memory.GIB))
    assert [c.backend for c in need.capped] == ["authors"]
    for case in plan:
        row = next(r for r in rows if r["backend"] == case.backend)
        if row["status"] == "ok":
            assert int(row["peak_extra_bytes"]) <= memory.estimated_extra_bytes(case)


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


def test_bench_sources_stay_small_enough_to_read():
    """The project's size rule for bench/: files under about 600 lines, functions under
    about 120."""
    import ast

    for path in sorted(BENCH.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 120, f"{path.name}:{node.name} has {length} lines"


def test_memory_model_bounds_every_committed_measurement():
    """The estimate a run states up front is an upper bound of every peak recorded in the
    committed CPU results it was fitted to."""
    import cases
    import memory

    rows = [r for r in common.read_rows([common.RESULTS_DIR / "cpu.csv"]) if r["status"] == "ok"]
    assert len(rows) > 100
    for row in rows:
        backend = row["backend"].split(":")[0]
        case = cases.Case(backend, int(row["B"]), int(row["D"]), row["dtype"])
        assert int(row["peak_extra_bytes"]) <= memory.estimated_extra_bytes(case), row
