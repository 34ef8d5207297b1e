"""From a :class:`~rvsepp.precomp.PrecompSplit` to model batches.

* :class:`Vocabulary` and the tokenizers live in :mod:`rvsepp.text` (re-exported here).
* The recipe's training augmentations, each drawing from an explicit
  ``numpy.random.Generator``: :func:`drop_regions` and :func:`augment_tokens`.
* Text sides, one per split, which turn caption ``i`` into model input and collate it:
  :class:`BiGRUText` (word ids), :class:`WordPieceText` (MiniLM fine-tuning) and
  :class:`CachedStatesText` (frozen MiniLM token states from :func:`cache_token_states`).
* :class:`ImageCaptionDataset`: one item per caption, and :func:`collate`.

Randomness: in training each item draws from ``numpy.random.default_rng((seed, epoch,
index))``, so an epoch's augmentations are the same whatever the number of loader workers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .atomic import atomic_write_bytes
from .config import TOKEN_AUGMENT_RULES
from .text import (  # noqa: F401 (re-exported: the text pipeline's public names)
    MASK,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    EmptyCaptionError,
    Vocabulary,
    VocabularyError,
    tokenize,
    tokenize_all,
)

# --------------------------------------------------------------------------- augmentation


def drop_regions(regions: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
    """Drop each region (row) with probability ``p``, keeping at least one, in order.

    When every region is dropped one uniformly chosen region stays, so an image is never
    empty (with 36 regions and p = 0.2 that happens with probability 0.2**36).
    """
    if not 0 <= p < 1:
        raise ValueError(f"the region drop probability must be in [0, 1), got {p}")
    count = regions.shape[0]
    keep = rng.random(count) >= p
    if not keep.any():
        keep[rng.integers(count)] = True
    return regions[keep]


@dataclass(frozen=True)
class TokenAugmentation:
    """Each token is selected with ``select``; a selected token is masked (``mask``),
    replaced by a random token (``replace``) or deleted (``delete``); the three sum to 1.

    ``rule`` says which positions and replacements: "words" leaves the boundary tokens
    (``<start>``/``<end>``, [CLS]/[SEP]) alone and replaces with ordinary words only;
    "released" is the released BiGRU code's ``process_caption``: every position, the
    boundary tokens included, and replacements drawn from every id of the vocabulary.
    """

    select: float = 0.2
    mask: float = 0.5
    replace: float = 0.1
    delete: float = 0.4
    rule: str = "words"

    def __post_init__(self) -> None:
        if self.rule not in TOKEN_AUGMENT_RULES:
            raise ValueError(f"token augmentation rule must be one of {TOKEN_AUGMENT_RULES}")
        for name in ("select", "mask", "replace", "delete"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"token augmentation {name} must be in [0, 1], got {value}")
        if abs(self.mask + self.replace + self.delete - 1) > 1e-6:
            raise ValueError("token augmentation mask + replace + delete must sum to 1")


RECIPE_AUGMENTATION = TokenAugmentation()  # the RVSE++ / VSE-infinity rates


def augment_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    replacement_ids: np.ndarray,
    augmentation: TokenAugmentation = RECIPE_AUGMENTATION,
    keep_ends: bool = True,
) -> np.ndarray:
    """The recipe's token augmentation of one caption's ids (returns a new int64 array).

    With ``keep_ends`` the first and last ids (``<start>``/``<end>`` or [CLS]/[SEP]) are
    never touched, so a caption always keeps its boundary markers (the authors' BiGRU code
    also augments those: ``keep_ends=False``). Random replacements are drawn uniformly from
    ``replacement_ids``. A caption whose every token was deleted (possible only without
    ``keep_ends``; the authors' code would then fail on a zero-length caption) is returned
    unaugmented.
    """
    ids = np.asarray(ids, dtype=np.int64)
    first, stop = (1, len(ids) - 1) if keep_ends else (0, len(ids))
    count = max(stop - first, 0)
    draw = rng.random(count)
    selected = draw < augmentation.select
    # Reuse the draw: given selection it is uniform on [0, select), like the authors' code.
    action = np.where(selected, draw / max(augmentation.select, 1e-12), 1.0)
    masked = selected & (action < augmentation.mask)
    replaced = selected & ~masked & (action < augmentation.mask + augmentation.replace)
    deleted = selected & ~masked & ~replaced
    middle = ids[first:stop].copy()
    middle[masked] = mask_id
    if replaced.any():
        if len(replacement_ids) == 0:
            raise ValueError("augment_tokens has no replacement ids to draw from")
        middle[replaced] = replacement_ids[rng.integers(len(replacement_ids), size=replaced.sum())]
    augmented = np.concatenate([ids[:first], middle[~deleted], ids[stop:]])
    return augmented if len(augmented) else ids.copy()


# --------------------------------------------------------------------------- text sides


class TextSide(Protocol):
    """The text of one split: caption ``i`` as model input, and a batch of those."""

    def __len__(self) -> int: ...

    def item(self, index: int, rng: np.random.Generator | None) -> Any:
        """Caption ``index``; augmented when ``rng`` is given (training)."""

    def collate(self, items: Sequence[Any]) -> dict[str, Tensor]:
        """The ``text`` dict of a batch (what ``RVSEPP.encode_texts`` takes)."""


def _pad_ids(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    padded = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), pad_id,
                        dtype=torch.int64)  # fmt: skip
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.from_numpy(np.asarray(sequence, dtype=np.int64))
    return padded, lengths


class _TokenIdText:
    """A text side of token-id sequences, augmented per item when an RNG is given.

    Subclasses set ``ids`` (one int64 array per caption), ``augmentation``, ``mask_id``,
    ``replacement_ids`` (the tokens a replacement may draw from) and ``augment_ends``
    (whether the first and last token may be augmented too).
    """

    ids: list[np.ndarray]
    augmentation: TokenAugmentation | None
    mask_id: int
    replacement_ids: np.ndarray
    augment_ends: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        ids = self.ids[index]
        if rng is None or self.augmentation is None:
            return ids
        return augment_tokens(
            ids,
            rng,
            mask_id=self.mask_id,
            replacement_ids=self.replacement_ids,
            augmentation=self.augmentation,
            keep_ends=not self.augment_ends,
        )


class BiGRUText(_TokenIdText):
    """Word ids ``<start> words <end>`` for the BiGRU; batches hold ``tokens`` + ``lengths``.

    ``tokenizer`` names the caption tokenizer of :mod:`rvsepp.text` ("nltk", as the released
    code, or "regex").
    """

    def __init__(
        self,
        vocab: Vocabulary,
        captions: Sequence[str],
        augmentation: TokenAugmentation | None = RECIPE_AUGMENTATION,
        source: str | None = None,
        tokenizer: str = "regex",
    ) -> None:
        self.vocab = vocab
        self.augmentation = augmentation
        self.tokenizer = tokenizer
        tokenized = tokenize_all(captions, source, tokenizer)
        self.ids = [vocab.encode(tokens) for tokens in tokenized]
        self.mask_id = vocab.mask_id
        released = augmentation is not None and augmentation.rule == "released"
        # The released code augments <start>/<end> too and replaces with
        # random.randrange(len(vocab)): any id.
        self.augment_ends = released
        self.replacement_ids = np.arange(len(vocab), dtype=np.int64) if released else vocab.word_ids

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, Tensor]:
        tokens, lengths = _pad_ids(items, self.vocab.pad_id)
        return {"tokens": tokens, "lengths": lengths}


MAX_WORDPIECES = 128  # captions are far shorter; longer ones are truncated


def _wordpiece_word_ids(tokenizer: Any) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    return np.array(
        sorted(i for w, i in vocab.items() if i not in special and not w.startswith("[unused")),
        dtype=np.int64,
    )


class WordPieceText(_TokenIdText):
    """MiniLM WordPiece ids ([CLS] ... [SEP]) for fine-tuning; batches hold ``input_ids`` and
    ``attention_mask``. Augmentation works on WordPiece tokens, [CLS]/[SEP] kept."""

    def __init__(
        self,
        tokenizer: Any,
        captions: Sequence[str],
        augmentation: TokenAugmentation | None = RECIPE_AUGMENTATION,
        max_length: int = MAX_WORDPIECES,
        source: str | None = None,
    ) -> None:
        tokenize_all(captions, source)  # the same empty-caption check as the other sides
        self.tokenizer = tokenizer
        self.augmentation = augmentation
        encoded = tokenizer(list(captions), truncation=True, max_length=max_length)["input_ids"]
        self.ids = [np.asarray(ids, dtype=np.int64) for ids in encoded]
        self.word_ids = _wordpiece_word_ids(tokenizer)
        self.mask_id = tokenizer.mask_token_id
        self.replacement_ids = self.word_ids

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, Tensor]:
        input_ids, lengths = _pad_ids(items, self.tokenizer.pad_token_id)
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class TokenStateCache:
    """Frozen MiniLM last hidden states of a caption list, fp16, concatenated.

    Caption ``i``'s states are ``states[offsets[i]:offsets[i + 1]]`` ([CLS] ... [SEP]).
    """

    states: np.ndarray  # (total tokens, 384) float16
    lengths: np.ndarray  # (captions,) int64
    key: str

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.states[self.offsets[index] : self.offsets[index + 1]]


class CachedStatesText:
    """Frozen MiniLM: cached token states; batches hold ``token_states`` + ``lengths``.

    Cached states cannot be augmented (the recipe's token augmentation needs the
    transformer in the loop), so training uses the states unchanged.
    """

    def __init__(self, cache: TokenStateCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def item(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        return self.cache[index]

    def collate(self, items: Sequence[np.ndarray]) -> dict[str, Tensor]:
        lengths = torch.tensor([len(s) for s in items], dtype=torch.int64)
        width = items[0].shape[1] if items else 0
        states = torch.zeros(len(items), int(lengths.max()) if items else 0, width)
        for row, item in enumerate(items):
            states[row, : len(item)] = torch.from_numpy(np.asarray(item, dtype=np.float32))
        return {"token_states": states, "lengths": lengths}


# --------------------------------------------------------------------------- MiniLM cache


@lru_cache(maxsize=1)
def minilm_fingerprint() -> str:
    """sha256 of the packaged model's files: a cache made with other weights is stale."""
    from .model import minilm_path

    digest = hashlib.sha256()
    root = minilm_path()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def token_cache_key(captions: Sequence[str], max_length: int = MAX_WORDPIECES) -> str:
    """The key a token-state cache is stored under: the model files, captions and length."""
    digest = hashlib.sha256()
    digest.update(f"minilm {minilm_fingerprint()} max_length {max_length}\n".encode())
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\n")
    return digest.hexdigest()


def compute_token_states(
    captions: Sequence[str],
    transformer: torch.nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_length: int = MAX_WORDPIECES,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the frozen transformer over ``captions``: (states fp16 concatenated, lengths)."""
    transformer = transformer.to(device).eval()
    # Shortest first: less padding per batch. The results go back in caption order.
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    per_caption: list[np.ndarray] = [np.empty(0)] * len(captions)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = tokenizer(
                [captions[i] for i in rows],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            mask = encoded["attention_mask"].to(device)
            states = transformer(
                input_ids=encoded["input_ids"].to(device), attention_mask=mask
            ).last_hidden_state
            states = states.to(torch.float16).cpu().numpy()
            for row, caption_index in enumerate(rows):
                per_caption[caption_index] = states[row, : int(mask[row].sum())]
    lengths = np.asarray([len(states) for states in per_caption], dtype=np.int64)
    if not per_caption:
        return np.zeros((0, transformer.config.hidden_size), np.float16), lengths
    return np.concatenate(per_caption), lengths


def _read_cache(path: Path, key: str) -> TokenStateCache | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return TokenStateCache(stored["states"], stored["lengths"].astype(np.int64), key)
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing, partial or foreign: recompute


def cache_token_states(
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    transformer: torch.nn.Module | None = None,
    tokenizer: Any = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_length: int = MAX_WORDPIECES,
    source: str | None = None,
) -> TokenStateCache:
    """The frozen MiniLM token states of ``captions``, from ``path`` when it holds them.

    The file (an ``.npz``: ``states`` fp16, ``lengths``, ``key``) is keyed by a hash of the
    model files, ``max_length`` and the captions; a missing, unreadable or stale file is
    recomputed (loading the packaged model unless ``transformer``/``tokenizer`` are given)
    and replaced atomically.
    """
    tokenize_all(captions, source)
    path = Path(path)
    key = token_cache_key(captions, max_length)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    if transformer is None:
        from .model import MiniLMTextEncoder

        transformer = MiniLMTextEncoder.load_transformer()
    if tokenizer is None:
        from .model import load_minilm_tokenizer

        tokenizer = load_minilm_tokenizer()
    states, lengths = compute_token_states(
        captions, transformer, tokenizer, batch_size=batch_size, device=device,
        max_length=max_length,
    )  # fmt: skip
    with tempfile.SpooledTemporaryFile() as buffer:
        np.savez(buffer, states=states, lengths=lengths, key=np.array(key))
        buffer.seek(0)
        atomic_write_bytes(path, buffer.read())
    return TokenStateCache(states, lengths, key)


# --------------------------------------------------------------------------- dataset


def make_text_side(
    kind: str,
    captions: Sequence[str],
    *,
    vocab: Vocabulary | None = None,
    augmentation: TokenAugmentation | None = RECIPE_AUGMENTATION,
    finetune: bool = False,
    cache_path: str | os.PathLike | None = None,
    tokenizer: Any = None,
    transformer: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    source: str | None = None,
    word_tokenizer: str = "regex",
) -> TextSide:
    """The text side of a split for text encoder ``kind`` ("bigru" or "minilm").

    ``word_tokenizer`` ("nltk" or "regex") splits captions into words for the BiGRU;
    ``tokenizer`` is MiniLM's WordPiece tokenizer (loaded when needed). Frozen MiniLM states
    are read from / written to ``cache_path`` when given, otherwise computed in memory.
    """
    if kind == "bigru":
        if vocab is None:
            raise ValueError("the BiGRU text side needs a Vocabulary")
        return BiGRUText(vocab, captions, augmentation, source, word_tokenizer)
    if kind != "minilm":
        raise ValueError(f"unknown text encoder {kind!r}; expected 'bigru' or 'minilm'")
    if tokenizer is None and (finetune or cache_path is None):
        from .model import load_minilm_tokenizer

        tokenizer = load_minilm_tokenizer()
    if finetune:
        return WordPieceText(tokenizer, captions, augmentation, source=source)
    if cache_path is not None:  # loads the tokenizer and model only on a cache miss
        cache = cache_token_states(
            captions, cache_path, transformer=transformer, tokenizer=tokenizer, device=device,
            source=source,
        )  # fmt: skip
        return CachedStatesText(cache)
    if transformer is None:
        from .model import MiniLMTextEncoder

        transformer = MiniLMTextEncoder.load_transformer()
    tokenize_all(captions, source)
    states, lengths = compute_token_states(captions, transformer, tokenizer, device=device)
    return CachedStatesText(TokenStateCache(states, lengths, key=""))


class ImageCaptionDataset(Dataset):
    """One item per caption of a split: its image's regions and its text.

    In training (``train=True``) regions are dropped with ``region_drop`` and the text side
    augments its tokens; each item's generator is seeded from (seed, epoch, index), so call
    :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        split: Any,
        text: TextSide,
        train: bool,
        *,
        region_drop: float = 0.2,
        seed: int = 0,
    ) -> None:
        if len(text) != len(split.captions):
            raise ValueError(
                f"the text side has {len(text)} captions but the split has {len(split.captions)}"
            )
        if not 0 <= region_drop < 1:
            raise ValueError(f"region_drop must be in [0, 1), got {region_drop}")
        self.split = split
        self.text = text
        self.train = train
        self.region_drop = region_drop
        self.seed = seed
        self.epoch = 0
        self.img_index = np.asarray(split.img_index, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.img_index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_row = int(self.img_index[index])
        # A private copy: the split's features are a read-only memory map.
        regions = np.array(self.split.images[image_row], dtype=np.float32)
        rng = None
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if self.region_drop > 0:
                regions = drop_regions(regions, rng, self.region_drop)
        return {
            "regions": regions,
            "image_index": image_row,
            "caption_index": index,
            "text": self.text.item(index, rng),
        }

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.text)


def collate(items: Sequence[dict[str, Any]], text: TextSide) -> dict[str, Any]:
    """A batch: ``regions`` (B, K, F) zero-padded, ``region_lengths`` (B,), ``text`` (the
    text side's dict), ``image_index`` (B,) (the image row of each caption, usable as
    ``ids`` for the loss) and ``caption_index`` (B,)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(item["regions"]) for item in items], dtype=torch.int64)
    feature_dim = items[0]["regions"].shape[1]
    regions = torch.zeros(len(items), int(lengths.max()), feature_dim)
    for row, item in enumerate(items):
        regions[row, : len(item["regions"])] = torch.from_numpy(item["regions"])
    return {
        "regions": regions,
        "region_lengths": lengths,
        "text": text.collate([item["text"] for item in items]),
        "image_index": torch.tensor([item["image_index"] for item in items], dtype=torch.int64),
        "caption_index": torch.tensor([item["caption_index"] for item in items], dtype=torch.int64),
    }


def batch_to(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: batch_to(value, device, non_blocking) for key, value in batch.items()}
    return batch


def build_vocabulary(
    config: Any, train_split: Any, saved: Mapping[str, Any] | None = None
) -> Vocabulary | None:
    """The BiGRU vocabulary of a run (None for MiniLM): ``saved`` (a checkpoint's), else
    ``config.vocab_path`` (a SCAN JSON, ids kept), else built by ``config.vocab_build``:
    "train" from the training captions, "scan" by SCAN's rule from the training captions
    and those of the ``dev`` split in the same folder."""
    if config.text_encoder != "bigru":
        return None
    if saved is not None:
        return Vocabulary.from_dict(saved, source="checkpoint")
    if config.vocab_path:
        return Vocabulary.load(config.vocab_path)
    train = (train_split.captions, text_source(train_split))
    if config.vocab_build == "train":
        return Vocabulary.build(train[0], source=train[1], tokenizer=config.tokenizer)
    from .precomp import read_text_lines, split_files

    if getattr(train_split, "data_dir", None) is None:
        raise ValueError("vocab_build 'scan' reads the dev captions beside the training split")
    dev_path = split_files(train_split.data_dir, "dev").captions
    if not dev_path.is_file():
        raise FileNotFoundError(
            f"vocab_build 'scan' counts the train and dev captions, but {dev_path} does not "
            "exist; pass SCAN's vocabulary file (vocab_path) or use vocab_build 'train'"
        )
    dev = (read_text_lines(dev_path, what="caption"), str(dev_path))
    return Vocabulary.build_scan([train, dev], tokenizer=config.tokenizer)


def text_source(split: Any) -> str | None:
    """The captions file of a loaded split, for error messages (None if unknown)."""
    data_dir, name = getattr(split, "data_dir", None), getattr(split, "name", "")
    if data_dir is not None and name:
        return str(Path(data_dir) / f"{name}_caps.txt")
    return None
