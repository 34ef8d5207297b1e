"""The contract every backend implements, and the O(B) math they all share.

A call covers one row block of a global batch, described by a :class:`Block` (the Python
twin of the C++ ``Problem<T>``): ``rows`` (b, D) are the global rows
``[row_offset, row_offset + b)``, ``cols`` (N, D) are all N columns, ``col_pos`` (N,) holds
the positive scores d_j in the compute dtype. Row i's positive is column
``row_offset + i``; a pair (i, j) is a valid negative when ``j != row_offset + i`` and
(with ids) ``row_ids[i] != col_ids[j]``. One process is the block ``row_offset = 0``,
b = N.

A backend (:class:`Backend`) computes what needs the B x B similarity matrix
S = rows @ cols.T:

* ``partials(block, margin, *, deterministic, allow_tf32) -> (row, col)``: for every row
  i (complete, since every column is seen) and every column j (*un-finalised*: only over
  these b rows), a :class:`DirectionStats` of

  - ``max``: the largest valid S_ij, NaN if any valid S_ij is NaN, -inf if none is valid;
  - ``arg``: the global index achieving it (a column index for rows, a row index
    ``row_offset + i`` for columns), the smallest one among ties and among NaNs,
    -1 if none is valid; -0.0 counts as +0.0;
  - ``hinge_sum``: the sum over valid pairs of relu(margin + S_ij - d_anchor), where
    d_anchor is ``col_pos[row_offset + i]`` for rows and ``col_pos[j]`` for columns;
  - ``active``: the number of valid pairs whose hinge argument is > 0 (int32).

  Every float is in the compute dtype (fp32 for 16/32-bit inputs, fp64 for fp64).

* ``dense_backward(block, margin, gated, *, deterministic, allow_tf32)
  -> (grad_rows (b, D), grad_cols (N, D))`` in the compute dtype: the off-diagonal
  gradient of the gated (mean-over-negatives) anchors only (:class:`GatedAnchors`),

      W_ij = row_gated_i * row_coef_i * 1[margin + S_ij - d_{row_offset+i} > 0]
           + col_gated_j * col_coef_j * 1[margin + S_ij - d_j > 0]      (valid pairs)
      grad_rows = W @ cols,   grad_cols = W.T @ rows.

  It recomputes S only for tiles that touch a gated row or column, and it must
  reproduce the forward's S bit for bit (same tiling and accumulation order) so that the
  forward's ``active`` counts, used for the diagonal below, match the recomputed set.

and three O(B) / O(B*D) steps around them, which :class:`PyTorchGlue` implements once in
plain PyTorch for every backend: ``positive_scores``, ``finalize_both`` (the gate, the
per-anchor losses and the backward weights of both directions; ``finalize_forward`` adds
the (2, b) results of the block's own pairs) and
``sparse_and_diagonal_backward`` (the hardest-negative pairs and the diagonal, and the
cast to the gradients' dtypes; in mode "hardest", which gates no anchor, the dense
backward is skipped and its gradients are ``gate_free_dense_grads``: zeros, or None for a
backend whose ``sparse_and_diagonal_backward`` takes None). The pipeline calls
``dense_backward_for_sparse`` (the coefficients as :class:`GatedFactors`), which may
return the dense gradients in the backend's own form for its own
``sparse_and_diagonal_backward``. A backend may fuse any of these into
its own kernels; a fused ``finalize_both`` must reproduce :func:`finalize` exactly (every
decision, every bit), which stays the one definition of the gate, and the tests compare
the two. When the statistics go straight from ``partials`` to ``finalize_forward`` (one
process: nothing merges the columns in between) the pipeline calls
``partials_for_finalize`` instead, which may leave the maxima packed
(:class:`PackedStats`) for the backend's own finalize to decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Block:
    """One row block of a global batch against all its columns (see the module notes)."""

    rows: Tensor  # (b, D)
    cols: Tensor  # (N, D), same dtype as rows
    col_pos: Tensor  # (N,) compute dtype: d_j of every column
    row_offset: int = 0  # global index of rows[0]
    row_ids: Tensor | None = None  # (b,) int32/int64, given together with col_ids
    col_ids: Tensor | None = None  # (N,)

    def __post_init__(self) -> None:
        rows, cols = self.rows, self.cols
        if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
            raise ValueError(
                f"rows and cols must be (b, D) and (N, D), got {tuple(rows.shape)} and "
                f"{tuple(cols.shape)}"
            )
        if rows.dtype != cols.dtype:
            raise TypeError(f"rows and cols must share a dtype, got {rows.dtype} and {cols.dtype}")
        if self.col_pos.shape != (self.n,):
            raise ValueError(f"col_pos must be ({self.n},), got {tuple(self.col_pos.shape)}")
        if not 0 <= self.row_offset <= self.n - self.b:
            raise ValueError(
                f"row_offset {self.row_offset} puts the {self.b} rows outside the {self.n} columns"
            )
        if (self.row_ids is None) != (self.col_ids is None):
            raise ValueError("row_ids and col_ids must be given together")
        if self.row_ids is not None and (
            self.row_ids.shape != (self.b,) or self.col_ids.shape != (self.n,)
        ):
            raise ValueError(f"row_ids and col_ids must have shapes ({self.b},) and ({self.n},)")

    @property
    def b(self) -> int:
        return self.rows.shape[0]

    @property
    def n(self) -> int:
        return self.cols.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]


class DirectionStats(NamedTuple):
    """Per-anchor statistics of one direction (rows: image anchors, cols: caption anchors)."""

    max: Tensor  # compute dtype
    arg: Tensor  # int64, global index, -1 if no valid negative
    hinge_sum: Tensor  # compute dtype
    active: Tensor  # int32


class PackedStats(NamedTuple):
    """DirectionStats whose max and arg are still packed in ``key`` (the backend's own
    layout): ``Backend.partials_for_finalize`` may return them when the statistics go
    straight to the same backend's ``finalize_forward``, which decodes the keys into
    ``max`` and ``arg`` (allocated, written then) in its own launch."""

    max: Tensor
    arg: Tensor
    hinge_sum: Tensor
    active: Tensor
    key: Tensor  # int64


class AnchorSide(NamedTuple):
    """What the finalize step reads of one direction's anchors."""

    stats: DirectionStats | PackedStats  # merged over every negative
    positive: Tensor  # d of these anchors, compute dtype
    # n, the number of valid negatives of each anchor (int64); None without ids, when
    # every anchor has N - 1 (N the number of columns, ``col.positive``'s length).
    negatives: Tensor | None


