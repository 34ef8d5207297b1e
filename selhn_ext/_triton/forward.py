"""Launcher of the forward kernels (forward_kernels.py): row statistics and un-finalised
column statistics of S = rows @ cols.T, in one pass, then the exact fix-up of the anchors
the fast pass could not settle (NaN or infinite values)."""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ..kernel_interface import Block, DirectionStats, PackedStats
from . import glue
from .config import (
    FORWARD_CPU_PROGRAMS,
    FORWARD_PROGRAMS_PER_SM,
    L2_GROUP_BYTES,
    block_config,
    check_block,
    ids_or_placeholder,
    precision,
    sm_count,
    testing,
    tma_allowed,
    upcast,
)
from .forward_kernels import exact_fixup_kernel, partials_kernel


def masked_tile_count(b: int, n_cols: int, row_offset: int, bm: int, bn: int) -> int:
    """Tiles with invalid pairs (without ids): diagonal and edge tiles, as the kernel's
    masked_coords enumerates them."""
    n_col_blocks = triton.cdiv(n_cols, bn)
    count = 0
    for rb in range(b // bm):
        lo = (row_offset + rb * bm) // bn
        hi = (row_offset + rb * bm + bm - 1) // bn
        count += hi - lo + 1 + (n_cols % bn != 0 and n_col_blocks - 1 > hi)
    return count + (b % bm != 0) * n_col_blocks


def program_split(tiles: int, masked: int, device: torch.device) -> tuple[int, int]:
    """(programs, interior programs) of the persistent grid: about one per SM (on CPU a
    few, so that several programs always merge), shared between the interior and the
    masked tiles in proportion, each kind with at least one program if it has tiles."""
    sms = sm_count(device)
    programs = FORWARD_CPU_PROGRAMS if sms is None else FORWARD_PROGRAMS_PER_SM * sms
    programs = max(1, min(programs, tiles))
    interior = tiles - masked
    if interior == 0:
        return programs, 0
    if masked == 0:
        return programs, programs
    programs = max(programs, 2)
    masked_programs = min(programs - 1, max(1, math.ceil(programs * masked / tiles)))
    return programs, programs - masked_programs


def partials(
    block: Block,
    margin: float,
    *,
    deterministic: bool = False,
    allow_tf32: bool = False,
    packed: bool = False,
) -> tuple[DirectionStats, DirectionStats] | tuple[PackedStats, PackedStats]:
    """The statistics of both directions; ``packed``: the maxima left in their packed keys
    (PackedStats) for glue.finalize_forward to decode, one launch fewer."""
    check_block(block)
    rows, cols, col_pos, row_offset = block.rows, block.cols, block.col_pos, block.row_offset
    row_ids, col_ids = block.row_ids, block.col_ids
    cfg = block_config(rows.dtype)
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    device = rows.device
    row_ids_t, has_ids = ids_or_placeholder(row_ids, device)
    col_ids_t, _ = ids_or_placeholder(col_ids, device)
    row_blocks = triton.cdiv(b, cfg.BM)
    col_blocks = triton.cdiv(n_cols, cfg.BN)
    tiles = row_blocks * col_blocks
    masked = tiles if has_ids else masked_tile_count(b, n_cols, row_offset, cfg.BM, cfg.BN)
    programs, interior_programs = program_split(tiles, masked, device)

    # The kernel merges tiles past the edges into these spare elements (no masks) and
    # reads d past the edge from the zero padding of col_pos.
    rows_pad, cols_pad = b + cfg.BM, n_cols + cfg.BN
    sum_programs = programs if deterministic else 1
    pos, row_key, col_key, row_cnt, col_cnt, row_sum, col_sum = glue.partials_buffers(
        col_pos, n_cols + max(cfg.BM, cfg.BN), rows_pad, cols_pad, sum_programs
    )
    use_tma = tma_allowed(rows, allow_tf32) and tma_allowed(cols, allow_tf32)
    if use_tma and device.type == "cuda":
        ensure_allocator()
    common = dict(
        HAS_IDS=has_ids, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
        PRECISION=precision(rows.dtype, allow_tf32), UPCAST=upcast(rows.dtype),
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if tiles:
        partials_kernel[(programs,)](
            rows, cols, pos, row_ids_t, col_ids_t,
            row_key, row_sum, row_cnt, col_key, col_sum, col_cnt,
            b, n_cols, dim, row_offset,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            float(margin), row_blocks, col_blocks,
            max(1, L2_GROUP_BYTES // (cfg.BM * dim * rows.element_size())),
            interior_programs, rows_pad, cols_pad,
            DETERMINISTIC=bool(deterministic), REVERSE=testing.reverse_block_order,
            USE_TMA=use_tma, num_warps=cfg.forward_warps, **common,
        )  # fmt: skip
    # Fixed shapes, fixed order: torch's reductions do not use atomics.
    if deterministic:
        row_sum, col_sum = row_sum.sum(dim=0), col_sum.sum(dim=0)
    else:
        row_sum, col_sum = row_sum[0], col_sum[0]
    if tiles:
        exact_fixup_kernel[(row_blocks + col_blocks,)](
            rows, cols, pos, row_ids_t, col_ids_t,
            row_key, row_sum, row_cnt, col_key, col_sum, col_cnt,
            b, n_cols, dim, row_offset,
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            float(margin), row_blocks, col_blocks, num_warps=cfg.num_warps, **common,
        )  # fmt: skip
    row_key, col_key = row_key[:b], col_key[:n_cols]
    if packed:
        return glue.packed_stats(row_key, row_sum[:b], row_cnt[:b]), glue.packed_stats(
            col_key, col_sum[:n_cols], col_cnt[:n_cols]
        )
    row_max, row_arg, col_max, col_arg = glue.decode_keys(row_key, col_key)
    return (
        DirectionStats(row_max, row_arg, row_sum[:b], row_cnt[:b]),
        DirectionStats(col_max, col_arg, col_sum[:n_cols], col_cnt[:n_cols]),
    )


def ensure_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch per program, which
    triton takes from the allocator set with triton.set_allocator: set one backed by
    torch's caching allocator unless the caller has set one."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")
