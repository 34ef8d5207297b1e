"""Training configuration: one dataclass holding every recipe choice, stored as JSON.

The defaults are the RVSE++ / VSE-infinity recipe (BUTD regions + BiGRU): AdamW at
5e-4, 30 epochs with the learning rate x0.1 after epoch 15, batch 128 (drop_last),
gradient-norm clip 2.0, margin 0.2, eps 0.01, 1024-d embeddings, region dropout 0.2 and
the token augmentation rates of the official code. No default depends on ``loss_mode``, so
runs that differ only in the mode are comparable.

The released code's implementation details are the fields of :data:`OFFICIAL_PROFILE`
(NLTK tokenization, SCAN's vocabulary, BatchNorm statistics over padded regions, model
selection on the first 5,000 dev captions with numpy's argsort ranks, summed baseline
losses, the released caption augmentation); the F30K and COCO presets set all of them. The
defaults keep this trainer's own choices, so configurations and checkpoints written before
these fields existed still mean what they meant.

JSON files hold the fields by name; keys starting with ``_`` are comments (for example
``"_expected"`` with the reference numbers a preset should approach) and are ignored;
any other unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

LOSS_MODES = ("selhn", "hardest", "all", "sum_hinges", "warmup")
BASELINE_MODES = ("hardest", "sum_hinges")  # VSE++ and VSE0 (VSE-infinity's warm-up)
REDUCTIONS = ("mean", "sum")
TEXT_ENCODERS = ("bigru", "minilm")
TOKENIZERS = ("nltk", "regex")  # rvsepp.text
VOCAB_BUILDS = ("train", "scan")
TOKEN_AUGMENT_RULES = ("words", "released")  # rvsepp.data.TokenAugmentation
IMAGE_BN_STATS = ("valid", "padded")  # rvsepp.model.ImageEncoder
IMAGE_MLPS = ("residual", "parallel")
RANK_RULES = ("pessimistic", "argsort")  # rvsepp.evaluate
BACKENDS = ("auto", "reference", "chunked", "cpu", "triton", "cuda")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message says which and why."""


