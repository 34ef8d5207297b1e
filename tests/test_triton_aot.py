"""The Triton kernels compile for sm_90 ahead of time, with no GPU (tests/triton_aot.py).

The interpreter accepts code the real compiler rejects (a tl.dot dimension under 16,
some casts); this compiles every specialization the dispatch can launch in a subprocess
with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import require_backend

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")
ROOT = os.path.dirname(os.path.dirname(SCRIPT))


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


@pytest.mark.backend("triton")
def test_specialization_list_covers_the_dispatch():
    require_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    out = _run("--list", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    labels = out.stdout.splitlines()[1:-1]
    # partials: ids x deterministic x (pointer and descriptor loads for the 3 tensor-core
    # precisions, pointer loads for fp32 ieee); its exact fix-up: 4 precisions x ids;
    # backward: 4 precisions x (ids x weights + products); the two compaction kernels x
    # factored coefficients or not; the glue: 3 dtypes x (positive scores + gradients
    # without dense terms, with them, with them read where written), finalize for 4 modes
    # x with and without negative counts x packed maxima or not, keys, buffers, decoding.
    glue = 3 * (1 + 3) + 4 * 2 * 2 + 3
    assert len(labels) == 2 * 2 * (3 * 2 + 1) + 4 * 2 + 4 * (2 + 1) + 2 * 2 + glue
    for needle in ("torch.bfloat16 ieee", "torch.float16 ieee", "torch.float32 ieee",
                   "torch.float32 tf32", "ids=True", "deterministic=True", "tma=True",
                   "exact_fixup torch.bfloat16", "count_kernel",
                   "compact_kernel", "weights torch.bfloat16",
                   "products torch.float16 ieee", "glue finalize selhn", "packed=True",
                   "glue gradients bf16", "glue positive fp16"):  # fmt: skip
        assert any(needle in label for label in labels), needle


@pytest.mark.slow
@pytest.mark.backend("triton")
def test_every_specialization_compiles_for_sm90():
    require_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    out = _run(timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1].endswith("specializations compiled")
    done, total = lines[-1].split()[0].split("/")
    assert done == total and int(total) > 0
    # The 16-bit S products run on Hopper tensor cores (wgmma).
    for line in lines:
        if line.startswith("ok") and ("bfloat16" in line or "float16" in line):
            assert "wgmma" in line, line
        # Tensor-descriptor loads compile to TMA (cp.async.bulk.tensor); pointer loads not.
        if line.startswith("ok") and "tma=" in line:
            assert ("tma=True" in line) == (", tma," in line), line
