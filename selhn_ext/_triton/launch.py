"""Host side of the Triton backend: block configurations, buffers and launches.

Nothing here synchronises with the device: grids are sized from shapes only (worst case
where a device-side count decides the work), and every O(B) finish (key decoding, the
fixed-order sum of deterministic slots) is a plain PyTorch op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ..kernel_interface import DirectionStats
from . import kernels

NO_KEY = -(2**63)
# Read once, like dispatch.py: the interpreter is chosen before triton is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"

# The dense backward: "tiles" (each recomputed tile adds its products into the gradients;
# float atomics unless deterministic) or "panel" (panels of gated anchors, tensor-core
# GEMMs with owned output tiles, no float atomics: deterministic by construction).
BACKWARD_PATHS = ("tiles", "panel")
BACKWARD_PATH = os.environ.get("SELHN_TRITON_BACKWARD", "tiles")
if BACKWARD_PATH not in BACKWARD_PATHS:
    raise ValueError(
        f"SELHN_TRITON_BACKWARD must be one of {', '.join(BACKWARD_PATHS)}, got {BACKWARD_PATH!r}"
    )


@dataclass(frozen=True)
class BlockConfig:
    """One tiling per input dtype; the backward recomputes S with the same one."""

    BM: int  # rows of S per tile
    BN: int  # columns of S per tile
    BK: int  # K step of the S product
    BD: int  # embedding columns per step of the gradient products
    num_warps: int
    num_stages: int


# Large blocks: tensor-core friendly on sm_90 and few programs in the interpreter. Every
# tl.dot dimension is >= 16, which the sm_90 compiler requires.
CONFIGS: dict[torch.dtype, BlockConfig] = {
    torch.bfloat16: BlockConfig(BM=128, BN=128, BK=64, BD=64, num_warps=8, num_stages=3),
    torch.float16: BlockConfig(BM=128, BN=128, BK=64, BD=64, num_warps=8, num_stages=3),
    torch.float32: BlockConfig(BM=64, BN=64, BK=32, BD=64, num_warps=4, num_stages=3),
}


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

# Column splits of the forward / inner splits of the backward: enough programs to fill
# the GPU (a multiple of its SM count); on CPU (the interpreter) a few, so that merging
# across splits is always exercised.
PROGRAMS_PER_SM = 4
CPU_SPLITS = 3
# Deterministic forward: row programs each own one slot of the (P, N) column-sum buffer.
DETERMINISTIC_ROW_PROGRAMS_CUDA = 64
DETERMINISTIC_ROW_PROGRAMS_CPU = 2
COMPACT_BLOCK = 1024


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


@dataclass
class TestingSwitches:
    """Test-only switches; both change kernel specializations, neither is for production.

    ``reverse_block_order``: every kernel visits its program ids in reverse order.
    ``tile_counter``: a (1,) int32 device tensor the backward kernels increment once per
    recomputed S tile.
    ``backward``: "tiles" or "panel" overrides SELHN_TRITON_BACKWARD (None: use it).
    ``panel_size``: the panel backward's P (a positive multiple of PANEL_UNIT), so that
    small batches span several panels (None: ``panel_size()``).
    """

    reverse_block_order: bool = False
    tile_counter: Tensor | None = None
    backward: str | None = None
    panel_size: int | None = None


testing = TestingSwitches()


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot input precision: IEEE fp32 unless TF32 is allowed (16-bit inputs ignore it)."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Under the interpreter, bfloat16 products go through an exact fp32 upcast."""
    return INTERPRETED and dtype == torch.bfloat16


def _config(dtype: torch.dtype) -> BlockConfig:
    if dtype not in CONFIGS:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return CONFIGS[dtype]


