"""Backend ``triton``: fused Triton kernels behind the kernel interface.

``KERNELS`` implements ``partials`` and ``dense_backward`` of ``kernel_interface.py``;
``testing`` holds the test-only switches (reversed block order, recomputed-tile counter,
backward path and panel size). The dense backward is the ``tiles`` path unless
``SELHN_TRITON_BACKWARD=panel`` is set before import (see launch.py).
"""

from .launch import CONFIGS, KERNELS, BlockConfig, TritonKernels, compact, testing

__all__ = ["CONFIGS", "KERNELS", "BlockConfig", "TritonKernels", "compact", "testing"]
