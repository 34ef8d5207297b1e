"""Backend ``triton``: fused Triton kernels behind the kernel interface.

    tile.py               @triton.jit building blocks shared by every kernel (S tile,
                          validity, packed max keys, hinge)
    forward_kernels.py    the forward kernel (row and column statistics in one pass)
    backward_kernels.py   compaction, W panels and gradient products of the gated anchors
    config.py             block configurations, grid splits, test switches
    forward.py            the forward launcher (``partials``)
    backward.py           the backward launchers (``dense_backward``, ``compact``)

``KERNELS`` implements ``partials`` and ``dense_backward`` of ``kernel_interface.py``;
``testing`` holds the test-only switches (reversed work order, recomputed-tile counter,
backward variant and panel size). The dense backward has one variant, ``panels`` (see
backward.py; ``SELHN_TRITON_BACKWARD`` in config.py names it).
"""

from __future__ import annotations

from .backward import compact, dense_backward
from .config import CONFIGS, BlockConfig, testing
from .forward import partials


class TritonKernels:
    """The kernel interface of kernel_interface.py as fused Triton passes."""

    partials = staticmethod(partials)
    dense_backward = staticmethod(dense_backward)


KERNELS = TritonKernels()

__all__ = ["CONFIGS", "KERNELS", "BlockConfig", "TritonKernels", "compact", "testing"]
