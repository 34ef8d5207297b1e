"""The output folder of a training run: never another run's files overwritten, never a
half-made folder left behind.

* A folder that holds a run (any of :data:`RUN_FILES`) is refused unless the run is
  continued from a checkpoint in that folder (``--resume OUT/last.pt``) or ``overwrite``
  is given; then the old run is moved aside whole, to ``OUT.replaced-<time>``, not
  truncated.
* ``--out`` naming a file, or a folder that cannot be created, is a clear error before
  anything is loaded or built.
* A run that fails before its first optimizer step removes what it created (the folder
  itself, if it made it) and puts back a run it moved aside.
* Temporaries left by an interrupted write of an earlier process are removed at start,
  before anything else is decided.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import WriteError, ensure_folder, remove_stale_temporaries, write_error

# The files and folders a training run writes; any of them marks a folder as holding a run.
RUN_FILES = (
    "config.json", "vocab.json", "steps.csv", "metrics.csv", "last.pt", "best.pt",
    "curves.png", "tensorboard",
)  # fmt: skip


class RunFolderError(ValueError):
    """The output folder cannot take this run; the message says why and what to do."""


@dataclass
class RunFolder:
    path: Path
    resume: Path | None = None  # the checkpoint the run continues from
    overwrite: bool = False
    created: bool = False  # this run made the folder
    moved_aside: Path | None = None  # where an overwritten run went
    existing: frozenset[str] = frozenset()  # entries present before this run wrote

    def run_files(self) -> list[str]:
        """The run files already in the folder."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def continues_its_run(self) -> bool:
        """Whether the run resumes from a checkpoint inside this folder."""
        if self.resume is None:
            return False
        return self.resume.resolve().parent == self.path.resolve()

    def check(self) -> None:
        """Before anything is built: refuse a folder this run may not write to."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(
                f"--out {path} is a file, not a folder; name a folder for the run's "
                "checkpoints and logs (it is created if missing)"
            )
        if path.is_dir():
            remove_stale_temporaries(path)  # of writes killed midway, whatever happens next
        found = self.run_files()
        if not found or self.overwrite or self.continues_its_run():
            return
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        if self.resume is not None:
            raise RunFolderError(
                f"{path} already holds another training run ({listed}); continuing the run "
                f"of {self.resume} there would overwrite it. Choose an empty --out folder, or "
                "pass --overwrite to move the run in it aside"
            )
        raise RunFolderError(
            f"{path} already holds a training run ({listed}); pass --resume to continue it "
            f"(from {path / 'last.pt'}), --overwrite to move it aside and start anew, or "
            "choose another --out folder"
        )

    def open(self) -> None:
        """Before the first write: move an overwritten run aside and create the folder."""
        if self.overwrite and self.run_files() and not self.continues_its_run():
            self.moved_aside = self._aside_path()
            try:
                os.rename(self.path.absolute(), self.moved_aside)
            except OSError as error:
                raise write_error(self.moved_aside, error) from None
            print(f"moved the earlier run in {self.path} aside, to {self.moved_aside}")
        self.created = not self.path.exists()
        ensure_folder(self.path)
        self.existing = frozenset(entry.name for entry in self.path.iterdir())

    def abandon(self) -> None:
        """The run failed before its first step: remove what it created and put back a
        run it moved aside. Never raises (the run's own error is the one to report)."""
        try:
            if self.created:
                shutil.rmtree(self.path)
            elif self.path.is_dir():
                for entry in self.path.iterdir():
                    if entry.name not in self.existing:
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
            if self.moved_aside is not None and not self.path.exists():
                os.rename(self.moved_aside, self.path)
                self.moved_aside = None
        except OSError as error:
            print(f"could not tidy {self.path} after the failure: {write_error(self.path, error)}")

    def _aside_path(self) -> Path:
        path = self.path.absolute()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidate = path.with_name(f"{path.name}.replaced-{stamp}")
        number = 1
        while candidate.exists():
            number += 1
            candidate = path.with_name(f"{path.name}.replaced-{stamp}-{number}")
        return candidate


__all__ = ["RUN_FILES", "RunFolder", "RunFolderError", "WriteError"]
