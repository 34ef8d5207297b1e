"""``selhn_loss``: checks at the boundary, backend choice, then the op or the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, options
from .options import SelHNStats
from .reference import selhn_loss_reference

_OPTION_NAMES = (
    "margin", "eps", "mode", "reduction", "ids", "backend", "deterministic", "return_stats"
)  # fmt: skip


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
        margin: the triplet margin (>= 0; a Python or NumPy number).
        eps: the SelHN threshold: an anchor whose positive is within ``eps`` of its
            hardest negative takes the mean over all negatives instead (>= 0).
        mode: ``"selhn"``, ``"hardest"`` (VSE++), ``"all"`` (mean of hinges) or
            ``"sum_hinges"`` (VSE0).
        reduction: ``"mean"`` (over the 2B anchors), ``"sum"`` or ``"none"`` (a (2, B)
            tensor: row 0 image anchors, row 1 caption anchors).
        ids: optional (B,) int32/int64 identities; pairs sharing an id are not negatives.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"cpu"``, ``"triton"`` or
            ``"cuda"``.
        deterministic: True or False for bitwise reproducible results or not; None
            follows ``torch.are_deterministic_algorithms_enabled()``.
        return_stats: also return a :class:`SelHNStats`.

    Returns:
        The loss in the compute dtype (fp32, or fp64 for fp64 inputs), and the statistics
        when ``return_stats`` is true.
    """
    options.check_embeddings(img, txt)
    options.check_ids(ids, img)
    options.check_options(margin, eps, mode, reduction, backend, deterministic, return_stats)
    img, txt = options.autocast_inputs(img, txt)
    name = dispatch.choose_backend(backend, img.device.type, img.dtype, img.shape[0])

    if name == "reference":
        with torch.autocast(img.device.type, enabled=False):
            loss, stats = selhn_loss_reference(
                img, txt, margin=margin, eps=eps, mode=mode, reduction=reduction, ids=ids
            )
        return (loss, SelHNStats(**stats)) if return_stats else loss

    per_anchor, gated, near_tie, hardest_index, gap, *_ = torch.ops.selhn_ext.loss_forward(
        img, txt, ids, float(margin), float(eps), mode, name,
        options.resolve_deterministic(deterministic), options.allow_tf32_for(img),
    )  # fmt: skip
    loss = options.reduce_losses(per_anchor, reduction)
    if not return_stats:
        return loss
    return loss, SelHNStats.from_decisions(gated, near_tie, hardest_index, gap)


def backend_status(img: Tensor, txt: Tensor, **loss_options) -> dispatch.BackendStatus:
    """For every backend: None if it can run these inputs with these options, else why.

    Only shapes, dtypes and devices are read, so a batch too large to allocate can be
    asked about through a tensor that does not hold it (``torch.empty(1, 1).expand(B, D)``).
    ``.variants`` names the variant each backend with variants would run.
    """
    options.check_embeddings(img, txt)
    unknown = set(loss_options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    options.check_ids(loss_options.get("ids"), img)
    options.check_options(
        loss_options.get("margin", 0.2),
        loss_options.get("eps", 0.01),
        loss_options.get("mode", "selhn"),
        loss_options.get("reduction", "mean"),
        loss_options.get("backend", "auto"),
        loss_options.get("deterministic"),
        loss_options.get("return_stats", False),
    )
    img, _ = options.autocast_inputs(img, txt)
    return dispatch.status(img.device.type, img.dtype, img.shape[0])
