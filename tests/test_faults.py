"""Nothing a user owns is lost or silently wrong: runs in an output folder, checkpoints that
were damaged, non-finite features or losses, failing writes, half-made folders."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rvsepp import atomic
from rvsepp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rvsepp.cli import main
from rvsepp.config import TrainConfig
from rvsepp.precomp import PrecompError, load_split
from rvsepp.run_folder import RunFolderError
from rvsepp.train import read_csv, train

REPO = Path(__file__).resolve().parent.parent


def tiny(**changes) -> TrainConfig:
    base = TrainConfig(
        epochs=1, batch_size=16, embed_dim=64, word_dim=32, gpo_pe_dim=8, gpo_hidden=8,
        eval_batch_size=64, progress=False, tensorboard=False, device="cpu",
    )  # fmt: skip
    return base.replace(**changes)


@pytest.fixture(scope="module")
def finished_run(emoji48, tmp_path_factory) -> Path:
    """One finished epoch: best.pt, last.pt and the logs."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(), emoji48, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- the output folder


def test_a_folder_holding_a_run_is_refused_and_left_untouched(finished_run, emoji48):
    before = snapshot(finished_run)
    with pytest.raises(
        RunFolderError, match="already holds a training run .*--resume.*--overwrite"
    ):
        train(tiny(), emoji48, finished_run)
    other = finished_run.parent / "other"
    train(tiny(max_steps=1), emoji48, other)
    with pytest.raises(RunFolderError, match="already holds another training run"):
        train(tiny(max_steps=2), emoji48, finished_run, resume=other / "last.pt")
    assert snapshot(finished_run) == before


def test_resume_continues_the_folders_run(emoji48, tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny(epochs=2, max_steps=2).to_json())
    out = tmp_path / "run"
    common = ["train", "--data", str(emoji48), "--out", str(out)]
    assert main([*common, "--config", str(config_file)]) == 0
    assert main([*common, "--resume", "--set", "max_steps=4"]) == 0  # OUT/last.pt
    assert [int(row["step"]) for row in read_csv(out / "steps.csv")] == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 4


