"""selhn_ext: the Selectively Hard Negative (SelHN) triplet loss, fused.

>>> import torch, selhn_ext
>>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
>>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
>>> loss = selhn_ext.selhn_loss(img, txt)

From the kernels up (README.md, "Layout", names every file):

    kernels     csrc/*.cpp, *.cu (C++/CUDA); _triton/*_kernels.py, tile.py (Triton)
    launchers   _triton/forward.py, backward.py; the C++ op entry points in csrc/
    backends    kernel_interface.py (the contract), chunked.py, _cpp.py, _triton/
    registry    dispatch.py: which backend runs, and every reason one cannot
    op          pipeline.py (the forward and backward sequence), ops.py (custom ops)
    function    options.py (checks and decisions), functional.py, distributed.py
    module      loss.py
"""

from . import ops  # noqa: F401  (registers the custom ops)
from ._cpp import build_extension
from .dispatch import BackendUnavailableError
from .functional import backend_status, selhn_loss
from .loss import SelHNLoss
from .options import BACKENDS, SelHNStats

__version__ = "0.1.0"


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SelHNLoss",
    "SelHNStats",
    "backend_status",
    "build_extension",
    "selhn_loss",
]
