"""The roofline model of the static sm_90 profile (bench/static_profile.py).

Every figure it produces is a MODEL PREDICTION, not a measurement; the first run of
bench/gpu_check.sh on a GPU calibrates it. Its constants and assumptions are below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from static_profile import Profile

DIMS = (256, 1024)  # embedding sizes of the profile's rows and of the model

# Assumptions:
#
# - One SM at CLOCK_HZ issues one warp instruction per clock on each of its 4 schedulers
#   and retires, per clock, PIPE_RATE thread operations on each pipe (CUDA programming
#   guide throughput table for compute capability 9.0; IMAD is counted at the FP32 rate,
#   the optimistic side). Dense wgmma: 2048 bf16/fp16 multiply-adds per clock per SM.
# - torch.mm of the headline shape runs at MM_EFFICIENCY of that tensor peak (the lent
#   H200 ran 8192^3 bf16 at about 790 TFLOP/s, the B = 16384, D = 1024 product in
#   0.70-0.75 ms, gpu-performance.md), and the kernels' K loops reach the same efficiency
#   unless their L2 operand traffic or their own instruction issue is slower.
# - K loop per tile = max(MMA, L2 traffic of its operand tiles at L2_BYTES_PER_S, issue
#   of its instructions). The rest of the tile (epilogue, the backward's gradient loop
#   minus its MMAs, whose MMA time is added to the K loop's) runs after it at the rate of
#   its busiest pipe or issue, whichever is slower: one CTA per SM overlaps nothing.
#   With two or more resident CTAs per SM (registers, shared memory) one CTA's epilogue
#   hides under another's MMA: a tile then costs the larger of the two, not the sum.
# - Global atomics cost their 4 bytes per lane at L2_BYTES_PER_S (optimistic).
# - Tiles spread evenly over the SMs, rounded up to whole waves of resident CTAs.
# - Interior tiles take the forward's interior path; tiles on the diagonal (or at the
#   edge) the masked one.
# - The glue around the B x B kernels (selhn_ext/_triton/glue.py; launches counted by
#   tests/test_triton_glue.py's dispatch-mode and Triton-launch counter, bytes added up
#   from what each glue kernel reads and writes) streams at HBM_EFFICIENCY of the HBM
#   bandwidth plus LAUNCH_S per launch. At B = 16384, D = 1024, bf16, no ids, not
#   deterministic, mode selhn: forward 3 launches (positive scores 67.2 MB, the forward
#   kernel's buffers 0.66 MB, finalize with the packed keys' decoding 2.1 MB: 69.9 MB;
#   before the decoding moved into finalize 4 launches and 70.3 MB); backward
#   3 launches (the gradients kernel 268 MB with nothing gated: three input-dtype operand
#   rows and the output row per gradient row; keys and their sort, estimated at four
#   32-byte passes, 4.9 MB: 273 MB), plus the fp32 dense gradient it reads, 134 MB, once
#   any anchor is gated (it reads a row only where the dense backward wrote it, and with
#   any anchor gated nearly every row is written). Two of the three operand rows, 134 MB,
#   are hardest-negative terms: the anchor's own hardest and, on average, one anchor
#   whose hardest it is. A term of weight 0 is not read (glue_kernels.py), and a gated
#   anchor's hard weight is 0, so they count for the ungated fraction only: 406 MB at
#   1 % gated, 394 MB at 10 %, 273 MB at 100 %. (Until the own hardest row of weight 0
#   was skipped too, 407 MB at every gated fraction.) Before the accumulators' first writes
#   (zero fills, coefficients multiplied by torch): 8 launches and 542 MB at every gated
#   fraction. Before the glue was fused: forward 4 B x D-sized ops and 65 O(B) ops,
#   backward 21 and 54, about 3.8 GB.
# - Backward (the "panels" variant, selhn_ext/_triton/backward_kernels.py): with a
#   fraction f of the anchors gated on each side, weights_kernel recomputes the S tiles
#   touching a gated anchor once (part A, gated rows x every column: f B^2 / (BM BN)
#   tiles; part B, other rows x gated columns: (f - f^2) B^2 / (BM BN)) at the rate its
#   profile gives for each part's code (a profile from before the parts had their own
#   code runs every tile through its one tile loop). Its occupancy comes from the profile
#   like the forward's: at 4 warps (bf16/fp16 without ids, no spills) two CTAs share an
#   SM, so a tile costs the larger of its K loop and its epilogue; at 8 warps (before,
#   and with ids) one CTA, the sum. The K-split sums of the gated-side products (their
#   own loop in weights_kernel, O(f B D) bytes) are not counted. products_kernel does
#   two GEMMs per part, (4 f - 2 f^2) x 2 B^2 D flops in all, at the torch.mm efficiency
#   (MM_EFFICIENCY of peak; its profile is not tile-shaped, so not counted here).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    l2_bytes_per_s: float


DEVICES = (
    Device("H100-SXM (model)", 132, 1.755e9, 3.35e12, 10e12),
    Device("H200 (model)", 132, 1.755e9, 4.8e12, 10e12),
)
TENSOR_FMA_PER_CLOCK = {"bfloat16": 2048, "float16": 2048}  # per SM, dense wgmma
MM_EFFICIENCY = 0.8
PIPE_RATE = {"fma": 128, "alu": 64, "xu": 16, "shfl": 32, "mem": 32, "local": 32}
ISSUE_PER_CLOCK = 4  # warp instructions per SM
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64
GLUE_BYTES = {"forward": 69.9e6, "backward": 273e6}  # at 16384 x 1024, nothing gated
GLUE_GATED_BYTES = 134e6  # the backward's read of the fp32 dense gradient, once gated
GLUE_HARDEST_BYTES = 134e6  # of the backward's, the hardest-negative rows (ungated only)
GLUE_O_B_LAUNCHES = {"forward": 3, "backward": 3}
HBM_EFFICIENCY = 0.7
LAUNCH_S = 3e-6
HEADLINE_B = 16384
GATED_FRACTIONS = (0.0, 0.01, 0.10, 1.0)
# The headline forward: tensor-descriptor loads where the kernel has them (before this
# work it had none, and its label no tma= part).
FORWARD_MODEL_LABELS = (
    "partials torch.{dtype} ieee ids=False deterministic=False tma=True",
    "partials torch.{dtype} ieee ids=False deterministic=False",
)
BACKWARD_MODEL_LABEL = "weights torch.{dtype} ieee ids=False"


def resident_ctas(p: Profile) -> int:
    regs = math.ceil(p.regs / 8) * 8 * 32 * p.num_warps
    return max(1, min(REGISTERS_PER_SM // regs, SHARED_PER_SM // max(p.shared_bytes, 1),
                      WARPS_PER_SM // p.num_warps))  # fmt: skip


def busiest_pipe_cycles(p: Profile, counts: dict[str, float]) -> float:
    """Clocks of one SM for per-warp ``counts`` of one CTA: the slower of issue and pipes."""
    lanes = {pipe: n * 32 * p.num_warps for pipe, n in counts.items()}
    issue = sum(n for pipe, n in counts.items() if pipe != "atomic") * p.num_warps
    pipes = [lanes[pipe] / rate for pipe, rate in PIPE_RATE.items()]
    return max(issue / ISSUE_PER_CLOCK, *pipes)


def tile_seconds(p: Profile, path: str, dim: int, device: Device) -> dict[str, float]:
    """Modelled time of one tile on one SM, and its parts (seconds)."""
    k_steps, inner_steps = p.steps(dim)
    itemsize = 2 if p.dtype in ("bfloat16", "float16") else 4
    mma = p.tile_fma(dim) / (TENSOR_FMA_PER_CLOCK[p.dtype] * MM_EFFICIENCY)
    atomics = sum(c["atomic"] * r for c, r in ((p.inner_loop, inner_steps), (p.epilogue[path], 1)))
    l2_bytes = (p.BM + p.BN) * dim * itemsize * (1 + (p.inner_mma_fma > 0)) \
        + atomics * 32 * 4 * p.num_warps  # fmt: skip
    l2 = l2_bytes / (device.l2_bytes_per_s / device.sms / device.clock_hz)
    k_issue = sum(v for k, v in p.k_loop.items() if k != "atomic") * k_steps * p.num_warps
    main = max(mma, l2, k_issue / ISSUE_PER_CLOCK)
    rest = {pipe: p.inner_loop[pipe] * inner_steps + p.epilogue[path][pipe] for pipe in p.k_loop}
    rest["tensor"] = 0
    epilogue = busiest_pipe_cycles(p, rest)
    overlap = resident_ctas(p) >= 2
    clocks = max(main, epilogue) if overlap else main + epilogue
    return {"tile": clocks / device.clock_hz, "main": main / device.clock_hz,
            "epilogue": epilogue / device.clock_hz}  # fmt: skip


def grid_seconds(p: Profile, tiles: float, masked_tiles: float, dim, device) -> float:
    """Tiles over the SMs in whole waves of resident CTAs."""
    if tiles <= 0:
        return 0.0
    # A kernel with one tile loop (the backward; the forward before its two paths) runs
    # every tile through it.
    interior = "interior" if "interior" in p.epilogue else next(iter(p.epilogue))
    masked = "masked" if "masked" in p.epilogue else interior
    mean = (tile_seconds(p, interior, dim, device)["tile"] * (tiles - masked_tiles)
            + tile_seconds(p, masked, dim, device)["tile"] * masked_tiles) / tiles  # fmt: skip
    slots = device.sms * resident_ctas(p)
    return math.ceil(tiles / slots) * slots / device.sms * mean


def backward_tiles_seconds(p: Profile, frac: float, b: int, dim, device) -> float:
    """weights_kernel's S tiles at gated fraction ``frac``: parts A and B at their own
    paths' rates, in whole waves of resident CTAs."""
    whole = b * b / (p.BM * p.BN)  # tiles of all of S
    tiles = {"part_a": math.ceil(frac * whole), "part_b": math.ceil((frac - frac**2) * whole)}
    total = sum(tiles.values())
    if total <= 0:
        return 0.0
    only = next(iter(p.epilogue))
    seconds = sum(
        tile_seconds(p, path if path in p.epilogue else only, dim, device)["tile"] * count
        for path, count in tiles.items()
    )
    slots = device.sms * resident_ctas(p)
    return math.ceil(total / slots) * slots / device.sms * seconds / total


