"""Image-text retrieval metrics (the VSE++ / VSE-infinity / SCAN protocol).

Similarities are dot products of the (L2-normalised) embeddings of every image with every
caption. Image -> text: an image's rank is the best rank of its captions. Text -> image:
a caption's rank is the rank of its image. Ranks are pessimistic: an item's rank is the
number of wrong candidates that score at least as high as it does (0 is the top), so a
collapsed model that gives every pair the same score ranks last, not first.

Reported: R@1, R@5, R@10 in percent for both directions, ``rsum`` (their sum), and the
median and mean rank counted from 1 (``medr`` = floor(median) + 1, as in VSE++). The
similarity matrix is built ``block`` rows at a time, so 5K x 25K never exists at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import BiGRUText, TextSide, WordPieceText, batch_to

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


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
    img_emb: Any, txt_emb: Any, img_index: Any, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """0-based pessimistic ranks: (i2t ranks (N,), t2i ranks (M,)) as int64 arrays."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    img_emb, txt_emb, img_index = _check_inputs(img_emb, txt_emb, img_index)
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


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr, meanr per direction and rsum, as plain floats."""
    metrics: dict[str, float] = {}
    for direction, ranks in zip(DIRECTIONS, (i2t_ranks, t2i_ranks), strict=True):
        ranks = np.asarray(ranks)
        for k in RECALL_AT:
            metrics[f"{direction}_r{k}"] = float(100.0 * np.mean(ranks < k))
        metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{direction}_meanr"] = float(np.mean(ranks) + 1)
    metrics["rsum"] = float(sum(metrics[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_AT))
    return metrics


def retrieval_metrics(
    img_emb: Any, txt_emb: Any, img_index: Any, block: int = 1024
) -> dict[str, float]:
    """Retrieval metrics of N images and M captions; caption j belongs to image img_index[j].

    Keys: ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr`` and the same for ``t2i``, ``rsum``.
    """
    return metrics_from_ranks(*retrieval_ranks(img_emb, txt_emb, img_index, block))


def fold_bounds(n_images: int, folds: int) -> list[tuple[int, int]]:
    """Image row ranges of ``folds`` contiguous folds (1000 each for 5000 images)."""
    if folds < 1 or n_images < folds:
        raise ValueError(f"cannot split {n_images} images into {folds} folds")
    edges = [round(f * n_images / folds) for f in range(folds + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def fold5_metrics(
    img_emb: Any, txt_emb: Any, img_index: Any, folds: int = 5, block: int = 1024
) -> dict[str, float]:
    """MS-COCO's 5-fold 1K protocol: the metrics of each fold of contiguous images (with
    their captions, against each other only), averaged over the folds."""
    img_emb, txt_emb, img_index = _check_inputs(img_emb, txt_emb, img_index)
    per_fold = []
    for start, stop in fold_bounds(img_emb.shape[0], folds):
        members = (img_index >= start) & (img_index < stop)
        per_fold.append(
            retrieval_metrics(
                img_emb[start:stop], txt_emb[members], img_index[members] - start, block
            )
        )
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


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
        return BiGRUText(model.vocab, captions, augmentation=None)
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
) -> dict[str, float]:
    """:func:`encode_split` then :func:`retrieval_metrics` (or :func:`fold5_metrics`)."""
    img_emb, txt_emb, img_index = encode_split(model, split, batch_size, device, text)
    if fold5:
        return fold5_metrics(img_emb, txt_emb, img_index, block=block)
    return retrieval_metrics(img_emb, txt_emb, img_index, block=block)
