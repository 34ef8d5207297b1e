"""The interface every fused backend implements, and the O(B) math they all share.

A backend computes only what needs the B x B similarity matrix S = rows @ cols.T:

* ``partials(rows, cols, col_pos, row_offset, row_ids, col_ids, margin, *,
  deterministic, allow_tf32) -> (row: DirectionStats, col: DirectionStats)``

  ``rows`` (b, D) are the global rows ``[row_offset, row_offset + b)``; ``cols`` (N, D)
  are all N columns; ``col_pos`` (N,) holds the positive scores d_j (compute dtype).
  Row i's positive is column ``row_offset + i``; a pair (i, j) is a valid negative when
  ``j != row_offset + i`` and (with ids) ``row_ids[i] != col_ids[j]``.
  For every row i (complete, since every column is seen) and every column j
  (*un-finalised*: only over these b rows), the backend returns

  - ``max``: the largest valid S_ij, NaN if any valid S_ij is NaN, -inf if none is valid;
  - ``arg``: the global index achieving it (a column index for rows, a row index
    ``row_offset + i`` for columns), the smallest one among ties and among NaNs,
    -1 if none is valid; -0.0 counts as +0.0;
  - ``hinge_sum``: the sum over valid pairs of relu(margin + S_ij - d_anchor), where
    d_anchor is ``col_pos[row_offset + i]`` for rows and ``col_pos[j]`` for columns;
  - ``active``: the number of valid pairs whose hinge argument is > 0 (int32).

  Every float is in the compute dtype (fp32 for 16/32-bit inputs, fp64 for fp64).

* ``dense_backward(rows, cols, col_pos, row_offset, row_ids, col_ids, margin,
  row_coef, col_coef, row_gated, col_gated, *, deterministic, allow_tf32)
  -> (grad_rows (b, D), grad_cols (N, D))`` in the compute dtype: the off-diagonal
  gradient of the gated (mean-over-negatives) anchors only,

      W_ij = row_gated_i * row_coef_i * 1[margin + S_ij - d_{row_offset+i} > 0]
           + col_gated_j * col_coef_j * 1[margin + S_ij - d_j > 0]      (valid pairs)
      grad_rows = W @ cols,   grad_cols = W.T @ rows.

  It recomputes S only for tiles that touch a gated row or column, and it must
  reproduce the forward's S bit for bit (same tiling and accumulation order) so that the
  forward's ``active`` counts, used for the diagonal below, match the recomputed set.

Everything else (the gate, the per-anchor losses, the hardest-negative gradient and the
diagonal terms) is O(B) or O(B*D) and lives here once, so every backend, and the
distributed loss, make the same decisions the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

MODES = ("selhn", "hardest", "all", "sum_hinges")
REDUCTIONS = ("mean", "sum", "none")


class DirectionStats(NamedTuple):
    """Per-anchor statistics of one direction (rows: image anchors, cols: caption anchors)."""

    max: Tensor  # compute dtype
    arg: Tensor  # int64, global index, -1 if no valid negative
    hinge_sum: Tensor  # compute dtype
    active: Tensor  # int32


class AnchorDecisions(NamedTuple):
    """What the finalize step decides for the anchors of one direction."""

    loss: Tensor  # compute dtype, the per-anchor loss
    gated: Tensor  # bool, takes the mean over negatives
    near_tie: Tensor  # bool, |gap| < eps
    hardest_index: Tensor  # int64, -1 if none
    gap: Tensor  # compute dtype, d - max, NaN if none
    dense_weight: Tensor  # d loss / d hinge for every active hinge of a gated anchor
    hard_weight: Tensor  # d loss / d (hardest hinge) for a non-gated anchor (0 or 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positive_scores(img: Tensor, txt: Tensor) -> Tensor:
    """d_i = <img_i, txt_i> in the compute dtype (O(B*D))."""
    cdt = compute_dtype(img.dtype)
    return (img.to(cdt) * txt.to(cdt)).sum(dim=1)


def count_negatives(ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """n_i, the number of valid negatives of each anchor (int64)."""
    if ids is None:
        return torch.full((batch,), batch - 1, dtype=torch.int64, device=device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return batch - counts[inverse]


def merge_stats(a: DirectionStats, b: DirectionStats) -> DirectionStats:
    """Combine two partial statistics over disjoint sets of negatives.

    The larger max wins; NaN is larger than everything; ties go to the smaller index,
    and index -1 (no valid negative) loses every tie.
    """
    big = torch.iinfo(torch.int64).max
    a_idx = torch.where(a.arg < 0, big, a.arg)
    b_idx = torch.where(b.arg < 0, big, b.arg)
    a_nan, b_nan = torch.isnan(a.max), torch.isnan(b.max)
    same = (a_nan & b_nan) | (a.max == b.max)
    b_wins = (b_nan & ~a_nan) | (~a_nan & ~b_nan & (b.max > a.max)) | (same & (b_idx < a_idx))
    return DirectionStats(
        max=torch.where(b_wins, b.max, a.max),
        arg=torch.where(b_wins, b.arg, a.arg),
        hinge_sum=a.hinge_sum + b.hinge_sum,
        active=a.active + b.active,
    )


def finalize(
    stats: DirectionStats, d: Tensor, n: Tensor, margin: float, eps: float, mode: str
) -> AnchorDecisions:
    """Gate, per-anchor loss and backward weights of one direction, in O(B).

    ``d`` and ``n`` are the anchors' positive scores and negative counts. Any NaN or Inf
    in an anchor's own pair reaches its loss through ``0 * d`` (no host sync needed).
    """
    dtype = d.dtype
    has_negative = n > 0
    has_hardest = stats.arg >= 0
    gap = torch.where(has_hardest, d - stats.max, torch.full_like(d, float("nan")))
    near_tie = gap.abs() < torch.tensor(eps, dtype=dtype, device=d.device)
    if mode == "selhn":
        gated = near_tie & has_negative
    elif mode == "hardest":
        gated = torch.zeros_like(near_tie)
    else:  # "all", "sum_hinges"
        gated = has_negative
    hard_arg = margin + stats.max - d
    hard_hinge = torch.relu(hard_arg)
    if mode == "sum_hinges":
        per_hinge = torch.ones_like(d)
    else:
        per_hinge = 1.0 / n.clamp(min=1).to(dtype)
    dense = stats.hinge_sum * per_hinge
    zero = torch.zeros_like(d)
    loss = torch.where(gated, dense, torch.where(has_negative, hard_hinge, zero)) + 0 * d
    hard_active = (~gated) & has_hardest & (hard_arg > 0)
    return AnchorDecisions(
        loss=loss,
        gated=gated,
        near_tie=near_tie,
        hardest_index=stats.arg,
        gap=gap,
        dense_weight=torch.where(gated, per_hinge, zero),
        hard_weight=hard_active.to(dtype),
    )


class AnchorWeights(NamedTuple):
    """What the backward needs of one direction's anchors (all O(B))."""

    hardest_index: Tensor  # int64, global index, -1 if none
    dense_weight: Tensor  # AnchorDecisions.dense_weight
    hard_weight: Tensor  # AnchorDecisions.hard_weight
    active: Tensor  # the forward's active-hinge counts, merged over every negative


