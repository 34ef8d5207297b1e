"""The one atomic-write helper: whole files or none, stale temporaries removed, and write
failures (no space, permission, read-only, file size limit, a file in the way) named."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rvsepp import atomic
from rvsepp.atomic import (
    WriteError,
    atomic_write,
    atomic_write_bytes,
    ensure_folder,
    is_temporary,
    remove_stale_temporaries,
)

REPO = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_a_failing_writer_keeps_the_old_file_and_its_error(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def half_then_crash(handle):
        handle.write(b"new but torn")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_no_space_is_named_with_path_and_cause(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, b"old")

    def fills_the_disk(handle):
        handle.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as info:
        atomic_write(path, fills_the_disk)
    assert str(info.value) == (
        f"cannot write {path}: no space left on the device; free some space or write to "
        "another folder"
    )
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.EACCES, "permission denied; choose a folder you can write to"),
        (errno.EROFS, "the file system is read-only; choose a folder you can write to"),
        (errno.EDQUOT, "the disk quota is exceeded; free some space"),
        (errno.EIO, "an input/output error"),
    ],
)
def test_a_refused_temporary_is_named(tmp_path, monkeypatch, code, cause):
    """open() of the temporary fails as on a read-only or foreign folder (also as root,
    whom permission bits do not stop)."""

    def refuse(name, mode="r", *args, **kwargs):
        raise OSError(code, os.strerror(code), str(name))

    monkeypatch.setattr(atomic, "open", refuse, raising=False)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'a.json'}: {cause}"):
        atomic_write_bytes(tmp_path / "a.json", b"{}")


FILE_SIZE_LIMIT = """
import resource, signal, sys
from rvsepp.atomic import WriteError, atomic_write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    atomic_write_bytes(sys.argv[1], b"x" * 100_000)
except WriteError as error:
    print(error)
"""


def test_a_real_kernel_write_failure_is_named(tmp_path):
    """The kernel refuses the write (a file size limit, EFBIG): the real error path."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"cannot write {path}: the file is larger than this system allows (file size limit); "
        "free some space or write to another folder"
    )
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_a_file_in_the_way_of_a_folder(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(WriteError, match="runs: it exists and is a file, not a folder"):
        ensure_folder(tmp_path / "runs")
    with pytest.raises(WriteError, match="runs: it exists and is a file, not a folder"):
        atomic_write_bytes(tmp_path / "runs" / "config.json", b"{}")
    with pytest.raises(WriteError, match="a part of the path is a file, not a folder"):
        ensure_folder(tmp_path / "runs" / "deeper" / "still")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = dead_pid()
    stale = [
        tmp_path / f".last.pt.{dead}-0a1b2c.tmp",
        tmp_path / f".best.pt.{dead}.tmp",  # the name earlier versions used
        tmp_path / f"train_ims.npy.tmp-{dead}",  # and extract-features' earlier name
    ]
    live = tmp_path / f".last.pt.{os.getppid()}-0a1b2c.tmp"  # a process that runs
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", live]
    for path in stale + keep:
        path.write_bytes(b"x")
    assert all(is_temporary(p.name) for p in stale) and not is_temporary("notes.tmp")
    assert sorted(remove_stale_temporaries(tmp_path, {"best.pt"})) == [stale[1]]
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale[0], stale[2]])
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_a_write_removes_its_targets_stale_temporary(tmp_path):
    stale = tmp_path / f".cache.npz.{dead_pid()}-abcdef.tmp"
    stale.write_bytes(b"torn")
    atomic_write_bytes(tmp_path / "cache.npz", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]