class AnchorDecisions(NamedTuple):
    """What the finalize step decides for the anchors of one direction."""

    loss: Tensor  # compute dtype, the per-anchor loss
    gated: Tensor  # bool, takes the mean over negatives
    near_tie: Tensor  # bool, |gap| < eps
    hardest_index: Tensor  # int64, -1 if none
    gap: Tensor  # compute dtype, d - max, NaN if none
    dense_weight: Tensor  # d loss / d hinge for every active hinge of a gated anchor
    hard_weight: Tensor  # d loss / d (hardest hinge) for a non-gated anchor (0 or 1)


class PairedResults(NamedTuple):
    """(2, b) per-anchor results of a block's pairs: row 0 the image anchors (the block's
    rows), row 1 the caption anchors of the same pairs (columns row_offset + i)."""

    loss: Tensor
    gated: Tensor
    near_tie: Tensor
    hardest_index: Tensor
    gap: Tensor


class GatedAnchors(NamedTuple):
    """The dense backward's anchors: coefficient (upstream x dense weight) and gate."""

    row_coef: Tensor  # (b,) compute dtype
    col_coef: Tensor  # (N,)
    row_gated: Tensor  # (b,) bool
    col_gated: Tensor  # (N,) bool


class GatedFactors(NamedTuple):
    """GatedAnchors with each coefficient still as its two factors (a backend may form
    the products inside its own kernels)."""

    row_upstream: Tensor  # (b,) compute dtype
    row_dense_weight: Tensor  # (b,)
    col_upstream: Tensor  # (N,)
    col_dense_weight: Tensor  # (N,)
    row_gated: Tensor  # (b,) bool
    col_gated: Tensor  # (N,) bool

    def anchors(self) -> GatedAnchors:
        """The coefficients multiplied out."""
        row_coef = self.row_upstream * self.row_dense_weight
        col_coef = self.col_upstream * self.col_dense_weight
        return GatedAnchors(row_coef, col_coef, self.row_gated, self.col_gated)


