"""The static sm_90 profile of the forward kernel at the headline specialisation (no GPU):
bench/static_profile.py compiles it ahead of time and reads the cubin.

Fails if the bf16 or fp16 forward spills or uses stack, if it loses wgmma or its TMA
loads, or if the interior tiles' epilogue at D = 1024 takes more than 20 integer/logic
(ALU pipe) thread instructions per S element; or if the backward's S recompute without
ids spills or no longer fits two CTAs per SM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "static_profile.py")
HEADLINE = "ids=False,deterministic=False,tma=True"
EPILOGUE_ALU_LIMIT = 20.0


@pytest.mark.slow
@pytest.mark.backend("triton")
def test_headline_forward_does_not_spill_and_has_a_lean_epilogue(tmp_path):
    profiles = _compiled_profiles(tmp_path, "partials_kernel", HEADLINE)
    from static_profile import static_rows

    assert sorted(p.dtype for p in profiles) == ["bfloat16", "float16"]
    for p in profiles:
        assert (p.stack_bytes, p.spill_store_bytes, p.spill_load_bytes) == (0, 0, 0), p.label
        assert p.wgmma and p.tma_loads, p.label
        assert set(p.epilogue) == {"interior", "masked"}, p.label
    for row in static_rows(profiles):
        if row["D"] == 1024 and row["path"] == "interior":
            assert 0 < row["epi_alu"] <= EPILOGUE_ALU_LIMIT, row


@pytest.mark.slow
@pytest.mark.backend("triton")
def test_backward_s_recompute_fits_two_ctas_per_sm_without_spills(tmp_path):
    """weights_kernel, bf16 and fp16 without ids, as launched: no spill or stack, wgmma,
    two CTAs per SM, and one epilogue path per part (A, B)."""
    profiles = _compiled_profiles(tmp_path, "weights_kernel", "ids=False")
    from static_model import resident_ctas

    assert sorted(p.dtype for p in profiles) == ["bfloat16", "float16"]
    for p in profiles:
        assert (p.stack_bytes, p.spill_store_bytes, p.spill_load_bytes) == (0, 0, 0), p.label
        assert p.wgmma and p.num_warps == 4, p.label
        assert resident_ctas(p) == 2, (p.label, p.regs, p.shared_bytes)
        assert set(p.epilogue) == {"part_a", "part_b"}, p.label


@pytest.mark.backend("triton")
def test_the_kept_forward_tile_is_the_one_the_tile_sweep_prefers():
    """bench/results/tiles_sm90.csv holds every candidate of bench/tile_sweep.py under
    both tritons (the backward's S-tile kernel at those its panels allow), and config.py
    keeps the forward the sweep's rule prefers (no spill, then the lowest modelled
    forward kernel time)."""
    require_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import csv

    import tile_sweep

    with open(tile_sweep.TILES_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = tile_sweep.kept_candidate()
    kept_backward = tile_sweep.kept_backward_candidate()
    versions = sorted({r["triton"] for r in rows})
    assert len(versions) >= 2, versions  # the pinned triton and the GPU machine's 3.6
    backward = {
        c.name for c in tile_sweep.backward_candidates(tile_sweep.CANDIDATES, kept_backward)
    }
    for version in versions:
        for kernel, names in (("partials_kernel", {c.name for c in tile_sweep.CANDIDATES}),
                              ("weights_kernel", backward)):  # fmt: skip
            found = {
                r["candidate"] for r in rows if r["triton"] == version and r["kernel"] == kernel
            }
            assert found == names, (version, kernel, found)
        assert tile_sweep.preferred(rows, version) == kept.name, version
        for kernel, candidate in (("partials_kernel", kept), ("weights_kernel", kept_backward)):
            marked = {
                r["candidate"] for r in rows
                if r["triton"] == version and r["kernel"] == kernel and r["kept"] == "True"
            }  # fmt: skip
            assert marked == {candidate.name}, (version, kernel, marked)


def _compiled_profiles(tmp_path, kernel: str, select: str) -> list:
    """Compile ``kernel`` for sm_90 at bf16 and fp16 (the rows ``select`` picks) through
    bench/static_profile.py, outside the interpreter, and return its profiles."""
    require_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    out = tmp_path / "profiles.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, SCRIPT, "--kernels", kernel, "--dtypes", "bf16,fp16",
            "--select", select, "--json-out", str(out)]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from static_profile import Profile

    return [Profile(**item) for item in json.loads(out.read_text())]
