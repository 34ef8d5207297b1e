"""Backend ``triton``: fused Triton kernels behind the kernel interface.

    tile.py               @triton.jit building blocks shared by every kernel (S tile,
                          validity, packed max keys, hinge)
    forward_kernels.py    the forward kernel (row and column statistics in one pass)
    backward_kernels.py   compaction, W panels and gradient products of the gated anchors
    config.py             block configurations, grid splits, test switches
    forward.py            the forward launcher (``partials``)
    backward.py           the backward launchers (``dense_backward``, ``compact``)

``TritonBackend(variant)`` implements ``partials`` and ``dense_backward`` of
``kernel_interface.py``; the variant names the dense backward (``backward.VARIANTS``, one
so far: ``panels``), chosen by dispatch.py from ``SELHN_TRITON_BACKWARD``. ``testing``
holds the test-only switches (reversed work order, recomputed-tile counter, panel size).
"""

from __future__ import annotations

from torch import Tensor

from ..kernel_interface import Block, GatedAnchors, PyTorchGlue
from .backward import VARIANTS, compact, dense_backward
from .config import CONFIGS, BlockConfig, testing
from .forward import partials


class TritonBackend(PyTorchGlue):
    """The kernel interface of kernel_interface.py as fused Triton passes."""

    def __init__(self, variant: str | None = None) -> None:
        variant = VARIANTS[0] if variant is None else variant
        if variant not in VARIANTS:
            raise ValueError(f"the Triton backward variant is one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    partials = staticmethod(partials)

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


__all__ = ["CONFIGS", "VARIANTS", "BlockConfig", "TritonBackend", "compact", "testing"]