@dataclass
class TrainConfig:
    # Optimisation (AdamW; weight decay is PyTorch's AdamW default).
    lr: float = 5e-4
    weight_decay: float = 0.01
    epochs: int = 30
    lr_decay_epoch: int = 15  # epochs at ``lr`` before lr * factor (0: never decay)
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0  # max global gradient norm; 0 disables clipping
    batch_size: int = 128  # pairs per optimizer step per process
    drop_last: bool = True

    # Loss (selhn_ext.selhn_loss).
    loss_mode: str = "selhn"  # selhn | hardest | all | sum_hinges | warmup
    warmup_epochs: int = 1  # loss_mode "warmup": epochs of "sum_hinges" before "hardest"
    loss_reduction: str = "mean"  # reduction of modes selhn and all (RVSE++: mean)
    # Reduction of the baselines hardest and sum_hinges (so also both phases of warmup):
    # VSE++ and VSE-infinity sum over the batch. With "sum" the gradient is 2B times that
    # of "mean", so the 2.0 clip cuts nearly every step (see README).
    baseline_reduction: str = "mean"
    margin: float = 0.2
    eps: float = 0.01
    backend: str = "auto"
    mask_same_image: bool = False  # pass the image index as ids: same-image pairs are not negatives

    # Model.
    embed_dim: int = 1024
    text_encoder: str = "bigru"  # bigru | minilm
    word_dim: int = 300  # BiGRU word embedding size
    tokenizer: str = "regex"  # BiGRU captions -> words: nltk (the released code) | regex
    vocab_path: str | None = None  # a SCAN vocabulary JSON (ids kept); None: vocab_build
    # Without vocab_path: "train" = every word of the training captions, by count; "scan" =
    # SCAN's rule (train + dev captions, words seen >= 4 times, first-seen order).
    vocab_build: str = "train"
    minilm_finetune: bool = False  # False: frozen MiniLM with cached token states
    minilm_lr_scale: float = 0.1  # learning-rate factor of the MiniLM transformer when fine-tuned
    freeze_batchnorm: bool = False  # keep BatchNorm layers in eval mode while training
    # Image MLP BatchNorm batch statistics: over the "valid" regions only, or over the
    # zero-"padded" batch tensor as the released code computes them (eval mode: the same).
    image_bn_stats: str = "valid"
    # "residual": h = fc(x) + MLP(fc(x)) (RVSE++); "parallel": fc(x) + MLP(x) (VSE-infinity).
    image_mlp: str = "residual"
    gpo_pe_dim: int = 32
    gpo_hidden: int = 32

    # Augmentation (training only).
    augment: bool = True
    region_dropout: float = 0.2  # each region dropped with this probability
    token_select_prob: float = 0.2  # each caption token selected with this probability ...
    token_mask_prob: float = 0.5  # ... then masked,
    token_replace_prob: float = 0.1  # replaced by a random token,
    token_delete_prob: float = 0.4  # or deleted
    # BiGRU: "words" keeps <start>/<end> and replaces with ordinary words; "released" (the
    # released code) augments every position and replaces with any vocabulary id.
    token_augment_rule: str = "words"

    # Gradient-cached encoding: encode at most ``chunk_size`` pairs at once (0: the whole
    # batch in one pass). The loss always sees the whole batch.
    chunk_size: int = 0

    # Data and evaluation.
    captions_per_image: int = 5
    num_workers: int = 0
    token_cache_dir: str | None = None  # frozen MiniLM token states (None: see train.py)
    eval_batch_size: int = 256
    dev_split: str = "dev"
    dev_captions: int = 0  # select the best epoch on the first N dev captions (0: all)
    # Ranks for model selection: "pessimistic" (ties count against the query) or "argsort"
    # (the position in numpy's descending argsort, as the released evaluation computes it).
    rank_rule: str = "pessimistic"

    # Run control.
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    sync_bn: bool = False  # distributed CUDA runs: BatchNorm -> SyncBatchNorm
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    progress: bool = True  # tqdm progress bars
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _choice("loss_mode", self.loss_mode, LOSS_MODES)
        _choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        _choice("backend", self.backend, BACKENDS)
        _choice("device", self.device, DEVICES)
        _choice("loss_reduction", self.loss_reduction, REDUCTIONS)
        _choice("baseline_reduction", self.baseline_reduction, REDUCTIONS)
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        _choice("vocab_build", self.vocab_build, VOCAB_BUILDS)
        _choice("token_augment_rule", self.token_augment_rule, TOKEN_AUGMENT_RULES)
        _choice("image_bn_stats", self.image_bn_stats, IMAGE_BN_STATS)
        _choice("image_mlp", self.image_mlp, IMAGE_MLPS)
        _choice("rank_rule", self.rank_rule, RANK_RULES)
        for name in ("lr", "margin", "eps", "weight_decay", "grad_clip", "minilm_lr_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay_factor <= 1:
            raise ConfigError(f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")
        for name in ("region_dropout", "token_select_prob", "token_mask_prob",
                     "token_replace_prob", "token_delete_prob"):  # fmt: skip
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value}")
        if self.region_dropout >= 1:
            raise ConfigError("region_dropout must be < 1 (every image keeps a region)")
        split = self.token_mask_prob + self.token_replace_prob + self.token_delete_prob
        if abs(split - 1.0) > 1e-6:
            raise ConfigError(
                "token_mask_prob + token_replace_prob + token_delete_prob must sum to 1, "
                f"got {split:g}"
            )
        for name in ("epochs", "batch_size", "embed_dim", "word_dim", "captions_per_image",
                     "eval_batch_size", "gpo_pe_dim", "gpo_hidden"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (the loss needs negatives), got 1")
        for name in ("lr_decay_epoch", "warmup_epochs", "chunk_size", "num_workers",
                     "max_steps", "dev_captions"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def mode_for_epoch(self, epoch: int) -> str:
        """The loss mode of 0-based ``epoch`` ("warmup": sum_hinges, then hardest)."""
        if self.loss_mode == "warmup":
            return "sum_hinges" if epoch < self.warmup_epochs else "hardest"
        return self.loss_mode

    def reduction_for_mode(self, mode: str) -> str:
        """The loss reduction of loss mode ``mode`` (one epoch's mode, never "warmup")."""
        return self.baseline_reduction if mode in BASELINE_MODES else self.loss_reduction

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated; unknown names rejected)."""
        unknown = sorted(set(changes) - field_names())
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return to_json(self)


# The released RVSE++ / VSE-infinity / SCAN code's choices where this trainer's defaults
# differ; the F30K and COCO presets set every one (tests/test_config.py checks that).
OFFICIAL_PROFILE: dict[str, Any] = {
    "tokenizer": "nltk",  # nltk.word_tokenize(caption.lower())
    "vocab_build": "scan",  # used only without vocab_path (pass SCAN's file with --vocab)
    "token_augment_rule": "released",
    "image_bn_stats": "padded",
    "loss_reduction": "mean",  # RVSE++'s TripletSelHNLoss
    "baseline_reduction": "sum",  # VSE++ ContrastiveLoss and VSE-infinity's warm-up
    "dev_captions": 5000,  # the released PrecompRegionDataset cuts dev to 5,000 captions
    "rank_rule": "argsort",
}


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


_TYPES = {"float": (float, int), "int": (int,), "bool": (bool,), "str": (str,)}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None")
    base = text.removesuffix("|None")
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must be a {base}, got null")
    allowed = _TYPES[base]
    # bool is an int in Python; a JSON true is not a valid epoch count or learning rate.
    if isinstance(value, bool) and base != "bool":
        raise ConfigError(f"{name} must be a {base}, got {value!r}")
    if not isinstance(value, allowed):
        raise ConfigError(f"{name} must be a {base}, got {type(value).__name__} {value!r}")


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a config from a mapping; ``_``-prefixed keys are comments and ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key(s) {unknown}; known keys: {sorted(field_names())} "
            "(prefix a key with '_' to keep it as a comment)"
        )
    try:
        config = TrainConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    # JSON has one number type: keep floats as floats (5e-4 written as 0 would be an int).
    for f in fields(config):
        if str(f.type).startswith("float") and isinstance(getattr(config, f.name), int):
            setattr(config, f.name, float(getattr(config, f.name)))
    return config


def load_config(path: str | Path) -> TrainConfig:
    """Read a JSON config file, or a shipped preset by name (``f30k_bigru``) when no such
    file exists; unknown keys raise :class:`ConfigError` naming the file."""
    path = Path(path)
    shipped = PRESETS_DIR / f"{path.name.removesuffix('.json')}.json"
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        path = shipped
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return config_from_dict(data, source=str(path))


def to_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n"


def save_config(config: TrainConfig, path: str | Path) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, to_json(config).encode("utf-8"))


PRESETS_DIR = Path(__file__).parent / "configs"


def preset_path(name: str) -> Path:
    """The path of a shipped preset (``f30k_bigru``, ``coco_bigru``, ``emoji_demo``)."""
    path = PRESETS_DIR / f"{name.removesuffix('.json')}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise ConfigError(f"no preset named {name!r}; shipped presets: {known}")
    return path
