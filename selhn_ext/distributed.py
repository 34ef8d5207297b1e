"""The SelHN loss of the global batch, computed across the ranks of a torch.distributed group.

Rank r holds b_r pairs; the global batch of N = sum(b_r) pairs is their concatenation in
rank order, so rank r owns the global rows ``[off_r, off_r + b_r)``. Every rank

1. exchanges a small header (sizes, D, dtype, options, any local input error) with one
   all-gather, so that bad or mismatched inputs raise the same error on every rank instead
   of leaving the others waiting in a collective;
2. all-gathers the caption embeddings, the positive scores d and the ids (O(N*D));
3. runs its backend's ``partials`` on its own rows against all N columns with
   ``row_offset = off_r``: its image anchors' statistics are complete, its caption
   statistics are partial over its rows;
4. all-gathers the partial caption statistics (O(N) per rank) and merges them in rank
   order with ``merge_stats``, so every rank holds the same column statistics, bit for bit,
   and finalizes both directions with the shared O(N) finalize;
5. in backward, runs ``dense_backward`` and ``sparse_and_diagonal_backward`` for its rows
   against all columns and returns each column gradient to its owner with a padded
   reduce-scatter (NCCL) or an all-to-all summed in rank order (gloo, or deterministic).

No rank holds a B x B or b_r x B matrix; the extra memory per rank is O(N*D).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from .functional import (
    SelHNStats,
    _check_embeddings,
    _check_ids,
    allow_tf32_for,
    autocast_inputs,
    check_options,
)
from .functional import selhn_loss as single_process_selhn_loss
from .kernel_interface import (
    MODES,
    REDUCTIONS,
    AnchorWeights,
    DirectionStats,
    compute_dtype,
    count_negatives,
    finalize,
    merge_stats,
    positive_scores,
    sparse_and_diagonal_backward,
)

__all__ = ["CollectiveError", "DistributedInputError", "selhn_loss"]

# torch >= 2.8 renamed the single-tensor collectives; older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class DistributedInputError(ValueError):
    """Some rank's inputs are invalid, or the ranks disagree; raised on every rank alike."""


class CollectiveError(RuntimeError):
    """A collective of the distributed loss failed or timed out on this rank."""


# ---------------------------------------------------------------------------------------
# The header every rank sends before any data: one int64 row per rank.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
_FIELDS = ("batch", "dim", "dtype", "device", "ids", "mode", "reduction", "margin", "eps")
_ERROR, _MESSAGE_LENGTH = len(_FIELDS), len(_FIELDS) + 1
_MESSAGE_BYTES = 512  # a local error's message travels truncated to this many UTF-8 bytes
_HEADER_LENGTH = len(_FIELDS) + 2 + _MESSAGE_BYTES // 8


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _describe_field(field: str, value: int) -> str:
    if field == "dtype":
        return str(_DTYPES[value]).removeprefix("torch.")
    if field == "device":
        return _DEVICE_TYPES[value] if 0 <= value < len(_DEVICE_TYPES) else "another device"
    if field == "ids":
        return "ids" if value else "no ids"
    if field == "mode":
        return repr(MODES[value])
    if field == "reduction":
        return repr(REDUCTIONS[value])
    if field in ("margin", "eps"):
        return repr(_bits_float(value))
    return str(value)


_FIELD_NAMES = {
    "dim": "the embedding dimension D",
    "dtype": "the embedding dtype",
    "device": "the device type",
    "ids": "whether ids are given",
    "mode": "mode",
    "reduction": "reduction",
    "margin": "margin",
    "eps": "eps",
}


