"""Checkpoints of the released RVSE++ and VSE-infinity BiGRU code, loaded into this model.

The released trainers save ``{"epoch", "model", "best_rsum", "opt", "Eiters"}`` with
``model = [image_encoder.state_dict(), text_encoder.state_dict()]`` (``checkpoint.pth``,
``model_best.pth``). Their modules and ours differ only in names:

=============================  ==============================  =====================
released (image encoder)       ours (``image_encoder.``)       shape (BUTD, E = 1024)
=============================  ==============================  =====================
``fc.weight`` / ``.bias``       ``fc.weight`` / ``.bias``       (E, F) / (E,)
``mlp.layers.0.*``              ``mlp.0.*``                     (E/2, E or F) / (E/2,)
``mlp.bns.0.*``                 ``mlp.1.*`` (BatchNorm1d)       (E/2,)
``mlp.layers.1.*``              ``mlp.3.*``                     (E, E/2) / (E,)
``gpool.gru.*``                 ``gpo.gru.*``                   (96, 32) ...
``gpool.linear.weight``         ``gpo.score.weight``            (1, 32)
=============================  ==============================  =====================

The released ``MLP`` also builds a second BatchNorm (``mlp.bns.1.*``, E wide) that its
forward never applies; it is dropped. RVSE++ stacks the MLP on the projection (its first
layer is E -> E/2: ``image_mlp="residual"``); VSE-infinity runs it on the raw features
(F -> E/2: ``"parallel"``); the first layer's width tells which.

=============================  ==============================
released (text encoder)        ours (``text_encoder.``)
=============================  ==============================
``embed.weight``               ``embedding.weight`` (V, 300)
``rnn.*``                      ``gru.*`` (bidirectional GRU 300 -> E)
``gpool.gru.*``                ``gpo.gru.*``
``gpool.linear.weight``        ``gpo.score.weight``
=============================  ==============================

The word ids are those of SCAN's vocabulary file with ``<mask>`` appended, so loading needs
that file; the text pipeline is the released one (:data:`rvsepp.config.OFFICIAL_PROFILE`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

GRU_PARAMETERS = tuple(
    f"{kind}_{part}_l0{suffix}"
    for suffix in ("", "_reverse")
    for kind in ("weight", "bias")
    for part in ("ih", "hh")
)
BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
UNUSED_IMAGE_PREFIX = "mlp.bns.1."  # the released MLP's second BatchNorm, never applied


def _gpo_names(prefix: str) -> dict[str, str]:
    names = {f"gpool.gru.{p}": f"{prefix}gpo.gru.{p}" for p in GRU_PARAMETERS}
    names["gpool.linear.weight"] = f"{prefix}gpo.score.weight"
    return names


IMAGE_NAMES: dict[str, str] = {
    "fc.weight": "image_encoder.fc.weight",
    "fc.bias": "image_encoder.fc.bias",
    "mlp.layers.0.weight": "image_encoder.mlp.0.weight",
    "mlp.layers.0.bias": "image_encoder.mlp.0.bias",
    **{f"mlp.bns.0.{e}": f"image_encoder.mlp.1.{e}" for e in BATCHNORM_ENTRIES},
    "mlp.layers.1.weight": "image_encoder.mlp.3.weight",
    "mlp.layers.1.bias": "image_encoder.mlp.3.bias",
    **_gpo_names("image_encoder."),
}
TEXT_NAMES: dict[str, str] = {
    "embed.weight": "text_encoder.embedding.weight",
    **{f"rnn.{p}": f"text_encoder.gru.{p}" for p in GRU_PARAMETERS},
    **_gpo_names("text_encoder."),
}


class ReleasedCheckpointError(ValueError):
    """A file that is not a usable released checkpoint; the message says what is wrong."""


def is_released_checkpoint(payload: Any) -> bool:
    """Whether ``payload`` has the released trainers' layout (``model`` = two state dicts)."""
    if not isinstance(payload, Mapping):
        return False
    model = payload.get("model")
    return (
        isinstance(model, (list, tuple))
        and len(model) == 2
        and all(isinstance(part, Mapping) for part in model)
    )