class AnchorWeights(NamedTuple):
    """What the sparse and diagonal backward needs of one direction's anchors (O(B))."""

    upstream: Tensor  # d (total loss) / d (per-anchor loss), compute dtype
    hardest_index: Tensor  # int64, global index, -1 if none
    dense_weight: Tensor  # AnchorDecisions.dense_weight
    hard_weight: Tensor  # AnchorDecisions.hard_weight
    active: Tensor  # the forward's active-hinge counts, merged over every negative


# ---------------------------------------------------------------------------------------
# The shared O(B) and O(B*D) math


def positive_scores(img: Tensor, txt: Tensor) -> Tensor:
    """d_i = <img_i, txt_i> in the compute dtype (O(B*D))."""
    cdt = compute_dtype(img.dtype)
    return (img.to(cdt) * txt.to(cdt)).sum(dim=1)


def count_negatives(ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """n_i, the number of valid negatives of each anchor (int64)."""
    if ids is None:
        return torch.full((batch,), batch - 1, dtype=torch.int64, device=device)
    # Sorted ids and two binary searches: unlike torch.unique, no host sync.
    ordered = torch.sort(ids).values
    same = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
    return batch - same


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
    This is the one definition of the gate: a backend that fuses it must match it exactly.
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
    block: Block,
    grad_rows: Tensor,
    grad_cols: Tensor,
    row: AnchorWeights,
    col: AnchorWeights,
    deterministic: bool,
) -> None:
    """Add the hardest-negative pairs and the diagonal to (grad_rows, grad_cols) in place.

    The gradients are in the compute dtype; ``row`` holds the weights of the block's b
    rows, ``col`` those of all N columns. O(B*D), no host sync.
    """
    cdt = compute_dtype(block.rows.dtype)
    rows, cols, row_offset = block.rows.to(cdt), block.cols.to(cdt), block.row_offset
    b = rows.shape[0]
    local = torch.arange(b, device=rows.device)

    # Image anchor i, hardest caption k_i: dimg_i += w txt_k, dtxt_k += w img_i.
    w_row = row.upstream * row.hard_weight
    k = row.hardest_index.clamp(min=0)
    w_row = torch.where(row.hardest_index >= 0, w_row, torch.zeros_like(w_row))
    grad_rows += w_row[:, None] * cols[k]
    scatter_add_rows(grad_cols, k, w_row[:, None] * rows, deterministic)

    # Caption anchor j, hardest image q_j (only where q_j is one of these rows).
    w_col = col.upstream * col.hard_weight
    q_local = col.hardest_index - row_offset
    mine = (col.hardest_index >= 0) & (q_local >= 0) & (q_local < b)
    w_col_mine = torch.where(mine, w_col, torch.zeros_like(w_col))
    q_local = torch.where(mine, q_local, torch.zeros_like(q_local))
    scatter_add_rows(grad_rows, q_local, w_col_mine[:, None] * cols, deterministic)
    grad_cols += w_col_mine[:, None] * rows[q_local]

    # Diagonal: every active hinge of anchor i carries -d_i, and d_i = <row_i, col_{off+i}>.
    pos = row_offset + local
    dense_r = row.upstream * row.dense_weight * row.active.to(cdt)
    dense_c = col.upstream * col.dense_weight * col.active.to(cdt)
    g_diag = -(dense_r + w_row + (dense_c + w_col)[pos])
    grad_rows += g_diag[:, None] * cols[pos]
    grad_cols[pos] += g_diag[:, None] * rows


class FullyActive(NamedTuple):
    """Gated anchors whose every hinge is active, taken out of the dense backward.

    Their dense weights are rank one: W_ij = c_i for every valid column j of such a row
    i, W_ij = e_j for every valid row i of such a column j. So their two products are
    O(B*D) sums (``add_fully_active``) instead of a recompute of S and two products."""

    row_coef: Tensor  # (b,) c_i = upstream x dense weight where row i is fully active, else 0
    col_coef: Tensor  # (N,) e_j likewise


