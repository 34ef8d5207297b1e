"""``SelHNLoss``: the module form of :func:`selhn_ext.selhn_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import selhn_loss
from .options import SelHNStats, check_options


class SelHNLoss(nn.Module):
    """Selectively hard negative triplet loss for paired embeddings.

    ``SelHNLoss()`` is the paper's loss; ``SelHNLoss(mode="hardest", reduction="sum")`` is
    VSE++'s ``ContrastiveLoss(max_violation=True)``.
    """

    def __init__(
        self,
        margin: float = 0.2,
        eps: float = 0.01,
        mode: str = "selhn",
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool | None = None,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        check_options(margin, eps, mode, reduction, backend, deterministic, return_stats)
        self.margin = margin
        self.eps = eps
        self.mode = mode
        self.reduction = reduction
        self.backend = backend
        self.deterministic = deterministic
        self.return_stats = return_stats

    def forward(
        self, img: Tensor, txt: Tensor, ids: Tensor | None = None
    ) -> Tensor | tuple[Tensor, SelHNStats]:
        return selhn_loss(
            img,
            txt,
            margin=self.margin,
            eps=self.eps,
            mode=self.mode,
            reduction=self.reduction,
            ids=ids,
            backend=self.backend,
            deterministic=self.deterministic,
            return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, eps={self.eps}, mode={self.mode!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