def diagonal_tiles(b: int, bm: int, bn: int) -> int:
    """Tiles of a b x b grid of bm x bn tiles that hold a diagonal element or an edge."""
    count = 0
    for rb in range(math.ceil(b / bm)):
        last = min((rb + 1) * bm, b) - 1
        count += last // bn - rb * bm // bn + 1
    edge = (b % bm != 0) * math.ceil(b / bn) + (b % bn != 0) * math.ceil(b / bm)
    return count + edge


def model_rows(profiles: list[Profile]) -> list[dict]:
    """Predicted milliseconds and ratios to one torch.mm (MODEL, see the notes above)."""
    rows = []
    by_label = {(p.triton, p.label): p for p in profiles}
    for (version, label), fwd in sorted(by_label.items()):
        dtype = fwd.dtype
        if label not in {x.format(dtype=dtype) for x in FORWARD_MODEL_LABELS}:
            continue
        if dtype not in TENSOR_FMA_PER_CLOCK:
            continue
        weights = by_label.get((version, BACKWARD_MODEL_LABEL.format(dtype=dtype)))
        b = HEADLINE_B
        for device, dim, frac in (
            (d, n, f) for d in DEVICES for n in DIMS for f in GATED_FRACTIONS
        ):  # fmt: skip
            peak = device.sms * TENSOR_FMA_PER_CLOCK[dtype] * 2 * device.clock_hz
            mm = 2 * b * b * dim / (peak * MM_EFFICIENCY)
            tiles = math.ceil(b / fwd.BM) * math.ceil(b / fwd.BN)
            fwd_s = grid_seconds(fwd, tiles, diagonal_tiles(b, fwd.BM, fwd.BN), dim, device)
            bwd_s = math.nan
            if weights is not None:
                products = (4 * frac - 2 * frac * frac) * mm
                bwd_s = backward_tiles_seconds(weights, frac, b, dim, device) + products
            glue = {}
            for direction in ("forward", "backward"):
                size = b * dim / (16384 * 1024)
                extra = 0.0
                if direction == "backward":  # the dense gradient, once read; the gated
                    # anchors' hardest rows (weight 0), never read
                    extra = GLUE_GATED_BYTES * (frac > 0) - GLUE_HARDEST_BYTES * frac
                glue[direction] = (GLUE_BYTES[direction] + extra) * size / (
                    device.hbm_bytes_per_s * HBM_EFFICIENCY
                ) + GLUE_O_B_LAUNCHES[direction] * LAUNCH_S  # fmt: skip
            interior = tile_seconds(fwd, next(iter(fwd.epilogue)), dim, device)
            total = fwd_s + glue["forward"] + bwd_s + glue["backward"]
            rows.append({
                "source": "model", "device": device.name, "triton": version, "dtype": dtype,
                "B": b, "D": dim, "gated_fraction": frac, "tile": f"{fwd.BM}x{fwd.BN}",
                "ctas_per_sm": resident_ctas(fwd),
                "interior_tile_main_us": interior["main"] * 1e6,
                "interior_tile_epilogue_us": interior["epilogue"] * 1e6,
                "mm_ms": mm * 1e3, "forward_kernel_ms": fwd_s * 1e3,
                "forward_glue_ms": glue["forward"] * 1e3, "backward_kernels_ms": bwd_s * 1e3,
                "backward_glue_ms": glue["backward"] * 1e3,
                "forward_kernel_ratio": fwd_s / mm,
                "forward_ratio": (fwd_s + glue["forward"]) / mm,
                "kernels_only_ratio": (fwd_s + bwd_s) / mm,
                "forward_backward_ratio": total / mm,
            })  # fmt: skip
    return rows
