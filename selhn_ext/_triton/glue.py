"""Launchers of the fused glue (glue_kernels.py): the O(B) and O(B*D) steps of the kernel
interface around the B x B kernels, as the Triton backend runs them.

Launches (no host sync, no fp32 copy of an input):

    positive_scores                 positive_kernel                          1
    partials (forward.py)           partials_init_kernel before the forward
                                    kernels, decode_keys_kernel after them
                                    unless the keys stay packed              1 or 2
    finalize_both / finalize_forward  finalize_kernel (both directions; it
                                    decodes packed keys itself)              1
    sparse_and_diagonal_backward    hard_keys_kernel, a stable torch.sort,
                                    gradients_kernel                         3

The backward's result is deterministic in every mode: the hardest-negative pairs are
grouped by target with a stable sort and each output row is written by one program.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ..dispatch import TRITON_INTERPRET
from ..kernel_interface import (
    AnchorDecisions,
    AnchorSide,
    AnchorWeights,
    Block,
    DirectionStats,
    PackedStats,
    PairedResults,
)
from .backward import DenseAccumulators
from .glue_kernels import (
    decode_keys_kernel,
    finalize_kernel,
    gradients_kernel,
    hard_keys_kernel,
    partials_init_kernel,
    positive_kernel,
)

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = ("selhn", "hardest", "all", "sum_hinges")
POSITIVE_ROWS = 16
FINALIZE_BLOCK = 1024
KEYS_BLOCK = 1024
GRADIENT_BLOCK_D = 1024


INIT_BLOCK = 1024


class PartialsBuffers(NamedTuple):
    """What the forward kernels (forward.py) read and merge into."""

    pos: Tensor  # (N + pad,) fp32: d of every column, then zeros
    row_key: Tensor  # (rows_pad,) int64, no key (int64 min)
    col_key: Tensor  # (cols_pad,)
    row_cnt: Tensor  # (rows_pad,) int32 zeros
    col_cnt: Tensor
    row_sum: Tensor  # (slots, rows_pad) fp32 zeros
    col_sum: Tensor  # (slots, cols_pad)


def partials_buffers(
    col_pos: Tensor, pos_len: int, rows_pad: int, cols_pad: int, slots: int
) -> PartialsBuffers:
    """The forward kernels' buffers, filled by one launch."""
    device = col_pos.device
    out = PartialsBuffers(
        torch.empty(pos_len, dtype=torch.float32, device=device),
        torch.empty(rows_pad, dtype=torch.int64, device=device),
        torch.empty(cols_pad, dtype=torch.int64, device=device),
        torch.empty(rows_pad, dtype=torch.int32, device=device),
        torch.empty(cols_pad, dtype=torch.int32, device=device),
        torch.empty(slots, rows_pad, dtype=torch.float32, device=device),
        torch.empty(slots, cols_pad, dtype=torch.float32, device=device),
    )
    col_pos = col_pos.to(torch.float32).contiguous()
    longest = max(pos_len, slots * rows_pad, slots * cols_pad)
    partials_init_kernel[(triton.cdiv(longest, INIT_BLOCK),)](
        col_pos, *out, col_pos.shape[0], pos_len, rows_pad, cols_pad, slots * rows_pad,
        slots * cols_pad, BLOCK=INIT_BLOCK,
    )  # fmt: skip
    return out


def packed_stats(key: Tensor, hinge_sum: Tensor, active: Tensor) -> PackedStats:
    """Statistics whose max and arg finalize_forward decodes from ``key`` (allocated here)."""
    n, device = key.shape[0], key.device
    return PackedStats(
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
        hinge_sum, active, key,
    )  # fmt: skip


def unpacked(row: AnchorSide, col: AnchorSide) -> tuple[AnchorSide, AnchorSide]:
    """Both sides with their statistics decoded (for the PyTorch finalize), one launch."""
    if not isinstance(row.stats, PackedStats):
        return row, col
    row_max, row_arg, col_max, col_arg = decode_keys(row.stats.key, col.stats.key)

    def decoded(side: AnchorSide, best: Tensor, arg: Tensor) -> AnchorSide:
        stats = side.stats
        return side._replace(stats=DirectionStats(best, arg, stats.hinge_sum, stats.active))

    return decoded(row, row_max, row_arg), decoded(col, col_max, col_arg)


