"""Every user-facing decision about inputs and options, made once for every entry point.

``selhn_loss``, ``SelHNLoss``, ``backend_status`` and the distributed loss all check their
arguments here, take the autocast dtype, decide TF32 and the deterministic default here,
and reduce the per-anchor losses here. Backends may guard their own limits, but none
restates these checks.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

MODES = ("selhn", "hardest", "all", "sum_hinges")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "chunked", "cpu", "triton", "cuda")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Under torch.autocast the loss takes the autocast dtype, like a matrix product; fp64
# inputs stay fp64, as autocast leaves fp64 matrix products alone.
AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


class SelHNStats(NamedTuple):
    """Per-anchor statistics, device tensors, row 0 image anchors, row 1 caption anchors."""

    gated: Tensor  # (2, B) bool: the gate this mode applied
    near_tie: Tensor  # (2, B) bool: |gap| < eps, whatever the mode
    gated_fraction: Tensor  # (2,) float32
    hardest_index: Tensor  # (2, B) int64: hardest negative's index, -1 if none
    gap: Tensor  # (2, B) compute dtype: positive minus hardest negative, NaN if none

    @classmethod
    def from_decisions(
        cls, gated: Tensor, near_tie: Tensor, hardest_index: Tensor, gap: Tensor
    ) -> SelHNStats:
        """Statistics from the per-anchor decisions (O(B), no host sync)."""
        return cls(gated, near_tie, gated.float().mean(dim=1), hardest_index, gap)


# ---------------------------------------------------------------------------------------
# Inputs


def check_embeddings(img: Tensor, txt: Tensor, min_batch: int = 2) -> None:
    """(B, D) floating tensors of one shape, dtype and device, B >= min_batch, D >= 1."""
    for name, t in (("img", img), ("txt", txt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if img.shape != txt.shape:
        raise ValueError(
            f"img and txt must have the same shape (B, D), got {tuple(img.shape)} "
            f"and {tuple(txt.shape)}"
        )
    if img.dtype != txt.dtype:
        raise TypeError(f"img and txt must share a dtype, got {img.dtype} and {txt.dtype}")
    if img.device != txt.device:
        raise ValueError(f"img and txt must be on one device, got {img.device} and {txt.device}")
    batch, dim = img.shape
    if batch < min_batch:
        raise ValueError(
            f"the batch needs at least {min_batch} pairs (B >= {min_batch}), got B = {batch}"
        )
    if dim == 0:
        raise ValueError("the embedding dimension D must be at least 1, got D = 0")


def check_ids(ids: Tensor | None, img: Tensor) -> None:
    """None, or (B,) int32/int64 on the embeddings' device."""
    if ids is None:
        return
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a torch.Tensor or None, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.shape != (img.shape[0],):
        raise ValueError(f"ids must have shape (B,) = ({img.shape[0]},), got {tuple(ids.shape)}")
    if ids.device != img.device:
        raise ValueError(f"ids must be on the inputs' device {img.device}, got {ids.device}")


# ---------------------------------------------------------------------------------------
# Options


def _is_number(value) -> bool:
    """Python and NumPy reals (np.float32(0.2) included); bool is not a number here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_flag(name: str, value, allow_none: bool) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    expected = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_options(
    margin: float,
    eps: float,
    mode: str,
    reduction: str,
    backend: str,
    deterministic: bool | None = None,
    return_stats: bool = False,
) -> None:
    """Every option of the loss, with a message that says what was expected."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for name, value in (("margin", margin), ("eps", eps)):
        if not _is_number(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    _check_flag("deterministic", deterministic, allow_none=True)
    _check_flag("return_stats", return_stats, allow_none=False)


def resolve_deterministic(deterministic: bool | None) -> bool:
    """None follows ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


def allow_tf32_for(img: Tensor) -> bool:
    """fp32 products are IEEE unless the user enabled TF32 for matrix products."""
    if img.dtype != torch.float32 or img.device.type != "cuda":
        return False
    return bool(
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    )


def autocast_inputs(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.autocast the loss takes the autocast dtype, like a matrix product."""
    device_type = img.device.type
    if img.dtype in AUTOCAST_CASTS and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        img, txt = img.to(dtype), txt.to(dtype)
    return img, txt


# ---------------------------------------------------------------------------------------
# Reduction


def reduce_losses(per_anchor: Tensor, reduction: str, total=None, anchors: int | None = None):
    """The loss from the (2, b) per-anchor losses.

    ``total`` sums them (default: ``Tensor.sum``; the distributed loss sums over every
    rank); ``anchors`` is the count ``mean`` divides by (default: ``per_anchor.numel()``).
    """
    if reduction == "none":
        return per_anchor
    loss = per_anchor.sum() if total is None else total(per_anchor)
    if reduction == "sum":
        return loss
    return loss / (per_anchor.numel() if anchors is None else anchors)
