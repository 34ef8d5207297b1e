"""Launcher of the backward kernels (backward_kernels.py): the off-diagonal gradient of the
gated anchors, through the ``tiles`` path or the ``panel`` path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ..kernel_interface import Block, GatedAnchors
from . import backward_kernels
from .config import (
    block_config,
    check_block,
    column_splits,
    ids_or_placeholder,
    precision,
    testing,
    upcast,
)

COMPACT_BLOCK = 1024


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of the panel backward's gradient GEMMs (output GM x GD, K step GK)."""

    GM: int
    GD: int
    GK: int
    num_warps: int
    num_stages: int


PANEL_GEMM_CONFIGS: dict[torch.dtype, GemmConfig] = {
    torch.bfloat16: GemmConfig(GM=128, GD=128, GK=64, num_warps=8, num_stages=3),
    torch.float16: GemmConfig(GM=128, GD=128, GK=64, num_warps=8, num_stages=3),
    torch.float32: GemmConfig(GM=64, GD=64, GK=32, num_warps=4, num_stages=3),
}
# Panel sizes are multiples of this (a multiple of every BM, BN and GM above), so panel
# boundaries fall on block boundaries of the compacted list.
PANEL_UNIT = 128
PANEL_MIN, PANEL_MAX = 256, 2048


class BackwardPass(NamedTuple):
    """One launch of dense_backward_kernel (its constexpr flags)."""

    gated_is_row: bool  # the compacted, coefficient-carrying side
    outer_is_gated: bool  # grid axis 0 runs over gated blocks (else over the other side)
    write_rows: bool
    write_cols: bool
    atomic: bool


# Default: two passes with float atomics. Deterministic: each pass owns the gradient rows
# it writes (plain read-add-write in a fixed order); the price is a second recompute of
# every gated tile.
BACKWARD_PASSES: dict[bool, tuple[BackwardPass, ...]] = {
    False: (
        BackwardPass(True, True, True, True, True),  # gated rows x all columns
        BackwardPass(False, True, True, True, True),  # all rows x gated columns
    ),
    True: (
        BackwardPass(True, True, True, False, False),  # gated rows x columns -> grad_rows
        BackwardPass(True, False, False, True, False),  # columns x gated rows -> grad_cols
        BackwardPass(False, True, False, True, False),  # gated columns x rows -> grad_cols
        BackwardPass(False, False, True, False, False),  # rows x gated columns -> grad_rows
    ),
}


def panel_size(dim: int, n_anchors: int) -> int:
    """P, the gated anchors per panel: about 2 D (so the P x N activity buffer is O(N * D),
    the size of the two embeddings), between PANEL_MIN and PANEL_MAX, and no more than the
    anchors there are.

    Why not smaller: each panel reads and writes the other side's whole fp32 gradient
    (8 bytes per P * 2 multiply-adds of the 16-bit GEMM: compute-bound on sm_90 only from
    P of about 2048), and the gated side's GEMM has (P / GM) * (D / GD) output tiles, too
    few to fill the GPU when P is small.
    """
    if testing.panel_size is not None:
        size = testing.panel_size
        if size <= 0 or size % PANEL_UNIT:
            raise ValueError(f"panel_size must be a positive multiple of {PANEL_UNIT}, got {size}")
        return size
    size = min(max(triton.cdiv(2 * dim, PANEL_UNIT) * PANEL_UNIT, PANEL_MIN), PANEL_MAX)
    return min(size, triton.cdiv(n_anchors, PANEL_UNIT) * PANEL_UNIT)


# The dense backward's variants (dispatch.py lists the same names): "tiles" (each
# recomputed tile adds its products into the gradients; float atomics unless
# deterministic) or "panel" (panels of gated anchors, tensor-core GEMMs with owned output
# tiles, no float atomics: deterministic by construction).
VARIANTS = ("tiles", "panel")


