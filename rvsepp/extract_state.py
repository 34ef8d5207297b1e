"""The files of ``rvsepp extract-features``: shards of finished images under
``OUT/.extract-state/``, each split's final files, and the checks that decide what a
resumed run can keep.

Every file is written atomically (temporary name, fsync, rename), so an interrupted run
leaves only complete files; a split is marked done with the sizes of its files, and
``meta.json`` is written last, once every split is complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import (
    atomic_write,
    atomic_write_bytes,
    ensure_folder,
    fsync_folder,
    remove_stale_temporaries,
)
from .extract_inputs import SPLITS, FeatureExtractionError, SplitPlan
from .precomp import split_files
from .region_encoder import FEATURE_DIM, GRID

STATE_DIR = ".extract-state"
META_FILE = "meta.json"
PLAN_FILE = "plan.json"


def save_npy(target: Path, array: np.ndarray) -> None:
    atomic_write(target, lambda handle: np.save(handle, array, allow_pickle=False))


def save_lines(target: Path, lines: Sequence[str]) -> None:
    atomic_write_bytes(target, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def save_json(target: Path, obj: dict) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a .npy header, or None when the file is missing or broken."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return tuple(array.shape), array.dtype


def shard_path(state_dir: Path, split: str, start: int) -> Path:
    return state_dir / f"{split}_{start:09d}.npy"


def done_marker(state_dir: Path, split: str) -> Path:
    return state_dir / f"{split}.done.json"


def output_names() -> list[str]:
    return [path.name for split in SPLITS for path in split_files(".", split).all()]


def file_sizes(out_dir: Path, plans: Sequence[SplitPlan]) -> dict[str, int]:
    sizes = {}
    for plan in plans:
        for path in split_files(out_dir, plan.name).all():
            sizes[path.name] = path.stat().st_size
    return sizes


def files_match(out_dir: Path, sizes: dict[str, int]) -> str | None:
    """None when every file exists with its recorded size, else the first problem."""
    for name, size in sizes.items():
        path = out_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def split_complete(out_dir: Path, state_dir: Path, plan: SplitPlan) -> bool:
    """Whether the split's final files were all written and are intact (by size and shape)."""
    marker = done_marker(state_dir, plan.name)
    try:
        sizes = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if files_match(out_dir, sizes) is not None:
        return False
    expected = ((len(plan.images), GRID * GRID, FEATURE_DIM), np.float32)
    return npy_shape(split_files(out_dir, plan.name).images) == expected


def finish_split(out_dir: Path, state_dir: Path, plan: SplitPlan, shard_images: int) -> None:
    """Join the split's shards into its final files, mark it done, drop the shards."""
    files = split_files(out_dir, plan.name)
    shape = (len(plan.images), GRID * GRID, FEATURE_DIM)

    def join_shards(handle: Any) -> None:
        # Streamed with plain writes (not a memory map, where a full disk is a SIGBUS).
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32))}
        np.lib.format.write_array_header_1_0(
            handle, {**header, "fortran_order": False, "shape": shape}
        )
        for start, _ in plan.shards(shard_images):
            shard = np.load(shard_path(state_dir, plan.name, start), mmap_mode="r")
            handle.write(memoryview(np.ascontiguousarray(shard, dtype=np.float32)).cast("B"))

    atomic_write(files.images, join_shards)
    save_lines(files.captions, plan.captions)
    save_npy(files.img_index, plan.img_index)
    save_lines(files.image_names, plan.images)
    save_json(done_marker(state_dir, plan.name), {"files": file_sizes(out_dir, [plan])})
    for start, _ in plan.shards(shard_images):
        shard_path(state_dir, plan.name, start).unlink(missing_ok=True)


def remove_state(state_dir: Path) -> None:
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()
    fsync_folder(state_dir.parent)


def check_output_folder(out_dir: Path, resume: bool) -> None:
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


def verify_complete_output(out_dir: Path, plans: Sequence[SplitPlan], digest: str) -> None:
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
    problem = files_match(out_dir, sizes)
    for plan in plans:
        expected = ((len(plan.images), GRID * GRID, FEATURE_DIM), np.float32)
        path = split_files(out_dir, plan.name).images
        if problem is None and npy_shape(path) != expected:
            problem = f"{path} does not hold a {expected[0]} float32 array"
    if problem is not None:
        raise FeatureExtractionError(
            f"{problem} although {meta_path} says the extraction is complete; remove the "
            "folder and extract again"
        )


def open_state(out_dir: Path, digest: str, settings: dict[str, Any]) -> Path:
    """The state folder of an unfinished extraction: created with its plan file, or reused
    when its plan file records the same inputs and settings (``digest``)."""
    state_dir = ensure_folder(out_dir / STATE_DIR)
    remove_stale_temporaries(out_dir, {META_FILE, *output_names()})
    remove_stale_temporaries(state_dir)
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
        save_json(plan_file, {"digest": digest, "settings": settings})
    return state_dir