def scatter_add_rows(target: Tensor, index: Tensor, values: Tensor, deterministic: bool) -> None:
    """target[index[k]] += values[k], with duplicates in ``index``.

    CUDA's index_add_ uses atomics; index_put_ with accumulate=True sorts the indices
    and sums duplicates in a fixed order, so it is the deterministic choice there.
    """
    if deterministic and target.is_cuda:
        target.index_put_((index,), values, accumulate=True)
    else:
        target.index_add_(0, index, values)


def sparse_and_diagonal_backward(
    rows: Tensor,
    cols: Tensor,
    row_offset: int,
    grad_rows: Tensor,
    grad_cols: Tensor,
    row_up: Tensor,
    col_up: Tensor,
    row: AnchorWeights,
    col: AnchorWeights,
    deterministic: bool,
) -> None:
    """Add the hardest-negative pairs and the diagonal to (grad_rows, grad_cols) in place.

    ``rows``/``cols`` are in the compute dtype; ``row_up`` (b,) and ``col_up`` (N,) are the
    upstream gradients of the per-anchor losses; ``row``/``col`` the weights of the
    local rows and of all N columns. O(B*D), no host sync.
    """
    b = rows.shape[0]
    local = torch.arange(b, device=rows.device)

    # Image anchor i, hardest caption k_i: dimg_i += w txt_k, dtxt_k += w img_i.
    w_row = row_up * row.hard_weight
    k = row.hardest_index.clamp(min=0)
    w_row = torch.where(row.hardest_index >= 0, w_row, torch.zeros_like(w_row))
    grad_rows += w_row[:, None] * cols[k]
    scatter_add_rows(grad_cols, k, w_row[:, None] * rows, deterministic)

    # Caption anchor j, hardest image q_j (only where q_j is one of these rows).
    w_col = col_up * col.hard_weight
    q_local = col.hardest_index - row_offset
    mine = (col.hardest_index >= 0) & (q_local >= 0) & (q_local < b)
    w_col_mine = torch.where(mine, w_col, torch.zeros_like(w_col))
    q_local = torch.where(mine, q_local, torch.zeros_like(q_local))
    scatter_add_rows(grad_rows, q_local, w_col_mine[:, None] * cols, deterministic)
    grad_cols += w_col_mine[:, None] * rows[q_local]

    # Diagonal: every active hinge of anchor i carries -d_i, and d_i = <row_i, col_{off+i}>.
    pos = row_offset + local
    dense_r = row_up * row.dense_weight * row.active.to(rows.dtype)
    dense_c = col_up * col.dense_weight * col.active.to(rows.dtype)
    g_diag = -(dense_r + w_row + (dense_c + w_col)[pos])
    grad_rows += g_diag[:, None] * cols[pos]
    grad_cols[pos] += g_diag[:, None] * rows
