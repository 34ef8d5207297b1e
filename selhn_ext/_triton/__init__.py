"""Backend ``triton``: fused Triton kernels behind the kernel interface.

    tile.py               @triton.jit building blocks shared by every kernel (S tile,
                          K step, packed max keys' format)
    forward_kernels.py    the forward kernel (row and column statistics in one pass)
    compaction_kernels.py the backward's compaction (gated anchors first, counts, scale)
    backward_kernels.py   W panels and gradient products of the gated anchors
    config.py             block configurations, grid splits, test switches
    forward.py            the forward launcher (``partials``)
    backward.py           the backward launchers (``dense_backward``, ``compact``)
    glue_kernels.py       the fused O(B) and O(B*D) steps around them (positive scores,
                          finalize of both directions, hardest-negative and diagonal
                          gradients written in the input dtype)
    glue.py               their launchers

``TritonBackend(variant)`` implements ``partials`` (``partials_for_finalize``: the maxima
left packed for the finalize kernel to decode) and ``dense_backward``
(``dense_backward_for_sparse``: the fp32 accumulators left unfilled where nothing was
written, for the gradients kernel to skip) of
``kernel_interface.py`` and replaces the PyTorch glue with glue.py's kernels; the variant
names the dense backward (``backward.VARIANTS``, one so far: ``panels``), chosen by
dispatch.py from ``SELHN_TRITON_BACKWARD``. ``testing`` holds the test-only switches
(reversed work order, recomputed-tile counter, panel size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_interface import (
    AnchorDecisions,
    AnchorSide,
    AnchorWeights,
    Block,
    GatedAnchors,
    GatedFactors,
    PackedStats,
    PairedResults,
    PyTorchGlue,
)
from . import glue
from .backward import (
    VARIANTS,
    DenseAccumulators,
    compact,
    dense_backward,
    dense_backward_for_sparse,
    written_or_zero,
)
from .config import CONFIGS, BlockConfig, testing
from .forward import partials


class TritonBackend(PyTorchGlue):
    """The kernel interface of kernel_interface.py as fused Triton passes."""

    plain_dense_grads = False  # dense_backward_for_sparse returns DenseAccumulators

    def __init__(self, variant: str | None = None) -> None:
        variant = VARIANTS[0] if variant is None else variant
        if variant not in VARIANTS:
            raise ValueError(f"the Triton backward variant is one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    partials = staticmethod(partials)

    def partials_for_finalize(
        self, block: Block, margin: float, *, deterministic: bool = False, allow_tf32: bool = False
    ) -> tuple[PackedStats, PackedStats]:
        """partials with the maxima left packed: finalize_forward decodes them."""
        return partials(
            block, margin, deterministic=deterministic, allow_tf32=allow_tf32, packed=True
        )

    def positive_scores(self, img: Tensor, txt: Tensor) -> Tensor:
        if not glue.fusable(img, txt):
            return super().positive_scores(img, txt)
        return glue.positive_scores(img, txt)

    def finalize_both(
        self, row: AnchorSide, col: AnchorSide, margin: float, eps: float, mode: str
    ) -> tuple[AnchorDecisions, AnchorDecisions]:
        if not glue.finalize_inputs_fusable(row, col):
            return super().finalize_both(*glue.unpacked(row, col), margin, eps, mode)
        _, row_dec, col_dec = glue.finalize_forward(row, col, margin, eps, mode, 0)
        return row_dec, col_dec

    def finalize_forward(
        self,
        row: AnchorSide,
        col: AnchorSide,
        margin: float,
        eps: float,
        mode: str,
        row_offset: int,
    ) -> tuple[PairedResults, AnchorDecisions, AnchorDecisions]:
        if not glue.finalize_inputs_fusable(row, col):
            return super().finalize_forward(*glue.unpacked(row, col), margin, eps, mode, row_offset)
        return glue.finalize_forward(row, col, margin, eps, mode, row_offset)

    def gate_free_dense_grads(self, block: Block) -> tuple[Tensor, Tensor] | None:
        """None: the fused gradients kernel adds no dense term (no fp32 B x D tensor)."""
        return None

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
        """Deterministic whatever ``deterministic`` says (see glue.py)."""
        if not glue.fusable(block.rows):
            if isinstance(dense_grads, DenseAccumulators):
                dense_grads = written_or_zero(dense_grads)
            return super().sparse_and_diagonal_backward(
                block, dense_grads, row, col, deterministic=deterministic, out_dtypes=out_dtypes
            )
        return glue.sparse_and_diagonal_backward(block, dense_grads, row, col, out_dtypes)

    def dense_backward(
        self,
        block: Block,
        margin: float,
        gated: GatedAnchors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> tuple[Tensor, Tensor]:
        return dense_backward(
            block, margin, gated, deterministic=deterministic, allow_tf32=allow_tf32,
            variant=self.variant,
        )  # fmt: skip

    def dense_backward_for_sparse(
        self,
        block: Block,
        margin: float,
        gated: GatedFactors,
        *,
        deterministic: bool = False,
        allow_tf32: bool = False,
    ) -> DenseAccumulators:
        """The accumulators as written (no zero fill; glue.py's gradients kernel reads a
        row only where written), the coefficients multiplied in the compaction."""
        return dense_backward_for_sparse(
            block, margin, gated, deterministic=deterministic, allow_tf32=allow_tf32,
            variant=self.variant,
        )  # fmt: skip


__all__ = ["CONFIGS", "VARIANTS", "BlockConfig", "TritonBackend", "compact", "testing"]
