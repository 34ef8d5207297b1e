"""Checkpoints: what a run saves after every epoch, written atomically, read back checked.

A checkpoint is a ``torch.save`` dict of tensors, numbers and strings only (so
``torch.load(weights_only=True)`` reads it): the configuration, model, optimizer and
scheduler states, every random generator's state, the run's progress and id, the
vocabulary and the feature dimension, and ``checksum``: the sha256 of all of that
(:func:`content_digest`), so that a byte changed anywhere after the write (a failing disk,
a bad copy) is found when the file is loaded, by resume, eval and the demo alike.

Loading says what a file is when it is not a checkpoint (empty, truncated, not a zip
archive, a text file, a bare state dict, a newer format) and names the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_bytes
from .config import TrainConfig

# 2: with a content checksum. Format 1 (before checksums) is still read, unverified.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# What every checkpoint holds (resume also needs the optimizer, scheduler and rng states).
REQUIRED_KEYS = ("config", "model", "progress", "vocab", "feature_dim")


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names it and says what it is."""


def _serialize(payload: Mapping[str, Any], handle: Any) -> None:
    torch.save(payload, handle)


def save_checkpoint(payload: Mapping[str, Any], *paths: str | os.PathLike) -> None:
    """Write ``payload`` with its checksum to each of ``paths`` in turn, so that each is
    always the old or the complete new file.

    Serialized once, in memory, so a failing disk shows up as an ``OSError`` of our own
    write (a :class:`~rvsepp.atomic.WriteError` naming the path and the cause), not as an
    error deep inside torch's zip writer; then written atomically.
    """
    payload = {key: value for key, value in payload.items() if key != "checksum"}
    payload["format"] = CHECKPOINT_FORMAT
    payload["checksum"] = {"sha256": content_digest(payload)}
    buffer = io.BytesIO()
    _serialize(payload, buffer)
    for path in paths:
        atomic_write_bytes(path, buffer.getbuffer())


def content_digest(payload: Mapping[str, Any]) -> str:
    """sha256 of everything in ``payload`` but its ``checksum``: the structure, every key,
    number and string, and every tensor's dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != "checksum"})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)}|".encode() + encoded)
    elif isinstance(value, bool) or value is None:
        digest.update(f"{value}|".encode())
    elif isinstance(value, int):
        digest.update(f"I{value}|".encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex()}|".encode())
    else:
        digest.update(f"R{type(value).__qualname__}:{value!r}|".encode())


def rng_states(device: torch.device) -> dict[str, Any]:
    """The global generators' states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and verify its checksum."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (last.pt or best.pt)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which
        raise CheckpointError(f"{path}: {describe_unreadable(path, error)}") from None
    return check_contents(checkpoint, path)


