"""One forward call of the loss inside an NVTX range, for ``ncu --nvtx-include``.

ncu --nvtx --nvtx-include "selhn_forward/" python3 bench/ncu_forward.py --backend cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DTYPES, make_inputs  # noqa: E402

RANGE_NAME = "selhn_forward"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--gate-mix", default="half")
    args = parser.parse_args()
    import selhn_ext

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 1
    img, txt = make_inputs(args.batch, args.dim, DTYPES[args.dtype], args.gate_mix, "cuda")
    reason = selhn_ext.backend_status(img, txt)[args.backend]
    if reason is not None:
        print(f"backend {args.backend!r} cannot run: {reason}")
        return 1
    for _ in range(2):  # compile and autotune outside the profiled range
        selhn_ext.selhn_loss(img, txt, backend=args.backend)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(RANGE_NAME)
    loss = selhn_ext.selhn_loss(img, txt, backend=args.backend)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    shape = f"B={args.batch} D={args.dim} {args.dtype}"
    print(f"{args.backend} forward {shape}: loss {loss.item():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
