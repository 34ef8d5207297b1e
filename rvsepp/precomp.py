"""Read precomputed image features and captions, one folder per dataset.

Two layouts share one loader:

* SCAN precomp (unchanged): ``{split}_ims.npy`` (N, K, F) float32 and ``{split}_caps.txt``
  with exactly ``k`` consecutive captions per image (k = ``captions_per_image``, 5 for
  Flickr30K and MS-COCO), so caption ``c`` belongs to image ``c // k``.
* Ours (written by ``rvsepp extract-features``): the same two files plus
  ``{split}_img_index.npy`` (int64, the image row of each caption line) and
  ``{split}_images.txt`` (the image path of each row). With the index any number of
  captions per image is allowed, but every image needs at least one: an image without a
  caption cannot be an image-to-text query, so it would silently distort recall. (The
  extractor never writes one; SCAN folders always have k.)

Image features are memory-mapped (``np.load(mmap_mode="r")``: MS-COCO's train split is
~33 GB), captions are read whole. Every feature is checked finite when a split is loaded,
in blocks of 64 MiB (one sequential read of the file: a NaN or Inf would otherwise surface
only as a non-finite loss, many steps later). Every problem raises :class:`PrecompError`
naming the file and what is wrong with it (for a non-finite value: the row and image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PrecompError", "PrecompSplit", "available_splits", "load_split", "split_files"]

# Conventional order of the splits; others follow alphabetically.
KNOWN_SPLITS = ("train", "dev", "test", "testall")


class PrecompError(ValueError):
    """A precomp folder is missing a file or holds a malformed one (the message names it)."""


@dataclass
class PrecompSplit:
    """One split of a precomp folder.

    ``images`` is (N, K, F) float32, memory-mapped; ``captions`` has one entry per caption
    line; ``img_index[c]`` is the image row of caption ``c``; ``image_names`` is the image
    path of each row when the folder has ``{split}_images.txt``, else None.
    """

    images: np.ndarray
    captions: list[str]
    img_index: np.ndarray
    image_names: list[str] | None = None
    name: str = ""
    data_dir: Path | None = None

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class SplitFiles:
    images: Path
    captions: Path
    img_index: Path
    image_names: Path

    def all(self) -> tuple[Path, Path, Path, Path]:
        return (self.images, self.captions, self.img_index, self.image_names)


def split_files(data_dir: str | os.PathLike, split: str) -> SplitFiles:
    """The four file paths of ``split`` in ``data_dir`` (whether they exist or not)."""
    root = Path(data_dir)
    return SplitFiles(
        images=root / f"{split}_ims.npy",
        captions=root / f"{split}_caps.txt",
        img_index=root / f"{split}_img_index.npy",
        image_names=root / f"{split}_images.txt",
    )


def available_splits(data_dir: str | os.PathLike) -> list[str]:
    """Splits with both ``{split}_ims.npy`` and ``{split}_caps.txt`` in ``data_dir``.

    Ordered train, dev, test, testall, then any others alphabetically.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise PrecompError(f"{root}: not a directory")
    found = {
        path.name[: -len("_ims.npy")]
        for path in root.glob("*_ims.npy")
        if (root / f"{path.name[: -len('_ims.npy')]}_caps.txt").is_file()
    }
    known = [split for split in KNOWN_SPLITS if split in found]
    return known + sorted(found - set(KNOWN_SPLITS))