def backward_path() -> str:
    """The dense backward in use: the test switch if set, else SELHN_TRITON_BACKWARD."""
    path = testing.backward if testing.backward is not None else BACKWARD_PATH
    if path not in BACKWARD_PATHS:
        raise ValueError(f"backward path must be one of {BACKWARD_PATHS}, got {path!r}")
    return path


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


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(outer_blocks: int, inner_blocks: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, inner blocks per split) with no empty split."""
    sms = _sm_count(device)
    if sms is None:
        wanted = CPU_SPLITS
    else:
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(outer_blocks, 1))
    wanted = max(1, min(wanted, inner_blocks))
    per_split = triton.cdiv(inner_blocks, wanted)
    return triton.cdiv(inner_blocks, per_split), per_split


def _ids(ids: Tensor | None, device: torch.device) -> tuple[Tensor, bool]:
    """ids as contiguous int64 (one kernel specialization), or an empty int64 placeholder."""
    if ids is None:
        return torch.empty(0, dtype=torch.int64, device=device), False
    return ids.to(torch.int64).contiguous(), True


def _decode(key: Tensor) -> tuple[Tensor, Tensor]:
    """(max, arg) from packed keys; see kernels.py for the layout."""
    none = key == NO_KEY
    high = (key >> 32).to(torch.int32)
    bits = torch.where(high >= 0, high, high ^ 0x7FFFFFFF)
    best = torch.where(none, float("-inf"), bits.view(torch.float32))
    arg = torch.where(none, -1, 0xFFFFFFFF - (key & 0xFFFFFFFF))
    return best, arg


def _check(rows: Tensor, cols: Tensor, col_pos: Tensor, row_offset: int, row_ids, col_ids) -> None:
    if (row_ids is None) != (col_ids is None):
        raise ValueError("row_ids and col_ids must be given together")
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"rows and cols must be (b, D) and (N, D), got {tuple(rows.shape)} and "
            f"{tuple(cols.shape)}"
        )
    if rows.dtype != cols.dtype:
        raise TypeError(f"rows and cols must share a dtype, got {rows.dtype} and {cols.dtype}")
    if col_pos.shape != (cols.shape[0],):
        raise ValueError(f"col_pos must have shape ({cols.shape[0]},), got {tuple(col_pos.shape)}")
    if not 0 <= row_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"row_offset {row_offset} puts rows outside the {cols.shape[0]} columns "
            f"(b = {rows.shape[0]})"
        )
    if cols.shape[0] >= 2**32:
        raise ValueError("the packed keys hold indices below 2**32")


class TritonKernels:
    """The kernel interface of kernel_interface.py as fused Triton passes."""

    def partials(
        self,
        rows: Tensor,
        cols: Tensor,
        col_pos: Tensor,
        row_offset: int,
        row_ids: Tensor | None,
        col_ids: Tensor | None,
        margin: float,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[DirectionStats, DirectionStats]:
        _check(rows, cols, col_pos, row_offset, row_ids, col_ids)
        cfg = _config(rows.dtype)
        b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
        device = rows.device
        col_pos = col_pos.to(torch.float32).contiguous()
        row_ids_t, has_ids = _ids(row_ids, device)
        col_ids_t, _ = _ids(col_ids, device)
        row_blocks = triton.cdiv(b, cfg.BM)
        col_blocks = triton.cdiv(n_cols, cfg.BN)
        splits, per_split = _splits(row_blocks, col_blocks, device)
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

        kernels.partials_kernel[(row_programs, splits)](
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
            UPCAST=_upcast(rows.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if deterministic:
            # Fixed shapes, fixed order: torch's reductions do not use atomics.
            row_sum, col_sum = row_sum.sum(dim=0), col_sum.sum(dim=0)
        row_max, row_arg = _decode(row_key)
        col_max, col_arg = _decode(col_key)
        return (
            DirectionStats(row_max, row_arg, row_sum, row_cnt),
            DirectionStats(col_max, col_arg, col_sum, col_cnt),
        )

    def dense_backward(
        self,
        rows: Tensor,
        cols: Tensor,
        col_pos: Tensor,
        row_offset: int,
        row_ids: Tensor | None,
        col_ids: Tensor | None,
        margin: float,
        row_coef: Tensor,
        col_coef: Tensor,
        row_gated: Tensor,
        col_gated: Tensor,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        _check(rows, cols, col_pos, row_offset, row_ids, col_ids)
        cfg = _config(rows.dtype)
        b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
        device = rows.device
        col_pos = col_pos.to(torch.float32).contiguous()
        row_ids_t, has_ids = _ids(row_ids, device)
        col_ids_t, _ = _ids(col_ids, device)
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
                splits, per_split = _splits(outer, inner, device)
            else:  # one program owns each outer block's gradient rows
                splits, per_split = 1, inner
            kernels.dense_backward_kernel[(outer, splits)](
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
                UPCAST=_upcast(rows.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

        if backward_path() == "panel":
            _panel_backward(
                rows, cols, col_pos, row_offset, row_ids_t, col_ids_t, has_ids, margin,
                (row_coef, row_index, row_count, grad_rows),
                (col_coef, col_index, col_count, grad_cols),
                precision(rows.dtype, allow_tf32),
            )  # fmt: skip
            return grad_rows, grad_cols
        for backward_pass in BACKWARD_PASSES[bool(deterministic)]:
            launch(*backward_pass)
        return grad_rows, grad_cols


def _panel_backward(
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
    """The panel dense backward (see kernels.py), adding into the two gradients in place.

    ``row_side`` / ``col_side``: (coefficients, compacted gated indices, their (1,)
    count, that side's gradient). Rows first, then columns; on each side a host loop over
    the worst-case number of panels, whose kernels read the device-side count and exit
    early past it. Every launch owns its output tiles and launches run in order, so the
    sums are the same on every run, whatever the deterministic flag.
    """
    cfg, gemm = _config(rows.dtype), PANEL_GEMM_CONFIGS[rows.dtype]
    b, n_cols, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    upcast = _upcast(rows.dtype)
    size = panel_size(dim, max(b, n_cols))
    # One activity buffer, reused by every panel of both sides. Under the interpreter
    # bfloat16 products go through fp32 (see kernels._mma), so the buffer is fp32 there.
    act = torch.empty(
        size * max(b, n_cols),
        dtype=torch.float32 if upcast else rows.dtype,
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
            kernels.panel_activity_kernel[activity_grid](
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
                PRECISION=prec, UPCAST=upcast,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            kernels.panel_gated_grad_kernel[gated_grid](
                act, other, coef, index, count, grad_gated,
                n_other, dim, other.stride(0), other.stride(1), start,
                REVERSE=reverse,
                GM=gemm.GM, GD=gemm.GD, GK=gemm.GK,
                PRECISION=prec, UPCAST=upcast,
                num_warps=gemm.num_warps, num_stages=gemm.num_stages,
            )  # fmt: skip
            kernels.panel_other_grad_kernel[other_grid](
                act, gated, coef, index, count, grad_other,
                n_other, dim, gated.stride(0), gated.stride(1), start, size,
                REVERSE=reverse,
                GM=gemm.GM, GD=gemm.GD, GK=gemm.GK,
                PRECISION=prec, UPCAST=upcast,
                num_warps=gemm.num_warps, num_stages=gemm.num_stages,
            )  # fmt: skip


def compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(indices of the true flags in order, padded to len(flags); their (1,) int32 count).

    Runs on the device; nothing is read back.
    """
    n = flags.shape[0]
    index = torch.zeros(n, dtype=torch.int32, device=flags.device)
    count = torch.zeros(1, dtype=torch.int32, device=flags.device)
    kernels.compact_kernel[(1,)](flags.to(torch.int8).contiguous(), index, count, n, COMPACT_BLOCK)
    return index, count


KERNELS = TritonKernels()
