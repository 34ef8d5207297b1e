"""Launcher of the forward kernel (forward_kernels.py): row statistics and un-finalised
column statistics of S = rows @ cols.T, in one pass."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..kernel_interface import Block, DirectionStats
from .config import (
    DETERMINISTIC_ROW_PROGRAMS_CPU,
    DETERMINISTIC_ROW_PROGRAMS_CUDA,
    block_config,
    check_block,
    column_splits,
    ids_or_placeholder,
    precision,
    testing,
    upcast,
)
from .forward_kernels import partials_kernel

NO_KEY = -(2**63)


def decode_keys(key: Tensor) -> tuple[Tensor, Tensor]:
    """(max, arg) from packed keys; see tile.py for the layout."""
    none = key == NO_KEY
    high = (key >> 32).to(torch.int32)
    bits = torch.where(high >= 0, high, high ^ 0x7FFFFFFF)
    best = torch.where(none, float("-inf"), bits.view(torch.float32))
    arg = torch.where(none, -1, 0xFFFFFFFF - (key & 0xFFFFFFFF))
    return best, arg


def partials(
    block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
) -> tuple[DirectionStats, DirectionStats]:
    check_block(block)
    rows, cols, col_pos, row_offset = block.rows, block.cols, block.col_pos, block.row_offset
    row_ids, col_ids = block.row_ids, block.col_ids
    cfg = block_config(rows.dtype)
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    device = rows.device
    col_pos = col_pos.to(torch.float32).contiguous()
    row_ids_t, has_ids = ids_or_placeholder(row_ids, device)
    col_ids_t, _ = ids_or_placeholder(col_ids, device)
    row_blocks = triton.cdiv(b, cfg.BM)
    col_blocks = triton.cdiv(n_cols, cfg.BN)
    splits, per_split = column_splits(row_blocks, col_blocks, device)
    if deterministic:
        cap = DETERMINISTIC_ROW_PROGRAMS_CUDA if device.type == "cuda" else None
        row_programs = min(row_blocks, cap or DETERMINISTIC_ROW_PROGRAMS_CPU)
        row_sum = torch.zeros(splits, b, dtype=torch.float32, device=device)
        col_sum = torch.zeros(row_programs, n_cols, dtype=torch.float32, device=device)
    else:
        row_programs = row_blocks
        row_sum = torch.zeros(b, dtype=torch.float32, device=device)
        col_sum = torch.zeros(n_cols, dtype=torch.float32, device=device)
    row_key = torch.full((b,), NO_KEY, dtype=torch.int64, device=device)
    col_key = torch.full((n_cols,), NO_KEY, dtype=torch.int64, device=device)
    row_cnt = torch.zeros(b, dtype=torch.int32, device=device)
    col_cnt = torch.zeros(n_cols, dtype=torch.int32, device=device)

    partials_kernel[(row_programs, splits)](
        rows, cols, col_pos, row_ids_t, col_ids_t,
        row_key, row_sum, row_cnt, col_key, col_sum, col_cnt,
        b, n_cols, dim, row_offset,
        rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
        float(margin), row_blocks, col_blocks, per_split,
        HAS_IDS=has_ids,
        DETERMINISTIC=bool(deterministic),
        REVERSE=testing.reverse_block_order,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
        PRECISION=precision(rows.dtype, allow_tf32),
        UPCAST=upcast(rows.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if deterministic:
        # Fixed shapes, fixed order: torch's reductions do not use atomics.
        row_sum, col_sum = row_sum.sum(dim=0), col_sum.sum(dim=0)
    row_max, row_arg = decode_keys(row_key)
    col_max, col_arg = decode_keys(col_key)
    return (
        DirectionStats(row_max, row_arg, row_sum, row_cnt),
        DirectionStats(col_max, col_arg, col_sum, col_cnt),
    )
