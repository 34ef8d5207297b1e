"""Launcher of the backward kernels (backward_kernels.py): the off-diagonal gradient of the
gated anchors, with one S recompute per touched tile and the products on tensor cores.

Launches, all on one stream and none sized by a device-side count (no host sync):

    count_kernel, compact_kernel    both sides' orders, gated counts, scale,
                                    the zeroed tickets (no fill launch)        2
    weights_kernel(t), products_kernel(t)   for t < steps                      2 * steps
    weights_kernel(steps)           adds the last step's partial products      1

``steps`` = ceil(max(b, N) / P) is fixed by the shapes. Each launch is a persistent grid
whose programs claim work items until the device-side count of items is spent, so a
launch costs in proportion to the gated anchors of its panel; a step past the gated
anchors of both sides has no item and returns at once.

The two fp32 gradients are allocated without a fill: each element's first term is stored
(backward_kernels.py, "First writes"). ``dense_backward_for_sparse`` returns them as
written (DenseAccumulators, for glue.py's gradients kernel, which reads only the rows
written); ``dense_backward`` zeroes the rest (two masked fills) for the kernel interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ..kernel_interface import Block, GatedAnchors, GatedFactors
from . import backward_kernels
from .config import (
    block_config,
    check_block,
    ids_or_placeholder,
    precision,
    sm_count,
    testing,
    upcast,
)

COMPACT_BLOCK = 1024
# The int32 state: gated rows, gated columns, scale bits, spare, one ticket per launch.
STATE_HEADER = 4
# Persistent programs per launch without a GPU (the interpreter runs them one by one;
# the first claims every item, so more cost nothing there).
CPU_PROGRAMS = 4
# W rows start at multiples of this many entries (64 bytes in fp32, 32 in 16 bits).
W_ALIGN = 16


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of the gradient products (output GM x GD, K step GK)."""

    GM: int
    GD: int
    GK: int
    num_warps: int
    num_stages: int


GEMM_CONFIGS: dict[torch.dtype, GemmConfig] = {
    torch.bfloat16: GemmConfig(GM=128, GD=128, GK=64, num_warps=8, num_stages=3),
    torch.float16: GemmConfig(GM=128, GD=128, GK=64, num_warps=8, num_stages=3),
    torch.float32: GemmConfig(GM=64, GD=64, GK=32, num_warps=4, num_stages=3),
}
# Panel sizes are multiples of this (a multiple of every BM, BN and GM), so a panel's
# gated anchors fill whole blocks.
PANEL_UNIT = 128
PANEL_MIN, PANEL_MAX = 512, 2048


def panel_size(dim: int, n_anchors: int) -> int:
    """P, the gated anchors per panel: about 2 D, between PANEL_MIN and PANEL_MAX, and no
    more than the anchors there are.

    Memory: the two W buffers hold P x (N + b) entries of the input dtype, about the
    size of the two embeddings when P = 2 D. Speed: the other side's product adds P
    terms per read-add-write of its fp32 gradient (P / 4 flop per byte), compute-bound
    on sm_90 from P of about 1200; a larger P only saves launches.
    """
    if testing.panel_size is not None:
        size = testing.panel_size
        if size <= 0 or size % PANEL_UNIT:
            raise ValueError(f"panel_size must be a positive multiple of {PANEL_UNIT}, got {size}")
        return size
    size = min(max(triton.cdiv(2 * dim, PANEL_UNIT) * PANEL_UNIT, PANEL_MIN), PANEL_MAX)
    return min(size, triton.cdiv(n_anchors, PANEL_UNIT) * PANEL_UNIT)


# The dense backward's variants (dispatch.py lists the same names). One so far: "panels"
# recomputes each S tile that touches a gated anchor once, into W panels, and runs the
# gradient products on tensor cores with owned output tiles (no float atomics).
VARIANTS = ("panels",)


def persistent_programs(device: torch.device, per_sm: int = 1) -> int:
    """``per_sm`` programs per SM (as many as fit at once), or CPU_PROGRAMS."""
    sms = sm_count(device)
    return CPU_PROGRAMS if sms is None else per_sm * sms


