"""The inputs of ``rvsepp extract-features``: the caption TSV, the split fractions, and the
plan that assigns every image to a split.

Splits are by image and deterministic: every image gets a key hashed from ``split_seed`` and
its path (stable across machines and library versions), the sorted keys are cut by the
fractions, and each split keeps its images in path order. Every split gets at least one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "dev", "test")


class FeatureExtractionError(ValueError):
    """Bad input or output folder for feature extraction (the message names the file)."""


@dataclass(frozen=True)
class CaptionRow:
    image: str  # normalised path relative to the image folder
    caption: str
    line: int  # 1-based line in the TSV


def parse_split_fractions(value: str | Sequence[float]) -> tuple[float, float, float]:
    """Validate ``"0.8,0.1,0.1"`` or a 3-sequence: train, dev, test fractions > 0, sum 1."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        fractions = [float(part) for part in parts]
    except (TypeError, ValueError):
        raise FeatureExtractionError(
            f"bad split fractions {value!r}: expected three numbers like 0.8,0.1,0.1"
        ) from None
    if len(fractions) != 3:
        raise FeatureExtractionError(
            f"bad split fractions {value!r}: expected three (train, dev, test), "
            f"got {len(fractions)}"
        )
    if not all(math.isfinite(f) and f > 0 for f in fractions):
        raise FeatureExtractionError(
            f"bad split fractions {value!r}: each must be a number > 0 "
            "(every split gets at least one image)"
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise FeatureExtractionError(
            f"bad split fractions {value!r}: they sum to {sum(fractions):g}, not 1"
        )
    return (fractions[0], fractions[1], fractions[2])


def read_caption_tsv(path: str | os.PathLike) -> list[CaptionRow]:
    """Parse ``relative/path<TAB>caption`` lines; blank lines are skipped.

    Errors name the file and line: undecodable UTF-8, a line without a tab, an empty path
    or caption, an absolute path or one leading outside the image folder, or no rows.
    """
    tsv = Path(path)
    if not tsv.is_file():
        raise FeatureExtractionError(f"{tsv}: caption TSV not found")
    data = tsv.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FeatureExtractionError(
            f"{tsv}: line {line} is not valid UTF-8 ({err.reason})"
        ) from None
    text = text.removeprefix("\ufeff")
    rows: list[CaptionRow] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise FeatureExtractionError(
                f"{tsv}: line {number} is malformed: expected 'relative/path<TAB>caption', "
                f"found no tab in {line[:80]!r}"
            )
        image, caption = line.split("\t", 1)
        image, caption = image.strip(), caption.strip()
        if not image:
            raise FeatureExtractionError(f"{tsv}: line {number} is malformed: empty image path")
        if not caption:
            raise FeatureExtractionError(
                f"{tsv}: line {number} is malformed: empty caption for {image!r}"
            )
        normalised = posixpath.normpath(image)
        if posixpath.isabs(normalised) or normalised == ".." or normalised.startswith("../"):
            raise FeatureExtractionError(
                f"{tsv}: line {number}: image path {image!r} must be relative to the image "
                "folder and stay inside it"
            )
        rows.append(CaptionRow(image=normalised, caption=caption, line=number))
    if not rows:
        raise FeatureExtractionError(f"{tsv}: empty TSV: no 'relative/path<TAB>caption' lines")
    return rows


def split_counts(n_images: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Images per split: largest-remainder rounding of the fractions, at least 1 each."""
    if n_images < 3:
        raise FeatureExtractionError(
            f"need at least 3 images (one per split: train, dev, test), got {n_images}"
        )
    exact = [f * n_images for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n_images - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if counts[i] == 0:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return (counts[0], counts[1], counts[2])


def assign_splits(
    image_paths: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Deterministic split of image paths into train/dev/test (each in path order)."""
    paths = sorted(set(image_paths))
    counts = split_counts(len(paths), fractions)
    shuffled = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest())
    train_end, dev_end = counts[0], counts[0] + counts[1]
    return {
        "train": sorted(shuffled[:train_end]),
        "dev": sorted(shuffled[train_end:dev_end]),
        "test": sorted(shuffled[dev_end:]),
    }


@dataclass
class SplitPlan:
    name: str
    images: list[str]  # rows, in path order
    captions: list[str]  # grouped by image row
    img_index: np.ndarray  # int64 image row of each caption
    first_line: dict[str, int]  # TSV line that first names each image

    def shards(self, shard_images: int) -> list[tuple[int, int]]:
        return [
            (start, min(start + shard_images, len(self.images)))
            for start in range(0, len(self.images), shard_images)
        ]


def plan_splits(
    rows: list[CaptionRow], fractions: Sequence[float], seed: int, max_images: int | None
) -> list[SplitPlan]:
    first_line: dict[str, int] = {}
    by_image: dict[str, list[str]] = {}
    for row in rows:
        first_line.setdefault(row.image, row.line)
        by_image.setdefault(row.image, []).append(row.caption)
    images = sorted(by_image)
    if max_images is not None:
        if max_images < 1:
            raise FeatureExtractionError(f"max_images must be >= 1, got {max_images}")
        images = images[:max_images]
    assignment = assign_splits(images, fractions, seed)
    plans = []
    for name in SPLITS:
        captions: list[str] = []
        index: list[int] = []
        for row, image in enumerate(assignment[name]):
            captions.extend(by_image[image])
            index.extend([row] * len(by_image[image]))
        plans.append(
            SplitPlan(
                name=name,
                images=assignment[name],
                captions=captions,
                img_index=np.asarray(index, dtype=np.int64),
                first_line=first_line,
            )
        )
    return plans


def plan_digest(plans: list[SplitPlan], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for plan in plans:
        digest.update(f"\0split\0{plan.name}\0{len(plan.images)}\0".encode())
        for image in plan.images:
            digest.update(f"{image}\n".encode())
        digest.update(plan.img_index.tobytes())
        for caption in plan.captions:
            digest.update(f"{caption}\n".encode())
    return digest.hexdigest()
