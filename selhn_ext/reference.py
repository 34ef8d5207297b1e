"""The SelHN loss in plain PyTorch: the executable spec.

``selhn_loss_reference`` builds the full B x B matrices and lets autograd differentiate
them; it checks every hand-written backward. Nothing else lives here: the memory-bounded
PyTorch backend is ``chunked.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .kernel_interface import compute_dtype


class Decisions(NamedTuple):
    """Discrete decisions to impose on the reference (test-only): gates and hardest indices.

    Each is a (2, B) tensor: row 0 for image anchors, row 1 for caption anchors.
    """

    gated: Tensor
    hardest_index: Tensor


def selhn_loss_reference(
    img: Tensor,
    txt: Tensor,
    *,
    margin: float = 0.2,
    eps: float = 0.01,
    mode: str = "selhn",
    reduction: str = "mean",
    ids: Tensor | None = None,
    decisions: Decisions | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The spec: returns (loss, stats dict). Inputs are assumed checked by the caller.

    ``decisions`` replaces the computed gates and hardest indices (the two-step test
    method of the design notes, section 4); everything else is computed as usual.
    """
    cdt = compute_dtype(img.dtype)
    x, y = img.to(cdt), txt.to(cdt)
    batch = x.shape[0]
    s = x @ y.T
    d = s.diagonal()
    invalid = torch.eye(batch, dtype=torch.bool, device=s.device)
    if ids is not None:
        invalid = invalid | (ids[:, None] == ids[None, :])
    valid = ~invalid
    n = valid.sum(dim=1)  # the relation is symmetric: row and column counts agree
    has_negative = n > 0
    zero = torch.zeros((), dtype=cdt, device=s.device)
    nan = torch.full((), float("nan"), dtype=cdt, device=s.device)
    eps_t = torch.tensor(eps, dtype=cdt, device=s.device)

    losses, gates, near_ties, hardest, gaps = [], [], [], [], []
    # Row direction (image anchors) uses S as is; column direction uses S.T.
    for scores in (s, s.T):
        hinge = torch.where(valid, torch.relu(margin + scores - d[:, None]), zero)
        masked = scores.detach().masked_fill(invalid, float("-inf"))
        best, index = masked.max(dim=1)
        index = torch.where(has_negative, index, -1)
        gap = torch.where(has_negative, d.detach() - best, nan)
        near_tie = gap.abs() < eps_t
        if mode == "selhn":
            gated = near_tie & has_negative
        elif mode == "hardest":
            gated = torch.zeros_like(near_tie)
        else:
            gated = has_negative.clone()
        if decisions is not None:
            row = len(losses)
            gated = decisions.gated[row].to(torch.bool) & has_negative
            index = decisions.hardest_index[row]
        hard_hinge = torch.relu(margin + scores.gather(1, index.clamp(min=0)[:, None])[:, 0] - d)
        hard_hinge = torch.where(index >= 0, hard_hinge, zero)
        total = hinge.sum(dim=1)
        dense = total if mode == "sum_hinges" else total / n.clamp(min=1)
        loss = torch.where(gated, dense, torch.where(has_negative, hard_hinge, zero)) + 0 * d
        losses.append(loss)
        gates.append(gated)
        near_ties.append(near_tie)
        hardest.append(index)
        gaps.append(gap)

    per_anchor = torch.stack(losses)
    if reduction == "mean":
        out = per_anchor.sum() / (2 * batch)
    elif reduction == "sum":
        out = per_anchor.sum()
    else:
        out = per_anchor
    gated_all = torch.stack(gates)
    stats = {
        "gated": gated_all,
        "near_tie": torch.stack(near_ties),
        "gated_fraction": gated_all.float().mean(dim=1),
        "hardest_index": torch.stack(hardest),
        "gap": torch.stack(gaps),
    }
    return out, stats
