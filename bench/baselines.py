"""The losses the fused backends are measured against.

* ``authors_selhn_loss``: the SelHN loss written the way the paper's authors wrote it in
  plain PyTorch: full B x B matrices, the diagonal masked, the hardest negative from
  ``.max`` of the detached masked scores, the gate by ``torch.where``, both directions,
  averaged over the 2B anchors. It computes in the input dtype, as their code does.
* ``PMLHardestLoss``: pytorch-metric-learning's ``TripletMarginLoss`` with a
  ``BatchHardMiner``, used cross-modally (anchors from one modality, ``ref_emb`` from the
  other) in both directions; this is ``selhn_loss(mode="hardest")``.
* ``keops_selhn_loss``: the SelHN loss as KeOps symbolic reductions (no B x B buffer).
* ``matmul_floor``: one ``torch.mm(img, txt.T)``, the physical floor of any of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def authors_selhn_loss(
    img: Tensor,
    txt: Tensor,
    margin: float = 0.2,
    eps: float = 0.01,
    stats: dict | None = None,
) -> Tensor:
    """The plain-PyTorch SelHN loss (mode ``selhn``, reduction ``mean``, no ids).

    ``stats``, when given, receives ``gated_fraction`` (a float over the 2B anchors).
    """
    batch = img.shape[0]
    scores = img @ txt.T
    positive = scores.diag()
    on_diagonal = torch.eye(batch, dtype=torch.bool, device=scores.device)

    # Image anchors compare against row i's positive, caption anchors against column j's.
    hinge_rows = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(on_diagonal, 0)
    hinge_cols = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(on_diagonal, 0)
    mean_rows = hinge_rows.sum(1) / (batch - 1)
    mean_cols = hinge_cols.sum(0) / (batch - 1)

    masked = scores.detach().masked_fill(on_diagonal, float("-inf"))
    hardest_rows, index_rows = masked.max(1)
    hardest_cols, index_cols = masked.max(0)
    hard_rows = (margin + scores.gather(1, index_rows[:, None])[:, 0] - positive).clamp(min=0)
    hard_cols = (margin + scores.gather(0, index_cols[None, :])[0] - positive).clamp(min=0)

    gate_rows = (positive.detach() - hardest_rows).abs() < eps
    gate_cols = (positive.detach() - hardest_cols).abs() < eps
    loss_rows = torch.where(gate_rows, mean_rows, hard_rows)
    loss_cols = torch.where(gate_cols, mean_cols, hard_cols)
    if stats is not None:
        gated = gate_rows.sum() + gate_cols.sum()
        stats["gated_fraction"] = gated.item() / (2 * batch)
    return (loss_rows.sum() + loss_cols.sum()) / (2 * batch)


class PMLHardestLoss:
    """VSE++'s max-of-hinges loss through pytorch-metric-learning, both directions.

    Labels are the pair indices, so each anchor has exactly one positive (its partner in
    the other modality) and every other item of that modality is a negative. The miner
    picks the hardest negative by dot product (the embeddings are not re-normalised), the
    triplet loss is relu(margin + s_an - s_ap), and ``MeanReducer`` averages over the B
    anchors; the two directions are averaged, giving the mean over 2B anchors.
    """

    def __init__(self, margin: float = 0.2) -> None:
        from pytorch_metric_learning import distances, losses, miners, reducers

        similarity = distances.DotProductSimilarity(normalize_embeddings=False)
        self.miner = miners.BatchHardMiner(distance=similarity)
        self.loss = losses.TripletMarginLoss(
            margin=margin, distance=similarity, reducer=reducers.MeanReducer()
        )

    def __call__(self, img: Tensor, txt: Tensor) -> Tensor:
        labels = torch.arange(img.shape[0], device=img.device)
        # A distinct tensor: pml treats ``ref_labels is labels`` as one modality and then
        # drops the diagonal, which here holds the positives.
        ref_labels = labels.clone()
        image_anchors = self.loss(
            img, labels, self.miner(img, labels, txt, ref_labels), txt, ref_labels
        )
        text_anchors = self.loss(
            txt, labels, self.miner(txt, labels, img, ref_labels), img, ref_labels
        )
        return (image_anchors + text_anchors) / 2


def _keops_direction(
    anchor: Tensor, other: Tensor, margin: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-anchor SelHN losses of one direction and the gate, with KeOps reductions."""
    from pykeops.torch import LazyTensor

    batch = anchor.shape[0]
    positive = (anchor * other).sum(1)
    index = torch.arange(batch, dtype=anchor.dtype, device=anchor.device)
    x_i = LazyTensor(anchor[:, None, :])
    y_j = LazyTensor(other[None, :, :])
    i_i = LazyTensor(index[:, None, None])
    j_j = LazyTensor(index[None, :, None])
    on_diagonal = (0.25 - (i_i - j_j) ** 2).step()  # 1 where i == j (indices are integers)
    scores = (x_i * y_j).sum(-1)

    with torch.no_grad():
        # A large finite penalty keeps the off-diagonal scores exact (0 * penalty = 0).
        hardest, hardest_index = (scores - 1e30 * on_diagonal).max_argmax(dim=1)
        hardest, hardest_index = hardest[:, 0], hardest_index[:, 0].long()
    d_i = LazyTensor(positive[:, None, None])
    hinge_sum = ((margin + scores - d_i).relu() * (1 - on_diagonal)).sum(dim=1)[:, 0]
    hard = (margin + (anchor * other[hardest_index]).sum(1) - positive).clamp(min=0)
    gated = (positive.detach() - hardest).abs() < eps
    return torch.where(gated, hinge_sum / (batch - 1), hard), gated


def keops_selhn_loss(
    img: Tensor,
    txt: Tensor,
    margin: float = 0.2,
    eps: float = 0.01,
    stats: dict | None = None,
) -> Tensor:
    """The SelHN loss (mode ``selhn``, mean) as KeOps map-reductions; bf16 runs in fp32."""
    if img.dtype == torch.bfloat16:  # KeOps has no bfloat16 kernels
        img, txt = img.float(), txt.float()
    batch = img.shape[0]
    loss_rows, gate_rows = _keops_direction(img, txt, margin, eps)
    loss_cols, gate_cols = _keops_direction(txt, img, margin, eps)
    if stats is not None:
        stats["gated_fraction"] = (gate_rows.sum() + gate_cols.sum()).item() / (2 * batch)
    return (loss_rows.sum() + loss_cols.sum()) / (2 * batch)


def keops_unavailable_reason(device: torch.device) -> str | None:
    """None if KeOps imports and compiles a tiny reduction on ``device``, else why not."""
    try:
        from pykeops.torch import LazyTensor
    except Exception as error:  # ImportError, or a broken install
        return f"pykeops is not usable: {type(error).__name__}: {error}"
    try:
        x = torch.ones(4, 3, device=device)
        LazyTensor(x[:, None, :]).sqnorm2().sum(dim=1)
    except Exception as error:  # KeOps compiles at run time and needs a working compiler
        return f"KeOps could not compile a reduction: {type(error).__name__}: {error}"
    return None


def matmul_floor(img: Tensor, txt: Tensor) -> Tensor:
    """One B x B similarity matrix: the least work any of these losses can do."""
    return torch.mm(img, txt.T)


def compiled_authors_loss() -> Callable[..., Tensor]:
    """``authors_selhn_loss`` under ``torch.compile`` (shapes specialised, no stats)."""
    return torch.compile(authors_selhn_loss, dynamic=False)
