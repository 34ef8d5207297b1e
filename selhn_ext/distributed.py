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
5. in backward, gathers the captions again, runs ``dense_backward`` and the sparse and
   diagonal terms for its rows against all columns, and returns each column gradient to
   its owner with a padded reduce-scatter (NCCL) or an all-to-all summed in rank order
   (gloo, or deterministic).

Steps 2 to 5 are the single-process pipeline (pipeline.py) run through the same custom
ops (ops.py), with this module's ``_Ranks`` as the exchange: the loss is as opaque to
``torch.compile`` as the single-process one (the header exchange of step 1 reads the
header on the host, once per call). No rank holds a B x B or b_r x B matrix; the extra
memory per rank is O(N*D).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import dispatch, options, pipeline
from .functional import selhn_loss as single_process_selhn_loss
from .kernel_interface import DirectionStats, merge_stats
from .options import BACKENDS, MODES, REDUCTIONS, SelHNStats

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
_FIELDS = (
    "batch", "dim", "dtype", "device", "ids", "mode", "reduction", "margin", "eps", "backend"
)  # fmt: skip
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
    if field == "backend":
        return repr(BACKENDS[value])
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
    "backend": "the backend (the kernels built or installed on each rank differ)",
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

    def merge_columns(self, partial: DirectionStats) -> DirectionStats:
        """Merge every rank's partial caption statistics in rank order (same bits everywhere)."""
        what = "the caption statistics all-gather"
        floats = self.gather_stack(what, torch.stack([partial.max, partial.hinge_sum]))
        ints = self.gather_stack(what, torch.stack([partial.arg, partial.active.to(torch.int64)]))

        def of_rank(r: int) -> DirectionStats:
            return DirectionStats(
                floats[r, 0], ints[r, 0], floats[r, 1], ints[r, 1].to(torch.int32)
            )

        merged = of_rank(0)
        for r in range(1, self.world):
            merged = merge_stats(merged, of_rank(r))
        return merged

    def sum_scalars(self, what: str, local: Tensor) -> Tensor:
        return self.gather_stack(what, local.reshape(1)).sum()

    def register(self) -> str:
        """Register this exchange for the custom ops, under a key naming everything it
        holds (one entry per group and layout, reused by later calls)."""
        key = f"group{id(self.group)}:rank{self.rank}:{self.sizes}:{self.device}"
        key += ":reduce-scatter" if self.reduce_scatter else ":all-to-all"
        pipeline.register_exchange(key, self)
        return key


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
    loss_options = dict(margin=margin, eps=eps, mode=mode, reduction=reduction, ids=ids)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return single_process_selhn_loss(
            img, txt, **loss_options, backend=backend, deterministic=deterministic,
            return_stats=return_stats,
        )  # fmt: skip

    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("selhn_loss: this process is not a member of the given group")
    uses_nccl = dist.get_backend(group) == "nccl"
    error: Exception | None = None
    values: dict[str, int] = {}
    name = ""
    try:
        options.check_embeddings(img, txt, min_batch=0)
        options.check_ids(ids, img)
        options.check_options(margin, eps, mode, reduction, backend, deterministic, return_stats)
        img, txt = options.autocast_inputs(img, txt)
        name = _local_backend(img, uses_nccl, backend)
        values = _header_values(img, name, **loss_options)
    except (TypeError, ValueError, dispatch.BackendUnavailableError) as exc:
        error = exc
    rows = _gather_headers(_encode_header(values, error, _control_device(img, uses_nccl)), group)
    sizes = tuple(rows[:, _FIELDS.index("batch")].tolist())
    message = _header_error(rows) or _size_error(name, img, sizes)
    if message is not None:
        raise DistributedInputError("selhn_loss: " + message) from error

    deterministic = options.resolve_deterministic(deterministic)
    exchange = _Ranks(group, rank, sizes, img.device, uses_nccl and not deterministic).register()
    per_anchor, gated, near_tie, hardest_index, gap, *_ = torch.ops.selhn_ext.loss_forward(
        img, txt, None if ids is None else ids.to(torch.int64), float(margin), float(eps),
        mode, name, deterministic, options.allow_tf32_for(img), exchange,
    )  # fmt: skip
    loss = options.reduce_losses(
        per_anchor,
        reduction,
        total=lambda t: torch.ops.selhn_ext.sum_over_ranks(t.sum(), exchange),
        anchors=2 * sum(sizes),
    )
    if not return_stats:
        return loss
    return loss, SelHNStats.from_decisions(gated, near_tie, hardest_index, gap)


def _local_backend(img: Tensor, uses_nccl: bool, backend: str) -> str:
    """This rank's backend for its inputs (the global size is checked after the header)."""
    if uses_nccl and img.device.type != "cuda":
        raise ValueError(f"the group's backend is NCCL, which needs CUDA tensors, got {img.device}")
    name = dispatch.choose_backend(backend, img.device.type, img.dtype)
    # The reference would build the full B x B matrix: its chunked form runs instead.
    return "chunked" if name == "reference" else name


def _header_values(img: Tensor, name: str, margin, eps, mode, reduction, ids) -> dict[str, int]:
    return dict(
        batch=img.shape[0],
        dim=img.shape[1],
        dtype=_DTYPES.index(img.dtype),
        device=_device_code(img.device),
        ids=int(ids is not None),
        mode=MODES.index(mode),
        reduction=REDUCTIONS.index(reduction),
        margin=_float_bits(margin),
        eps=_float_bits(eps),
        backend=BACKENDS.index(name),
    )


def _gather_headers(header: Tensor, group) -> Tensor:
    """(world, header length) on the host: every rank's header, in rank order."""
    world = dist.get_world_size(group)
    rows = header.new_empty(world * _HEADER_LENGTH)
    try:
        _all_gather_single(rows, header, group=group)
    except RuntimeError as exc:
        rank = dist.get_rank(group)
        raise CollectiveError(_timeout_hint("the input header all-gather", rank, exc)) from exc
    return rows.view(world, _HEADER_LENGTH).cpu()


def _size_error(name: str, img: Tensor, sizes: tuple[int, ...]) -> str | None:
    """Why the backend every rank chose cannot take the global batch (the same on every
    rank, since every rank sees the same header), or None."""
    reasons = dispatch.unsupported_reasons(name, img.device.type, img.dtype, sum(sizes), max(sizes))
    if not reasons:
        return None
    return f"backend {name!r} cannot run the global batch: " + "; ".join(reasons)
