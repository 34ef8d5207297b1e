"""The loss as torch.library custom ops: one forward op, one backward op, for every backend.

The backend name is an argument of the op; ``dispatch.kernels(name)`` returns the object
implementing the kernel interface (``kernel_interface.py``). Fake kernels and the
autograd formula live here once, so ``torch.compile(fullgraph=True)`` sees two opaque ops
whatever backend runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .kernel_interface import (
    AnchorWeights,
    compute_dtype,
    count_negatives,
    finalize,
    positive_scores,
    sparse_and_diagonal_backward,
)

# Outputs of the forward op, in order. The first five are the user-facing per-anchor
# loss and statistics; the rest are O(B) values the backward needs.
FORWARD_OUTPUTS = (
    "loss",
    "gated",
    "near_tie",
    "hardest_index",
    "gap",
    "dense_weight",
    "hard_weight",
    "active",
    "positive",
)


@torch.library.custom_op("selhn_ext::loss_forward", mutates_args=())
def loss_forward(
    img: Tensor,
    txt: Tensor,
    ids: Tensor | None,
    margin: float,
    eps: float,
    mode: str,
    backend: str,
    deterministic: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = dispatch.kernels(backend)
    batch = img.shape[0]
    # The inputs already carry the autocast dtype; the compute dtype rules (§4) apply inside.
    with torch.autocast(img.device.type, enabled=False):
        d = positive_scores(img, txt)
        n = count_negatives(ids, batch, img.device)
        row_stats, col_stats = kernels.partials(
            img, txt, d, 0, ids, ids, margin, deterministic=deterministic, allow_tf32=allow_tf32
        )
    row = finalize(row_stats, d, n, margin, eps, mode)
    col = finalize(col_stats, d, n, margin, eps, mode)
    active = torch.stack([row_stats.active, col_stats.active])
    return (*(torch.stack([a, b]) for a, b in zip(row[:7], col[:7], strict=False)), active, d)


@loss_forward.register_fake
def _(img, txt, ids, margin, eps, mode, backend, deterministic, allow_tf32):
    batch = img.shape[0]
    cdt = compute_dtype(img.dtype)

    def new(dtype):
        return img.new_empty((2, batch), dtype=dtype)

    return (
        new(cdt),
        new(torch.bool),
        new(torch.bool),
        new(torch.int64),
        new(cdt),
        new(cdt),
        new(cdt),
        new(torch.int32),
        img.new_empty((batch,), dtype=cdt),
    )


@torch.library.custom_op("selhn_ext::loss_backward", mutates_args=())
def loss_backward(
    grad_loss: Tensor,
    img: Tensor,
    txt: Tensor,
    ids: Tensor | None,
    gated: Tensor,
    hardest_index: Tensor,
    dense_weight: Tensor,
    hard_weight: Tensor,
    active: Tensor,
    positive: Tensor,
    margin: float,
    backend: str,
    deterministic: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    with torch.autocast(img.device.type, enabled=False):
        return _loss_backward_impl(
            grad_loss, img, txt, ids, gated, hardest_index, dense_weight, hard_weight, active,
            positive, margin, backend, deterministic, allow_tf32,
        )  # fmt: skip


def _loss_backward_impl(
    grad_loss, img, txt, ids, gated, hardest_index, dense_weight, hard_weight, active,
    positive, margin, backend, deterministic, allow_tf32,
):  # fmt: skip
    kernels = dispatch.kernels(backend)
    cdt = compute_dtype(img.dtype)
    up = grad_loss.to(cdt)
    row_coef = up[0] * dense_weight[0]
    col_coef = up[1] * dense_weight[1]
    grad_img, grad_txt = kernels.dense_backward(
        img,
        txt,
        positive,
        0,
        ids,
        ids,
        margin,
        row_coef,
        col_coef,
        gated[0],
        gated[1],
        deterministic=deterministic,
        allow_tf32=allow_tf32,
    )

    def weights(k: int) -> AnchorWeights:
        return AnchorWeights(hardest_index[k], dense_weight[k], hard_weight[k], active[k])

    sparse_and_diagonal_backward(
        img.to(cdt),
        txt.to(cdt),
        0,
        grad_img,
        grad_txt,
        up[0],
        up[1],
        weights(0),
        weights(1),
        deterministic,
    )
    return grad_img.to(img.dtype), grad_txt.to(txt.dtype)


@loss_backward.register_fake
def _(grad_loss, img, txt, ids, gated, hardest_index, dense_weight, hard_weight, active,
      positive, margin, backend, deterministic, allow_tf32):  # fmt: skip
    return torch.empty_like(img), torch.empty_like(txt)


def _setup_context(ctx, inputs, output):
    img, txt, ids, margin, eps, mode, backend, deterministic, allow_tf32 = inputs
    _, gated, _, hardest_index, _, dense_weight, hard_weight, active, positive = output
    ctx.save_for_backward(
        img, txt, ids, gated, hardest_index, dense_weight, hard_weight, active, positive
    )
    ctx.options = (margin, backend, deterministic, allow_tf32)


def _backward(ctx, grad_loss, *unused_grads):
    saved = ctx.saved_tensors
    grad_img, grad_txt = loss_backward(grad_loss.contiguous(), *saved, *ctx.options)
    return grad_img, grad_txt, None, None, None, None, None, None, None


loss_forward.register_autograd(_backward, setup_context=_setup_context)