def split_fully_active(
    gated: GatedFactors, row_active: Tensor, col_active: Tensor
) -> tuple[GatedFactors, FullyActive] | None:
    """(the other gated anchors, for the dense backward; the fully active ones), or None
    when no gated anchor is fully active: its forward active count (merged over every
    negative) equals its number of valid negatives, N - 1 without ids. Reads one flag
    back to the host, so the pipeline calls it for CPU tensors only."""
    n_cols = gated.col_gated.shape[0]
    row_full = gated.row_gated & (row_active == n_cols - 1)
    col_full = gated.col_gated & (col_active == n_cols - 1)
    if not bool(row_full.any() | col_full.any()):
        return None
    zero = gated.row_dense_weight.new_zeros(())  # same dtype and device
    rest = GatedFactors(
        gated.row_upstream, torch.where(row_full, zero, gated.row_dense_weight),
        gated.col_upstream, torch.where(col_full, zero, gated.col_dense_weight),
        gated.row_gated & ~row_full, gated.col_gated & ~col_full,
    )  # fmt: skip
    full = FullyActive(
        torch.where(row_full, gated.row_upstream * gated.row_dense_weight, zero),
        torch.where(col_full, gated.col_upstream * gated.col_dense_weight, zero),
    )
    return rest, full


def add_fully_active(block: Block, grad_rows: Tensor, grad_cols: Tensor, full: FullyActive) -> None:
    """Add the fully active anchors' dense products to the gradients, in place.

    Row i adds c_i x (every column but its positive) to grad_rows[i] and c_i x row_i to
    every column but that positive; column j adds e_j x (every row of the block but its
    positive) to grad_cols[j] and e_j x col_j to those rows. Without ids only.
    """
    cdt = grad_rows.dtype
    rows, cols, off = block.rows.to(cdt), block.cols.to(cdt), block.row_offset
    b = rows.shape[0]
    c, e = full.row_coef.to(cdt), full.col_coef.to(cdt)
    own = c + e[off : off + b]  # both weights of pair i, taken back off its positive
    grad_rows.addr_(c, cols.sum(0)).add_(torch.mv(cols.T, e))
    grad_rows.addcmul_(own[:, None], cols[off : off + b], value=-1)
    grad_cols.addr_(e, rows.sum(0)).add_(torch.mv(rows.T, c))
    grad_cols[off : off + b].addcmul_(own[:, None], rows, value=-1)


# ---------------------------------------------------------------------------------------
# The backend contract


class Backend(Protocol):
    """What the pipeline (pipeline.py) calls on a backend; see the module notes."""

    plain_dense_grads: bool  # see PyTorchGlue

    def positive_scores(self, img: Tensor, txt: Tensor) -> Tensor: ...

    def partials(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats, DirectionStats]: ...

    def partials_for_finalize(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats | PackedStats, DirectionStats | PackedStats]: ...

    def finalize_both(
        self, row: AnchorSide, col: AnchorSide, margin: float, eps: float, mode: str
    ) -> tuple[AnchorDecisions, AnchorDecisions]: ...

    def finalize_forward(
        self,
        row: AnchorSide,
        col: AnchorSide,
        margin: float,
        eps: float,
        mode: str,
        row_offset: int,
    ) -> tuple[PairedResults, AnchorDecisions, AnchorDecisions]: ...

    def dense_backward(
        self,
        block: Block,
        margin: float,
        gated: GatedAnchors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]: ...

    def dense_backward_for_sparse(
        self,
        block: Block,
        margin: float,
        gated: GatedFactors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]: ...

    def gate_free_dense_grads(self, block: Block) -> tuple[Tensor, Tensor] | None: ...

    def sparse_and_diagonal_backward(
        self,
        block: Block,
        dense_grads: tuple[Tensor, Tensor] | None,
        row: AnchorWeights,
        col: AnchorWeights,
        *,
        deterministic: bool,
        out_dtypes: tuple[torch.dtype, torch.dtype],
    ) -> tuple[Tensor, Tensor]: ...


