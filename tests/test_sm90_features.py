"""bench/sm90_features.py, the record of what triton's cluster and warp-specialization
options do to the forward on sm_90: its source edit and its reading of compiler failures
(the compiles themselves need minutes; the script is run by hand, see its docstring)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sm90_features  # noqa: E402


@pytest.mark.parametrize("loops", ["k", "tiles"])
def test_ws_copy_marks_only_the_chosen_loop(tmp_path, loops):
    kernel = sm90_features.ws_copy(tmp_path, loops)
    assert kernel.__name__ == "partials_kernel"
    assert kernel.fn.__module__ == "ws_forward_kernels"
    tile_text = (tmp_path / "ws_tile.py").read_text()
    forward_text = (tmp_path / "ws_forward_kernels.py").read_text()
    assert ("warp_specialize=True" in tile_text) == (loops == "k")
    assert ("warp_specialize=True" in forward_text) == (loops == "tiles")
    assert "from ws_tile import" in forward_text
    assert (sm90_features.K_LOOP in tile_text) == (loops != "k")


def test_ws_copy_fails_loudly_when_the_loop_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(sm90_features, "K_LOOP", "for k0 in range(0, D, 2 * BK):")
    with pytest.raises(RuntimeError, match="no longer in the source"):
        sm90_features.ws_copy(tmp_path, "k")


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        ("x\npython: PlanCTA.cpp:212: void f(): Assertion `!tiled && \"CTA\"' failed.\n",
         "Assertion `!tiled && \"CTA\"' failed"),
        ("Unexpected asyncTaskIds.size()\nUNREACHABLE executed at WSDataPartition.cpp:777!\n",
         "Unexpected asyncTaskIds.size() UNREACHABLE executed at WSDataPartition.cpp:777!"),
        ("note: Pipeline failed while executing [`ConvertTritonGPUToLLVM` on 'builtin']",
         "Pipeline failed while executing [`ConvertTritonGPUToLLVM`"),
        ("nothing the compiler said\n", ""),
    ],
)  # fmt: skip
def test_first_reason_quotes_the_compiler(stderr, reason):
    assert sm90_features.first_reason(stderr) == reason
