"""Backend ``chunked``: its extra memory grows linearly with the batch.

Its values are checked against the reference and a brute-force loop in
test_reference.py, and against the fused backends in their own test files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from selhn_ext.chunked import CHUNK_ROWS

pytestmark = pytest.mark.backend("chunked")

MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import selhn_ext

    torch.set_num_threads(1)

    def status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(field + " missing from /proc/self/status")

    def pairs(batch):
        gen = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(batch, 4, generator=gen), dim=1)
        txt = torch.nn.functional.normalize(torch.randn(batch, 4, generator=gen), dim=1)
        return img.requires_grad_(), txt.requires_grad_()

    def loss_pass(img, txt):
        # mode "all" gates every anchor: the backward recomputes every block too.
        selhn_ext.selhn_loss(img, txt, mode="all", backend="chunked").backward()

    loss_pass(*pairs(300))  # warm up: thread pools, lazy initialisation
    inputs = pairs(int(sys.argv[1]))
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    loss_pass(*inputs)
    print(max(0, status_kib("VmHWM") - base))
    """
)


@pytest.mark.slow
def test_extra_memory_grows_linearly_with_the_batch():
    """Peak RSS of forward + backward at two batch sizes, each in a fresh process with
    glibc's default allocator settings (the ones that held freed panels before). The row
    block is fixed, so doubling B doubles the panels; the bound is two panels sets of
    chunk_rows x B (fp32 and bool) plus 16 MiB for the O(B*D) tensors and the runtime."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = {}
    for batch in (8192, 16384):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(batch)],
            capture_output=True, text=True, env=env, cwd=root, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        extra[batch] = int(out.stdout.split()[-1]) / 1024  # MiB
    panels = {b: CHUNK_ROWS * b * (2 * 4 + 2 * 1) / 2**20 for b in extra}
    for batch, mib in extra.items():
        assert mib < 2 * panels[batch] + 16, (batch, extra)
    assert extra[16384] < 2.5 * max(extra[8192], 4.0), extra
    assert extra[16384] > panels[16384] / 2, extra  # the measurement sees the panels
