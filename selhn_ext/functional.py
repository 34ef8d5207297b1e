"""``selhn_loss``: checks at the boundary, backend choice, then the op or the reference."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch
from .kernel_interface import MODES, REDUCTIONS
from .reference import selhn_loss_reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


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


def _check_embeddings(img: Tensor, txt: Tensor, min_batch: int = 2) -> None:
    for name, t in (("img", img), ("txt", txt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
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


def _check_ids(ids: Tensor | None, img: Tensor) -> None:
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


def check_options(margin: float, eps: float, mode: str, reduction: str, backend: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {dispatch.BACKENDS}")
    for name, value in (("margin", margin), ("eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


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
    if img.dtype in _AUTOCAST_CASTS and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        img, txt = img.to(dtype), txt.to(dtype)
    return img, txt


def reduce_losses(per_anchor: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_anchor.sum() / per_anchor.numel()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


def selhn_loss(
    img: Tensor,
    txt: Tensor,
    *,
    margin: float = 0.2,
    eps: float = 0.01,
    mode: str = "selhn",
    reduction: str = "mean",
    ids: Tensor | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, SelHNStats]:
    """The SelHN triplet loss of paired embeddings (row i of ``img`` matches row i of ``txt``).

    Args:
        img, txt: (B, D) embeddings, B >= 2, float16/bfloat16/float32/float64.
        margin: the triplet margin (>= 0).
        eps: the SelHN threshold: an anchor whose positive is within ``eps`` of its
            hardest negative takes the mean over all negatives instead (>= 0).
        mode: ``"selhn"``, ``"hardest"`` (VSE++), ``"all"`` (mean of hinges) or
            ``"sum_hinges"`` (VSE0).
        reduction: ``"mean"`` (over the 2B anchors), ``"sum"`` or ``"none"`` (a (2, B)
            tensor: row 0 image anchors, row 1 caption anchors).
        ids: optional (B,) int32/int64 identities; pairs sharing an id are not negatives.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"cpu"``, ``"triton"`` or
            ``"cuda"``.
        deterministic: bitwise reproducible results; None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        return_stats: also return a :class:`SelHNStats`.

    Returns:
        The loss in the compute dtype (fp32, or fp64 for fp64 inputs), and the statistics
        when ``return_stats`` is true.
    """
    _check_embeddings(img, txt)
    _check_ids(ids, img)
    check_options(margin, eps, mode, reduction, backend)
    img, txt = autocast_inputs(img, txt)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    name = dispatch.choose_backend(backend, img.device.type, img.dtype)

    if name == "reference":
        with torch.autocast(img.device.type, enabled=False):
            loss, stats = selhn_loss_reference(
                img, txt, margin=margin, eps=eps, mode=mode, reduction=reduction, ids=ids
            )
        return (loss, SelHNStats(**stats)) if return_stats else loss

    per_anchor, gated, near_tie, hardest_index, gap, *_ = torch.ops.selhn_ext.loss_forward(
        img, txt, ids, float(margin), float(eps), mode, name, bool(deterministic),
        allow_tf32_for(img),
    )  # fmt: skip
    loss = reduce_losses(per_anchor, reduction)
    if not return_stats:
        return loss
    return loss, SelHNStats.from_decisions(gated, near_tie, hardest_index, gap)


def backend_status(img: Tensor, txt: Tensor, **options) -> dict[str, str | None]:
    """For every backend: None if it can run these inputs with these options, else why."""
    _check_embeddings(img, txt)
    unknown = set(options) - {
        "margin", "eps", "mode", "reduction", "ids", "backend", "deterministic", "return_stats"
    }  # fmt: skip
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    _check_ids(options.get("ids"), img)
    check_options(
        options.get("margin", 0.2),
        options.get("eps", 0.01),
        options.get("mode", "selhn"),
        options.get("reduction", "mean"),
        options.get("backend", "auto"),
    )
    img, _ = autocast_inputs(img, txt)
    return dispatch.status(img.device.type, img.dtype)