def decode_keys(row_key: Tensor, col_key: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row max, row arg, col max, col arg) of both directions' packed keys, one launch."""
    b, n_cols = row_key.shape[0], col_key.shape[0]
    device = row_key.device
    row_max = torch.empty(b, dtype=torch.float32, device=device)
    col_max = torch.empty(n_cols, dtype=torch.float32, device=device)
    row_arg = torch.empty(b, dtype=torch.int64, device=device)
    col_arg = torch.empty(n_cols, dtype=torch.int64, device=device)
    blocks = triton.cdiv(b, INIT_BLOCK) + triton.cdiv(n_cols, INIT_BLOCK)
    if blocks:
        decode_keys_kernel[(blocks,)](
            row_key, col_key, row_max, row_arg, col_max, col_arg, b, n_cols, BLOCK=INIT_BLOCK
        )
    return row_max, row_arg, col_max, col_arg


def positive_scores(img: Tensor, txt: Tensor) -> Tensor:
    """d_i = <img_i, txt_i> in fp32, the inputs read in their own dtype."""
    b, dim = img.shape
    out = torch.empty(b, dtype=torch.float32, device=img.device)
    if b:
        block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
        positive_kernel[(triton.cdiv(b, POSITIVE_ROWS),)](
            img, txt, out, b, dim, img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
            BLOCK_R=POSITIVE_ROWS, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _outputs(n: int, device: torch.device) -> list[Tensor]:
    """Empty outputs of finalize_kernel for n anchors, each its own tensor: loss, gap,
    dense_weight, hard_weight (fp32), gated, near_tie (bool)."""
    floats = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(4)]
    return floats + [torch.empty(n, dtype=torch.bool, device=device) for _ in range(2)]


def _decisions(out: list[Tensor], arg: Tensor) -> AnchorDecisions:
    loss, gap, dense_weight, hard_weight, gated, near_tie = out
    return AnchorDecisions(loss, gated, near_tie, arg, gap, dense_weight, hard_weight)


def finalize_forward(
    row: AnchorSide, col: AnchorSide, margin: float, eps: float, mode: str, row_offset: int
) -> tuple[PairedResults, AnchorDecisions, AnchorDecisions]:
    """kernel_interface.finalize of both directions in one launch, bit for bit, and the
    (2, b) pair results of these rows (see PyTorchGlue.finalize_forward). PackedStats
    (both sides or neither) are decoded into their max and arg by the same launch."""
    _check_mode(mode)
    b, n_cols = row.positive.shape[0], col.positive.shape[0]
    device = row.positive.device
    row_out = _outputs(b, device)
    col_out = _outputs(n_cols, device)
    # The pairs' loss, gap, gated, near_tie, hardest_index, as (2, b).
    pair_out = [
        torch.empty(2, b, dtype=dtype, device=device)
        for dtype in (torch.float32, torch.float32, torch.bool, torch.bool, torch.int64)
    ]
    has_n = row.negatives is not None
    packed = isinstance(row.stats, PackedStats)
    if packed != isinstance(col.stats, PackedStats):
        raise ValueError("finalize_forward takes both directions packed or neither")

    def inputs(side: AnchorSide) -> list[Tensor]:  # the kernel reads unit-stride vectors
        stats = side.stats
        n = side.negatives if has_n else stats.arg
        key = stats.key if packed else stats.arg  # (a placeholder when not packed)
        vectors = (key, stats.max, stats.arg, stats.hinge_sum, side.positive, n)
        return [t.contiguous() for t in vectors]

    blocks = triton.cdiv(b, FINALIZE_BLOCK) + triton.cdiv(n_cols, FINALIZE_BLOCK)
    if blocks:
        finalize_kernel[(blocks,)](
            *inputs(row), *inputs(col),
            *row_out, *col_out, *pair_out,
            b, n_cols, row_offset, float(margin), float(eps),
            HAS_N=has_n, MODE=mode, PACKED=packed, BLOCK=FINALIZE_BLOCK,
            enable_fp_fusion=False,  # torch rounds every product and sum on its own
        )  # fmt: skip
    loss, gap, gated, near_tie, arg = pair_out
    return (
        PairedResults(loss, gated, near_tie, arg, gap),
        _decisions(row_out, row.stats.arg),
        _decisions(col_out, col.stats.arg),
    )