def dense_backward(
    block: Block,
    margin: float,
    gated: GatedAnchors,
    *,
    deterministic: bool = False,
    allow_tf32: bool = False,
    variant: str = "tiles",
) -> tuple[Tensor, Tensor]:
    check_block(block)
    rows, cols, col_pos, row_offset = block.rows, block.cols, block.col_pos, block.row_offset
    row_ids, col_ids = block.row_ids, block.col_ids
    row_coef, col_coef, row_gated, col_gated = gated
    cfg = block_config(rows.dtype)
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    device = rows.device
    col_pos = col_pos.to(torch.float32).contiguous()
    row_ids_t, has_ids = ids_or_placeholder(row_ids, device)
    col_ids_t, _ = ids_or_placeholder(col_ids, device)
    grad_rows = torch.zeros(b, dim, dtype=torch.float32, device=device)
    grad_cols = torch.zeros(n_cols, dim, dtype=torch.float32, device=device)
    row_index, row_count = compact(row_gated)
    col_index, col_count = compact(col_gated)
    row_coef = row_coef.to(torch.float32).contiguous()
    col_coef = col_coef.to(torch.float32).contiguous()
    counter = testing.tile_counter
    row_blocks = triton.cdiv(b, cfg.BM)
    col_blocks = triton.cdiv(n_cols, cfg.BN)

    def launch(gated_is_row, outer_is_gated, write_rows, write_cols, atomic):
        outer_is_row = gated_is_row == outer_is_gated
        outer, inner = (row_blocks, col_blocks) if outer_is_row else (col_blocks, row_blocks)
        if atomic:
            splits, per_split = column_splits(outer, inner, device)
        else:  # one program owns each outer block's gradient rows
            splits, per_split = 1, inner
        backward_kernels.dense_backward_kernel[(outer, splits)](
            rows, cols, col_pos, row_ids_t, col_ids_t,
            row_coef if gated_is_row else col_coef,
            row_index if gated_is_row else col_index,
            row_count if gated_is_row else col_count,
            grad_rows, grad_cols,
            counter if counter is not None else row_count,
            b, n_cols, dim, row_offset,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            float(margin), per_split,
            GATED_IS_ROW=gated_is_row,
            OUTER_IS_GATED=outer_is_gated,
            WRITE_ROWS=write_rows,
            WRITE_COLS=write_cols,
            ATOMIC=atomic,
            HAS_IDS=has_ids,
            COUNT_TILES=counter is not None,
            REVERSE=testing.reverse_block_order,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BD=cfg.BD,
            PRECISION=precision(rows.dtype, allow_tf32),
            UPCAST=upcast(rows.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if variant == "panel":
        panel_backward(
            rows, cols, col_pos, row_offset, row_ids_t, col_ids_t, has_ids, margin,
            (row_coef, row_index, row_count, grad_rows),
            (col_coef, col_index, col_count, grad_cols),
            precision(rows.dtype, allow_tf32),
        )  # fmt: skip
        return grad_rows, grad_cols
    for backward_pass in BACKWARD_PASSES[bool(deterministic)]:
        launch(*backward_pass)
    return grad_rows, grad_cols


def panel_backward(
    rows: Tensor,
    cols: Tensor,
    col_pos: Tensor,
    row_offset: int,
    row_ids: Tensor,
    col_ids: Tensor,
    has_ids: bool,
    margin: float,
    row_side: tuple[Tensor, Tensor, Tensor, Tensor],
    col_side: tuple[Tensor, Tensor, Tensor, Tensor],
    prec: str,
) -> None:
    """The panel dense backward (see backward_kernels.py), adding into the two gradients in place.

    ``row_side`` / ``col_side``: (coefficients, compacted gated indices, their (1,)
    count, that side's gradient). Rows first, then columns; on each side a host loop over
    the worst-case number of panels, whose kernels read the device-side count and exit
    early past it. Every launch owns its output tiles and launches run in order, so the
    sums are the same on every run, whatever the deterministic flag.
    """
    cfg, gemm = block_config(rows.dtype), PANEL_GEMM_CONFIGS[rows.dtype]
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    upcast_products = upcast(rows.dtype)
    size = panel_size(dim, max(b, n_cols))
    # One activity buffer, reused by every panel of both sides. Under the interpreter
    # bfloat16 products go through fp32 (see kernels._mma), so the buffer is fp32 there.
    act = torch.empty(
        size * max(b, n_cols),
        dtype=torch.float32 if upcast_products else rows.dtype,
        device=rows.device,
    )
    counter = testing.tile_counter
    reverse = testing.reverse_block_order
    d_blocks = triton.cdiv(dim, gemm.GD)
    for gated_is_row in (True, False):
        if gated_is_row:
            gated, other, n_gated, n_other = rows, cols, b, n_cols
            (coef, index, count, grad_gated), grad_other = row_side, col_side[3]
            gated_block, other_block = cfg.BM, cfg.BN
        else:
            gated, other, n_gated, n_other = cols, rows, n_cols, b
            (coef, index, count, grad_gated), grad_other = col_side, row_side[3]
            gated_block, other_block = cfg.BN, cfg.BM
        activity_grid = (size // gated_block, triton.cdiv(n_other, other_block))
        gated_grid = (triton.cdiv(size, gemm.GM), d_blocks)
        other_grid = (triton.cdiv(n_other, gemm.GM), d_blocks)
        for start in range(0, n_gated, size):
            backward_kernels.panel_activity_kernel[activity_grid](
                rows, cols, col_pos, row_ids, col_ids, index, count, act,
                counter if counter is not None else count,
                b, n_cols, dim, row_offset,
                rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
                float(margin), start,
                GATED_IS_ROW=gated_is_row,
                HAS_IDS=has_ids,
                COUNT_TILES=counter is not None,
                REVERSE=reverse,
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                PRECISION=prec, UPCAST=upcast_products,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            backward_kernels.panel_gated_grad_kernel[gated_grid](
                act, other, coef, index, count, grad_gated,
                n_other, dim, other.stride(0), other.stride(1), start,
                REVERSE=reverse,
                GM=gemm.GM, GD=gemm.GD, GK=gemm.GK,
                PRECISION=prec, UPCAST=upcast_products,
                num_warps=gemm.num_warps, num_stages=gemm.num_stages,
            )  # fmt: skip
            backward_kernels.panel_other_grad_kernel[other_grid](
                act, gated, coef, index, count, grad_other,
                n_other, dim, gated.stride(0), gated.stride(1), start, size,
                REVERSE=reverse,
                GM=gemm.GM, GD=gemm.GD, GK=gemm.GK,
                PRECISION=prec, UPCAST=upcast_products,
                num_warps=gemm.num_warps, num_stages=gemm.num_stages,
            )  # fmt: skip


def compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(indices of the true flags in order, padded to len(flags); their (1,) int32 count).

    Runs on the device; nothing is read back.
    """
    n = flags.shape[0]
    index = torch.zeros(n, dtype=torch.int32, device=flags.device)
    count = torch.zeros(1, dtype=torch.int32, device=flags.device)
    backward_kernels.compact_kernel[(1,)](
        flags.to(torch.int8).contiguous(), index, count, n, COMPACT_BLOCK
    )
    return index, count