def load_split(
    data_dir: str | os.PathLike, split: str, captions_per_image: int = 5
) -> PrecompSplit:
    """Load and validate one split; see the module docstring for the two layouts."""
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int):
        raise TypeError(f"captions_per_image must be an int, got {captions_per_image!r}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    root = Path(data_dir)
    if not root.is_dir():
        raise PrecompError(f"{root}: data folder not found")
    files = split_files(root, split)
    for required in (files.images, files.captions):
        if not required.is_file():
            present = available_splits(root)
            raise PrecompError(
                f"{required}: missing, so split {split!r} cannot be loaded "
                f"(splits with both _ims.npy and _caps.txt here: {present or 'none'})"
            )

    images = _load_images(files.images)
    n_images = images.shape[0]
    captions = read_text_lines(files.captions, what="caption")
    if not captions:
        raise PrecompError(f"{files.captions}: no captions")

    if files.img_index.is_file():
        img_index = _load_img_index(files.img_index, len(captions), n_images, files.captions)
    else:
        if len(captions) != captions_per_image * n_images:
            raise PrecompError(
                f"{files.captions}: {len(captions)} captions for {n_images} images in "
                f"{files.images.name}; without {files.img_index.name} the SCAN layout needs "
                f"exactly {captions_per_image} consecutive captions per image "
                f"({captions_per_image * n_images} lines; set captions_per_image to match)"
            )
        img_index = np.arange(len(captions), dtype=np.int64) // captions_per_image

    image_names = None
    if files.image_names.is_file():
        image_names = read_text_lines(files.image_names, what="image name")
        if len(image_names) != n_images:
            raise PrecompError(
                f"{files.image_names}: {len(image_names)} image names for {n_images} rows in "
                f"{files.images.name}"
            )
    check_finite(images, files.images, image_names)
    return PrecompSplit(
        images=images,
        captions=captions,
        img_index=img_index,
        image_names=image_names,
        name=split,
        data_dir=root,
    )


def _load_images(path: Path) -> np.ndarray:
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise PrecompError(f"{path}: not a readable .npy array ({err})") from err
    if images.ndim != 3:
        raise PrecompError(
            f"{path}: expected a 3-d array (images, regions, features), got shape "
            f"{tuple(images.shape)}"
        )
    if images.dtype != np.float32:
        raise PrecompError(
            f"{path}: expected dtype float32 (native byte order), got {images.dtype}; "
            "convert once with np.save(path, np.load(path).astype(np.float32))"
        )
    if min(images.shape) == 0:
        raise PrecompError(f"{path}: empty array of shape {tuple(images.shape)}")
    return images


# Features are checked for NaN and Inf in blocks of this many bytes.
FINITE_CHECK_BYTES = 64 << 20


def check_finite(images: np.ndarray, path: Path, image_names: list[str] | None = None) -> None:
    """Raise :class:`PrecompError` naming ``path`` and the first row (and its image) that
    holds a NaN or an infinity. Reads ``images`` once, a block at a time."""
    rows = max(1, FINITE_CHECK_BYTES // max(1, images[0].nbytes))
    bad: list[int] = []
    for start in range(0, images.shape[0], rows):
        block = images[start : start + rows]
        # Fast path: any NaN or Inf makes the sum non-finite. A non-finite sum of finite
        # values (an overflow) is then cleared by the exact test.
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(block, axis=None)
        if np.isfinite(total):
            continue
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        bad.extend(start + int(row) for row in np.flatnonzero(~finite))
    if not bad:
        return
    first = bad[0]
    row = np.asarray(images[first])
    position = tuple(int(i) for i in np.argwhere(~np.isfinite(row))[0])
    name = f" (image {image_names[first]!r})" if image_names is not None else ""
    where = ", ".join(
        f"{axis} {index}" for axis, index in zip(("region", "feature"), position, strict=False)
    )
    raise PrecompError(
        f"{path}: row {first}{name} holds {row[position]} at {where}; {len(bad)} of "
        f"{images.shape[0]} rows hold NaN or Inf. Features must be finite: extract them again "
        "or repair the file"
    )


def _load_img_index(path: Path, n_captions: int, n_images: int, captions: Path) -> np.ndarray:
    try:
        index = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise PrecompError(f"{path}: not a readable .npy array ({err})") from err
    if index.ndim != 1:
        raise PrecompError(
            f"{path}: expected a 1-d array (one image row per caption), got shape "
            f"{tuple(index.shape)}"
        )
    if not np.issubdtype(index.dtype, np.integer):
        raise PrecompError(f"{path}: expected an integer dtype (int64), got {index.dtype}")
    if index.shape[0] != n_captions:
        raise PrecompError(
            f"{path}: {index.shape[0]} entries but {captions.name} has {n_captions} captions "
            "(one image row per caption line is needed)"
        )
    index = index.astype(np.int64, copy=False)
    out_of_range = np.flatnonzero((index < 0) | (index >= n_images))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise PrecompError(
            f"{path}: {out_of_range.size} entries outside [0, {n_images}) (the image rows); "
            f"the first is caption {first} -> {int(index[first])}"
        )
    uncaptioned = np.flatnonzero(np.bincount(index, minlength=n_images) == 0)
    if uncaptioned.size:
        shown = ", ".join(str(int(row)) for row in uncaptioned[:5])
        raise PrecompError(
            f"{path}: {uncaptioned.size} image rows have no caption (rows {shown}"
            f"{', ...' if uncaptioned.size > 5 else ''}); every image needs at least one"
        )
    return index


def read_text_lines(path: Path, what: str = "line") -> list[str]:
    """Non-empty UTF-8 lines of ``path``, stripped; a final newline is optional.

    Raises PrecompError naming the file and line for undecodable bytes or an empty line.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PrecompError(f"{path}: line {line} is not valid UTF-8 ({err.reason})") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    stripped = [line.strip() for line in lines]
    for number, line in enumerate(stripped, start=1):
        if not line:
            raise PrecompError(f"{path}: line {number} is an empty {what}")
    return stripped
