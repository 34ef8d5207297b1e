"""Gradient-cached chunked encoding: the loss sees the whole batch, the encoders a chunk.

Used when ``chunk_size`` > 0 and smaller than the batch. (1) every chunk is encoded without
autograd; (2) the loss runs on the concatenated, detached embeddings and its backward gives
the gradient of each embedding; (3) every chunk is encoded again with autograd and its slice
of the embedding gradient is back-propagated. The parameter gradients equal those of one
big backward through the same per-chunk forward passes.

* BatchNorm runs twice per chunk. Both passes use training mode, so the second pass
  computes exactly the embeddings whose gradients step (2) produced (an eval-mode first
  pass would give different embeddings, and the gradients would belong to another point).
  The running statistics are saved before pass (1) and put back after it, so each chunk
  updates them exactly once, in pass (3), as an unchunked step would per chunk. As with
  data parallelism, the batch statistics are those of a chunk, not of the whole batch.
* Random inputs: augmentation happens once, when the data loader builds the batch, and both
  passes reuse those tensors. Randomness inside the model (dropout, if a model has it) is
  replayed: the generator state before each chunk's first pass is restored for its second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The number of pairs in a collated batch."""
    return int(batch["image_index"].shape[0])


def slice_rows(value: Any, start: int, stop: int, rows: int) -> Any:
    """Rows ``[start, stop)`` of every per-pair tensor in a (nested) batch."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() >= 1 and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {key: slice_rows(item, start, stop, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return value[start:stop]
    return value


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    buffers = []
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                if buffer is not None:
                    buffers.append(buffer)
    return buffers


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


LossFn = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Any]]


def forward_backward(
    encoder: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    *,
    chunk_size: int = 0,
    ids: Tensor | None = None,
    loss_scale: float = 1.0,
    inner: nn.Module | None = None,
) -> tuple[Tensor, Any]:
    """Accumulate the parameter gradients of ``loss_scale * loss`` on ``batch``.

    ``encoder(regions, region_lengths, text) -> (img_emb, txt_emb)`` (the model, or its
    DDP wrapper, whose ``no_sync`` then defers the gradient all-reduce to the last chunk;
    ``inner`` is the unwrapped model, used for the pass without autograd).
    ``loss_fn(img_emb, txt_emb, ids) -> (loss, stats)``. With ``chunk_size`` 0 or at least
    the batch, one plain forward and backward; otherwise the three-step gradient cache of
    the module docstring. Returns the detached loss (unscaled) and the loss statistics.
    """
    rows = batch_rows(batch)
    args = (batch["regions"], batch["region_lengths"], batch["text"])
    if chunk_size <= 0 or chunk_size >= rows:
        img, txt = encoder(*args)
        loss, stats = loss_fn(img, txt, ids)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        return loss.detach(), stats

    inner = encoder if inner is None else inner
    device = batch["regions"].device
    bounds = [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]
    chunks = [slice_rows(batch, start, stop, rows) for start, stop in bounds]

    # (1) embeddings of every chunk, without autograd; BatchNorm statistics put back after.
    saved_bn = [buffer.clone() for buffer in _batchnorm_buffers(inner)]
    rng_states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            rng_states.append(_rng_state(device))
            img, txt = inner(chunk["regions"], chunk["region_lengths"], chunk["text"])
            img_parts.append(img)
            txt_parts.append(txt)
        for buffer, saved in zip(_batchnorm_buffers(inner), saved_bn, strict=True):
            buffer.copy_(saved)

    # (2) the loss over the whole batch on detached embeddings -> embedding gradients.
    img_all = torch.cat(img_parts).requires_grad_(True)
    txt_all = torch.cat(txt_parts).requires_grad_(True)
    loss, stats = loss_fn(img_all, txt_all, ids)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    img_grad, txt_grad = img_all.grad, txt_all.grad

    # (3) each chunk again, with autograd, back-propagating its slice of the gradients.
    no_sync = getattr(encoder, "no_sync", None)
    for index, (chunk, (start, stop)) in enumerate(zip(chunks, bounds, strict=True)):
        _set_rng_state(rng_states[index], device)
        last = index == len(chunks) - 1
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            img, txt = encoder(chunk["regions"], chunk["region_lengths"], chunk["text"])
            torch.autograd.backward((img, txt), (img_grad[start:stop], txt_grad[start:stop]))
    return loss.detach(), stats
