"""Checkpoints: what a run saves after every epoch, written atomically, read back checked.

A checkpoint is a ``torch.save`` dict of tensors, numbers and strings only (so
``torch.load(weights_only=True)`` reads it): the configuration, model, optimizer and
scheduler states, every random generator's state, the run's progress, the vocabulary and
the feature dimension.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_bytes
from .config import TrainConfig

CHECKPOINT_FORMAT = 1


def _serialize(payload: Mapping[str, Any], handle: Any) -> None:
    torch.save(payload, handle)


def atomic_save(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is always the old or the new file.

    Serialized in memory first, so a failing disk shows up as an ``OSError`` of our own
    write (a :class:`~rvsepp.atomic.WriteError` naming the path and the cause), not as an
    error deep inside torch's zip writer; then written atomically.
    """
    buffer = io.BytesIO()
    _serialize(payload, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


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
    """Read a checkpoint written by :func:`train` (tensors, numbers, strings only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable rvsepp checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rvsepp checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


# Fields that change what a resumed run computes; the rest (epochs, max_steps, progress,
# num_workers, ...) may differ between the first run and its continuation.
_RESUME_MUST_MATCH = (
    "lr", "weight_decay", "lr_decay_epoch", "lr_decay_factor", "grad_clip", "batch_size",
    "drop_last", "loss_mode", "warmup_epochs", "margin", "eps", "mask_same_image",
    "embed_dim", "text_encoder", "word_dim", "minilm_finetune", "minilm_lr_scale",
    "gpo_pe_dim", "gpo_hidden", "freeze_batchnorm", "augment", "region_dropout",
    "token_select_prob", "token_mask_prob", "token_replace_prob", "token_delete_prob", "seed",
    "captions_per_image", "chunk_size",
)  # fmt: skip


def check_resume_config(config: TrainConfig, checkpoint: Mapping[str, Any], path: Any) -> None:
    saved = checkpoint["config"]
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
    checkpoint: Mapping[str, Any], device: Any = "cpu"
) -> tuple[nn.Module, Any]:
    """The model of a checkpoint (weights loaded, eval mode) and its vocabulary (or None)."""
    from .build import build_vocabulary
    from .config import config_from_dict
    from .model import build_model

    config = config_from_dict(checkpoint["config"], source="checkpoint config")
    vocab = build_vocabulary(config, None, checkpoint["vocab"])
    model = build_model(
        config, len(vocab) if vocab is not None else None, device,
        feature_dim=int(checkpoint["feature_dim"]), vocab=vocab,
    )  # fmt: skip
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, vocab