def compact(
    row_gated: Tensor,
    col_gated: Tensor,
    row_coef: Tensor,
    col_coef: Tensor,
    launches: int,
    factors: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_order, col_order, row_weight, col_weight, state) on the device, in two
    launches over blocks of both sides, nothing read back.

    ``row_order`` lists the gated rows ascending, then the other rows descending (the
    same for columns); ``row_weight`` = row_coef / scale where gated, else 0, with
    scale the largest finite |coefficient| of a gated anchor (1 if none); ``state``
    (int32) holds the gated row and column counts, the scale's fp32 bits and a zero
    ticket for each of ``launches`` later launches. With ``factors`` (fp32, one per
    side) each coefficient is ``coef * factor``, the product formed in the kernels.
    """
    b, n_cols = row_gated.shape[0], col_gated.shape[0]
    device = row_gated.device
    row_order = torch.empty(b, dtype=torch.int32, device=device)
    col_order = torch.empty(n_cols, dtype=torch.int32, device=device)
    row_weight = torch.empty(b, dtype=torch.float32, device=device)
    col_weight = torch.empty(n_cols, dtype=torch.float32, device=device)
    blocks = triton.cdiv(b, COMPACT_BLOCK) + triton.cdiv(n_cols, COMPACT_BLOCK)
    # One allocation, no fill: the state (zeroed by count_kernel, which runs first), then
    # per-block counts and maxima (at least one program, so that the state is zeroed).
    count_programs = max(blocks, 1)
    state = torch.empty(STATE_HEADER + launches + 2 * count_programs, dtype=torch.int32,
                        device=device)  # fmt: skip
    per_block = state[STATE_HEADER + launches :]
    row_factor, col_factor = factors if factors is not None else (row_coef, col_coef)
    coefs = (row_coef, row_factor, col_coef, col_factor)
    flags = (_flags(row_gated), _flags(col_gated))
    factored = factors is not None
    backward_kernels.count_kernel[(count_programs,)](
        *flags, *coefs, per_block, state, STATE_HEADER + launches, b, n_cols,
        FACTORED=factored, BLOCK=COMPACT_BLOCK,
    )  # fmt: skip
    backward_kernels.compact_kernel[(blocks,)](
        *flags, *coefs, row_order, col_order, row_weight, col_weight, state, per_block, b,
        n_cols, FACTORED=factored, BLOCK=COMPACT_BLOCK,
    )  # fmt: skip
    return row_order, col_order, row_weight, col_weight, state[: STATE_HEADER + launches]


def _flags(gated: Tensor) -> Tensor:
    """bool flags as int8 (a view, no copy, when already contiguous)."""
    gated = gated.contiguous()
    return gated.view(torch.int8) if gated.dtype == torch.bool else gated.to(torch.int8)


class DenseAccumulators(NamedTuple):
    """The dense backward's fp32 gradients as the kernels leave them: a row is written
    only where backward_kernels.py's "First writes" says, the rest is uninitialised. Read
    them through ``written_or_zero``, or glue.py's gradients kernel, which skips the rest."""

    rows: Tensor  # (b, D) fp32
    cols: Tensor  # (N, D) fp32
    state: Tensor  # int32, compact's state (the gated counts first)
    row_gated: Tensor  # (b,) int8 flags
    col_gated: Tensor  # (N,) int8


