"""The SelHN loss in plain PyTorch: the executable spec, and its memory-bounded variant.

``selhn_loss_reference`` builds the full B x B matrices and lets autograd differentiate
them; it checks every hand-written backward. ``ChunkedKernels`` computes the same
statistics in row blocks (peak extra memory O(block * B)) behind the kernel interface of
``kernel_interface.py``, and is the fallback wherever no fused kernel runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .kernel_interface import DirectionStats, compute_dtype, merge_stats


class Decisions(NamedTuple):
    """Discrete decisions to impose on the reference (test-only): gates and hardest indices.

    Each is a (2, B) tensor: row 0 for image anchors, row 1 for caption anchors.
    """

    gated: Tensor
    hardest_index: Tensor


def selhn_loss_reference(
    img: Tensor,
    txt: Tensor,
    *,
    margin: float = 0.2,
    eps: float = 0.01,
    mode: str = "selhn",
    reduction: str = "mean",
    ids: Tensor | None = None,
    decisions: Decisions | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The spec: returns (loss, stats dict). Inputs are assumed checked by the caller.

    ``decisions`` replaces the computed gates and hardest indices (the two-step test
    method of the design notes, section 4); everything else is computed as usual.
    """
    cdt = compute_dtype(img.dtype)
    x, y = img.to(cdt), txt.to(cdt)
    batch = x.shape[0]
    s = x @ y.T
    d = s.diagonal()
    invalid = torch.eye(batch, dtype=torch.bool, device=s.device)
    if ids is not None:
        invalid = invalid | (ids[:, None] == ids[None, :])
    valid = ~invalid
    n = valid.sum(dim=1)  # the relation is symmetric: row and column counts agree
    has_negative = n > 0
    zero = torch.zeros((), dtype=cdt, device=s.device)
    nan = torch.full((), float("nan"), dtype=cdt, device=s.device)
    eps_t = torch.tensor(eps, dtype=cdt, device=s.device)

    losses, gates, near_ties, hardest, gaps = [], [], [], [], []
    # Row direction (image anchors) uses S as is; column direction uses S.T.
    for scores in (s, s.T):
        hinge = torch.where(valid, torch.relu(margin + scores - d[:, None]), zero)
        masked = scores.detach().masked_fill(invalid, float("-inf"))
        best, index = masked.max(dim=1)
        index = torch.where(has_negative, index, -1)
        gap = torch.where(has_negative, d.detach() - best, nan)
        near_tie = gap.abs() < eps_t
        if mode == "selhn":
            gated = near_tie & has_negative
        elif mode == "hardest":
            gated = torch.zeros_like(near_tie)
        else:
            gated = has_negative.clone()
        if decisions is not None:
            row = len(losses)
            gated = decisions.gated[row].to(torch.bool) & has_negative
            index = decisions.hardest_index[row]
        hard_hinge = torch.relu(margin + scores.gather(1, index.clamp(min=0)[:, None])[:, 0] - d)
        hard_hinge = torch.where(index >= 0, hard_hinge, zero)
        total = hinge.sum(dim=1)
        dense = total if mode == "sum_hinges" else total / n.clamp(min=1)
        loss = torch.where(gated, dense, torch.where(has_negative, hard_hinge, zero)) + 0 * d
        losses.append(loss)
        gates.append(gated)
        near_ties.append(near_tie)
        hardest.append(index)
        gaps.append(gap)

    per_anchor = torch.stack(losses)
    if reduction == "mean":
        out = per_anchor.sum() / (2 * batch)
    elif reduction == "sum":
        out = per_anchor.sum()
    else:
        out = per_anchor
    gated_all = torch.stack(gates)
    stats = {
        "gated": gated_all,
        "near_tie": torch.stack(near_ties),
        "gated_fraction": gated_all.float().mean(dim=1),
        "hardest_index": torch.stack(hardest),
        "gap": torch.stack(gaps),
    }
    return out, stats


