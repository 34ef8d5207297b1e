"""Retrieval metrics against hand-computed and brute-force rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvsepp.evaluate import (
    argsort_ranks_from_scores,
    encode_split,
    evaluate_split,
    first_captions,
    fold5_metrics,
    fold_bounds,
    format_report,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    retrieval_report,
)
from rvsepp.precomp import PrecompSplit

KEYS = {f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")} | {"rsum"}


def as_embeddings(scores: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose similarity matrix (img @ txt.T) is exactly ``scores`` (N, M)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return scores, torch.eye(scores.shape[1])


def brute_force_ranks(scores: np.ndarray, img_index: np.ndarray) -> tuple[list, list]:
    """Pessimistic ranks with plain loops over the full matrix."""
    n_images, n_captions = scores.shape
    i2t = []
    for image in range(n_images):
        own = [c for c in range(n_captions) if img_index[c] == image]
        i2t.append(
            min(
                sum(
                    1
                    for other in range(n_captions)
                    if img_index[other] != image and scores[image, other] >= scores[image, c]
                )
                for c in own
            )
        )
    t2i = []
    for caption in range(n_captions):
        own = img_index[caption]
        t2i.append(
            sum(
                1
                for i in range(n_images)
                if i != own and scores[i, caption] >= scores[own, caption]
            )
        )
    return i2t, t2i


def test_hand_computed_example_with_ties():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.9],  # image 0 owns captions 0, 1: best 0.9 ties caption 3 -> 1
            [0.2, 0.3, 0.1, 0.4],  # image 1 owns caption 2 (0.1): three above -> 3
            [0.0, 0.0, 0.0, 0.8],  # image 2 owns caption 3 -> 0
        ]
    )
    img_index = np.array([0, 0, 1, 2])
    i2t, t2i = retrieval_ranks(*as_embeddings(scores), img_index)
    assert i2t.tolist() == [1, 3, 0]
    assert t2i.tolist() == [0, 1, 1, 1]
    metrics = retrieval_metrics(*as_embeddings(scores), img_index)
    assert set(metrics) == KEYS
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == metrics["i2t_r10"] == 100.0
    assert metrics["i2t_medr"] == 2.0
    assert metrics["i2t_meanr"] == pytest.approx(4 / 3 + 1)
    assert metrics["t2i_r1"] == 25.0
    assert metrics["t2i_medr"] == 2.0
    assert metrics["t2i_meanr"] == pytest.approx(1.75)
    assert metrics["rsum"] == pytest.approx(100 / 3 + 200 + 25 + 200)
    assert all(type(value) is float for value in metrics.values())


def test_perfect_reversed_and_constant_scores():
    n = 20
    img_index = np.arange(n)
    perfect = retrieval_metrics(*as_embeddings(np.eye(n)), img_index)
    assert perfect["rsum"] == 600.0
    assert perfect["i2t_medr"] == perfect["t2i_meanr"] == 1.0

    reversed_ = retrieval_metrics(*as_embeddings(1 - np.eye(n)), img_index)
    assert reversed_["rsum"] == 0.0
    assert reversed_["i2t_medr"] == reversed_["t2i_meanr"] == float(n)

    # A collapsed model: every image and caption the same vector, so every score ties.
    # Pessimistic ranks put each ground truth last: R@K = 0, not 100.
    img_index = np.repeat(np.arange(n), 2)
    same = torch.full((1, 4), 0.5)
    constant = retrieval_metrics(same.expand(n, 4), same.expand(2 * n, 4), img_index)
    assert constant["rsum"] == 0.0
    assert constant["i2t_meanr"] == float(2 * n - 2 + 1)  # all other captions tie above
    assert constant["t2i_meanr"] == float(n)


@pytest.mark.parametrize("block", [1, 3, 4, 1000])
def test_several_captions_per_image_against_brute_force(block):
    rng = np.random.default_rng(0)
    n_images = 7
    counts = [1, 4, 2, 3, 1, 5, 2]
    img_index = rng.permutation(np.repeat(np.arange(n_images), counts))  # not contiguous
    # Coarse scores make many exact ties.
    scores = rng.integers(0, 4, size=(n_images, len(img_index))).astype(np.float32)
    i2t, t2i = retrieval_ranks(*as_embeddings(scores), img_index, block=block)
    expected_i2t, expected_t2i = brute_force_ranks(scores, img_index)
    assert i2t.tolist() == expected_i2t
    assert t2i.tolist() == expected_t2i


def test_random_embeddings_block_size_does_not_matter():
    rng = np.random.default_rng(1)
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(13, 6))), dim=1)
    txt = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(29, 6))), dim=1)
    img_index = np.concatenate([np.arange(13), rng.integers(0, 13, size=16)])
    full = retrieval_metrics(img, txt, img_index, block=10_000)
    for block in (2, 5, 7):
        assert retrieval_metrics(img, txt, img_index, block=block) == full
    i2t, t2i = brute_force_ranks((img @ txt.T).numpy(), img_index)
    assert full["t2i_meanr"] == pytest.approx(np.mean(t2i) + 1)
    assert full["i2t_meanr"] == pytest.approx(np.mean(i2t) + 1)
    # numpy inputs give the same numbers
    assert retrieval_metrics(img.numpy(), txt.numpy(), img_index) == full


def test_fold5_evaluates_each_fold_separately():
    n_images, folds = 10, 5
    img_index = np.repeat(np.arange(n_images), 2)
    fold_of = np.arange(n_images) // 2
    scores = np.zeros((n_images, len(img_index)))
    for image in range(n_images):
        for caption, owner in enumerate(img_index):
            if owner == image:
                scores[image, caption] = 1.0
            elif fold_of[owner] != fold_of[image]:
                scores[image, caption] = 2.0  # a distractor only in the full 10-image set
    fold = fold5_metrics(*as_embeddings(scores), img_index, folds=folds)
    full = retrieval_metrics(*as_embeddings(scores), img_index)
    assert fold["rsum"] == 600.0
    assert full["i2t_r1"] == 0.0 and full["t2i_r1"] == 0.0


def test_fold5_is_the_mean_of_per_fold_metrics():
    rng = np.random.default_rng(2)
    n_images = 10
    img_index = rng.permutation(np.repeat(np.arange(n_images), 3))
    scores = rng.normal(size=(n_images, len(img_index)))
    fold = fold5_metrics(*as_embeddings(scores), img_index, block=4)
    per_fold = []
    for start in range(0, n_images, 2):
        members = (img_index >= start) & (img_index < start + 2)
        sub_scores = scores[start : start + 2][:, members]
        per_fold.append(retrieval_metrics(*as_embeddings(sub_scores), img_index[members] - start))
    for key in KEYS:
        assert fold[key] == pytest.approx(np.mean([m[key] for m in per_fold]))
    assert all(type(value) is float for value in fold.values())


def released_ranks(sims: np.ndarray, img_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The released ``i2t`` / ``t2i`` loops, one query at a time: ``np.argsort`` of the
    query's row (of ``sims``, or of the view ``sims.T``), reversed, then ``np.where`` for the
    ground truth. Float ranks, as the released code keeps them."""
    n_images, n_captions = sims.shape
    i2t = np.zeros(n_images)
    for image in range(n_images):
        inds = np.argsort(sims[image])[::-1]
        i2t[image] = min(np.where(inds == c)[0][0] for c in np.flatnonzero(img_index == image))
    by_caption = sims.T
    t2i = np.zeros(n_captions)
    for caption in range(n_captions):
        inds = np.argsort(by_caption[caption])[::-1]
        t2i[caption] = np.where(inds == img_index[caption])[0][0]
    return i2t, t2i


