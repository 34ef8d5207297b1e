"""Image-text retrieval metrics (the VSE++ / VSE-infinity / SCAN protocol).

Similarities are dot products of the (L2-normalised) embeddings of every image with every
caption. Image -> text: an image's rank is the best rank of its captions. Text -> image:
a caption's rank is the rank of its image. Two rank rules (``rule``), equal when no two
candidates of a query score exactly the same:

* ``"argsort"``, the released evaluation's: the similarity matrix is one float64 product
  (``np.matmul``, as ``compute_sim``), and an item's rank is its position in
  ``np.argsort(scores)[::-1]``, numpy's own order for ties included. Use it to compare with
  published tables.
* ``"pessimistic"``: an item's rank is the number of wrong candidates that score at least
  as high as it does, so a collapsed model that gives every pair the same score ranks
  last, not first (the argsort rule may rank it anywhere). A robustness column.

Reported: R@1, R@5, R@10 in percent for both directions, ``rsum`` (their sum), and the
median and mean rank counted from 1 (``medr`` = floor(median) + 1, as in VSE++). The
pessimistic rule builds the similarity matrix ``block`` rows at a time, so 5K x 25K never
exists at once; the argsort rule holds it whole in float64, as the released code does
(1 GB for COCO's 5K test images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import RANK_RULES
from .data import BiGRUText, TextSide, WordPieceText, batch_to

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
RULE_NOTES = {
    "argsort": "position in numpy's descending argsort, as the released code (comparable "
    "with published tables)",
    "pessimistic": "ties count against the query (robustness)",
}


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _check_inputs(img_emb: Any, txt_emb: Any, img_index: Any) -> tuple[Tensor, Tensor, Tensor]:
    img_emb, txt_emb = _as_tensor(img_emb, "img_emb"), _as_tensor(txt_emb, "txt_emb")
    img_index = _as_tensor(img_index, "img_index")
    if img_emb.dim() != 2 or txt_emb.dim() != 2 or img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(
            "img_emb (N, E) and txt_emb (M, E) must be 2-D with the same E, got "
            f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    n_images, n_captions = img_emb.shape[0], txt_emb.shape[0]
    if n_images == 0 or n_captions == 0:
        raise ValueError(f"need images and captions, got {n_images} and {n_captions}")
    if img_index.shape != (n_captions,) or img_index.dtype.is_floating_point:
        raise ValueError(
            f"img_index must be an integer array of shape ({n_captions},) (one image row per "
            f"caption), got {img_index.dtype} of shape {tuple(img_index.shape)}"
        )
    img_index = img_index.to(device=img_emb.device, dtype=torch.int64)
    if int(img_index.min()) < 0 or int(img_index.max()) >= n_images:
        raise ValueError(f"img_index values must be image rows in [0, {n_images})")
    uncaptioned = torch.bincount(img_index, minlength=n_images) == 0
    if bool(uncaptioned.any()):
        first = int(uncaptioned.nonzero()[0])
        raise ValueError(
            f"{int(uncaptioned.sum())} images have no caption (the first is row {first}); "
            "an image without a caption cannot be an image-to-text query"
        )
    dtype = torch.float64 if torch.float64 in (img_emb.dtype, txt_emb.dtype) else torch.float32
    img_emb = img_emb.to(dtype)
    txt_emb = txt_emb.to(device=img_emb.device, dtype=dtype)
    if not (bool(torch.isfinite(img_emb).all()) and bool(torch.isfinite(txt_emb).all())):
        raise ValueError("the embeddings contain NaN or infinite values")
    return img_emb, txt_emb, img_index


def retrieval_ranks(
    img_emb: Any, txt_emb: Any, img_index: Any, block: int = 1024, rule: str = "pessimistic"
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks by ``rule``: (i2t ranks (N,), t2i ranks (M,)) as int64 arrays."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if rule not in RANK_RULES:
        raise ValueError(f"rank rule must be one of {RANK_RULES}, got {rule!r}")
    img_emb, txt_emb, img_index = _check_inputs(img_emb, txt_emb, img_index)
    if rule == "argsort":
        return argsort_ranks(img_emb, txt_emb, img_index)
    n_images, n_captions = img_emb.shape[0], txt_emb.shape[0]
    device = img_emb.device

    i2t = torch.empty(n_images, dtype=torch.int64, device=device)
    for start in range(0, n_images, block):
        stop = min(start + block, n_images)
        scores = img_emb[start:stop] @ txt_emb.T  # (b, M)
        rows = torch.arange(start, stop, device=device)
        is_own = img_index.unsqueeze(0) == rows.unsqueeze(1)
        best_own = scores.masked_fill(~is_own, float("-inf")).max(dim=1).values
        i2t[start:stop] = ((scores >= best_own.unsqueeze(1)) & ~is_own).sum(dim=1)

    t2i = torch.empty(n_captions, dtype=torch.int64, device=device)
    images = torch.arange(n_images, device=device)
    for start in range(0, n_captions, block):
        stop = min(start + block, n_captions)
        # The true pair's score is read from the same product it is compared within,
        # so exact ties stay exact.
        scores = txt_emb[start:stop] @ img_emb.T  # (c, N)
        own = img_index[start:stop]
        own_score = scores.gather(1, own.unsqueeze(1))
        is_own = images.unsqueeze(0) == own.unsqueeze(1)
        t2i[start:stop] = ((scores >= own_score) & ~is_own).sum(dim=1)
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def argsort_ranks(img_emb: Any, txt_emb: Any, img_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """The released ``i2t`` / ``t2i`` ranks: one float64 similarity matrix, positions in
    numpy's descending argsort. Inputs as for :func:`retrieval_ranks`."""
    img_emb, txt_emb, img_index = _check_inputs(img_emb, txt_emb, img_index)
    images = img_emb.detach().cpu().numpy().astype(np.float64)
    captions = txt_emb.detach().cpu().numpy().astype(np.float64)
    return argsort_ranks_from_scores(np.matmul(images, captions.T), img_index.cpu().numpy())


