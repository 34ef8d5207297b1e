"""The trainer: gradient-cached chunked encoding, training on real data, exact resume,
atomic checkpoints, backends, loss-mode schedule, data parallelism; and the config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rvsepp.config import (
    OFFICIAL_PROFILE,
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    preset_path,
)
from rvsepp.train import (
    GlobalBatchSampler,
    forward_backward,
    load_checkpoint,
    make_loss_fn,
    model_from_checkpoint,
    read_csv,
    save_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- fixtures


def small_config(**changes) -> TrainConfig:
    """A model small enough for a few seconds of CPU training; the recipe otherwise."""
    base = TrainConfig(
        epochs=2, batch_size=16, embed_dim=128, word_dim=64, gpo_pe_dim=16, gpo_hidden=16,
        eval_batch_size=64, progress=False, tensorboard=False, device="cpu",
    )  # fmt: skip
    return base.replace(**changes)


def tiny_model(dtype=torch.float32):
    from rvsepp.model import build_model

    torch.manual_seed(0)
    config = TrainConfig(embed_dim=24, word_dim=8, gpo_pe_dim=4, gpo_hidden=4)
    return build_model(config, 30, "cpu", feature_dim=10).to(dtype)


def synthetic_batch(rows: int, seed: int, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(rows, 6, 10, generator=generator, dtype=dtype)
    region_lengths = torch.randint(1, 7, (rows,), generator=generator)
    tokens = torch.randint(5, 30, (rows, 7), generator=generator)
    token_lengths = torch.randint(2, 8, (rows,), generator=generator)
    return {
        "regions": regions,
        "region_lengths": region_lengths,
        "text": {"tokens": tokens, "lengths": token_lengths},
        "image_index": torch.arange(rows),
        "caption_index": torch.arange(rows),
    }


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# --------------------------------------------------------------------------- chunked encoding


@pytest.mark.parametrize("mode", ["selhn", "hardest"])
def test_chunked_encoding_matches_unchunked_over_two_steps(mode):
    """Batch 16 encoded in chunks of 4 (BatchNorm in eval mode) gives the gradients and,
    after two steps, the parameters of one unchunked pass."""
    plain, chunked = tiny_model(), tiny_model()
    plain.eval()
    chunked.eval()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (plain, chunked)]
    loss_fn = make_loss_fn(TrainConfig(), mode, distributed=False)
    for step in range(2):
        batch = synthetic_batch(16, seed=step)
        results = []
        for model, optimizer, chunk in zip((plain, chunked), optimizers, (0, 4), strict=True):
            optimizer.zero_grad()
            loss, stats = forward_backward(model, batch, loss_fn, chunk_size=chunk)
            results.append((loss, stats, grads(model)))
            optimizer.step()
        (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
        assert torch.equal(stats_a.gated, stats_b.gated)
        assert any(g.abs().sum() > 0 for g in grads_a)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(plain.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_chunked_encoding_in_train_mode_updates_batchnorm_once_per_chunk():
    """Training-mode BatchNorm: the gradient cache gives the gradients of one backward
    through the same per-chunk forward passes, and the running statistics of exactly one
    update per chunk (the pass without autograd leaves them alone)."""
    cached, reference = tiny_model(), tiny_model()
    cached.train()
    reference.train()
    loss_fn = make_loss_fn(TrainConfig(), "selhn", distributed=False)
    batch = synthetic_batch(12, seed=3)

    forward_backward(cached, batch, loss_fn, chunk_size=4)

    parts = [
        reference(batch["regions"][i : i + 4], batch["region_lengths"][i : i + 4],
                  {k: v[i : i + 4] for k, v in batch["text"].items()})
        for i in range(0, 12, 4)
    ]  # fmt: skip
    img = torch.cat([p[0] for p in parts])
    txt = torch.cat([p[1] for p in parts])
    loss, _ = loss_fn(img, txt, None)
    loss.backward()

    for ga, gb in zip(grads(reference), grads(cached), strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    bn_cached = cached.image_encoder.mlp[1]
    bn_reference = reference.image_encoder.mlp[1]
    assert int(bn_cached.num_batches_tracked) == 3  # three chunks, one update each
    torch.testing.assert_close(bn_cached.running_mean, bn_reference.running_mean)
    torch.testing.assert_close(bn_cached.running_var, bn_reference.running_var)


class _NoisyEncoder(torch.nn.Module):
    """A pair encoder with dropout, to check that randomness is replayed per chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(10, 8)
        self.text = torch.nn.Embedding(30, 8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, regions, region_lengths, text):
        img = self.dropout(self.image(regions.mean(dim=1)))
        txt = self.dropout(self.text(text["tokens"]).mean(dim=1))
        return torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)


