"""Compile what a benchmark stage will run, before anything is timed.

    python bench/warm_cache.py --backend triton --dims 1024 --dtypes bf16 [--triton-backward V]
    python bench/warm_cache.py --backend authors_compiled --batch 16384 --dims 1024 --dtypes bf16

For a fused backend, one forward and backward of the loss at every headline gate mix, with
and without ``deterministic`` and ``return_stats``, at a small batch: the Triton kernels
specialise on dtypes, constexprs and the divisibility of sizes, not on the batch, so a
batch of 512 compiles the kernels a batch of 16384 uses and fills the on-disk cache that
later processes read. ``authors_compiled`` specialises on the exact shape, so it is warmed
at the batch given. bench/gpu_check.sh runs several of these processes at once. Should a
kernel specialise on something else, the benchmark's own untimed warm-up compiles it:
warming saves time, it never changes a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
from common import DTYPES, make_inputs  # noqa: E402


def warm(
    backend: str, batch: int, dim: int, dtype: str, device: torch.device, mixes: list[str]
) -> int:
    """Forward and backward of every option the benchmark plans use; returns the calls."""
    import baselines

    import selhn_ext

    calls = 0
    if backend == "authors_compiled":
        img, txt = make_inputs(batch, dim, DTYPES[dtype], "half", device)
        img.requires_grad_(True)
        baselines.compiled_authors_loss()(img, txt).backward()
        return 1
    for mix in mixes:
        img, txt = make_inputs(batch, dim, DTYPES[dtype], mix, device)
        for deterministic, stats in ((False, False), (True, False), (False, True)):
            img.grad = txt.grad = None
            img.requires_grad_(True)
            txt.requires_grad_(True)
            out = selhn_ext.selhn_loss(
                img, txt, backend=backend, deterministic=deterministic, return_stats=stats
            )
            (out[0] if stats else out).backward()
            calls += 1
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dims", default="1024", help="comma list")
    parser.add_argument("--dtypes", default="bf16", help="comma list")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--triton-backward", default="", help="the Triton backward variant")
    parser.add_argument(
        "--gate-mixes", default=",".join(cases.HEADLINE_GATE_MIXES), help="comma list"
    )
    args = parser.parse_args(argv)
    if args.triton_backward:  # read once when selhn_ext is imported
        os.environ[cases.TRITON_BACKWARD_ENV] = args.triton_backward
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    calls = 0
    for dtype in args.dtypes.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            calls += warm(args.backend, args.batch, dim, dtype, device, args.gate_mixes.split(","))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    variant = f":{args.triton_backward}" if args.triton_backward else ""
    print(
        f"warmed {args.backend}{variant} ({args.dtypes}, D {args.dims}, B {args.batch}): "
        f"{calls} calls in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
