"""Backend ``chunked``: the kernel interface in row blocks of plain PyTorch, the fallback
wherever no fused kernel runs.

Each block of ``chunk_rows`` rows (128 by default, whatever the batch) computes its
(chunk_rows, N) slice of S and the statistics it feeds, so the extra memory is a few such
panels plus the O(N*D) inputs and gradients: it grows linearly with the batch. Every
result is written into buffers allocated before the loop, so nothing allocated in one
block outlives it; otherwise long-lived small tensors interleaved with the panels can
fragment the C heap until it holds many freed panels at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernel_interface import (
    Block,
    DirectionStats,
    GatedAnchors,
    PyTorchGlue,
    compute_dtype,
    merge_stats,
)

CHUNK_ROWS = 128


class ChunkedKernels(PyTorchGlue):
    """The kernel interface in row blocks of plain PyTorch (backend ``chunked``).

    Deterministic by construction: blocks are visited in order and merged in order.
    """

    def __init__(self, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    def _blocks(self, b: int):
        for start in range(0, b, self.chunk_rows):
            yield start, min(b, start + self.chunk_rows)

    @staticmethod
    def _valid(block: Block, start: int, stop: int) -> Tensor:
        """Which pairs of rows [start, stop) and all columns are valid negatives."""
        device = block.rows.device
        rows = torch.arange(start, stop, device=device)
        valid = torch.ones(stop - start, block.n, dtype=torch.bool, device=device)
        own = block.row_offset + rows
        in_range = (own >= 0) & (own < block.n)
        valid[(rows - start)[in_range], own[in_range]] = False
        if block.row_ids is not None:
            valid &= block.row_ids[start:stop, None] != block.col_ids[None, :]
        return valid

    def partials(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats, DirectionStats]:
        cdt = compute_dtype(block.rows.dtype)
        b, n_cols, device = block.b, block.n, block.rows.device
        c = block.cols.to(cdt)
        col_pos, offset = block.col_pos, block.row_offset
        zero = torch.zeros((), dtype=cdt, device=device)

        def empty_stats(length: int) -> DirectionStats:
            return DirectionStats(
                max=torch.full((length,), float("-inf"), dtype=cdt, device=device),
                arg=torch.full((length,), -1, dtype=torch.int64, device=device),
                hinge_sum=torch.zeros(length, dtype=cdt, device=device),
                active=torch.zeros(length, dtype=torch.int32, device=device),
            )

        row, col = empty_stats(b), empty_stats(n_cols)
        for start, stop in self._blocks(b):
            s = block.rows[start:stop].to(cdt) @ c.T
            valid = self._valid(block, start, stop)
            masked = s.masked_fill(~valid, float("-inf"))

            # Rows: complete, since the block sees every column.
            row_arg = margin + s - col_pos[offset + start : offset + stop, None]
            best, index = masked.max(dim=1)
            row.max[start:stop] = best
            row.arg[start:stop] = torch.where(valid.any(dim=1), index, -1)
            row.hinge_sum[start:stop] = torch.where(valid, torch.relu(row_arg), zero).sum(dim=1)
            row.active[start:stop] = (valid & (row_arg > 0)).sum(dim=1, dtype=torch.int32)
            del row_arg

            # Columns: this block's share, merged in block order.
            col_arg = margin + s - col_pos[None, :]
            best, index = masked.max(dim=0)
            block_col = DirectionStats(
                max=best,
                arg=torch.where(valid.any(dim=0), index + offset + start, -1),
                hinge_sum=torch.where(valid, torch.relu(col_arg), zero).sum(dim=0),
                active=(valid & (col_arg > 0)).sum(dim=0, dtype=torch.int32),
            )
            for kept, merged in zip(col, merge_stats(col, block_col), strict=True):
                kept.copy_(merged)
        # NaN survives max(): torch.max propagates it; -0.0 equals +0.0 there.
        return row, col

    def dense_backward(
        self,
        block: Block,
        margin: float,
        gated: GatedAnchors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        cdt = compute_dtype(block.rows.dtype)
        device, offset, col_pos = block.rows.device, block.row_offset, block.col_pos
        c = block.cols.to(cdt)
        grad_rows = torch.zeros(block.b, block.dim, dtype=cdt, device=device)
        grad_cols = torch.zeros(block.n, block.dim, dtype=cdt, device=device)
        # The chunked fallback may sync the host to skip work; fused kernels never do.
        gated_cols = torch.nonzero(gated.col_gated).flatten()
        c_gated = c[gated_cols]
        zero = torch.zeros((), dtype=cdt, device=device)
        for start, stop in self._blocks(block.b):
            r = block.rows[start:stop].to(cdt)
            valid = self._valid(block, start, stop)
            gated_rows = torch.nonzero(gated.row_gated[start:stop]).flatten()
            if gated_rows.numel():
                rg = r[gated_rows]
                s = rg @ c.T
                d_row = col_pos[offset + start + gated_rows]
                w = torch.where(
                    valid[gated_rows] & (margin + s - d_row[:, None] > 0),
                    gated.row_coef[start + gated_rows][:, None],
                    zero,
                )
                grad_rows[start + gated_rows] += w @ c
                grad_cols += w.T @ rg
            if gated_cols.numel():
                s = r @ c_gated.T
                w = torch.where(
                    valid[:, gated_cols] & (margin + s - col_pos[gated_cols][None, :] > 0),
                    gated.col_coef[gated_cols][None, :],
                    zero,
                )
                grad_rows[start:stop] += w @ c_gated
                grad_cols[gated_cols] += w.T @ r
        return grad_rows, grad_cols