def test_overwrite_moves_the_old_run_aside_whole(finished_run, emoji48, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    train(tiny(max_steps=1), emoji48, out, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert [int(row["step"]) for row in read_csv(out / "steps.csv")] == [1]
    assert not (out / "best.pt").exists()  # the new run has not evaluated yet


def test_best_pt_is_replaced_only_by_its_own_run(finished_run, emoji48, tmp_path):
    """A checkpoint of another run copied into the folder and resumed from there would
    replace best.pt with the other run's model: refused."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    stranger = tmp_path / "stranger"
    train(tiny(epochs=2, max_steps=1), emoji48, stranger)
    shutil.copy(stranger / "last.pt", out / "stranger.pt")
    best = (out / "best.pt").read_bytes()
    with pytest.raises(RunFolderError, match="best.pt belongs to another run"):
        train(tiny(epochs=2, max_steps=2), emoji48, out, resume=out / "stranger.pt")
    assert (out / "best.pt").read_bytes() == best
    # The folder's own run continues, and keeps its best.pt unless it scores better.
    result = train(tiny(epochs=2), emoji48, out, resume=out / "last.pt")
    kept = load_checkpoint(out / "best.pt")
    assert kept["run_id"] == load_checkpoint(out / "last.pt")["run_id"]
    assert kept["progress"]["best_rsum"] == result["best_rsum"]


@pytest.mark.parametrize("fault", ["missing data", "batch too large", "bad option"])
def test_a_run_failing_before_its_first_step_leaves_no_folder(emoji48, tmp_path, fault):
    data, config = emoji48, tiny()
    if fault == "missing data":
        data = tmp_path / "nowhere"
    elif fault == "batch too large":
        config = tiny(batch_size=500)
    else:
        config = tiny(backend="cuda")  # the loss refuses CPU tensors in the first step
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises((ValueError, RuntimeError, OSError)):
        train(config, data, fresh)
    assert not fresh.exists()

    empty = tmp_path / "empty"  # a folder the user made: kept, and left empty
    empty.mkdir()
    with pytest.raises((ValueError, RuntimeError, OSError)):
        train(config, data, empty)
    assert empty.is_dir() and not list(empty.iterdir())


def test_a_failed_overwrite_puts_the_old_run_back(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    with pytest.raises(PrecompError):
        train(tiny(), tmp_path / "nowhere", out, overwrite=True)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_out_naming_a_file_is_a_clear_error(emoji48, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["train", "--data", str(emoji48), "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert err == f"rvsepp: error: --out {target} is a file, not a folder; name a folder for " \
        "the run's checkpoints and logs (it is created if missing)\n"  # fmt: skip
    assert target.read_text() == "mine"


def test_the_batch_size_error_names_options_that_exist(emoji48, tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny(max_steps=1).to_json())
    common = ["train", "--data", str(emoji48), "--config", str(config_file), "--batch-size", "90"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "85 pairs, fewer than one batch of 90" in err
    assert "--batch-size" in err and "--set drop_last=false" in err
    # Both remedies are real options that work.
    assert main([*common, "--out", str(tmp_path / "b"), "--set", "drop_last=false"]) == 0
    assert len(read_csv(tmp_path / "b" / "steps.csv")) == 1
    assert main([*common[:-1], "40", "--out", str(tmp_path / "c")]) == 0


def test_stale_temporaries_are_removed_at_the_next_start(finished_run, emoji48, tmp_path):
    """What a write killed midway (kill -9) left: removed by the next start, whether it
    continues the run or is refused."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)

    def leave_temporaries() -> list[Path]:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()  # a process that no longer runs
        stale = [out / f".last.pt.{child.pid}.tmp", out / f".best.pt.{child.pid}-0a0b0c.tmp"]
        for path in stale:
            path.write_bytes(b"half a checkpoint")
        return stale

    stale = leave_temporaries()
    with pytest.raises(RunFolderError):
        train(tiny(), emoji48, out)
    assert not any(path.exists() for path in stale)
    stale = leave_temporaries()
    train(tiny(epochs=2, max_steps=6), emoji48, out, resume=out / "last.pt")
    assert not any(path.exists() for path in stale)


def test_curves_name_the_run_and_mode_and_draw_no_panel_twice(emoji48, tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="pip install 'selhn[rvsepp]' (Pillow)")
    for mode, fractions in (
        ("selhn", ["gated = near-tie fraction"]),
        ("hardest", ["near-tie fraction (none gated)"]),
    ):
        out = tmp_path / mode
        train(tiny(loss_mode=mode, max_steps=2), emoji48, out)
        with Image.open(out / "curves.png") as image:
            text = image.text
        assert text["Title"] == f"run {out}: loss mode {mode}, 2 steps"
        panels = text["Description"].removeprefix("panels: ").split("; ")
        assert panels == ["loss", "dev rsum", *fractions, "gradient norm"]
        assert len(set(panels)) == len(panels)


# --------------------------------------------------------------------------- checkpoints


def weight_storage(path: Path) -> tuple[int, int]:
    """Byte offset and size of the largest tensor's data inside a checkpoint file."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda item: item.file_size)
        with archive.open(info) as member:
            first = member.read(64)
    data = path.read_bytes()
    return data.index(first), info.file_size


def damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "200 bytes flipped in a weight":
        start, size = weight_storage(path)
        for offset in range(start + size // 2, start + size // 2 + 200):
            data[offset] ^= 0xA5
    elif kind == "one bit flipped in a weight":
        start, size = weight_storage(path)
        data[start + size - 3] ^= 0x01
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "empty":
        data = bytearray()
    elif kind == "zeroed tail":
        data[-300:] = bytes(300)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("200 bytes flipped in a weight", "do not match the checksum written with it"),
        ("one bit flipped in a weight", "do not match the checksum written with it"),
        ("truncated", "damaged or truncated zip archive"),
        ("empty", r"an empty file \(0 bytes\)"),
        ("zeroed tail", "damaged or truncated zip archive"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_eval_resume_and_the_demo(
    finished_run, emoji48, tmp_path, capsys, kind, problem
):
    from rvsepp.demo import _load_for_test

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damage(out / "last.pt", kind)
    assert main(["eval", "--data", str(emoji48), "--checkpoint", str(out / "last.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rvsepp: error: {out / 'last.pt'}: ") and err.count("\n") == 1
    assert re.search(problem, err), err
    with pytest.raises(CheckpointError, match=problem):
        train(tiny(epochs=2), emoji48, out, resume=out / "last.pt")
    with pytest.raises(CheckpointError, match=problem):
        _load_for_test(out / "last.pt", tiny(), emoji48)


def test_weights_that_do_not_fit_the_model_are_named(finished_run, emoji48, tmp_path, capsys):
    checkpoint = load_checkpoint(finished_run / "best.pt")
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = torch.zeros(3, 3)
    save_checkpoint(checkpoint, tmp_path / "odd.pt")  # a valid checksum over odd contents
    assert main(["eval", "--data", str(emoji48), "--checkpoint", str(tmp_path / "odd.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"rvsepp: error: {tmp_path / 'odd.pt'}: its weights do not fit the model its "
        f"configuration describes (size mismatch for {name}"
    ), err
    assert err.count("\n") == 1


def minimal_checkpoint() -> dict:
    return {
        "config": TrainConfig().to_dict(), "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "progress": {"epoch": 1, "step": 3}, "vocab": None, "feature_dim": 4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda p: p.write_text('{"lr": 0.1}\n'), "a text file \\(it starts with '{\"lr\""),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or p.with_suffix(".npy").rename(p),
         "a NumPy .npy array"),
        (lambda p: p.write_bytes(b"\x00\x01\x02\xff" * 8), "starts with the bytes 00 01 02 ff"),
        (lambda p: torch.save({"w": torch.zeros(2)}, p), "a bare state dict of 1 tensors"),
        (lambda p: torch.save({"epoch": 3, "notes": "x"}, p), "a dict with keys 'epoch', 'notes'"),
        (lambda p: torch.save([1, 2], p), "a PyTorch file holding a list"),
        (lambda p: torch.save({**minimal_checkpoint(), "format": 9}, p), "checkpoint format 9"),
        (lambda p: torch.save(minimal_checkpoint() | {"format": 2}, p), "has no checksum"),
        (lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "hi"), "a zip archive without"),
        (lambda p: p.mkdir(), "a folder, not a checkpoint file"),
    ],
    ids=["text", "npy", "binary", "state-dict", "dict", "list", "newer", "no-checksum", "zip",
         "folder"],
)  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, write, problem):
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(CheckpointError, match=problem) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_saved_checkpoint_verifies_and_every_kind_of_content_is_covered(tmp_path):
    path = tmp_path / "c.pt"
    payload = minimal_checkpoint()
    save_checkpoint(payload, path)
    loaded = load_checkpoint(path)
    assert loaded["format"] == 2 and len(loaded["checksum"]["sha256"]) == 64
    # A changed number, string, key or tensor shape changes the checksum.
    from rvsepp.checkpoint import content_digest

    base = content_digest(loaded)
    variants = [
        {**loaded, "feature_dim": 5},
        {**loaded, "progress": {"epoch": 1, "step": 4}},
        {**loaded, "config": {**loaded["config"], "loss_mode": "hardest"}},
        {**loaded, "model": {"w": torch.arange(6.0).reshape(3, 2)}},
        {**loaded, "model": {"v": torch.arange(6.0).reshape(2, 3)}},
        {**loaded, "extra": None},
    ]
    assert len({base, *(content_digest(v) for v in variants)}) == len(variants) + 1


# --------------------------------------------------------------------------- non-finite values


def write_split(folder: Path, images: np.ndarray, names: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train_ims.npy", images)
    (folder / "train_caps.txt").write_text("".join(f"caption {i}\n" for i in range(len(images))))
    np.save(folder / "train_img_index.npy", np.arange(len(images), dtype=np.int64))
    if names is not None:
        (folder / "train_images.txt").write_text("".join(f"{n}\n" for n in names))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_file_row_and_image(tmp_path, monkeypatch, bad):
    import rvsepp.precomp as precomp

    monkeypatch.setattr(precomp, "FINITE_CHECK_BYTES", 3 * 4 * 5 * 4)  # 3 rows per block
    images = np.random.default_rng(0).standard_normal((10, 4, 5)).astype(np.float32)
    images[7, 2, 3] = bad
    images[9, 0, 0] = bad
    write_split(tmp_path, images, [f"img{i}.png" for i in range(10)])
    with pytest.raises(PrecompError) as info:
        load_split(tmp_path, "train", 1)
    assert str(info.value) == (
        f"{tmp_path / 'train_ims.npy'}: row 7 (image 'img7.png') holds {bad} at region 2, "
        "feature 3; 2 of 10 rows hold NaN or Inf. Features must be finite: extract them "
        "again or repair the file"
    )


def test_finite_features_load_even_when_their_block_sum_overflows(tmp_path):
    images = np.full((4, 2, 3), 3e38, dtype=np.float32)
    write_split(tmp_path, images)
    assert load_split(tmp_path, "train", 1).n_images == 4


def test_a_non_finite_loss_names_the_step_and_the_batch(emoji48, tmp_path, monkeypatch, capsys):
    """The loss turns NaN at step 2: one line naming the step and the batch's images and
    captions (those the loss saw), no traceback, and the step-1 run kept."""
    import rvsepp.train as train_module

    real = train_module.make_loss_fn
    seen = []

    def poisoned(config, mode, distributed):
        loss_fn = real(config, mode, distributed)

        def at_step_two(img, txt, ids):
            loss, stats = loss_fn(img, txt, ids)
            seen.append(len(seen))
            return (loss * float("nan") if len(seen) == 2 else loss), stats

        return at_step_two

    spied = []
    real_step = train_module._train_step

    def spy(run, batch, loss_fn):
        spied.append(batch)
        return real_step(run, batch, loss_fn)

    monkeypatch.setattr(train_module, "make_loss_fn", poisoned)
    monkeypatch.setattr(train_module, "_train_step", spy)
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny().to_json())
    out = tmp_path / "run"
    status = main(
        ["train", "--data", str(emoji48), "--out", str(out), "--config", str(config_file)]
    )
    assert status == 1
    err = capsys.readouterr().err
    images = sorted(set(spied[1]["image_index"].tolist()))
    captions = spied[1]["caption_index"].tolist()
    assert err.startswith("rvsepp: error: training stopped at step 2 (epoch 1): the loss is nan.")
    assert f"images [{', '.join(map(str, images[:16]))}" in err
    assert f"captions [{', '.join(map(str, captions[:16]))}" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert [row["loss"] for row in read_csv(out / "steps.csv")][1] == "nan"


# --------------------------------------------------------------------------- write failures


def test_no_space_while_writing_a_checkpoint_is_named_and_keeps_the_run(
    finished_run, emoji48, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    real_open = open

    def full_disk(name, mode="r", *args, **kwargs):
        handle = real_open(name, mode, *args, **kwargs)
        if "x" in mode and ".last.pt." in str(name):
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle

    monkeypatch.setattr(atomic, "open", full_disk, raising=False)
    status = main(["train", "--data", str(emoji48), "--out", str(out), "--resume",
                   "--set", "epochs=2"])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert err == (
        f"rvsepp: error: cannot write {out / 'last.pt'}: no space left on the device; free "
        "some space or write to another folder\n"
    )
    assert snapshot(out)["last.pt"] == before["last.pt"]
    assert not [p for p in out.iterdir() if atomic.is_temporary(p.name)]


TRAIN_UNDER_FILE_SIZE_LIMIT = """
import resource, signal, sys
from rvsepp.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_write_failure_in_training_is_one_line_naming_the_file(emoji48, tmp_path):
    """The kernel refuses to grow a file past 1 MiB (a real failing write, as on a full
    disk): the 1.1 MB checkpoint cannot be written, the error names it and the cause, and
    the logs of the steps taken are kept."""
    config_file = tmp_path / "tiny.json"
    config_file.write_text(tiny(max_steps=2, embed_dim=128).to_json())
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-c", TRAIN_UNDER_FILE_SIZE_LIMIT, "train", "--data", str(emoji48),
        "--out", str(out), "--config", str(config_file),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"rvsepp: error: cannot write {out / 'last.pt'}: the file is larger than this system "
        "allows (file size limit); free some space or write to another folder\n"
    )
    assert [int(row["step"]) for row in read_csv(out / "steps.csv")] == [1, 2]
    assert not (out / "last.pt").exists()
    assert not [p for p in out.iterdir() if atomic.is_temporary(p.name)]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_folder_is_named_and_nothing_is_left(emoji48, tmp_path, code):
    """The output folder refuses the first file (read-only, or not ours: simulated, since
    root ignores permission bits): the error names the file, and the run leaves nothing."""
    real_open = open

    def refuse(name, mode="r", *args, **kwargs):
        if "x" in mode:
            raise OSError(code, os.strerror(code), str(name))
        return real_open(name, mode, *args, **kwargs)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic, "open", refuse, raising=False)
        with pytest.raises(atomic.WriteError, match=f"cannot write {out / 'config.json'}: "):
            train(tiny(), emoji48, out)
    assert not out.exists()


def test_a_run_interrupted_after_its_first_steps_keeps_its_folder(emoji48, tmp_path, monkeypatch):
    """Interrupted at step 3 (Ctrl-C): the steps taken stay in the folder's logs."""
    import rvsepp.train as train_module

    real_step = train_module._train_step

    def interrupted(run, batch, loss_fn):
        if run.progress.step == 2:
            raise KeyboardInterrupt
        return real_step(run, batch, loss_fn)

    monkeypatch.setattr(train_module, "_train_step", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), emoji48, out)
    assert [int(row["step"]) for row in read_csv(out / "steps.csv")] == [1, 2]
    assert (out / "config.json").is_file()