def _strip_data_parallel(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key.removeprefix("module."): value for key, value in state.items()}


def _rename(state: Mapping[str, Any], names: Mapping[str, str], side: str) -> dict[str, Tensor]:
    state = _strip_data_parallel(state)
    unknown = sorted(
        key for key in state if key not in names and not key.startswith(UNUSED_IMAGE_PREFIX)
    )
    if unknown:
        raise ReleasedCheckpointError(
            f"the {side} encoder has parameters the released BiGRU models do not: {unknown[:5]}"
        )
    renamed = {}
    for released, ours in names.items():
        if released in state:
            renamed[ours] = state[released]
        elif released.endswith("num_batches_tracked"):
            renamed[ours] = torch.tensor(0)  # written by torch >= 0.4.1 only; unused in eval
        else:
            raise ReleasedCheckpointError(f"the {side} encoder lacks {released!r}")
    return renamed


@dataclass(frozen=True)
class ReleasedArchitecture:
    """The sizes a released checkpoint's tensors imply."""

    feature_dim: int
    embed_dim: int
    word_dim: int
    vocab_size: int
    gpo_pe_dim: int
    gpo_hidden: int
    image_mlp: str


def infer_architecture(
    image_state: Mapping[str, Tensor], text_state: Mapping[str, Tensor], image_mlp: str | None
) -> ReleasedArchitecture:
    """Sizes from the released tensors' shapes; ``image_mlp`` None: from the MLP's width."""
    image_state = _strip_data_parallel(image_state)
    text_state = _strip_data_parallel(text_state)
    try:
        embed_dim, feature_dim = image_state["fc.weight"].shape
        mlp_in = image_state["mlp.layers.0.weight"].shape[1]
        vocab_size, word_dim = text_state["embed.weight"].shape
        gate_rows, gpo_pe_dim = image_state["gpool.gru.weight_ih_l0"].shape
    except KeyError as error:
        raise ReleasedCheckpointError(f"not a released BiGRU checkpoint: no {error}") from None
    widths = {"residual": embed_dim, "parallel": feature_dim}
    if image_mlp is None:
        matches = [kind for kind, width in widths.items() if width == mlp_in]
        if len(matches) != 1:
            raise ReleasedCheckpointError(
                f"cannot tell the image MLP from its input width {mlp_in} (features "
                f"{feature_dim}, embedding {embed_dim}); pass image_mlp='residual' (RVSE++) "
                "or 'parallel' (VSE-infinity)"
            )
        image_mlp = matches[0]
    elif widths.get(image_mlp) != mlp_in:
        raise ReleasedCheckpointError(
            f"image_mlp {image_mlp!r} takes {widths.get(image_mlp)} inputs, the checkpoint's "
            f"MLP {mlp_in}"
        )
    return ReleasedArchitecture(
        feature_dim=int(feature_dim), embed_dim=int(embed_dim), word_dim=int(word_dim),
        vocab_size=int(vocab_size), gpo_pe_dim=int(gpo_pe_dim), gpo_hidden=int(gate_rows) // 3,
        image_mlp=image_mlp,
    )  # fmt: skip


