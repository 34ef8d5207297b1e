"""Sampling for training: one permutation per epoch cut into global batches, each rank its
slice, resumable mid-epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per epoch one permutation of all pairs (the same on every rank), cut into global
    batches of ``batch_size * world_size``; rank r yields rows ``[r*b, (r+1)*b)`` of each.

    The permutation depends only on the seed and the epoch (:meth:`set_epoch`), so a run
    resumes with the same batches; ``skip`` batches of the epoch are left out (the ones a
    stopped run already took).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        global_batch = batch_size * world_size
        if num_items < global_batch and drop_last:
            processes = f" x {world_size} processes" if world_size > 1 else ""
            raise ValueError(
                f"the training split has {num_items} pairs, fewer than one batch of "
                f"{global_batch} (batch size {batch_size}{processes}); lower --batch-size, or "
                "pass --set drop_last=false to train on the one smaller batch"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def _global_batches(self) -> list[tuple[int, int]]:
        size = self.batch_size * self.world_size
        full = self.num_items // size
        bounds = [(b * size, (b + 1) * size) for b in range(full)]
        rest = self.num_items - full * size
        # A short last batch is kept only if every rank gets at least 2 pairs.
        if not self.drop_last and rest >= 2 * self.world_size:
            bounds.append((full * size, self.num_items))
        return bounds

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "sampler"))
        order = torch.randperm(self.num_items, generator=generator)
        for start, stop in self._global_batches()[self.skip :]:
            rows = order[start:stop]
            if stop - start == self.batch_size * self.world_size:
                local = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            else:
                local = torch.tensor_split(rows, self.world_size)[self.rank]
            yield local.tolist()


def epoch_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 63-bit seed for one purpose in one epoch (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