def released_metrics(ranks: np.ndarray) -> tuple[float, ...]:
    """The released summary of one direction's ranks."""
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    return r1, r5, r10, np.floor(np.median(ranks)) + 1, ranks.mean() + 1


@pytest.mark.parametrize(
    ("n_images", "per_image", "levels", "contiguous"),
    [(6, 5, 2, True), (40, 5, 3, True), (200, 5, 4, True), (30, 3, 2, False), (120, 1, 3, False)],
)
def test_argsort_ranks_equal_the_released_loops_on_tie_heavy_scores(
    n_images, per_image, levels, contiguous
):
    rng = np.random.default_rng(n_images)
    img_index = np.repeat(np.arange(n_images), per_image)
    if not contiguous:
        img_index = rng.permutation(img_index)
    # Few distinct values: almost every score ties with many others.
    sims = rng.integers(0, levels, size=(n_images, len(img_index))).astype(np.float64)
    i2t, t2i = argsort_ranks_from_scores(sims, img_index)
    expected_i2t, expected_t2i = released_ranks(sims, img_index)
    assert np.array_equal(i2t, expected_i2t) and np.array_equal(t2i, expected_t2i)
    # Through embeddings whose float64 product is exactly ``sims``, and the metrics bit for
    # bit as the released code prints them.
    metrics = retrieval_metrics(*as_embeddings(sims), img_index, rule="argsort")
    for direction, ranks in (("i2t", expected_i2t), ("t2i", expected_t2i)):
        ours = tuple(metrics[f"{direction}_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
        assert ours == released_metrics(ranks)
    # Ties count against the query in the pessimistic rule, so its ranks are never better.
    pessimistic_i2t, pessimistic_t2i = retrieval_ranks(*as_embeddings(sims), img_index)
    assert np.all(pessimistic_i2t >= i2t) and np.all(pessimistic_t2i >= t2i)
    assert np.any(pessimistic_t2i > t2i)


def test_metrics_are_computed_as_the_released_code_computes_them():
    rng = np.random.default_rng(5)
    ranks = rng.integers(0, 3000, size=25_000)  # long enough for numpy to sum in blocks
    metrics = metrics_from_ranks(ranks[:5000], ranks)
    assert tuple(metrics[f"t2i_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")) == (
        released_metrics(ranks.astype(np.float64))
    )
    assert metrics["rsum"] == sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_rank_rules_agree_without_ties_and_the_report_names_them():
    rng = np.random.default_rng(6)
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 8))), dim=1)
    txt = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(250, 8))), dim=1)
    img_index = np.arange(250) // 5
    report = retrieval_report(img.float(), txt.float(), img_index)
    assert report["argsort"] == report["pessimistic"]
    assert 0 < report["argsort"]["rsum"] < 600
    fold = retrieval_report(img.float(), txt.float(), img_index, fold5=True)
    assert fold["argsort"] == fold["pessimistic"]
    # 5-fold argsort: each fold's released ranks, averaged.
    per_fold = []
    for start in range(0, 50, 10):
        sims = img[start : start + 10].float().double().numpy() @ (
            txt[start * 5 : (start + 10) * 5].float().double().numpy().T
        )
        per_fold.append(sum(released_metrics(r)[:3][k] for r in released_ranks(
            sims, np.arange(50) // 5) for k in range(3)))  # fmt: skip
    assert fold["argsort"]["rsum"] == pytest.approx(np.mean(per_fold), rel=1e-12)
    table = format_report(report, "all images")
    assert "argsort" in table and "pessimistic" in table and "published tables" in table
    same = torch.full((20, 4), 0.5)  # collapsed: every score ties
    tied = retrieval_report(same, same.repeat(5, 1), np.arange(100) // 5)
    assert tied["pessimistic"]["rsum"] == 0.0 < tied["argsort"]["rsum"]


def test_first_captions_is_the_released_dev_subset(tmp_path):
    images = np.lib.format.open_memmap(
        tmp_path / "dev_ims.npy", mode="w+", dtype=np.float32, shape=(30, 2, 3)
    )
    images[:] = np.arange(30, dtype=np.float32)[:, None, None]
    images.flush()
    images = np.load(tmp_path / "dev_ims.npy", mmap_mode="r")
    split = PrecompSplit(images, [f"c{i}" for i in range(150)], np.arange(150) // 5, name="dev")
    subset = first_captions(split, 50)
    assert subset.captions == split.captions[:50] and subset.n_images == 10
    assert np.array_equal(subset.img_index, np.arange(50) // 5)
    assert isinstance(subset.images, np.memmap) and np.array_equal(subset.images, images[:10])
    assert first_captions(split, 0) is split and first_captions(split, 150) is split
    # An explicit caption-to-image index that skips rows: the rows used, re-indexed.
    shuffled = PrecompSplit(images, split.captions, np.array([4, 4, 9, 2] + [0] * 146),
                            image_names=[f"im{i}" for i in range(30)])  # fmt: skip
    subset = first_captions(shuffled, 4)
    assert subset.img_index.tolist() == [1, 1, 2, 0]
    assert subset.images[:, 0, 0].tolist() == [2.0, 4.0, 9.0]
    assert subset.image_names == ["im2", "im4", "im9"]


def test_fold_bounds():
    assert fold_bounds(5000, 5) == [(i * 1000, (i + 1) * 1000) for i in range(5)]
    assert fold_bounds(7, 3) == [(0, 2), (2, 5), (5, 7)]
    with pytest.raises(ValueError, match="folds"):
        fold_bounds(3, 5)


def test_malformed_inputs_raise():
    img, txt = torch.eye(3), torch.eye(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(img, txt, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(img, txt, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="same E"):
        retrieval_metrics(img, torch.eye(3, 4), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(img, txt, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((3, 3), float("nan")), txt, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="block"):
        retrieval_metrics(img, txt, np.array([0, 1, 2]), block=0)


def _tiny_split():
    from rvsepp.precomp import PrecompSplit

    rng = np.random.default_rng(3)
    captions = ["a red apple", "an apple", "a blue car", "the sun", "a hot sun", "sun rays"]
    return PrecompSplit(
        images=rng.normal(size=(3, 4, 5)).astype(np.float32),
        captions=captions,
        img_index=np.array([0, 0, 1, 2, 2, 2]),
    )


def test_encode_split_matches_direct_encoding():
    from rvsepp.data import Vocabulary
    from rvsepp.model import build_model

    torch.manual_seed(0)
    split = _tiny_split()
    vocab = Vocabulary.build(split.captions)
    config = {"embed_dim": 8, "word_dim": 4, "gpo_pe_dim": 4, "gpo_hidden": 3}
    model = build_model(config, len(vocab), "cpu", feature_dim=5, vocab=vocab)
    model.train()
    img, txt, img_index = encode_split(model, split, batch_size=2, device="cpu")
    assert model.training  # mode restored
    assert img.shape == (3, 8) and txt.shape == (6, 8)
    assert img_index.tolist() == [0, 0, 1, 2, 2, 2]
    model.eval()
    with torch.no_grad():
        direct = model.encode_images(torch.from_numpy(split.images), torch.tensor([4, 4, 4]))
        ids = torch.from_numpy(vocab.encode(["a", "hot", "sun"])).unsqueeze(0)
        caption = model.encode_texts({"tokens": ids, "lengths": torch.tensor([5])})
    assert torch.allclose(img, direct, atol=1e-5)
    assert torch.allclose(txt[4], caption[0], atol=1e-5)
    metrics = evaluate_split(model, split, batch_size=4)
    assert metrics == retrieval_metrics(img, txt, img_index)
    model.vocab = None
    with pytest.raises(ValueError, match="vocabulary"):
        encode_split(model, split)


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    rng = np.random.default_rng(4)
    img = torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32))
    txt = torch.from_numpy(rng.normal(size=(250, 8)).astype(np.float32))
    img_index = np.repeat(np.arange(50), 5)
    cpu = retrieval_metrics(img, txt, img_index, block=16)
    gpu = retrieval_metrics(img.cuda(), txt.cuda(), torch.from_numpy(img_index).cuda(), block=16)
    assert gpu == pytest.approx(cpu)