def _encode_header(values: dict[str, int], error: Exception | None, device) -> Tensor:
    header = torch.zeros(_HEADER_LENGTH, dtype=torch.int64)
    if error is None:
        header[: len(_FIELDS)] = torch.tensor([values[f] for f in _FIELDS], dtype=torch.int64)
    else:
        message = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        header[_ERROR] = 1
        header[_MESSAGE_LENGTH] = len(message)
        text = header[_MESSAGE_LENGTH + 1 :].view(torch.uint8)
        text[: len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    return header.to(device)


def _decode_message(row: Tensor) -> str:
    length = int(row[_MESSAGE_LENGTH])
    text = row[_MESSAGE_LENGTH + 1 :].contiguous().view(torch.uint8)[:length]
    return bytes(text.tolist()).decode("utf-8", errors="replace")


def _header_error(rows: Tensor) -> str | None:
    """The one message every rank raises, or None if the ranks' inputs fit together."""
    failed = [r for r in range(rows.shape[0]) if rows[r, _ERROR]]
    if failed:
        return "; ".join(
            f"rank {r} rejected its inputs: {_decode_message(rows[r])}" for r in failed
        )
    table = {field: rows[:, k].tolist() for k, field in enumerate(_FIELDS)}
    for field, label in _FIELD_NAMES.items():
        values = table[field]
        for r, value in enumerate(values):
            if value != values[0]:
                return (
                    f"the ranks disagree on {label}: rank 0 has "
                    f"{_describe_field(field, values[0])}, rank {r} has "
                    f"{_describe_field(field, value)}; every rank must pass the same"
                )
    empty = [r for r, b in enumerate(table["batch"]) if b == 0]
    if empty:
        return (
            f"rank {', '.join(map(str, empty))} has an empty local batch (b_r = 0); every "
            "rank needs at least one pair (drop_last=True in the sampler avoids this)"
        )
    if sum(table["batch"]) < 2:
        return f"the global batch needs at least 2 pairs, got {sum(table['batch'])}"
    return None


# ---------------------------------------------------------------------------------------
# Collectives


def _timeout_hint(what: str, rank: int, exc: Exception) -> str:
    return (
        f"selhn_loss: {what} failed on rank {rank}: {exc}. Every rank of the group must "
        "call selhn_loss, and backward on its result, the same number of times; a rank "
        "that skips one leaves the others waiting until the process group's timeout "
        "expires (torch.distributed.init_process_group(timeout=...))."
    )


@dataclass(frozen=True)
class _Ranks:
    """The group, who holds which rows, and the collectives the loss needs."""

    group: dist.ProcessGroup | None
    rank: int
    sizes: tuple[int, ...]
    device: torch.device
    reduce_scatter: bool  # NCCL's reduce-scatter; otherwise an all-to-all + ordered sum

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def padded(self) -> int:
        return max(self.sizes)

    def _run(self, what: str, collective, *args) -> None:
        try:
            collective(*args, group=self.group)
        except RuntimeError as exc:  # torch.distributed.DistError is a RuntimeError
            raise CollectiveError(_timeout_hint(what, self.rank, exc)) from exc

    def _owned_rows(self) -> Tensor:
        """Indices of the real rows in the rank-major padded layout (world * padded)."""
        return torch.cat(
            [
                torch.arange(size, device=self.device) + r * self.padded
                for r, size in enumerate(self.sizes)
            ]
        )

    def gather_stack(self, what: str, t: Tensor) -> Tensor:
        """(world, *t.shape): every rank's tensor of one shape (at least 1-D), in rank order."""
        # gloo takes only the concatenated (world * t.shape[0], ...) output layout.
        out = t.new_empty((self.world * t.shape[0], *t.shape[1:]))
        self._run(what, _all_gather_single, out, t.contiguous())
        return out.view(self.world, *t.shape)

    def gather_rows(self, what: str, t: Tensor) -> Tensor:
        """(N, ...): every rank's (b_r, ...) rows concatenated in rank order."""
        if len(set(self.sizes)) == 1:
            return self.gather_stack(what, t).flatten(0, 1)
        padded = t.new_zeros((self.padded, *t.shape[1:]))
        padded[: self.local] = t
        return self.gather_stack(what, padded).flatten(0, 1)[self._owned_rows()]

    def sum_rows(self, what: str, t: Tensor) -> Tensor:
        """Sum the ranks' (N, D) tensors and return this rank's rows (b_r, D)."""
        if len(set(self.sizes)) == 1:
            send = t.contiguous()
        else:
            send = t.new_zeros((self.world * self.padded, *t.shape[1:]))
            send[self._owned_rows()] = t
        if self.reduce_scatter:
            out = t.new_empty((self.padded, *t.shape[1:]))
            self._run(what, _reduce_scatter_single, out, send)
            return out[: self.local]
        received = torch.empty_like(send)
        self._run(what, dist.all_to_all_single, received, send)
        parts = received.view(self.world, self.padded, *t.shape[1:])
        total = parts[0].clone()
        for r in range(1, self.world):  # a fixed order: the same bits on every run
            total += parts[r]
        return total[: self.local]


def _merge_over_ranks(ranks: _Ranks, partial: DirectionStats) -> DirectionStats:
    """Merge every rank's partial caption statistics in rank order (same bits everywhere)."""
    floats = ranks.gather_stack(
        "the caption statistics all-gather", torch.stack([partial.max, partial.hinge_sum])
    )
    ints = ranks.gather_stack(
        "the caption statistics all-gather",
        torch.stack([partial.arg, partial.active.to(torch.int64)]),
    )

    def of_rank(r: int) -> DirectionStats:
        return DirectionStats(floats[r, 0], ints[r, 0], floats[r, 1], ints[r, 1].to(torch.int32))

    merged = of_rank(0)
    for r in range(1, ranks.world):
        merged = merge_stats(merged, of_rank(r))
    return merged


# ---------------------------------------------------------------------------------------
# Autograd


def _without_autocast(method):
    """The inputs already carry the autocast dtype; the compute dtype rules apply inside."""

    @functools.wraps(method)
    def run(ctx, first: Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return run


@dataclass(frozen=True)
class _Options:
    margin: float
    eps: float
    mode: str
    backend: str
    deterministic: bool
    allow_tf32: bool


class _GlobalBatchSelHN(torch.autograd.Function):
    """Per-anchor losses (2, b_r) of this rank's anchors within the global batch."""

    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, ids, ranks: _Ranks, options: _Options):
        kernels = dispatch.kernels(options.backend)
        total, offset, local = ranks.total, ranks.offset, ranks.local
        mine = slice(offset, offset + local)
        txt_all = ranks.gather_rows("the caption embedding all-gather", txt)
        d_local = positive_scores(img, txt)
        d_all = ranks.gather_rows("the positive score all-gather", d_local)
        ids_all = None
        if ids is not None:
            ids_all = ranks.gather_rows("the ids all-gather", ids.to(torch.int64))
        n_all = count_negatives(ids_all, total, img.device)

        row_stats, col_partial = kernels.partials(
            img,
            txt_all,
            d_all,
            offset,
            ids,
            ids_all,
            options.margin,
            deterministic=options.deterministic,
            allow_tf32=options.allow_tf32,
        )
        col_stats = _merge_over_ranks(ranks, col_partial)
        args = (options.margin, options.eps, options.mode)
        row = finalize(row_stats, d_local, n_all[mine], *args)
        col = finalize(col_stats, d_all, n_all, *args)

        ctx.save_for_backward(
            img, txt, ids, txt_all, d_all, ids_all,
            row.gated, row.hardest_index, row.dense_weight, row.hard_weight, row_stats.active,
            col.gated, col.hardest_index, col.dense_weight, col.hard_weight, col_stats.active,
        )  # fmt: skip
        ctx.ranks, ctx.options = ranks, options

        def local_pair(name: str) -> Tensor:
            return torch.stack([getattr(row, name), getattr(col, name)[mine]])

        outputs = [local_pair(name) for name in ("loss", "gated", "near_tie", "hardest_index")]
        outputs.append(local_pair("gap"))
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    @_without_autocast
    def backward(ctx, grad_loss, *unused):
        (img, txt, ids, txt_all, d_all, ids_all,
         row_gated, row_hardest, row_dense, row_hard, row_active,
         col_gated, col_hardest, col_dense, col_hard, col_active) = ctx.saved_tensors  # fmt: skip
        ranks, options = ctx.ranks, ctx.options
        kernels = dispatch.kernels(options.backend)
        cdt = compute_dtype(img.dtype)
        up = grad_loss.to(cdt)
        row_up = up[0]
        # A caption anchor's upstream gradient lives on the rank that owns it.
        col_up = ranks.gather_rows("the upstream gradient all-gather", up[1].contiguous())

        grad_rows, grad_cols = kernels.dense_backward(
            img,
            txt_all,
            d_all,
            ranks.offset,
            ids,
            ids_all,
            options.margin,
            row_up * row_dense,
            col_up * col_dense,
            row_gated,
            col_gated,
            deterministic=options.deterministic,
            allow_tf32=options.allow_tf32,
        )
        sparse_and_diagonal_backward(
            img.to(cdt),
            txt_all.to(cdt),
            ranks.offset,
            grad_rows,
            grad_cols,
            row_up,
            col_up,
            AnchorWeights(row_hardest, row_dense, row_hard, row_active),
            AnchorWeights(col_hardest, col_dense, col_hard, col_active),
            options.deterministic,
        )
        grad_txt = ranks.sum_rows("the caption gradient reduce-scatter", grad_cols)
        return grad_rows.to(img.dtype), grad_txt.to(txt.dtype), None, None, None


class _SumOverRanks(torch.autograd.Function):
    """The sum of every rank's local value (the same bits on every rank).

    Backward passes each rank's upstream gradient to its own local value: with the same
    upstream on every rank, each rank's anchors receive exactly their share of the
    single-process gradient.
    """

    @staticmethod
    def forward(ctx, local: Tensor, ranks: _Ranks) -> Tensor:
        return ranks.gather_stack("the loss all-gather", local.reshape(1)).sum()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------------------------------
# The public function


def _device_code(device: torch.device) -> int:
    return _DEVICE_TYPES.index(device.type) if device.type in _DEVICE_TYPES else len(_DEVICE_TYPES)


def _control_device(img, uses_nccl: bool) -> torch.device:
    """Where the header travels: the inputs' device, or a CUDA device for NCCL."""
    if isinstance(img, Tensor) and img.device.type in _DEVICE_TYPES:
        if img.device.type == "cuda" or not uses_nccl:
            return img.device
    if uses_nccl:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def selhn_loss(
    img: Tensor,
    txt: Tensor,
    *,
    margin: float = 0.2,
    eps: float = 0.01,
    mode: str = "selhn",
    reduction: str = "mean",
    ids: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, SelHNStats]:
    """The SelHN loss of the global batch spread over the ranks of ``group``.

    Every rank of the group must call this with its own pairs, and every rank must run
    backward on the result (backward runs collectives too).

    Args:
        img, txt: this rank's (b_r, D) embeddings; the global batch is the concatenation
            of every rank's rows in rank order. b_r may differ between ranks but must be at
            least 1; D, dtype, device type and the options must be the same on every rank.
        margin, eps, mode, reduction: as in :func:`selhn_ext.selhn_loss`, for the global
            batch: ``mean`` divides by 2N, N the global batch size.
        ids: this rank's (b_r,) slice of the global identities (given on every rank or on
            none); pairs sharing an id are not negatives, across ranks too.
        group: the process group (the default group when None).
        backend: as in :func:`selhn_ext.selhn_loss`; ``"reference"`` runs the ``chunked``
            kernels, since the reference would build the full B x B matrix.
        deterministic: None follows ``torch.are_deterministic_algorithms_enabled()``.
            Cross-rank sums always run in a fixed order except the caption gradient on
            NCCL, which uses NCCL's reduce-scatter unless ``deterministic`` is true.
        return_stats: also return a :class:`selhn_ext.SelHNStats` of this rank's anchors:
            (2, b_r) tensors whose hardest indices are global; ``gated_fraction`` is over
            this rank's anchors.

    Returns:
        ``mean``/``sum``: the global loss, the same value on every rank. ``none``: (2, b_r),
        the losses of this rank's image anchors (row 0) and caption anchors (row 1).
        ``img.grad``/``txt.grad`` receive exactly this rank's rows of the single-process
        gradient of the global batch (not divided by the world size). DistributedDataParallel
        averages parameter gradients over ranks, so a trainer using DDP multiplies this
        loss by the world size before backward to get the gradient of the global loss.

    Raises:
        DistributedInputError: on every rank, when any rank's inputs are invalid, when the
            ranks disagree on D, dtype or options, or when a rank's batch is empty.
        CollectiveError: when a collective fails or times out (a rank that never calls
            the loss or its backward leaves the others waiting for the group's timeout,
            ``init_process_group(timeout=...)``).

    Without an initialised process group, or with a group of one rank, this is
    :func:`selhn_ext.selhn_loss`. Each call syncs the host once, to read the header.
    """
    options = dict(margin=margin, eps=eps, mode=mode, reduction=reduction, ids=ids)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return single_process_selhn_loss(
            img, txt, **options, backend=backend, deterministic=deterministic,
            return_stats=return_stats,
        )  # fmt: skip

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("selhn_loss: this process is not a member of the given group")
    uses_nccl = dist.get_backend(group) == "nccl"
    error: Exception | None = None
    values: dict[str, int] = {}
    name = ""
    try:
        _check_embeddings(img, txt, min_batch=0)
        _check_ids(ids, img)
        check_options(margin, eps, mode, reduction, backend)
        if uses_nccl and img.device.type != "cuda":
            raise ValueError(
                f"the group's backend is NCCL, which needs CUDA tensors, got {img.device}"
            )
        img, txt = autocast_inputs(img, txt)
        name = dispatch.choose_backend(backend, img.device.type, img.dtype)
        name = "chunked" if name == "reference" else name
        values = dict(
            batch=img.shape[0],
            dim=img.shape[1],
            dtype=_DTYPES.index(img.dtype),
            device=_device_code(img.device),
            ids=int(ids is not None),
            mode=MODES.index(mode),
            reduction=REDUCTIONS.index(reduction),
            margin=_float_bits(margin),
            eps=_float_bits(eps),
        )
    except (TypeError, ValueError, dispatch.BackendUnavailableError) as exc:
        error = exc

    device = _control_device(img, uses_nccl)
    header = _encode_header(values, error, device)
    rows = torch.empty(world * _HEADER_LENGTH, dtype=torch.int64, device=device)
    try:
        _all_gather_single(rows, header, group=group)
    except RuntimeError as exc:
        raise CollectiveError(_timeout_hint("the input header all-gather", rank, exc)) from exc
    rows = rows.view(world, _HEADER_LENGTH).cpu()
    message = _header_error(rows)
    if message is not None:
        raise DistributedInputError("selhn_loss: " + message) from error

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    ranks = _Ranks(
        group=group,
        rank=rank,
        sizes=tuple(rows[:, _FIELDS.index("batch")].tolist()),
        device=img.device,
        reduce_scatter=uses_nccl and not deterministic,
    )
    kernel_options = _Options(
        margin=float(margin),
        eps=float(eps),
        mode=mode,
        backend=name,
        deterministic=bool(deterministic),
        allow_tf32=allow_tf32_for(img),
    )
    per_anchor, gated, near_tie, hardest_index, gap = _GlobalBatchSelHN.apply(
        img, txt, ids, ranks, kernel_options
    )
    if reduction == "none":
        loss = per_anchor
    else:
        loss = _SumOverRanks.apply(per_anchor.sum(), ranks)
        if reduction == "mean":
            loss = loss / (2 * ranks.total)
    if not return_stats:
        return loss
    return loss, SelHNStats.from_decisions(gated, near_tie, hardest_index, gap)