def released_state_dict(
    image_state: Mapping[str, Tensor], text_state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The released image and text encoders' state dicts as one state dict of :class:`RVSEPP`."""
    return {**_rename(image_state, IMAGE_NAMES, "image"), **_rename(text_state, TEXT_NAMES, "text")}


def released_config(architecture: ReleasedArchitecture, vocab_path: str | None) -> Any:
    """A :class:`TrainConfig` of the released recipe with the checkpoint's sizes."""
    from .config import OFFICIAL_PROFILE, TrainConfig

    return TrainConfig(
        **OFFICIAL_PROFILE, text_encoder="bigru", embed_dim=architecture.embed_dim,
        word_dim=architecture.word_dim, gpo_pe_dim=architecture.gpo_pe_dim,
        gpo_hidden=architecture.gpo_hidden, image_mlp=architecture.image_mlp,
        vocab_path=vocab_path,
    )  # fmt: skip


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` without running pickled code: tensors, containers and the released
    trainers' ``argparse.Namespace`` of options only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which
        from .checkpoint import CheckpointError, describe_unreadable

        raise CheckpointError(f"{path}: {describe_unreadable(path, error)}") from None


@dataclass
class LoadedModel:
    """A model ready for evaluation and what the command line reports about it."""

    model: nn.Module
    vocab: Any
    config: Any
    feature_dim: int
    description: str


def load_released_model(
    payload: Mapping[str, Any],
    vocab_path: str | os.PathLike | None,
    device: Any = "cpu",
    *,
    image_mlp: str | None = None,
    source: str = "checkpoint",
) -> LoadedModel:
    """A released checkpoint's model (eval mode) with SCAN's vocabulary from ``vocab_path``."""
    from .model import build_model
    from .text import Vocabulary

    if not is_released_checkpoint(payload):
        raise ReleasedCheckpointError(f"{source}: not a released RVSE++ / VSE-infinity checkpoint")
    image_state, text_state = payload["model"]
    architecture = infer_architecture(image_state, text_state, image_mlp)
    if vocab_path is None:
        raise ReleasedCheckpointError(
            f"{source} is a released checkpoint: its word ids are those of SCAN's vocabulary "
            "file, so pass it (--vocab PATH/f30k_precomp_vocab.json or coco_precomp_vocab.json)"
        )
    vocab = Vocabulary.load(vocab_path)
    if len(vocab) != architecture.vocab_size:
        raise ReleasedCheckpointError(
            f"{source}: the word embedding has {architecture.vocab_size} rows, but {vocab_path} "
            f"gives {len(vocab)} words (with <mask> appended): not the vocabulary it was "
            "trained with"
        )
    config = released_config(architecture, str(vocab_path))
    model = build_model(config, len(vocab), "cpu", feature_dim=architecture.feature_dim,
                        vocab=vocab)  # fmt: skip
    model.load_state_dict(released_state_dict(image_state, text_state))
    model.eval()
    epoch = payload.get("epoch", "?")
    description = (
        f"released {'RVSE++' if architecture.image_mlp == 'residual' else 'VSE-infinity'} "
        f"checkpoint {source} (epoch {epoch}, best rsum {payload.get('best_rsum', '?')})"
    )
    return LoadedModel(model.to(device), vocab, config, architecture.feature_dim, description)


def load_for_eval(
    path: str | os.PathLike, device: Any = "cpu", vocab_path: str | os.PathLike | None = None
) -> LoadedModel:
    """An rvsepp checkpoint (``best.pt``, ``last.pt``) or a released one, ready to evaluate."""
    from .checkpoint import CheckpointError, check_contents, model_from_checkpoint
    from .config import config_from_dict

    payload = read_checkpoint_file(path)
    if is_released_checkpoint(payload):
        return load_released_model(payload, vocab_path, device, source=str(path))
    # An rvsepp checkpoint (its checksum verified), or an error saying what the file is.
    try:
        checkpoint = check_contents(payload, path)
    except CheckpointError as error:
        if isinstance(payload, Mapping) and "format" in payload:
            raise  # an rvsepp checkpoint, damaged or of another format: the error says so
        raise CheckpointError(
            f"{error}; it is neither an rvsepp checkpoint nor a released one (a dict whose "
            "'model' entry holds the image and the text encoders' state dicts)"
        ) from None
    if vocab_path is not None:
        raise ValueError(f"{path} is an rvsepp checkpoint with its vocabulary; drop --vocab")
    model, vocab = model_from_checkpoint(checkpoint, device, source=path)
    progress = checkpoint["progress"]
    return LoadedModel(
        model, vocab, config_from_dict(checkpoint["config"], source=str(path)),
        int(checkpoint["feature_dim"]),
        f"checkpoint {path} (epoch {progress['epoch']}, step {progress['step']})",
    )  # fmt: skip