def accumulators(b: int, n_cols: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fp32 gradients, uninitialised: no fill launch, no bytes moved (the tests
    replace this by a NaN fill to catch a read before the first write)."""
    rows = torch.empty(b, dim, dtype=torch.float32, device=device)
    return rows, torch.empty(n_cols, dim, dtype=torch.float32, device=device)


def written_or_zero(acc: DenseAccumulators) -> tuple[Tensor, Tensor]:
    """The full gradients: rows the backward never wrote set to zero, on the device (the
    rule of "First writes" in backward_kernels.py; glue_kernels.py's _dense_term too)."""
    gated_rows = acc.state[backward_kernels.GATED_ROWS.value]  # 0-d views, no sync
    gated_cols = acc.state[backward_kernels.GATED_COLS.value]
    row_written = (acc.row_gated != 0) | (gated_cols > 0)
    col_written = (gated_rows > 0) | ((acc.col_gated != 0) & (gated_rows < acc.rows.shape[0]))
    return (
        acc.rows.masked_fill_(~row_written[:, None], 0.0),
        acc.cols.masked_fill_(~col_written[:, None], 0.0),
    )


def dense_backward(
    block: Block,
    margin: float,
    gated: GatedAnchors,
    *,
    deterministic: bool = False,
    allow_tf32: bool = False,
    variant: str = VARIANTS[0],
) -> tuple[Tensor, Tensor]:
    """The kernel interface's dense_backward (see kernel_interface.py), for ``variant``
    (one of VARIANTS, chosen by dispatch.py).

    Every output tile has one writer and the launches run in order, so the result is the
    same on every run: ``deterministic`` changes nothing here and costs nothing.
    """
    return written_or_zero(_accumulate(block, margin, gated, None, allow_tf32))


def dense_backward_for_sparse(
    block: Block,
    margin: float,
    gated: GatedFactors,
    *,
    deterministic: bool = False,
    allow_tf32: bool = False,
    variant: str = VARIANTS[0],
) -> DenseAccumulators:
    """dense_backward for glue.py's gradients kernel: the accumulators left as written,
    and each coefficient's product (upstream x dense weight) formed in the compaction."""
    anchors = GatedAnchors(gated.row_upstream, gated.col_upstream, gated.row_gated,
                           gated.col_gated)  # fmt: skip
    factors = tuple(
        w.to(torch.float32).contiguous() for w in (gated.row_dense_weight, gated.col_dense_weight)
    )
    return _accumulate(block, margin, anchors, factors, allow_tf32)


def _accumulate(
    block: Block,
    margin: float,
    gated: GatedAnchors,
    factors: tuple[Tensor, ...] | None,
    allow_tf32: bool,
) -> DenseAccumulators:
    """The launches of the module docstring (``factors``: see ``compact``)."""
    check_block(block)
    rows, cols, col_pos, row_offset = block.rows, block.cols, block.col_pos, block.row_offset
    row_ids, col_ids = block.row_ids, block.col_ids
    row_coef, col_coef, row_gated, col_gated = gated
    cfg, gemm = block_config(rows.dtype), GEMM_CONFIGS[rows.dtype]
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    device = rows.device
    col_pos = col_pos.to(torch.float32).contiguous()
    row_ids_t, has_ids = ids_or_placeholder(row_ids, device)
    col_ids_t, _ = ids_or_placeholder(col_ids, device)
    row_coef = row_coef.to(torch.float32).contiguous()
    col_coef = col_coef.to(torch.float32).contiguous()
    grad_rows, grad_cols = accumulators(b, n_cols, dim, device)

    panel = panel_size(dim, max(b, n_cols))
    steps = triton.cdiv(max(b, n_cols), panel)
    row_order, col_order, row_weight, col_weight, state = compact(
        row_gated, col_gated, row_coef, col_coef, 2 * steps + 1, factors
    )
    # W / scale of one panel of each part, in the input dtype (fp32 for fp32 inputs):
    # (P, N) for part A, rows padded to a multiple of W_ALIGN entries so that each starts
    # aligned, and (b, P) for part B.
    ld_a = triton.cdiv(n_cols, W_ALIGN) * W_ALIGN
    w_a = torch.empty(panel * ld_a, dtype=rows.dtype, device=device)
    w_b = torch.empty(b * panel, dtype=rows.dtype, device=device)
    # The gated sides' partial products (K splits x panel rows fit in a panel).
    ws_a = torch.empty(panel * dim, dtype=torch.float32, device=device)
    ws_b = torch.empty(panel * dim, dtype=torch.float32, device=device)
    counter = testing.tile_counter
    programs = persistent_programs(device)  # products_kernel: one CTA per SM fits
    # weights_kernel at 4 warps (no ids) fits two CTAs per SM (bench/static_profile.py).
    weight_programs = persistent_programs(device, 2 if cfg.backward_warps(has_ids) == 4 else 1)
    prec, up = precision(rows.dtype, allow_tf32), upcast(rows.dtype)
    strides = (rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1))
    for step in range(steps + 1):
        backward_kernels.weights_kernel[(weight_programs,)](
            rows, cols, col_pos, row_ids_t, col_ids_t, row_weight, col_weight,
            row_order, col_order, state, w_a, w_b, ws_a, ws_b, grad_rows, grad_cols,
            counter if counter is not None else state,
            b, n_cols, dim, row_offset, *strides, float(margin), step, panel, ld_a, programs,
            HAS_IDS=has_ids,
            COUNT_TILES=counter is not None,
            REVERSE=testing.reverse_block_order,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GM=gemm.GM, GD=gemm.GD,
            PRECISION=prec, UPCAST=up,
            num_warps=cfg.backward_warps(has_ids), num_stages=cfg.num_stages,
        )  # fmt: skip
        if step == steps:  # the last launch only adds the last step's partial products
            break
        backward_kernels.products_kernel[(programs,)](
            rows, cols, row_order, col_order, state, w_a, w_b, ws_a, ws_b, grad_rows, grad_cols,
            b, n_cols, dim, *strides, step, panel, ld_a, programs,
            REVERSE=testing.reverse_block_order,
            GM=gemm.GM, GD=gemm.GD, GK=gemm.GK,
            PRECISION=prec, UPCAST=up,
            num_warps=gemm.num_warps, num_stages=gemm.num_stages,
        )  # fmt: skip
    return DenseAccumulators(grad_rows, grad_cols, state, _flags(row_gated), _flags(col_gated))
