"""The loss over a row block of a global batch: the one forward and the one backward.

The single-process op (ops.py) and the distributed loss (distributed.py) both run
:func:`forward` and :func:`backward`; they differ only in the :class:`Exchange` they pass,
which says how this process's rows sit in the global batch, how rows are gathered from
every process, how the column statistics are merged, and how column gradients are summed
back to their owners. One process is :class:`OneProcess`, the exchange that does nothing
(row_offset 0, b = N).

Forward: positive scores of this process's pairs, gathered into the N columns' d; the
negative counts; the backend's ``partials`` of these b rows against all N columns; the
column statistics merged over every process; ``finalize`` of both directions. Backward:
the backend's ``dense_backward`` for the gated anchors, then the hardest-negative pairs
and the diagonal, and the column gradients summed back to their owners.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .kernel_interface import (
    AnchorSide,
    AnchorWeights,
    Backend,
    Block,
    DirectionStats,
    GatedFactors,
    add_fully_active,
    compute_dtype,
    count_negatives,
    split_fully_active,
)


class Exchange(Protocol):
    """Where this process's b rows sit in the global batch of N, and the collectives."""

    offset: int  # global index of this process's first row
    local: int  # b
    total: int  # N

    def gather_rows(self, what: str, t: Tensor) -> Tensor:
        """(N, ...): every process's (b_r, ...) rows concatenated in process order."""
        ...

    def merge_columns(self, partial: DirectionStats) -> DirectionStats:
        """The column statistics over every process's rows, the same bits everywhere."""
        ...

    def sum_rows(self, what: str, t: Tensor) -> Tensor:
        """Sum every process's (N, ...) tensor and return this process's rows (b, ...)."""
        ...

    def sum_scalars(self, what: str, local: Tensor) -> Tensor:
        """The sum of every process's 0-d tensor, in process order (the same bits everywhere)."""
        ...


class OneProcess:
    """The whole batch in this process: every exchange is the identity."""

    def __init__(self, batch: int) -> None:
        self.offset, self.local, self.total = 0, batch, batch

    def gather_rows(self, what: str, t: Tensor) -> Tensor:
        return t

    def merge_columns(self, partial: DirectionStats) -> DirectionStats:
        return partial

    def sum_rows(self, what: str, t: Tensor) -> Tensor:
        return t

    def sum_scalars(self, what: str, local: Tensor) -> Tensor:
        return local.clone()


# The custom ops take an exchange by name (they take no Python objects): "" is one
# process; distributed.py registers each process group's exchange under its own key.
_EXCHANGES: dict[str, Exchange] = {}


def register_exchange(key: str, exchange: Exchange) -> None:
    _EXCHANGES[key] = exchange


def exchange_for(key: str, batch: int) -> Exchange:
    """The exchange named ``key`` ("" for one process of ``batch`` pairs)."""
    return OneProcess(batch) if key == "" else _EXCHANGES[key]


class Settings(NamedTuple):
    margin: float
    eps: float
    mode: str
    deterministic: bool
    allow_tf32: bool


class Saved(NamedTuple):
    """What backward needs beyond the inputs and the (2, b) gates and hardest indices."""

    row_dense_weight: Tensor  # (b,)
    row_hard_weight: Tensor
    row_active: Tensor
    col_gated: Tensor  # (N,)
    col_hardest_index: Tensor
    col_dense_weight: Tensor
    col_hard_weight: Tensor
    col_active: Tensor
    positive: Tensor  # (N,) d of every column


class Forward(NamedTuple):
    """(2, b) per-anchor results of this process's anchors (row 0 image, row 1 caption),
    hardest indices global, and what backward needs."""

    loss: Tensor
    gated: Tensor
    near_tie: Tensor
    hardest_index: Tensor
    gap: Tensor
    saved: Saved


# The forward op's outputs, in order: the five (2, b) results, then Saved's fields.
OUTPUT_NAMES = Forward._fields[:-1] + Saved._fields


def _gather_ids(exchange: Exchange, ids: Tensor | None) -> Tensor | None:
    return None if ids is None else exchange.gather_rows("the ids all-gather", ids)