def _descending_positions(scores: np.ndarray) -> np.ndarray:
    """For each row, every column's position in ``np.argsort(row)[::-1]``.

    ``np.argsort`` along the last axis sorts each row with the same routine as the 1-D call
    the released code makes (a non-contiguous row is copied first), so ties come out in the
    same order.
    """
    order = np.argsort(scores, axis=1)
    positions = np.empty_like(order)
    np.put_along_axis(positions, order, np.arange(scores.shape[1])[None, :], axis=1)
    return scores.shape[1] - 1 - positions  # reversing the ascending order


def argsort_ranks_from_scores(
    scores: np.ndarray, img_index: Any, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of an (N images, M captions) score matrix by the released protocol.

    i2t: for image i, ``inds = np.argsort(scores[i])[::-1]``; its rank is the smallest
    position in ``inds`` of one of its captions. t2i: for caption c,
    ``inds = np.argsort(scores.T[c])[::-1]``; its rank is the position of its image.
    (The released code assumes caption c belongs to image c // 5; here ``img_index[c]``.)
    """
    scores = np.asarray(scores)
    img_index = np.asarray(img_index, dtype=np.int64)
    n_images, n_captions = scores.shape
    if img_index.shape != (n_captions,):
        raise ValueError(f"img_index must have shape ({n_captions},), got {img_index.shape}")
    i2t = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, block):
        stop = min(start + block, n_images)
        positions = _descending_positions(scores[start:stop])
        own = img_index[None, :] == np.arange(start, stop)[:, None]
        i2t[start:stop] = np.where(own, positions, n_captions).min(axis=1)
    t2i = np.empty(n_captions, dtype=np.int64)
    by_caption = scores.T  # a view, as the released ``sims = sims.T``
    for start in range(0, n_captions, block):
        stop = min(start + block, n_captions)
        positions = _descending_positions(by_caption[start:stop])
        t2i[start:stop] = positions[np.arange(stop - start), img_index[start:stop]]
    return i2t, t2i


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr, meanr per direction and rsum, as plain floats, each
    computed as the released ``i2t`` / ``t2i`` compute them (bit for bit)."""
    metrics: dict[str, float] = {}
    for direction, ranks in zip(DIRECTIONS, (i2t_ranks, t2i_ranks), strict=True):
        # float64, as the released ranks: np.mean of an int64 array sums in another order.
        ranks = np.asarray(ranks, dtype=np.float64)
        for k in RECALL_AT:
            metrics[f"{direction}_r{k}"] = 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks)
        metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{direction}_meanr"] = float(np.mean(ranks) + 1)
    metrics["rsum"] = float(sum(metrics[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_AT))
    return metrics


def retrieval_metrics(
    img_emb: Any, txt_emb: Any, img_index: Any, block: int = 1024, rule: str = "pessimistic"
) -> dict[str, float]:
    """Retrieval metrics of N images and M captions; caption j belongs to image img_index[j].

    Keys: ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr`` and the same for ``t2i``, ``rsum``;
    ranks by ``rule`` ("pessimistic" or "argsort").
    """
    return metrics_from_ranks(*retrieval_ranks(img_emb, txt_emb, img_index, block, rule))


def fold_bounds(n_images: int, folds: int) -> list[tuple[int, int]]:
    """Image row ranges of ``folds`` contiguous folds (1000 each for 5000 images)."""
    if folds < 1 or n_images < folds:
        raise ValueError(f"cannot split {n_images} images into {folds} folds")
    edges = [round(f * n_images / folds) for f in range(folds + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def fold5_metrics(
    img_emb: Any,
    txt_emb: Any,
    img_index: Any,
    folds: int = 5,
    block: int = 1024,
    rule: str = "pessimistic",
) -> dict[str, float]:
    """MS-COCO's 5-fold 1K protocol: the metrics of each fold of contiguous images (with
    their captions, against each other only), averaged over the folds."""
    img_emb, txt_emb, img_index = _check_inputs(img_emb, txt_emb, img_index)
    per_fold = []
    for start, stop in fold_bounds(img_emb.shape[0], folds):
        members = (img_index >= start) & (img_index < stop)
        per_fold.append(
            retrieval_metrics(
                img_emb[start:stop], txt_emb[members], img_index[members] - start, block, rule
            )
        )
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


def retrieval_report(
    img_emb: Any, txt_emb: Any, img_index: Any, *, fold5: bool = False, block: int = 1024
) -> dict[str, dict[str, float]]:
    """The metrics under both rank rules: ``{"argsort": {...}, "pessimistic": {...}}``
    (MS-COCO's 5-fold mean of each with ``fold5``)."""
    measure = fold5_metrics if fold5 else retrieval_metrics
    return {rule: measure(img_emb, txt_emb, img_index, block=block, rule=rule)
            for rule in ("argsort", "pessimistic")}  # fmt: skip


def format_report(report: dict[str, dict[str, float]], title: str) -> str:
    """A table of :func:`retrieval_report`: one row per rank rule and direction, then the
    rsum of each rule; a legend says what each rule is."""
    lines = [title, f"{'rank rule':<13}{'':<5}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}"
             f"{'meanr':>9}"]  # fmt: skip
    for rule, metrics in report.items():
        for direction in DIRECTIONS:
            cells = "".join(f"{metrics[f'{direction}_r{k}']:>8.2f}" for k in RECALL_AT)
            lines.append(
                f"{rule:<13}{direction:<5}{cells}{metrics[f'{direction}_medr']:>8.1f}"
                f"{metrics[f'{direction}_meanr']:>9.2f}"
            )
    lines.append("rsum  " + "  ".join(f"{rule} {m['rsum']:.2f}" for rule, m in report.items()))
    lines += [f"  {rule}: {RULE_NOTES[rule]}" for rule in report]
    return "\n".join(lines)


def first_captions(split: Any, count: int) -> Any:
    """The first ``count`` captions of a split with the images they belong to, re-indexed
    (the released trainer selects its best epoch on the first 5,000 dev captions, which are
    SCAN's first 1,000 dev images). ``count`` 0, or at least the split's size: the split.

    When those images are the split's first rows (SCAN's layout), the features stay a
    memory-mapped slice; otherwise the needed rows are read.
    """
    import copy
    import dataclasses

    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0 or count >= len(split.captions):
        return split
    img_index = np.asarray(split.img_index[:count], dtype=np.int64)
    rows = np.unique(img_index)
    if rows[-1] == len(rows) - 1:  # rows are 0..k-1
        images, new_index = split.images[: len(rows)], img_index
    else:
        images, new_index = split.images[rows], np.searchsorted(rows, img_index)
    names = getattr(split, "image_names", None)
    changes = {
        "images": images,
        "captions": list(split.captions[:count]),
        "img_index": new_index,
        "image_names": None if names is None else [names[int(r)] for r in rows],
    }
    if dataclasses.is_dataclass(split):
        return dataclasses.replace(split, **changes)
    subset = copy.copy(split)
    for name, value in changes.items():
        setattr(subset, name, value)
    return subset


def default_text_side(model: torch.nn.Module, captions: list[str]) -> TextSide:
    """Unaugmented text of ``captions`` for ``model``'s text encoder.

    The frozen MiniLM encoder computes token states here (slow: pass a cached
    :class:`rvsepp.data.CachedStatesText` to :func:`encode_split` instead).
    """
    from .data import make_text_side
    from .model import BiGRUTextEncoder

    encoder = model.text_encoder
    if isinstance(encoder, BiGRUTextEncoder):
        if getattr(model, "vocab", None) is None:
            raise ValueError("the model has no vocabulary: set model.vocab or pass text=")
        tokenizer = getattr(model, "word_tokenizer", "regex")
        return BiGRUText(model.vocab, captions, augmentation=None, tokenizer=tokenizer)
    if getattr(encoder, "finetune", False):
        from .model import load_minilm_tokenizer

        return WordPieceText(load_minilm_tokenizer(), captions, augmentation=None)
    device = next(model.parameters()).device
    return make_text_side("minilm", captions, augmentation=None, device=device)


def encode_split(
    model: torch.nn.Module,
    split: Any,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    text: TextSide | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Embed every image and every caption of a split in eval mode (no augmentation).

    Returns (img_emb (N, E), txt_emb (M, E), img_index (M,)) on ``device``, float32. The
    model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if text is None:
        text = default_text_side(model, list(split.captions))
    if len(text) != len(split.captions):
        raise ValueError(f"text has {len(text)} captions, the split {len(split.captions)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_images, n_regions = split.images.shape[:2]
            images = []
            for start in range(0, n_images, batch_size):
                chunk = np.array(split.images[start : start + batch_size], dtype=np.float32)
                regions = torch.from_numpy(chunk).to(device)
                lengths = torch.full((len(chunk),), n_regions, dtype=torch.int64)
                images.append(model.encode_images(regions, lengths).float())
            captions = []
            for start in range(0, len(text), batch_size):
                stop = min(start + batch_size, len(text))
                items = [text.item(i, None) for i in range(start, stop)]
                captions.append(model.encode_texts(batch_to(text.collate(items), device)).float())
    finally:
        model.train(was_training)
    img_index = torch.as_tensor(np.asarray(split.img_index, dtype=np.int64), device=device)
    return torch.cat(images), torch.cat(captions), img_index


def evaluate_split(
    model: torch.nn.Module,
    split: Any,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    *,
    fold5: bool = False,
    text: TextSide | None = None,
    block: int = 1024,
    rule: str = "pessimistic",
) -> dict[str, float]:
    """:func:`encode_split` then :func:`retrieval_metrics` (or :func:`fold5_metrics`)."""
    img_emb, txt_emb, img_index = encode_split(model, split, batch_size, device, text)
    if fold5:
        return fold5_metrics(img_emb, txt_emb, img_index, block=block, rule=rule)
    return retrieval_metrics(img_emb, txt_emb, img_index, block=block, rule=rule)
