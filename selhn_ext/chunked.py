"""Backend ``chunked``: the kernel interface in row blocks of plain PyTorch, the fallback
wherever no fused kernel runs.

Each block of ``chunk_rows`` rows (128 by default, whatever the batch) computes its
(chunk_rows, N) slice of S and the statistics it feeds. The slices live in four panels
allocated once per call (two in the compute dtype, two boolean) and reused by every
block, so the extra memory is about chunk_rows * N * 10 bytes (fp32) plus the O(N*D)
inputs and gradients: linear in the batch. Fresh temporaries per block would do the same
arithmetic, but the C heap keeps the freed ones, fragmented among the small tensors that
outlive each block, and its size then grew with the number of blocks, so with B^2.
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


class _Panels:
    """Flat buffers of chunk_rows * N elements, viewed as any (rows, cols) that fits."""

    def __init__(self, rows: int, n_cols: int, dtype: torch.dtype, device: torch.device):
        size = rows * n_cols
        self.scores = torch.empty(size, dtype=dtype, device=device)
        self.work = torch.empty(size, dtype=dtype, device=device)
        self.invalid = torch.empty(size, dtype=torch.bool, device=device)
        self.flag = torch.empty(size, dtype=torch.bool, device=device)

    def views(self, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(scores, work, invalid, flag) as contiguous (rows, cols) views."""
        buffers = (self.scores, self.work, self.invalid, self.flag)
        return tuple(t[: rows * cols].view(rows, cols) for t in buffers)


class ChunkedBackend(PyTorchGlue):
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

    def _panels(self, block: Block) -> _Panels:
        rows = min(self.chunk_rows, block.b)
        return _Panels(rows, block.n, compute_dtype(block.rows.dtype), block.rows.device)

    @staticmethod
    def _invalid(block: Block, start: int, stop: int, out: Tensor) -> Tensor:
        """Into ``out`` (stop - start, N): which pairs are not valid negatives."""
        if block.row_ids is None:
            out.fill_(False)
        else:
            torch.eq(block.row_ids[start:stop, None], block.col_ids[None, :], out=out)
        rows = torch.arange(start, stop, device=out.device)
        own = block.row_offset + rows
        in_range = (own >= 0) & (own < block.n)
        out[(rows - start)[in_range], own[in_range]] = True
        return out

    def partials(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats, DirectionStats]:
        cdt = compute_dtype(block.rows.dtype)
        b, n_cols, device = block.b, block.n, block.rows.device
        c = block.cols.to(cdt)
        col_pos, offset = block.col_pos, block.row_offset

        def empty_stats(length: int) -> DirectionStats:
            return DirectionStats(
                max=torch.full((length,), float("-inf"), dtype=cdt, device=device),
                arg=torch.full((length,), -1, dtype=torch.int64, device=device),
                hinge_sum=torch.zeros(length, dtype=cdt, device=device),
                active=torch.zeros(length, dtype=torch.int32, device=device),
            )

        row, col = empty_stats(b), empty_stats(n_cols)
        panels = self._panels(block)
        for start, stop in self._blocks(b):
            s, work, invalid, flag = panels.views(stop - start, n_cols)
            torch.matmul(block.rows[start:stop].to(cdt), c.T, out=s)
            self._invalid(block, start, stop, invalid)
            work.copy_(s).masked_fill_(invalid, float("-inf"))
            row_best, row_index = work.max(dim=1)
            col_best, col_index = work.max(dim=0)

            # Rows: complete, since the block sees every column.
            d_row = col_pos[offset + start : offset + stop, None]
            row_hinges = self._hinges(s, margin, d_row, invalid, work)
            row.max[start:stop] = row_best
            row.arg[start:stop] = torch.where(invalid.all(dim=1), -1, row_index)
            row.hinge_sum[start:stop] = row_hinges.sum(dim=1)
            row.active[start:stop] = torch.gt(row_hinges, 0, out=flag).sum(dim=1, dtype=torch.int32)

            # Columns: this block's share, merged in block order.
            col_hinges = self._hinges(s, margin, col_pos[None, :], invalid, work)
            block_col = DirectionStats(
                max=col_best,
                arg=torch.where(invalid.all(dim=0), -1, col_index + offset + start),
                hinge_sum=col_hinges.sum(dim=0),
                active=torch.gt(col_hinges, 0, out=flag).sum(dim=0, dtype=torch.int32),
            )
            for kept, merged in zip(col, merge_stats(col, block_col), strict=True):
                kept.copy_(merged)
        # NaN survives max(): torch.max propagates it; -0.0 equals +0.0 there.
        return row, col

    @staticmethod
    def _hinges(s: Tensor, margin: float, d: Tensor, invalid: Tensor, out: Tensor) -> Tensor:
        """relu(margin + S - d) on valid pairs, 0 elsewhere, into ``out``. A hinge is > 0
        exactly where its argument is (NaN is neither)."""
        torch.add(s, margin, out=out)
        return out.sub_(d).relu_().masked_fill_(invalid, 0.0)

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
        device, offset, col_pos, n_cols = (
            block.rows.device,
            block.row_offset,
            block.col_pos,
            block.n,
        )
        c = block.cols.to(cdt)
        grad_rows = torch.zeros(block.b, block.dim, dtype=cdt, device=device)
        grad_cols = torch.zeros(n_cols, block.dim, dtype=cdt, device=device)
        # The chunked fallback may sync the host to skip work; fused kernels never do.
        gated_cols = torch.nonzero(gated.col_gated).flatten()
        n_gated_cols = gated_cols.numel()
        c_gated = c[gated_cols]
        col_pos_gated = col_pos[gated_cols][None, :]
        col_coef_gated = gated.col_coef[gated_cols][None, :]
        zero = torch.zeros((), dtype=cdt, device=device)
        panels = self._panels(block)
        for start, stop in self._blocks(block.b):
            r = block.rows[start:stop].to(cdt)
            invalid = self._invalid(block, start, stop, panels.views(stop - start, n_cols)[2])
            gated_rows = torch.nonzero(gated.row_gated[start:stop]).flatten()
            if gated_rows.numel():
                rg = r[gated_rows]
                s, w, _, active = panels.views(gated_rows.numel(), n_cols)
                torch.matmul(rg, c.T, out=s)
                d_row = col_pos[offset + start + gated_rows][:, None]
                self._active(s, margin, d_row, invalid[gated_rows], w, active)
                torch.where(active, gated.row_coef[start + gated_rows][:, None], zero, out=w)
                grad_rows[start + gated_rows] += w @ c
                grad_cols += w.T @ rg
            if n_gated_cols:
                s, w, _, active = panels.views(stop - start, n_gated_cols)
                torch.matmul(r, c_gated.T, out=s)
                self._active(s, margin, col_pos_gated, invalid[:, gated_cols], w, active)
                torch.where(active, col_coef_gated, zero, out=w)
                grad_rows[start:stop] += w @ c_gated
                grad_cols[gated_cols] += w.T @ r
        return grad_rows, grad_cols

    @staticmethod
    def _active(s, margin, d, invalid, work, out) -> None:
        """Into ``out``: valid pairs whose hinge argument margin + S - d is > 0."""
        torch.add(s, margin, out=work)
        torch.gt(work.sub_(d), 0, out=out)
        out.masked_fill_(invalid, False)