def forward(
    backend: Backend,
    img: Tensor,
    txt: Tensor,
    ids: Tensor | None,
    settings: Settings,
    exchange: Exchange,
) -> Forward:
    """The forward of this process's b pairs within the global batch."""
    with torch.autocast(img.device.type, enabled=False):  # inputs carry the autocast dtype
        cols = exchange.gather_rows("the caption embedding all-gather", txt)
        d_local = backend.positive_scores(img, txt)
        d_all = exchange.gather_rows("the positive score all-gather", d_local)
        ids_all = _gather_ids(exchange, ids)
        n_all = None  # no ids: every anchor has N - 1 negatives, the backend knows
        if ids_all is not None:
            n_all = count_negatives(ids_all, exchange.total, img.device)
        block = Block(img, cols, d_all, exchange.offset, ids, ids_all)
        flags = dict(deterministic=settings.deterministic, allow_tf32=settings.allow_tf32)
        if isinstance(exchange, OneProcess):  # nothing between partials and finalize
            row_stats, col_stats = backend.partials_for_finalize(block, settings.margin, **flags)
        else:
            row_stats, col_partial = backend.partials(block, settings.margin, **flags)
            col_stats = exchange.merge_columns(col_partial)
        mine = slice(exchange.offset, exchange.offset + exchange.local)
        pairs, row, col = backend.finalize_forward(
            AnchorSide(row_stats, d_local, None if n_all is None else n_all[mine]),
            AnchorSide(col_stats, d_all, n_all),
            settings.margin, settings.eps, settings.mode, exchange.offset,
        )  # fmt: skip

    saved = Saved(
        row.dense_weight, row.hard_weight, row_stats.active,
        col.gated, col.hardest_index, col.dense_weight, col.hard_weight, col_stats.active,
        d_all,
    )  # fmt: skip
    return Forward(*pairs, saved)


# The fully active anchors' sums subtract each pair's own term from a total, which can
# leave a rounding residue (1e-16) where the dense pass's terms cancel exactly, as in the
# degenerate tiny batches of the tests; below one CPU tile of columns the dense pass is a
# single tile column anyway, so small batches keep it.
FULLY_ACTIVE_MIN_COLUMNS = 128


def _fully_active_shortcut(backend: Backend, block: Block, settings: Settings) -> bool:
    """Whether the fully active gated anchors skip the dense backward (kernel_interface's
    FullyActive): for backends whose dense gradients are plain tensors, on
    CPU (choosing reads a flag back, a sync on a GPU), without ids (their valid sets are
    not "all but the positive"), not in deterministic mode (the sums' order could
    depend on the thread count), and from FULLY_ACTIVE_MIN_COLUMNS columns."""
    return (
        getattr(backend, "plain_dense_grads", False)
        and block.n >= FULLY_ACTIVE_MIN_COLUMNS
        and block.rows.device.type == "cpu"
        and block.row_ids is None
        and not settings.deterministic
    )


def backward(
    backend: Backend,
    grad_loss: Tensor,
    img: Tensor,
    txt: Tensor,
    ids: Tensor | None,
    gated: Tensor,
    hardest_index: Tensor,
    saved: Saved,
    settings: Settings,
    exchange: Exchange,
) -> tuple[Tensor, Tensor]:
    """Gradients of this process's img and txt rows, given the (2, b) upstream gradient.

    The captions and ids are gathered again rather than kept alive from the forward.
    """
    with torch.autocast(img.device.type, enabled=False):
        cdt = compute_dtype(img.dtype)
        up = grad_loss.to(cdt)
        row_up = up[0]
        # A caption anchor's upstream gradient lives on the process that owns it.
        col_up = exchange.gather_rows("the upstream gradient all-gather", up[1].contiguous())
        cols = exchange.gather_rows("the caption embedding all-gather", txt)
        block = Block(img, cols, saved.positive, exchange.offset, ids, _gather_ids(exchange, ids))
        if settings.mode == "hardest":  # no anchor is gated: no dense backward at all
            dense = backend.gate_free_dense_grads(block)
        else:
            factors = GatedFactors(row_up, saved.row_dense_weight, col_up,
                                   saved.col_dense_weight, gated[0], saved.col_gated)  # fmt: skip
            split = None
            if _fully_active_shortcut(backend, block, settings):
                split = split_fully_active(factors, saved.row_active, saved.col_active)
            dense = backend.dense_backward_for_sparse(
                block, settings.margin, factors if split is None else split[0],
                deterministic=settings.deterministic, allow_tf32=settings.allow_tf32,
            )  # fmt: skip
            if split is not None:
                add_fully_active(block, *dense, split[1])
        # One process casts the column gradient at once; several sum theirs first.
        one_process = exchange.local == exchange.total
        grad_img, grad_cols = backend.sparse_and_diagonal_backward(
            block, dense,
            AnchorWeights(row_up, hardest_index[0], saved.row_dense_weight,
                          saved.row_hard_weight, saved.row_active),
            AnchorWeights(col_up, saved.col_hardest_index, saved.col_dense_weight,
                          saved.col_hard_weight, saved.col_active),
            deterministic=settings.deterministic,
            out_dtypes=(img.dtype, txt.dtype if one_process else cdt),
        )  # fmt: skip
        grad_txt = exchange.sum_rows("the caption gradient reduce-scatter", grad_cols)
        return grad_img, grad_txt.to(txt.dtype)