def default_chunk_rows(n_cols: int) -> int:
    """Rows per block so that one (block, N) fp32 panel stays near 32 MiB."""
    return max(1, min(4096, (1 << 23) // max(n_cols, 1)))


class ChunkedKernels:
    """The kernel interface in row blocks of plain PyTorch (backend ``chunked``).

    Deterministic by construction: blocks are visited in order and merged in order.
    """

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows

    def _blocks(self, b: int, n_cols: int):
        step = self.chunk_rows or default_chunk_rows(n_cols)
        for start in range(0, b, step):
            yield start, min(b, start + step)

    @staticmethod
    def _valid(start, stop, n_cols, row_offset, row_ids, col_ids, device) -> Tensor:
        rows = torch.arange(start, stop, device=device)
        valid = torch.ones(stop - start, n_cols, dtype=torch.bool, device=device)
        own = row_offset + rows
        in_range = (own >= 0) & (own < n_cols)
        valid[(rows - start)[in_range], own[in_range]] = False
        if row_ids is not None:
            valid &= row_ids[start:stop, None] != col_ids[None, :]
        return valid

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
        cdt = compute_dtype(rows.dtype)
        b, n_cols = rows.shape[0], cols.shape[0]
        device = rows.device
        c = cols.to(cdt)
        row_parts = []
        col = DirectionStats(
            max=torch.full((n_cols,), float("-inf"), dtype=cdt, device=device),
            arg=torch.full((n_cols,), -1, dtype=torch.int64, device=device),
            hinge_sum=torch.zeros(n_cols, dtype=cdt, device=device),
            active=torch.zeros(n_cols, dtype=torch.int32, device=device),
        )
        for start, stop in self._blocks(b, n_cols):
            s = rows[start:stop].to(cdt) @ c.T
            valid = self._valid(start, stop, n_cols, row_offset, row_ids, col_ids, device)
            d_row = col_pos[row_offset + start : row_offset + stop]
            row_arg = margin + s - d_row[:, None]
            col_arg = margin + s - col_pos[None, :]
            masked = s.masked_fill(~valid, float("-inf"))
            zero = torch.zeros((), dtype=cdt, device=device)

            best, index = masked.max(dim=1)
            index = torch.where(valid.any(dim=1), index, -1)
            row_parts.append(
                DirectionStats(
                    max=best,
                    arg=index,
                    hinge_sum=torch.where(valid, torch.relu(row_arg), zero).sum(dim=1),
                    active=(valid & (row_arg > 0)).sum(dim=1, dtype=torch.int32),
                )
            )
            best, index = masked.max(dim=0)
            index = torch.where(valid.any(dim=0), index + row_offset + start, -1)
            block_col = DirectionStats(
                max=best,
                arg=index,
                hinge_sum=torch.where(valid, torch.relu(col_arg), zero).sum(dim=0),
                active=(valid & (col_arg > 0)).sum(dim=0, dtype=torch.int32),
            )
            col = merge_stats(col, block_col)
        row = DirectionStats(*(torch.cat(parts) for parts in zip(*row_parts, strict=False)))
        # NaN must survive max(): torch.max already propagates it; -0.0 equals +0.0 there.
        return row, col

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
        cdt = compute_dtype(rows.dtype)
        b, n_cols = rows.shape[0], cols.shape[0]
        device = rows.device
        c = cols.to(cdt)
        grad_rows = torch.zeros(b, rows.shape[1], dtype=cdt, device=device)
        grad_cols = torch.zeros(n_cols, cols.shape[1], dtype=cdt, device=device)
        # The chunked fallback may sync the host to skip work; fused kernels never do.
        gated_cols = torch.nonzero(col_gated).flatten()
        c_gated = c[gated_cols]
        zero = torch.zeros((), dtype=cdt, device=device)
        for start, stop in self._blocks(b, n_cols):
            r = rows[start:stop].to(cdt)
            valid = self._valid(start, stop, n_cols, row_offset, row_ids, col_ids, device)
            gated_rows = torch.nonzero(row_gated[start:stop]).flatten()
            if gated_rows.numel():
                rg = r[gated_rows]
                s = rg @ c.T
                d_row = col_pos[row_offset + start + gated_rows]
                w = torch.where(
                    valid[gated_rows] & (margin + s - d_row[:, None] > 0),
                    row_coef[start + gated_rows][:, None],
                    zero,
                )
                grad_rows[start + gated_rows] += w @ c
                grad_cols += w.T @ rg
            if gated_cols.numel():
                s = r @ c_gated.T
                w = torch.where(
                    valid[:, gated_cols] & (margin + s - col_pos[gated_cols][None, :] > 0),
                    col_coef[gated_cols][None, :],
                    zero,
                )
                grad_rows[start:stop] += w @ c_gated
                grad_cols[gated_cols] += w.T @ r
        return grad_rows, grad_cols
