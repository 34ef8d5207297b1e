"""Loading precomp folders: the SCAN layout, ours with an image index, and every error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from rvsepp.precomp import PrecompError, PrecompSplit, available_splits, load_split

N_IMAGES, REGIONS, FEATURES = 3, 4, 8


def write_images(folder: Path, split: str, array: np.ndarray) -> Path:
    path = folder / f"{split}_ims.npy"
    np.save(path, array)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def features(n: int = N_IMAGES) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, REGIONS, FEATURES)).astype(np.float32)


def make_scan(folder: Path, split: str = "train", n: int = N_IMAGES, k: int = 5) -> np.ndarray:
    array = features(n)
    write_images(folder, split, array)
    write_lines(
        folder / f"{split}_caps.txt", [f"image {i} caption {j}" for i in range(n) for j in range(k)]
    )
    return array


def make_ours(folder: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Three images with 2, 1 and 2 captions, listed out of image order."""
    array = features()
    index = np.array([0, 2, 1, 0, 2], dtype=np.int64)
    captions = [f"caption {c} of image {i}" for c, i in enumerate(index)]
    write_images(folder, split, array)
    write_lines(folder / f"{split}_caps.txt", captions)
    np.save(folder / f"{split}_img_index.npy", index)
    write_lines(folder / f"{split}_images.txt", ["a.png", "b/c.png", "d e.jpg"])
    return array, index, captions


def test_scan_layout_loads_memory_mapped(tmp_path: Path) -> None:
    array = make_scan(tmp_path, k=5)
    split = load_split(tmp_path, "train")
    assert isinstance(split, PrecompSplit)
    assert isinstance(split.images, np.memmap)  # never read whole: COCO train is ~33 GB
    assert split.images.dtype == np.float32 and split.images.shape == array.shape
    np.testing.assert_array_equal(np.asarray(split.images), array)
    assert split.captions[5] == "image 1 caption 0"
    assert split.img_index.dtype == np.int64
    np.testing.assert_array_equal(split.img_index, np.repeat(np.arange(N_IMAGES), 5))
    assert split.image_names is None
    assert (split.n_images, split.n_captions) == (N_IMAGES, 15)


def test_scan_layout_other_captions_per_image(tmp_path: Path) -> None:
    make_scan(tmp_path, k=2)
    split = load_split(tmp_path, "train", captions_per_image=2)
    np.testing.assert_array_equal(split.img_index, [0, 0, 1, 1, 2, 2])


def test_our_layout_uses_the_index_and_names(tmp_path: Path) -> None:
    array, index, captions = make_ours(tmp_path)
    # captions_per_image is irrelevant when the index is present
    split = load_split(tmp_path, "train", captions_per_image=5)
    np.testing.assert_array_equal(split.img_index, index)
    assert split.captions == captions
    assert split.image_names == ["a.png", "b/c.png", "d e.jpg"]
    np.testing.assert_array_equal(np.asarray(split.images), array)


def test_index_of_another_integer_dtype_becomes_int64(tmp_path: Path) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.array([0, 2, 1, 0, 2], dtype=np.int32))
    split = load_split(tmp_path, "train")
    assert split.img_index.dtype == np.int64


def test_crlf_and_missing_final_newline_are_accepted(tmp_path: Path) -> None:
    write_images(tmp_path, "dev", features(1))
    (tmp_path / "dev_caps.txt").write_bytes(b"a cat \r\nthe cat\r\nx\r\ny\r\nlast")
    split = load_split(tmp_path, "dev")
    assert split.captions == ["a cat", "the cat", "x", "y", "last"]


def test_available_splits_order_and_completeness(tmp_path: Path) -> None:
    for split in ("test", "zeta", "train", "testall", "dev", "alpha"):
        make_scan(tmp_path, split)
    write_images(tmp_path, "orphan", features())  # no captions: not a usable split
    assert available_splits(tmp_path) == ["train", "dev", "test", "testall", "alpha", "zeta"]


def test_available_splits_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PrecompError, match="not a directory"):
        available_splits(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- errors


def expect_error(folder: Path, file_name: str, problem: str, **kwargs) -> None:
    with pytest.raises(PrecompError) as info:
        load_split(folder, kwargs.pop("split", "train"), **kwargs)
    message = str(info.value)
    assert str(folder / file_name) in message, message
    assert re.search(problem, message), message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PrecompError, match="data folder not found"):
        load_split(tmp_path / "nowhere", "train")


def test_missing_split_names_the_file_and_the_splits_present(tmp_path: Path) -> None:
    make_scan(tmp_path, "train")
    expect_error(tmp_path, "test_ims.npy", r"missing.*'test'.*\['train'\]", split="test")


