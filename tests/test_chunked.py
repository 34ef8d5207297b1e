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


def _peak_extra_mib(batch: int, mmap_threshold: int | None) -> float:
    """Peak RSS growth of one forward + backward at ``batch``, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(batch)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) / 1024


def _panel_set_mib(batch: int) -> float:
    """One set of the row block's panels, chunk_rows x B: two fp32 and two bool."""
    return CHUNK_ROWS * batch * (2 * 4 + 2 * 1) / 2**20


@pytest.mark.slow
def test_extra_memory_grows_linearly_with_the_batch():
    """Peak RSS of forward + backward at two batch sizes, each in a fresh process.

    With a fixed mmap threshold every panel-sized block is mapped when allocated and
    unmapped when freed, so the peak is what is live at once: doubling B (the row block
    fixed) doubles it (measured: 15.0 and 30.0 MiB at B = 8192 and 16384). With glibc's
    default settings (the ones users run, which held freed panels before) the allocator
    may keep some freed panels, so the same peaks scatter between 15 and 46 MiB from run
    to run; there the bound is three panel sets plus 16 MiB for the O(B*D) tensors and the
    runtime, which a B x B bool (256 MiB at B = 16384) or an N x N fp32 exceeds many times.
    """
    live = {batch: _peak_extra_mib(batch, 65536) for batch in (8192, 16384)}
    assert 1.6 < live[16384] / live[8192] < 2.4, live
    for batch, mib in live.items():
        assert _panel_set_mib(batch) / 2 < mib < 2 * _panel_set_mib(batch) + 16, (batch, live)
    for batch in (8192, 16384):
        default = _peak_extra_mib(batch, None)
        assert default < 3 * _panel_set_mib(batch) + 16, (batch, default)
