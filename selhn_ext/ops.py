"""The loss as torch.library custom ops, for every backend and for one or several processes.

``loss_forward`` and ``loss_backward`` run the pipeline (pipeline.py) on the backend named
by their ``backend`` argument, over the exchange named by ``exchange`` ("" for one
process; the distributed loss registers its process group's). Fake kernels and the
autograd formula live here once, so ``torch.compile(fullgraph=True)`` sees opaque ops
whatever backend runs, in one process or several. ``sum_over_ranks`` is the distributed
loss's sum of every process's local sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, pipeline
from .kernel_interface import compute_dtype

FORWARD_OUTPUTS = pipeline.OUTPUT_NAMES
ForwardOutputs = tuple[(Tensor,) * len(FORWARD_OUTPUTS)]


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
    exchange: str = "",
) -> ForwardOutputs:
    out = pipeline.forward(
        dispatch.backend(backend), img, txt, ids,
        pipeline.Settings(margin, eps, mode, deterministic, allow_tf32),
        pipeline.exchange_for(exchange, img.shape[0]),
    )  # fmt: skip
    return (*out[:-1], *out.saved)


@loss_forward.register_fake
def _(img, txt, ids, margin, eps, mode, backend, deterministic, allow_tf32, exchange=""):
    local = img.shape[0]
    total = pipeline.exchange_for(exchange, local).total
    cdt = compute_dtype(img.dtype)
    kinds = {
        "loss": cdt, "gated": torch.bool, "near_tie": torch.bool, "hardest_index": torch.int64,
        "gap": cdt, "row_dense_weight": cdt, "row_hard_weight": cdt, "row_active": torch.int32,
        "col_gated": torch.bool, "col_hardest_index": torch.int64, "col_dense_weight": cdt,
        "col_hard_weight": cdt, "col_active": torch.int32, "positive": cdt,
    }  # fmt: skip

    def shape(name: str) -> tuple[int, ...]:
        if name.startswith("row_"):
            return (local,)
        if name.startswith("col_") or name == "positive":
            return (total,)
        return (2, local)

    return tuple(img.new_empty(shape(name), dtype=kinds[name]) for name in FORWARD_OUTPUTS)


@torch.library.custom_op("selhn_ext::loss_backward", mutates_args=())
def loss_backward(
    grad_loss: Tensor,
    img: Tensor,
    txt: Tensor,
    ids: Tensor | None,
    gated: Tensor,
    hardest_index: Tensor,
    row_dense_weight: Tensor,
    row_hard_weight: Tensor,
    row_active: Tensor,
    col_gated: Tensor,
    col_hardest_index: Tensor,
    col_dense_weight: Tensor,
    col_hard_weight: Tensor,
    col_active: Tensor,
    positive: Tensor,
    margin: float,
    mode: str,
    backend: str,
    deterministic: bool,
    allow_tf32: bool,
    exchange: str = "",
) -> tuple[Tensor, Tensor]:
    saved = pipeline.Saved(
        row_dense_weight, row_hard_weight, row_active, col_gated, col_hardest_index,
        col_dense_weight, col_hard_weight, col_active, positive,
    )  # fmt: skip
    return pipeline.backward(
        dispatch.backend(backend), grad_loss, img, txt, ids, gated, hardest_index, saved,
        pipeline.Settings(margin, 0.0, mode, deterministic, allow_tf32),
        pipeline.exchange_for(exchange, img.shape[0]),
    )  # fmt: skip


@loss_backward.register_fake
def _(grad_loss, img, txt, ids, *saved_and_options):
    return torch.empty_like(img), torch.empty_like(txt)


def _setup_context(ctx, inputs, output):
    img, txt, ids, margin, eps, mode, backend, deterministic, allow_tf32, *rest = inputs
    _, gated, _, hardest_index, _, *saved = output
    ctx.save_for_backward(img, txt, ids, gated, hardest_index, *saved)
    ctx.options = (margin, mode, backend, deterministic, allow_tf32, *rest)


def _backward(ctx, grad_loss, *unused_grads):
    grad_img, grad_txt = loss_backward(grad_loss.contiguous(), *ctx.saved_tensors, *ctx.options)
    return grad_img, grad_txt, None, None, None, None, None, None, None, None


loss_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("selhn_ext::sum_over_ranks", mutates_args=())
def sum_over_ranks(local: Tensor, exchange: str) -> Tensor:
    """The sum of every process's 0-d ``local`` (the same bits in every process).

    Backward passes each process's upstream gradient to its own local value: with the
    same upstream in every process, each process's anchors receive exactly their share of
    the single-process gradient.
    """
    return pipeline.exchange_for(exchange, 1).sum_scalars("the loss all-gather", local)


@sum_over_ranks.register_fake
def _(local, exchange):
    return local.new_empty(())


sum_over_ranks.register_autograd(
    lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None
)