def test_missing_captions_file(tmp_path: Path) -> None:
    write_images(tmp_path, "train", features())
    expect_error(tmp_path, "train_caps.txt", "missing")


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((3, 8), np.float32), r"3-d array .* got shape \(3, 8\)"),
        (np.zeros((3, 4, 8, 1), np.float32), r"3-d array .* got shape \(3, 4, 8, 1\)"),
        (np.zeros((3, 4, 8), np.float64), "float32 .* got float64"),
        (np.zeros((3, 4, 8), np.int64), "float32 .* got int64"),
        (np.zeros((3, 4, 8), ">f4"), "float32 .* got >f4"),
        (np.zeros((0, 4, 8), np.float32), r"empty array of shape \(0, 4, 8\)"),
    ],
    ids=["rank2", "rank4", "float64", "int64", "big-endian", "empty"],
)
def test_bad_image_array(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    write_images(tmp_path, "train", array)
    write_lines(tmp_path / "train_caps.txt", ["a"] * 5)
    expect_error(tmp_path, "train_ims.npy", problem, captions_per_image=1)


def test_image_file_that_is_not_npy(tmp_path: Path) -> None:
    (tmp_path / "train_ims.npy").write_bytes(b"this is not numpy")
    write_lines(tmp_path / "train_caps.txt", ["a"])
    expect_error(tmp_path, "train_ims.npy", "not a readable .npy array")


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write_lines(tmp_path / "train_caps.txt", ["a"])
    expect_error(tmp_path, "train_ims.npy", "not a readable .npy array")


def test_scan_caption_count_must_be_k_times_images(tmp_path: Path) -> None:
    write_images(tmp_path, "train", features(3))
    write_lines(tmp_path / "train_caps.txt", ["caption"] * 14)
    expect_error(tmp_path, "train_caps.txt", r"14 captions for 3 images.*exactly 5 .*15 lines")


def test_scan_caption_count_with_another_k(tmp_path: Path) -> None:
    make_scan(tmp_path, k=5)
    expect_error(
        tmp_path, "train_caps.txt", r"15 captions for 3 images.*exactly 4", captions_per_image=4
    )


def test_empty_caption_file(tmp_path: Path) -> None:
    write_images(tmp_path, "train", features())
    (tmp_path / "train_caps.txt").write_bytes(b"")
    expect_error(tmp_path, "train_caps.txt", "no captions")


def test_empty_caption_line_names_the_line(tmp_path: Path) -> None:
    write_images(tmp_path, "train", features(1))
    write_lines(tmp_path / "train_caps.txt", ["one", "two", "   ", "four", "five"])
    expect_error(tmp_path, "train_caps.txt", "line 3 is an empty caption", captions_per_image=5)


def test_non_utf8_caption_names_the_line(tmp_path: Path) -> None:
    write_images(tmp_path, "train", features(1))
    (tmp_path / "train_caps.txt").write_bytes(b"one\ntwo\ncaf\xe9\nfour\nfive\n")
    expect_error(tmp_path, "train_caps.txt", "line 3 is not valid UTF-8")


def test_index_length_must_match_the_captions(tmp_path: Path) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.array([0, 1, 2, 0], dtype=np.int64))
    expect_error(tmp_path, "train_img_index.npy", "4 entries but train_caps.txt has 5 captions")


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ([0, 1, 2, 3, 0], r"1 entries outside \[0, 3\).*caption 3 -> 3"),
        ([0, 1, -1, 2, 0], r"1 entries outside \[0, 3\).*caption 2 -> -1"),
    ],
    ids=["too-large", "negative"],
)
def test_index_values_out_of_range(tmp_path: Path, index: list[int], problem: str) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.array(index, dtype=np.int64))
    expect_error(tmp_path, "train_img_index.npy", problem)


def test_index_must_be_integer(tmp_path: Path) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.array([0, 2, 1, 0, 2], dtype=np.float32))
    expect_error(tmp_path, "train_img_index.npy", "integer dtype .* got float32")


def test_index_must_be_one_dimensional(tmp_path: Path) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.zeros((5, 1), dtype=np.int64))
    expect_error(tmp_path, "train_img_index.npy", r"1-d array .* got shape \(5, 1\)")


def test_unreadable_index_file(tmp_path: Path) -> None:
    make_ours(tmp_path)
    (tmp_path / "train_img_index.npy").write_bytes(b"\x93NUMPY garbage")
    expect_error(tmp_path, "train_img_index.npy", "not a readable .npy array")


def test_every_image_needs_a_caption(tmp_path: Path) -> None:
    make_ours(tmp_path)
    np.save(tmp_path / "train_img_index.npy", np.array([0, 2, 0, 0, 2], dtype=np.int64))
    expect_error(tmp_path, "train_img_index.npy", r"1 image rows have no caption \(rows 1\)")


def test_image_names_must_match_the_rows(tmp_path: Path) -> None:
    make_ours(tmp_path)
    write_lines(tmp_path / "train_images.txt", ["a.png", "b.png"])
    expect_error(tmp_path, "train_images.txt", "2 image names for 3 rows")


def test_empty_image_name(tmp_path: Path) -> None:
    make_ours(tmp_path)
    write_lines(tmp_path / "train_images.txt", ["a.png", "", "c.png"])
    expect_error(tmp_path, "train_images.txt", "line 2 is an empty image name")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_captions_per_image(tmp_path: Path, bad) -> None:
    make_scan(tmp_path)
    with pytest.raises((TypeError, ValueError), match="captions_per_image"):
        load_split(tmp_path, "train", captions_per_image=bad)