def fusable(*tensors: Tensor) -> bool:
    """Whether the fused glue takes these inputs (else the PyTorch glue runs)."""
    return all(t.dtype in FUSED_DTYPES for t in tensors)


def finalize_inputs_fusable(row: AnchorSide, col: AnchorSide) -> bool:
    """The finalize kernel reads fp32 statistics and int64 indices and counts."""
    sides = (row, col)
    floats = [t for s in sides for t in (s.positive, s.stats.max, s.stats.hinge_sum)]
    ok = all(t.dtype == torch.float32 for t in floats)
    ok = ok and all(s.stats.arg.dtype == torch.int64 for s in sides)
    return ok and all(s.negatives is None or s.negatives.dtype == torch.int64 for s in sides)


def sparse_and_diagonal_backward(
    block: Block,
    dense_grads: tuple[Tensor, Tensor] | DenseAccumulators | None,
    row: AnchorWeights,
    col: AnchorWeights,
    out_dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[Tensor, Tensor]:
    """The final gradients (see kernel_interface.sparse_and_diagonal_backward), added to
    the fp32 dense gradients when given (full, or backward.py's DenseAccumulators, read
    only where written), in ``out_dtypes``, in three launches."""
    rows, cols, row_offset = block.rows, block.cols, block.row_offset
    b, n_cols, dim = block.b, block.n, block.dim
    device = rows.device

    def vector(t: Tensor, dtype: torch.dtype) -> Tensor:  # unit stride, no copy if already
        return t.to(dtype).contiguous()

    row_up, col_up = vector(row.upstream, torch.float32), vector(col.upstream, torch.float32)
    row_dw = vector(row.dense_weight, torch.float32)
    col_dw = vector(col.dense_weight, torch.float32)
    row_hw = vector(row.hard_weight, torch.float32)
    col_hw = vector(col.hard_weight, torch.float32)
    row_arg = vector(row.hardest_index, torch.int64)
    col_arg = vector(col.hardest_index, torch.int64)
    row_active, col_active = row.active.contiguous(), col.active.contiguous()
    sources = b + n_cols
    keys = torch.empty(sources, dtype=torch.int64, device=device)
    if sources:
        hard_keys_kernel[(triton.cdiv(sources, KEYS_BLOCK),)](
            row_hw, row_arg, col_hw, col_arg, keys, b, n_cols, row_offset, BLOCK=KEYS_BLOCK
        )
    keys, order = torch.sort(keys, stable=True)
    has_dense = dense_grads is not None
    # Accumulators as the dense backward left them: rows read only where written.
    where_written = isinstance(dense_grads, DenseAccumulators)
    dense_rows, dense_cols = dense_grads[:2] if has_dense else (keys, keys)
    if has_dense:
        dense_rows, dense_cols = dense_rows.contiguous(), dense_cols.contiguous()
    written = dense_grads[2:] if where_written else (keys, keys, keys)

    def output(n: int, dtype: torch.dtype, accumulator: Tensor) -> Tensor:
        # An fp32 output overwrites the dense backward's own accumulator (each program
        # reads its part of a row before it stores it): one fp32 B x D tensor fewer.
        if where_written and dtype == torch.float32:
            return accumulator
        return torch.empty(n, dim, dtype=dtype, device=device)

    out_rows = output(b, out_dtypes[0], dense_rows)
    out_cols = output(n_cols, out_dtypes[1], dense_cols)
    block_d = min(triton.next_power_of_2(max(dim, 1)), GRADIENT_BLOCK_D)
    if sources and dim:
        gradients_kernel[(sources, triton.cdiv(dim, block_d))](
            rows, cols, rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
            dense_rows, dense_cols, *written,
            row_up, row_arg, row_dw, row_hw, row_active,
            col_up, col_arg, col_dw, col_hw, col_active,
            keys, order, out_rows, out_cols,
            b, n_cols, dim, row_offset, math.ceil(math.log2(sources + 1)),
            HAS_DENSE=has_dense, WHERE_WRITTEN=where_written,
            ROWS_BY_HAND=TRITON_INTERPRET and out_dtypes[0] == torch.bfloat16,
            COLS_BY_HAND=TRITON_INTERPRET and out_dtypes[1] == torch.bfloat16,
            BLOCK_D=block_d,
        )  # fmt: skip
    return out_rows, out_cols