def check_contents(checkpoint: Any, path: Any) -> dict[str, Any]:
    """``checkpoint`` (as loaded from ``path``) if it is a whole rvsepp checkpoint whose
    checksum matches; else :class:`CheckpointError` saying what the file holds."""
    problem = _problem_with_contents(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return checkpoint


def _problem_with_contents(checkpoint: Any) -> str | None:
    """None for a whole rvsepp checkpoint, else what the loaded object is instead."""
    if not isinstance(checkpoint, Mapping):
        return (
            f"a PyTorch file holding a {type(checkpoint).__name__}, not an rvsepp checkpoint "
            "(the dict that rvsepp train writes as last.pt and best.pt)"
        )
    if "format" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return (
                f"a bare state dict of {len(checkpoint)} tensors (a model's weights alone), not "
                "an rvsepp checkpoint: it lacks the run's configuration, vocabulary and progress"
            )
        keys = ", ".join(repr(key) for key in list(checkpoint)[:6])
        return f"a dict with keys {keys}, not an rvsepp checkpoint (no 'format' entry)"
    version = checkpoint["format"]
    if version not in READABLE_FORMATS:
        return (
            f"checkpoint format {version!r}, which this version of rvsepp cannot read (it "
            f"reads formats {', '.join(map(str, READABLE_FORMATS))}); a newer rvsepp wrote it?"
        )
    recorded = checkpoint.get("checksum")
    if recorded is not None or version >= 2:
        expected = recorded.get("sha256") if isinstance(recorded, Mapping) else None
        if expected is None:
            return (
                f"an rvsepp checkpoint of format {version} that has no checksum, which every "
                "such checkpoint carries: damaged, or not written by rvsepp train"
            )
        actual = content_digest(checkpoint)
        if expected != actual:
            return (
                f"its contents do not match the checksum written with it (sha256 "
                f"{str(expected)[:16]}..., now {actual[:16]}...): the file was damaged or "
                "changed after it was written; use another checkpoint of the run or train again"
            )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return f"an rvsepp checkpoint without {', '.join(missing)}: damaged or incomplete"
    return None


def describe_unreadable(path: Path, error: BaseException) -> str:
    """What ``path`` is, given that ``torch.load`` failed on it with ``error``."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes), not a checkpoint (a write cut short by a crash?)"
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head.startswith(b"PK\x03\x04"):
        return f"not a PyTorch checkpoint, which is a zip archive: {_file_kind(head)}"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as zip_error:
        return (
            f"a damaged or truncated zip archive ({size} bytes: {zip_error}); the file was cut "
            "short or overwritten"
        )
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:4])
        return f"a zip archive without PyTorch's data.pkl ({shown}), not a PyTorch checkpoint"
    if damaged is not None:
        return f"damaged: {damaged} inside it fails its CRC check (a disk or copy error?)"
    if isinstance(error, pickle.UnpicklingError):
        return (
            "a PyTorch file holding Python objects that a checkpoint never holds (refused: "
            "loading them could run code)"
        )
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"an unreadable PyTorch file ({first_line})"


def _file_kind(head: bytes) -> str:
    """A few words on what a file that starts with ``head`` is."""
    kinds = (
        (b"\x93NUMPY", "a NumPy .npy array"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"%PDF", "a PDF document"),
        (b"\x1f\x8b", "a gzip-compressed file"),
        (b"\x7fELF", "a program (ELF executable)"),
    )
    for magic, kind in kinds:
        if head.startswith(magic):
            return kind
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle (torch.save's format before PyTorch 1.6, or another program's file)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(char.isprintable() or char in "\t\r\n" for char in text):
        return f"a text file (it starts with {text[:40]!r})"
    return f"a file that starts with the bytes {head[:8].hex(' ')}"


# Fields that change what a resumed run computes; the rest (epochs, max_steps, progress,
# num_workers, ...) may differ between the first run and its continuation.
_RESUME_MUST_MATCH = (
    "lr", "weight_decay", "lr_decay_epoch", "lr_decay_factor", "grad_clip", "batch_size",
    "drop_last", "loss_mode", "warmup_epochs", "margin", "eps", "mask_same_image",
    "embed_dim", "text_encoder", "word_dim", "minilm_finetune", "minilm_lr_scale",
    "gpo_pe_dim", "gpo_hidden", "freeze_batchnorm", "augment", "region_dropout",
    "token_select_prob", "token_mask_prob", "token_replace_prob", "token_delete_prob", "seed",
    "captions_per_image", "chunk_size", "loss_reduction", "baseline_reduction", "tokenizer",
    "vocab_build", "image_bn_stats", "image_mlp", "token_augment_rule", "dev_captions",
    "rank_rule",
)  # fmt: skip


def check_resume_config(config: TrainConfig, checkpoint: Mapping[str, Any], path: Any) -> None:
    # A field missing from an older checkpoint had its default's meaning.
    saved = {**TrainConfig().to_dict(), **checkpoint["config"]}
    differing = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if differing:
        raise ValueError(
            f"cannot resume from {path}: the configuration differs in " + "; ".join(differing)
        )


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], device: Any = "cpu", source: Any = "checkpoint"
) -> tuple[nn.Module, Any]:
    """The model of a checkpoint (weights loaded, eval mode) and its vocabulary (or None).
    ``source`` names the checkpoint in errors."""
    from .build import build_vocabulary
    from .config import config_from_dict
    from .model import build_model

    config = config_from_dict(checkpoint["config"], source=f"{source}: its config")
    vocab = build_vocabulary(config, None, checkpoint["vocab"])
    model = build_model(
        config, len(vocab) if vocab is not None else None, device,
        feature_dim=int(checkpoint["feature_dim"]), vocab=vocab,
    )  # fmt: skip
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"{source}: its weights do not fit the model its configuration describes ({detail})"
        ) from None
    model.eval()
    return model, vocab