class PyTorchGlue:
    """The O(B) and O(B*D) steps of :class:`Backend` in plain PyTorch.

    Backends inherit these and implement ``partials`` and ``dense_backward``; a backend
    with fused kernels for a step overrides it.
    """

    # dense_backward_for_sparse returns a plain (grad_rows, grad_cols) pair, which the
    # pipeline may add to (add_fully_active); a backend with its own form sets False.
    plain_dense_grads = True

    def positive_scores(self, img: Tensor, txt: Tensor) -> Tensor:
        return positive_scores(img, txt)

    def partials_for_finalize(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[DirectionStats | PackedStats, DirectionStats | PackedStats]:
        """partials, for statistics that go straight to this backend's finalize_forward
        (nothing merges them first): a backend may return PackedStats."""
        return self.partials(block, margin, deterministic=deterministic, allow_tf32=allow_tf32)

    def finalize_both(
        self, row: AnchorSide, col: AnchorSide, margin: float, eps: float, mode: str
    ) -> tuple[AnchorDecisions, AnchorDecisions]:
        if isinstance(row.stats, PackedStats) or isinstance(col.stats, PackedStats):
            raise TypeError("PackedStats go to the finalize of the backend that packed them")
        n_cols = col.positive.shape[0]

        def negatives(side: AnchorSide) -> Tensor:
            if side.negatives is not None:
                return side.negatives
            n = count_negatives(None, n_cols, side.positive.device)
            return n[: side.positive.shape[0]]

        return (
            finalize(row.stats, row.positive, negatives(row), margin, eps, mode),
            finalize(col.stats, col.positive, negatives(col), margin, eps, mode),
        )

    def finalize_forward(
        self,
        row: AnchorSide,
        col: AnchorSide,
        margin: float,
        eps: float,
        mode: str,
        row_offset: int,
    ) -> tuple[PairedResults, AnchorDecisions, AnchorDecisions]:
        """finalize_both, and the (2, b) results of the block's pairs (``row`` holds the
        block's b rows, ``col`` all N columns, the pairs' captions from ``row_offset``)."""
        row_dec, col_dec = self.finalize_both(row, col, margin, eps, mode)
        mine = slice(row_offset, row_offset + row.positive.shape[0])
        pairs = PairedResults(
            *(torch.stack([getattr(row_dec, n), getattr(col_dec, n)[mine]])
              for n in PairedResults._fields)
        )  # fmt: skip
        return pairs, row_dec, col_dec

    def dense_backward_for_sparse(
        self,
        block: Block,
        margin: float,
        gated: GatedFactors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """dense_backward, for gradients that go straight to this backend's
        sparse_and_diagonal_backward: a backend may return them in its own form."""
        return self.dense_backward(  # type: ignore[attr-defined]
            block, margin, gated.anchors(), deterministic=deterministic, allow_tf32=allow_tf32
        )

    def gate_free_dense_grads(self, block: Block) -> tuple[Tensor, Tensor] | None:
        """The dense gradients when no anchor can be gated: zeros in the compute dtype."""
        cdt = compute_dtype(block.rows.dtype)
        return (
            block.rows.new_zeros(block.rows.shape, dtype=cdt),
            block.cols.new_zeros(block.cols.shape, dtype=cdt),
        )

    def sparse_and_diagonal_backward(
        self,
        block: Block,
        dense_grads: tuple[Tensor, Tensor] | None,
        row: AnchorWeights,
        col: AnchorWeights,
        *,
        deterministic: bool,
        out_dtypes: tuple[torch.dtype, torch.dtype],
    ) -> tuple[Tensor, Tensor]:
        """The final gradients in ``out_dtypes`` (the dense ones are updated in place)."""
        if dense_grads is None:
            dense_grads = PyTorchGlue.gate_free_dense_grads(self, block)
        grad_rows, grad_cols = dense_grads
        sparse_and_diagonal_backward(block, grad_rows, grad_cols, row, col, deterministic)
        return grad_rows.to(out_dtypes[0]), grad_cols.to(out_dtypes[1])
