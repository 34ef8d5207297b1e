"""The official profile: the released code's choices as config fields, used by the F30K and
COCO presets, and what the trainer does with them (loss reductions per mode, best-epoch
selection on the first dev captions with argsort ranks, SCAN's vocabulary rule)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rvsepp.config import OFFICIAL_PROFILE, ConfigError, TrainConfig, load_config, preset_path
from rvsepp.evaluate import encode_split, first_captions, retrieval_metrics
from rvsepp.precomp import load_split
from rvsepp.train import load_checkpoint, make_loss_fn, model_from_checkpoint, read_csv, train

COLORS = ["red", "blue", "green", "black", "white", "brown"]
ANIMALS = ["dog", "cat", "horse", "bird"]


def write_split(folder, name: str, n_images: int, seed: int) -> None:
    """A SCAN-layout split: images whose features encode a colour and an animal, and five
    captions each naming them (with NLTK-sensitive punctuation)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(scale=0.3, size=(n_images, 6, 16)).astype(np.float32)
    captions = []
    for row in range(n_images):
        color, animal = rng.integers(len(COLORS)), rng.integers(len(ANIMALS))
        images[row, :, color] += 2.0
        images[row, :, 8 + animal] += 2.0
        for variant in range(5):
            captions.append(
                [f"A {COLORS[color]} {ANIMALS[animal]}.",
                 f"The {ANIMALS[animal]}'s fur is {COLORS[color]}!",
                 f"a {COLORS[color]} {ANIMALS[animal]} isn't moving",
                 f"{COLORS[color].title()} {ANIMALS[animal]}... resting",
                 f'"{ANIMALS[animal]}" in {COLORS[color]}'][variant]
            )  # fmt: skip
    np.save(folder / f"{name}_ims.npy", images)
    (folder / f"{name}_caps.txt").write_text("\n".join(captions) + "\n")


@pytest.fixture(autouse=True)
def one_thread():
    """Small GRUs run 20x slower with two threads than one on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def precomp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precomp")
    write_split(folder, "train", 48, seed=0)
    write_split(folder, "dev", 16, seed=1)
    return folder


def official_small(**changes) -> TrainConfig:
    config = TrainConfig(
        **OFFICIAL_PROFILE, epochs=2, batch_size=16, embed_dim=32, word_dim=16, gpo_pe_dim=8,
        gpo_hidden=8, eval_batch_size=64, progress=False, tensorboard=False, device="cpu",
        backend="reference",
    )  # fmt: skip
    return config.replace(**changes)


def test_presets_use_the_official_profile_and_defaults_keep_the_alternative():
    for name in ("f30k_bigru", "coco_bigru"):
        config = load_config(preset_path(name))
        assert config == TrainConfig(**OFFICIAL_PROFILE)
        assert load_config(name) == config  # a preset by name
        notes = json.loads(preset_path(name).read_text())["_notes"]
        assert "--vocab" in notes and "5,000 dev captions" in notes
    defaults = TrainConfig()
    changed = [k for k, v in OFFICIAL_PROFILE.items() if getattr(defaults, k) != v]
    assert sorted(changed) == sorted(set(OFFICIAL_PROFILE) - {"loss_reduction"})
    with pytest.raises(ConfigError, match="tokenizer must be one of"):
        TrainConfig(tokenizer="spacy")
    with pytest.raises(ConfigError, match="baseline_reduction must be one of"):
        TrainConfig(baseline_reduction="none")
    with pytest.raises(ConfigError, match="dev_captions must be >= 0"):
        TrainConfig(dev_captions=-1)


def test_loss_reductions_per_mode():
    official = TrainConfig(**OFFICIAL_PROFILE, loss_mode="warmup")
    assert [official.reduction_for_mode(official.mode_for_epoch(e)) for e in (0, 1)] == [
        "sum", "sum",
    ]  # fmt: skip
    assert official.reduction_for_mode("selhn") == official.reduction_for_mode("all") == "mean"
    assert TrainConfig().reduction_for_mode("hardest") == "mean"
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 5), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(8, 5), dim=1)
    for mode in ("hardest", "sum_hinges", "selhn"):
        summed, _ = make_loss_fn(official.replace(backend="reference"), mode, False)(img, txt, None)
        mean, _ = make_loss_fn(TrainConfig(backend="reference"), mode, False)(img, txt, None)
        factor = 1 if mode == "selhn" else 2 * 8  # sum over the 2B anchors vs their mean
        torch.testing.assert_close(summed, mean * factor, rtol=1e-6, atol=0)
        assert float(mean) > 0


def test_official_training_selects_on_the_first_dev_captions(precomp, tmp_path):
    config = official_small(dev_captions=40, loss_mode="warmup")  # 8 of the 16 dev images
    result = train(config, precomp, tmp_path)
    assert result["epochs_completed"] == 2
    steps = read_csv(tmp_path / "steps.csv")
    assert [row["mode"] for row in steps][:: len(steps) // 2] == ["sum_hinges", "hardest"]
    vocab = json.loads((tmp_path / "vocab.json").read_text())["word2idx"]
    assert "'s" in vocab and "n't" in vocab and "..." in vocab  # NLTK tokens, SCAN's rule
    assert list(vocab)[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and list(vocab)[-1] == "<mask>"

    metrics = read_csv(tmp_path / "metrics.csv")
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    model, _ = model_from_checkpoint(checkpoint, "cpu")
    assert model.image_encoder.bn_stats == "padded" and model.word_tokenizer == "nltk"
    dev = load_split(precomp, "dev")
    subset = first_captions(dev, 40)
    img, txt, index = encode_split(model, subset, 64)
    selected = retrieval_metrics(img, txt, index, rule="argsort")
    assert float(metrics[-1]["rsum"]) == pytest.approx(selected["rsum"], abs=0.006)
    img, txt, index = encode_split(model, dev, 64)
    whole = retrieval_metrics(img, txt, index, rule="argsort")
    assert whole["rsum"] != pytest.approx(selected["rsum"], abs=0.006)
