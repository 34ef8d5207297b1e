"""selhn_ext: the Selectively Hard Negative (SelHN) triplet loss, fused.

>>> import torch, selhn_ext
>>> img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
>>> txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
>>> loss = selhn_ext.selhn_loss(img, txt)
"""

from . import ops as _ops  # noqa: F401  (registers the custom ops)
from .dispatch import BACKENDS, BackendUnavailableError
from .functional import SelHNStats, backend_status, selhn_loss
from .loss import SelHNLoss

__version__ = "0.1.0"


def build_extension(verbose: bool = False):
    """JIT-build the C++ CPU kernels when ``pip install`` could not (needs a compiler).

    The backends that need them become available in the next Python process.
    """
    from ._cpp import build_extension as _build

    return _build(verbose=verbose)


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SelHNLoss",
    "SelHNStats",
    "backend_status",
    "build_extension",
    "selhn_loss",
]