def test_chunked_encoding_replays_dropout_masks():
    torch.manual_seed(1)
    cached = _NoisyEncoder()
    reference = _NoisyEncoder()
    reference.load_state_dict(cached.state_dict())
    loss_fn = make_loss_fn(TrainConfig(), "hardest", distributed=False)
    batch = synthetic_batch(12, seed=4)

    torch.manual_seed(7)
    forward_backward(cached, batch, loss_fn, chunk_size=4)
    torch.manual_seed(7)
    parts = [
        reference(batch["regions"][i : i + 4], None, {"tokens": batch["text"]["tokens"][i : i + 4]})
        for i in range(0, 12, 4)
    ]
    loss, _ = loss_fn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None)
    loss.backward()
    for ga, gb in zip(grads(reference), grads(cached), strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


def test_global_batch_sampler_slices_one_permutation_per_rank():
    single = GlobalBatchSampler(40, 8, seed=5, world_size=1, rank=0)
    ranks = [GlobalBatchSampler(40, 4, seed=5, world_size=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        for whole, part0, part1 in zip(single, *ranks, strict=True):
            assert whole == part0 + part1
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(0, skip=2)
    assert list(single) == first[2:]
    single.set_epoch(1)
    assert list(single) != first  # a new permutation each epoch
    with pytest.raises(
        ValueError, match=r"fewer than one batch of 8 \(batch size 4 x 2 processes\)"
    ):
        GlobalBatchSampler(7, 4, seed=0, world_size=2, rank=0)


# --------------------------------------------------------------------------- training runs


def test_training_on_real_data_learns(emoji48, tmp_path):
    """Five epochs on 38 emoji (85 captions), "dev" = the training split: the loss falls
    and retrieval of the training images rises far above chance."""
    from rvsepp.evaluate import evaluate_split
    from rvsepp.precomp import load_split
    from rvsepp.train import make_text

    config = small_config(epochs=5, dev_split="train")
    result = train(config, emoji48, tmp_path)
    assert result["epochs_completed"] == 5 and result["steps"] == 5 * (85 // 16)
    metrics = read_csv(tmp_path / "metrics.csv")
    losses = [float(row["train_loss"]) for row in metrics]
    rsums = [float(row["rsum"]) for row in metrics]
    assert losses[-1] < 0.9 * losses[0], losses
    split = load_split(emoji48, "train")
    # Chance: R@K ~ K/N per direction (a little more image->text: 2.2 captions per image).
    chance = 2 * 100 * sum(k / split.n_images for k in (1, 5, 10))
    assert rsums[-1] > 3 * chance and rsums[-1] > 1.5 * rsums[0], rsums
    for name in ("steps.csv", "metrics.csv", "best.pt", "last.pt", "config.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(tmp_path / "config.json") == config

    # best.pt reloads into a model that scores what metrics.csv recorded for its epoch.
    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint["progress"]["best_epoch"] == result["best_epoch"]
    assert result["best_rsum"] == max(rsums) or abs(result["best_rsum"] - max(rsums)) < 1e-3
    model, vocab = model_from_checkpoint(checkpoint)
    text = make_text(config, split, vocab, train=False, cache_dir=None)
    reloaded = evaluate_split(model, split, 64, "cpu", text=text)
    assert reloaded["rsum"] == pytest.approx(result["best_rsum"], abs=1e-6)


def test_step_log_columns_and_values(emoji48, tmp_path):
    train(small_config(epochs=1, max_steps=3), emoji48, tmp_path)
    rows = read_csv(tmp_path / "steps.csv")
    assert list(rows[0]) == [
        "step", "epoch", "mode", "loss", "lr", "gated_r", "gated_c", "near_tie_r",
        "near_tie_c", "grad_norm_image", "grad_norm_text",
    ]  # fmt: skip
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert float(row["loss"]) > 0 and float(row["lr"]) == pytest.approx(5e-4)
        for key in ("gated_r", "gated_c", "near_tie_r", "near_tie_c"):
            assert 0 <= float(row[key]) <= 1
        assert float(row["grad_norm_image"]) > 0 and float(row["grad_norm_text"]) > 0
        # With the selhn mode the gate is exactly the near-tie test.
        assert row["gated_r"] == row["near_tie_r"] and row["gated_c"] == row["near_tie_c"]


def test_reference_and_default_backends_give_the_same_loss_history(emoji48, tmp_path):
    histories = {}
    for backend in ("reference", "auto"):
        out = tmp_path / backend
        train(small_config(epochs=1, max_steps=3, backend=backend), emoji48, out)
        histories[backend] = [float(r["loss"]) for r in read_csv(out / "steps.csv")]
    assert len(histories["auto"]) == 3
    np.testing.assert_allclose(histories["auto"], histories["reference"], rtol=1e-4)


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_continues_bit_identically(emoji48, tmp_path):
    """Stop at the end of epoch 1 (step 5), resume and stop mid-epoch 2 (step 7), resume to
    the end: the same weights, optimizer state and logs as one uninterrupted run."""
    config = small_config(epochs=2, lr_decay_epoch=1)
    whole = train(config, emoji48, tmp_path / "whole")
    split = tmp_path / "split"
    first = train(config.replace(max_steps=5), emoji48, split)
    assert first["stopped_early"] and first["epochs_completed"] == 1
    assert load_checkpoint(split / "last.pt")["progress"]["step_in_epoch"] == 0
    second = train(config.replace(max_steps=7), emoji48, split, resume=split / "last.pt")
    assert second["stopped_early"] and second["steps"] == 7
    assert load_checkpoint(split / "last.pt")["progress"]["step_in_epoch"] == 2
    resumed = train(config, emoji48, split, resume=split / "last.pt")
    assert resumed["steps"] == whole["steps"] == 10

    a, b = _model_tensors(tmp_path / "whole" / "last.pt"), _model_tensors(split / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    optim_a = load_checkpoint(tmp_path / "whole" / "last.pt")["optimizer"]
    optim_b = load_checkpoint(split / "last.pt")["optimizer"]
    assert optim_a["param_groups"][0]["lr"] == optim_b["param_groups"][0]["lr"] == 5e-5
    for key in optim_a["state"]:
        assert torch.equal(optim_a["state"][key]["exp_avg_sq"], optim_b["state"][key]["exp_avg_sq"])
    assert read_csv(tmp_path / "whole" / "steps.csv") == read_csv(split / "steps.csv")

    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    whole_metrics = without_time(read_csv(tmp_path / "whole" / "metrics.csv"))
    assert whole_metrics == without_time(read_csv(split / "metrics.csv"))
    assert resumed["best_rsum"] == whole["best_rsum"]


def test_loader_workers_do_not_change_the_run(emoji48, tmp_path):
    """Augmentation draws from (seed, epoch, caption), so worker processes see the same
    augmented batches as the main process."""
    config = small_config(epochs=1, max_steps=3)
    train(config.replace(num_workers=2), emoji48, tmp_path / "workers")
    train(config, emoji48, tmp_path / "main")
    assert read_csv(tmp_path / "workers" / "steps.csv") == read_csv(tmp_path / "main" / "steps.csv")


def test_resume_rejects_a_different_recipe(emoji48, tmp_path):
    config = small_config(epochs=1, max_steps=1)
    train(config, emoji48, tmp_path)
    with pytest.raises(ValueError, match="margin: checkpoint 0.2, now 0.3"):
        train(config.replace(margin=0.3), emoji48, tmp_path, resume=tmp_path / "last.pt")


def test_interrupted_checkpoint_write_keeps_the_last_good_one(emoji48, tmp_path, monkeypatch):
    """A run stopped at step 2 wrote last.pt; its continuation runs out of space halfway
    through writing the next last.pt: the step-2 checkpoint is still there, whole, no
    temporary is left, and the error names the file and the cause."""
    import errno

    import rvsepp.atomic as atomic
    import rvsepp.checkpoint as checkpoint_module

    config = small_config(epochs=1)
    train(config.replace(max_steps=2), emoji48, tmp_path)
    good = (tmp_path / "last.pt").read_bytes()

    def disk_fills_up(path, data):
        def write_half(handle):
            if Path(path).name == "last.pt":
                handle.write(bytes(data)[: len(data) // 2])  # half of it is on disk
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write(data)

        atomic.atomic_write(path, write_half)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", disk_fills_up)
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: no space left on the device"):
        train(config, emoji48, tmp_path, resume=tmp_path / "last.pt")
    assert (tmp_path / "best.pt").is_file()  # written just before the failing last.pt
    assert (tmp_path / "last.pt").read_bytes() == good
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["progress"]["step"] == 2 and checkpoint["progress"]["epoch"] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    model_from_checkpoint(checkpoint)  # loads into a model


def test_save_checkpoint_failure_leaves_the_old_file(tmp_path, monkeypatch):
    import rvsepp.checkpoint as checkpoint_module

    path = tmp_path / "last.pt"
    save_checkpoint({"format": 1, "value": torch.tensor([1.0])}, path)
    before = path.read_bytes()

    def broken(payload, handle):
        handle.write(b"x" * 100)
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint_module, "_serialize", broken)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint({"format": 1, "value": torch.tensor([2.0])}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_warmup_mode_runs_sum_hinges_then_hardest(emoji48, tmp_path):
    train(small_config(epochs=2, loss_mode="warmup"), emoji48, tmp_path)
    modes = {(r["epoch"], r["mode"]) for r in read_csv(tmp_path / "steps.csv")}
    assert modes == {("1", "sum_hinges"), ("2", "hardest")}
    hardest = [r for r in read_csv(tmp_path / "steps.csv") if r["mode"] == "hardest"]
    assert all(float(r["gated_r"]) == 0 and float(r["gated_c"]) == 0 for r in hardest)


def test_mask_same_image_passes_image_rows_as_ids(emoji48, tmp_path, monkeypatch):
    import selhn_ext

    seen = []
    real = selhn_ext.selhn_loss

    def spy(img, txt, **options):
        seen.append(options["ids"])
        assert options["reduction"] == "mean"
        return real(img, txt, **options)

    monkeypatch.setattr(selhn_ext, "selhn_loss", spy)
    train(small_config(epochs=1, max_steps=2, mask_same_image=True), emoji48, tmp_path / "a")
    assert len(seen) == 2 and all(ids is not None and ids.dtype == torch.int64 for ids in seen)
    from rvsepp.precomp import load_split

    img_index = load_split(emoji48, "train").img_index
    assert set(seen[0].tolist()) <= set(img_index.tolist())
    seen.clear()
    train(small_config(epochs=1, max_steps=1), emoji48, tmp_path / "b")
    assert seen == [None]  # off by default


def test_chunked_training_runs_and_matches_unchunked_with_frozen_batchnorm(emoji48, tmp_path):
    config = small_config(epochs=1, max_steps=2, augment=False, freeze_batchnorm=True)
    train(config, emoji48, tmp_path / "plain")
    train(config.replace(chunk_size=4), emoji48, tmp_path / "chunked")
    plain = [float(r["loss"]) for r in read_csv(tmp_path / "plain" / "steps.csv")]
    chunked = [float(r["loss"]) for r in read_csv(tmp_path / "chunked" / "steps.csv")]
    np.testing.assert_allclose(chunked, plain, rtol=1e-4)


# --------------------------------------------------------------------------- data parallel


def test_two_process_gloo_training_equals_one_process_with_the_doubled_batch(emoji48, tmp_path):
    """Two ranks with batch 8 against one process with batch 16, five AdamW steps. The
    runs sum in different orders (one thread per rank against two threads, partial batches
    then an all-reduce, GEMMs whose path depends on the shape and the processor), so they
    agree to rounding, not bit for bit. What rounding can change:

    * Step losses and gradient norms come from the same batches and (at step 1) the same
      parameters: reordered fp32 sums move them by a few units in the 7th digit. steps.csv
      keeps 6 significant digits (up to 1e-5 relative apart when printed), so they must
      agree within 2e-5 relative.
    * Gated and near-tie counts are exact decisions on scores that differ by ~1e-7: at most
      one anchor per direction and step may flip (1/16 of a fraction).
    * Parameters. AdamW moves an entry by lr * m/(sqrt(v) + eps) plus weight decay, with
      |m/sqrt(v)| <= 1.01 for the first five steps (betas 0.9, 0.999), so after k steps the
      runs' updates differ by at most 2.02 * k * lr per entry, however the sums are ordered
      (hard bound). The step is scale-free: an entry whose gradient is perturbed by a
      relative d moves by about d * lr differently, ~1e-6 of lr here, far below
      1e-3 * k * lr. Only entries whose gradient is itself at the rounding level (sums that
      cancel) can step differently in sign; they are rare. So at most 1 entry in 1,000 may
      differ by more than 1e-3 * k * lr, and the whole update by at most 1e-3 of its norm.
      (Measured on a 2-core AVX2 machine: 21 of 344,032 entries beyond 1e-3 * k * lr, norm
      3.6e-5. Not scaling the loss by the world size: 20 % of the entries beyond, and the
      logged gradient norms halved; one rank's gradient left out: 98 %, norm 0.57.)
    """
    pytest.importorskip("selhn_ext.distributed")
    from rvsepp.build import Distributed, build_run
    from rvsepp.precomp import load_split

    config = small_config(epochs=1, augment=False, freeze_batchnorm=True)  # 5 steps
    config_file = tmp_path / "config.json"
    config_file.write_text(config.replace(batch_size=8).to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "rvsepp", "train", "--data", str(emoji48), "--out", str(tmp_path / "ddp"),
        "--config", str(config_file), "--device", "cpu",
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    # Rank 0 prints the epoch line and the final line, the other rank nothing.
    assert completed.stdout.count("epoch 1  dev rsum") == 1, completed.stdout
    assert completed.stdout.count("best dev rsum") == 1

    config = config.replace(batch_size=16)
    train(config, emoji48, tmp_path / "single")
    ddp_steps = read_csv(tmp_path / "ddp" / "steps.csv")
    single_steps = read_csv(tmp_path / "single" / "steps.csv")
    assert len(ddp_steps) == len(single_steps) == 5

    def column(rows, key):
        return np.array([float(row[key]) for row in rows])

    for key in ("loss", "grad_norm_image", "grad_norm_text"):
        np.testing.assert_allclose(column(ddp_steps, key), column(single_steps, key), rtol=2e-5)
    for key in ("gated_r", "gated_c", "near_tie_r", "near_tie_c"):
        flips = np.abs(column(ddp_steps, key) - column(single_steps, key)) * 16
        assert flips.max() <= 1, (key, flips)
    dev = [read_csv(tmp_path / run / "metrics.csv")[0] for run in ("ddp", "single")]
    # A flipped near-tie in the dev ranking moves one query of each direction in R@1/5/10.
    split_dev = load_split(emoji48, "dev")
    one_swap = 3 * 100 / split_dev.n_images + 3 * 100 / split_dev.n_captions
    assert abs(float(dev[0]["rsum"]) - float(dev[1]["rsum"])) <= one_swap

    start = build_run(config, emoji48, tmp_path / "initial", None, Distributed()).model
    initial = {name: p.detach().double() for name, p in start.named_parameters()}
    ddp, single = (
        _model_tensors(tmp_path / "ddp" / "last.pt"),
        _model_tensors(tmp_path / "single" / "last.pt"),
    )
    update_ddp = torch.cat([(ddp[n].double() - p).ravel() for n, p in initial.items()])
    update_single = torch.cat([(single[n].double() - p).ravel() for n, p in initial.items()])
    step = 5 * config.lr
    assert update_single.pow(2).mean().sqrt() > 0.1 * step  # the answer has Adam's size
    difference = (update_ddp - update_single).abs()
    assert difference.max() <= 2.02 * step
    assert (difference > 1e-3 * step).double().mean() <= 1e-3
    assert difference.norm() <= 1e-3 * update_single.norm()


# --------------------------------------------------------------------------- config


def test_config_defaults_are_the_paper_recipe():
    config = TrainConfig()
    assert (config.lr, config.epochs, config.lr_decay_epoch, config.lr_decay_factor) == (
        5e-4,
        30,
        15,
        0.1,
    )
    assert (config.grad_clip, config.batch_size, config.drop_last) == (2.0, 128, True)
    assert (config.margin, config.eps, config.embed_dim) == (0.2, 0.01, 1024)
    assert (config.region_dropout, config.token_select_prob) == (0.2, 0.2)
    assert (config.loss_mode, config.text_encoder, config.backend) == ("selhn", "bigru", "auto")
    assert config.mask_same_image is False
    assert [config.replace(loss_mode="warmup").mode_for_epoch(e) for e in (0, 1, 5)] == [
        "sum_hinges", "hardest", "hardest",
    ]  # fmt: skip


def test_config_json_round_trip_and_comments(tmp_path):
    config = TrainConfig(lr=1e-3, loss_mode="hardest", vocab_path="v.json")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_notes": "ignored", **config.to_dict()}))
    assert load_config(path) == config
    assert config_from_dict({"lr": 1}).lr == 1.0 and isinstance(
        config_from_dict({"lr": 1}).lr, float
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"learning_rate": 1e-3}, r"unknown config key\(s\) \['learning_rate'\]"),
        ({"loss_mode": "max"}, "loss_mode must be one of"),
        ({"epochs": 2.5}, "epochs must be a int"),
        ({"epochs": True}, "epochs must be a int"),
        ({"batch_size": 1}, "batch_size must be >= 2"),
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"token_mask_prob": 0.9}, "must sum to 1"),
        ({"region_dropout": 1.0}, "region_dropout must be < 1"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_config_rejects_bad_values(data, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig().replace(learning_rate=1.0)


def test_presets_load_and_name_their_reference_numbers():
    for name, rsum in (("f30k_bigru", 498.1), ("coco_bigru", 520.8)):
        path = preset_path(name)
        # The paper's recipe with the released code's choices (tests/test_official_profile.py)
        assert load_config(path) == TrainConfig(**OFFICIAL_PROFILE)
        assert json.loads(path.read_text())["_expected"]["rsum"] == rsum
    demo = load_config(preset_path("emoji_demo"))
    assert demo.text_encoder == "minilm" and not demo.minilm_finetune
    with pytest.raises(ConfigError, match="no preset named"):
        preset_path("imagenet")
    assert math.isfinite(demo.lr)


@pytest.mark.gpu
def test_training_on_cuda_runs_and_its_checkpoint_loads_on_cpu(emoji48, tmp_path):
    config = small_config(epochs=2, device="cuda", dev_split="train", chunk_size=8)
    result = train(config, emoji48, tmp_path)
    assert result["epochs_completed"] == 2
    losses = [float(row["loss"]) for row in read_csv(tmp_path / "steps.csv")]
    assert all(math.isfinite(loss) for loss in losses) and len(losses) == 10
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "last.pt"), "cpu")
    assert next(model.parameters()).device.type == "cpu"
    resumed = train(config.replace(max_steps=7), emoji48, tmp_path / "split")
    assert resumed["steps"] == 7
    final = train(config, emoji48, tmp_path / "split", resume=tmp_path / "split" / "last.pt")
    assert final["steps"] == 10
