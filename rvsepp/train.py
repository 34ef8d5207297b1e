"""The RVSE++ trainer: the paper's recipe, gradient-cached chunked encoding, exact resume.

``train(config, data_dir, out_dir, resume=None)`` trains on ``data_dir``'s ``train`` split,
selects the best epoch on the dev split (rsum) and writes to ``out_dir``:

* ``config.json``: the configuration of the run;
* ``steps.csv``: one row per optimizer step (loss, learning rate, the gated and near-tie
  fractions of image anchors ``r`` (rows) and caption anchors ``c`` (columns), the gradient
  norm of each encoder before clipping);
* ``metrics.csv``: one row per epoch (dev recalls, rsum, ranks, epoch means of the above);
* ``last.pt`` (after every epoch, and when ``max_steps`` stops a run midway) and
  ``best.pt`` (the best dev rsum so far), written atomically;
* ``curves.png``: loss, dev rsum, gated and near-tie fractions and gradient norms.

``out_dir`` never loses a run: one that holds a run is refused unless the run continues
(``resume`` from its checkpoint) or ``overwrite`` moves it aside, and a run that fails
before its first step leaves nothing behind (:mod:`rvsepp.run_folder`). Checkpoints carry
a checksum checked on load; a non-finite loss or gradient stops the run with the step and
the batch's rows.

Where the parts live: the gradient cache (``chunk_size``) in :mod:`rvsepp.gradcache`, the
batch sampler in :mod:`rvsepp.sampler`, checkpoints in :mod:`rvsepp.checkpoint`, the CSV
logs and curves in :mod:`rvsepp.logs`, the process group, vocabulary, text sides and the
run's parts in :mod:`rvsepp.build`, the step and epoch records in :mod:`rvsepp.progress`.
This module holds the loop: build the run, then per epoch the steps, the dev evaluation
and the checkpoints.

Data parallel (``torchrun --nproc_per_node N -m rvsepp train ...``): ``batch_size`` is per
process; every step draws one global batch of ``N * batch_size`` pairs from one permutation
shared by all ranks, and rank r takes rows ``[r * batch_size, (r + 1) * batch_size)``. The
loss is ``selhn_ext.distributed.selhn_loss`` over the global batch; DDP averages parameter
gradients over ranks, so the loss is multiplied by the world size before backward, which
makes the gradient (and so the 2.0 clip) that of one process with the global batch. The
logged gated and near-tie fractions are summed over ranks, so they too are the global
batch's. Only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .build import (
    Run,
    build_run,
    build_vocabulary,
    load_resume,
    make_text,
    set_training_mode,
    setup_distributed,
    token_cache_dir,
)
from .checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, save_config
from .gradcache import LossFn, forward_backward
from .logs import METRICS_COLUMNS, RunLogs, format_epoch_line, plot_curves, read_csv
from .progress import EpochTotals, Progress, StepValues
from .run_folder import RunFolder, RunFolderError
from .sampler import GlobalBatchSampler, epoch_seed

__all__ = [
    "CHECKPOINT_FORMAT",
    "GlobalBatchSampler",
    "build_vocabulary",
    "forward_backward",
    "load_checkpoint",
    "make_loss_fn",
    "make_text",
    "model_from_checkpoint",
    "read_csv",
    "save_checkpoint",
    "token_cache_dir",
    "train",
]


def make_loss_fn(config: TrainConfig, mode: str, distributed: bool) -> LossFn:
    """``(img, txt, ids) -> (loss, stats)`` with the run's options and ``mode``'s reduction."""
    if distributed:
        try:
            from selhn_ext.distributed import selhn_loss
        except ImportError as error:
            raise RuntimeError(
                "data-parallel training needs selhn_ext.distributed, which is not installed"
            ) from error
    else:
        from selhn_ext import selhn_loss

    def loss_fn(img: Tensor, txt: Tensor, ids: Tensor | None) -> tuple[Tensor, Any]:
        return selhn_loss(
            img, txt, margin=config.margin, eps=config.eps, mode=mode,
            reduction=config.reduction_for_mode(mode),
            ids=ids, backend=config.backend, return_stats=True,
        )  # fmt: skip

    return loss_fn


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train RVSE++ on ``data_dir`` with ``config``; write logs and checkpoints to ``out_dir``.

    ``resume``: a ``last.pt`` (or ``best.pt``) of an earlier run of the same configuration;
    training continues exactly where it stopped (bit-identical on CPU with no workers).
    ``out_dir`` must not hold another run unless ``overwrite``, which moves that run aside
    (see :mod:`rvsepp.run_folder`). Returns a summary: best dev rsum and epoch, the last
    epoch's metrics, steps, paths.
    """
    config.validate()
    dist_info = setup_distributed(config)
    folder = RunFolder(Path(out_dir), Path(resume) if resume is not None else None, overwrite)
    if dist_info.is_main:
        folder.check()
    checkpoint = load_resume(resume, config, dist_info)
    if dist_info.is_main:
        _check_best_is_this_runs(folder, checkpoint)
        folder.open()
    first_step = checkpoint["progress"]["step"] if checkpoint is not None else 0
    run = None
    try:
        if dist_info.is_main:
            save_config(config, folder.path / "config.json")
        run = build_run(config, data_dir, folder.path, checkpoint, dist_info)
        return _run_epochs(run, resumed=checkpoint is not None)
    except BaseException:
        if dist_info.is_main and (run is None or run.progress.step == first_step):
            folder.abandon()  # failed before its first step: leave no half-made run
        raise


def _run_epochs(run: Run, resumed: bool) -> dict[str, Any]:
    """The epochs still to run, each: its batches, then (at its end) the dev evaluation and
    the checkpoints. Returns the run's summary."""
    config, out_dir = run.config, run.out_dir
    logs = RunLogs(out_dir, config, run.progress if resumed else None) if run.dist.is_main else None
    last_metrics: dict[str, float] = {}
    stopped_early = False
    started = time.perf_counter()
    try:
        while run.progress.epoch < config.epochs and not stopped_early:
            epoch_start = time.perf_counter()
            mode, lr, stopped_early = _train_epoch(run, logs)
            if stopped_early:
                # Mid-epoch stop: last.pt resumes with the rest of this epoch's batches.
                if run.dist.is_main:
                    save_checkpoint(run.checkpoint_payload(), out_dir / "last.pt")
                break
            last_metrics = _end_epoch(run, logs, mode, lr, epoch_start) or last_metrics
            if config.max_steps and run.progress.step >= config.max_steps:
                stopped_early = run.progress.epoch < config.epochs
    finally:
        if logs is not None:
            logs.close()
    curves = _finish(run)
    return {
        "best_rsum": run.progress.best_rsum,
        "best_epoch": run.progress.best_epoch,
        "epochs_completed": run.progress.epoch,
        "steps": run.progress.step,
        "stopped_early": stopped_early,
        "last_metrics": last_metrics,
        "seconds": time.perf_counter() - started,
        "out_dir": str(out_dir),
        "curves": str(curves) if curves else None,
    }


def _check_best_is_this_runs(folder: RunFolder, checkpoint: Mapping[str, Any] | None) -> None:
    """A continued run replaces best.pt only if best.pt is its own (same run id)."""
    best = folder.path / "best.pt"
    if checkpoint is None or folder.overwrite or not folder.continues_its_run():
        return
    if not best.is_file() or best.resolve() == folder.resume.resolve():
        return
    owner = load_checkpoint(best).get("run_id")
    if owner != checkpoint.get("run_id"):
        raise RunFolderError(
            f"{best} belongs to another run than {folder.resume} (run {owner} and "
            f"{checkpoint.get('run_id')}); continuing would replace it. Move one of them, or "
            "pass --overwrite to move the folder's run aside"
        )


def _train_epoch(run: Run, logs: RunLogs | None) -> tuple[str, float, bool]:
    """The rest of the current epoch's batches (all of them unless resumed midway).
    Returns the epoch's loss mode and learning rate, and whether ``max_steps`` stopped it
    before its last batch."""
    config, progress = run.config, run.progress
    epoch = progress.epoch  # 0-based index of the epoch being run
    mode = config.mode_for_epoch(epoch)
    loss_fn = make_loss_fn(config, mode, run.dist.enabled)
    lr = run.optimizer.param_groups[0]["lr"]
    run.sampler.set_epoch(epoch, skip=progress.step_in_epoch)
    run.loader_generator.manual_seed(epoch_seed(config.seed, epoch, "loader"))
    run.dataset.set_epoch(epoch)  # augmentation draws from (seed, epoch, item)
    set_training_mode(run.model, config)
    bar = _progress_bar(
        config, run.dist.is_main, len(run.sampler), progress.step_in_epoch, epoch + 1
    )
    stopped_early = False
    for batch in iter(run.loader):
        values = _train_step(run, batch, loss_fn)
        progress.step += 1
        progress.step_in_epoch += 1
        progress.epoch_totals.add(values)
        if logs is not None:
            row = {**vars(values), "lr": lr, "step": progress.step, "epoch": epoch + 1}
            logs.write_step({**row, "mode": mode}, progress.step)
        if bar is not None:
            bar.set_postfix(loss=f"{values.loss:.4f}", refresh=False)
            bar.update(1)
        _check_finite(run, values, batch, epoch + 1)
        if config.max_steps and progress.step >= config.max_steps:
            stopped_early = progress.step_in_epoch < len(run.sampler)
            break
    if bar is not None:
        bar.close()
    return mode, lr, stopped_early


def _train_step(run: Run, batch: Mapping[str, Any], loss_fn: LossFn) -> StepValues:
    """One optimizer step on one batch: forward, backward, clip, step."""
    config, device = run.config, run.device
    batch = _to_device(batch, device)
    ids = batch["image_index"] if config.mask_same_image else None
    run.optimizer.zero_grad(set_to_none=True)
    loss, stats = forward_backward(
        run.encoder, batch, loss_fn, chunk_size=config.chunk_size, ids=ids,
        loss_scale=float(run.dist.world_size), inner=run.model,
    )  # fmt: skip
    image_params, text_params, other_params = run.param_groups
    norm_image = _grad_norm(image_params, device)
    norm_text = _grad_norm(text_params, device)
    if config.grad_clip > 0:
        total = torch.linalg.vector_norm(
            torch.stack([norm_image, norm_text, _grad_norm(other_params, device)])
        )
        _clip_(image_params + text_params + other_params, total, config.grad_clip)
    run.optimizer.step()
    fractions = _anchor_fractions(stats, run.dist.enabled)
    # The one host sync of the step: everything logged, in one transfer.
    values = torch.stack([
        loss.float(), *fractions, norm_image.float(), norm_text.float()
    ]).tolist()  # fmt: skip
    return StepValues(*values)


def _anchor_fractions(stats: Any, distributed: bool) -> Tensor:
    """Gated and near-tie fractions of image and caption anchors over the whole (global)
    batch. A data-parallel rank's statistics cover its own anchors, so the counts are
    summed over ranks (one all-reduce of five numbers): every rank logs what one process
    with the global batch would."""
    counts = torch.cat([
        stats.gated.float().sum(dim=1), stats.near_tie.float().sum(dim=1),
        torch.tensor([stats.gated.shape[1]], dtype=torch.float32, device=stats.gated.device),
    ])  # fmt: skip
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
    return counts[:4] / counts[4]


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; the message names the step and the
    batch."""


def _check_finite(run: Run, values: StepValues, batch: Mapping[str, Any], epoch: int) -> None:
    """Stop with the step and the batch's image and caption rows when the loss or a
    gradient norm is not finite (the parameters are not saved after such a step)."""
    checked = (
        ("loss", values.loss),
        ("gradient norm of the image encoder", values.grad_norm_image),
        ("gradient norm of the text encoder", values.grad_norm_text),
    )
    bad = [(name, value) for name, value in checked if not math.isfinite(value)]
    if not bad:
        return
    name, value = bad[0]
    split = run.dataset.split
    images = sorted(set(int(row) for row in batch["image_index"].tolist()))
    captions = [int(row) for row in batch["caption_index"].tolist()]
    where = f" in {split.data_dir}" if getattr(split, "data_dir", None) else ""
    last = run.out_dir / "last.pt"
    kept = (
        f"{last} is from before this step, untouched"
        if run.dist.is_main and last.is_file()
        else "no checkpoint of this run was written yet"
    )
    raise NonFiniteLossError(
        f"training stopped at step {run.progress.step} (epoch {epoch}): the {name} is {value}. "
        f"The batch held images {_rows(images)} (rows of train_ims.npy{where}) and captions "
        f"{_rows(captions)} (lines of train_caps.txt, counted from 0). The features were "
        "checked finite when the split was loaded, so the model diverged here: lower the "
        f"learning rate (--lr, now {run.config.lr:g}) or change the seed; {kept}."
    )


def _rows(rows: list[int], shown: int = 16) -> str:
    more = f", ... ({len(rows)} in all)" if len(rows) > shown else ""
    return "[" + ", ".join(map(str, rows[:shown])) + more + "]"


def _end_epoch(
    run: Run, logs: RunLogs | None, mode: str, lr: float, epoch_start: float
) -> dict[str, float] | None:
    """After an epoch's last batch: the learning-rate schedule, then (rank 0) the dev
    evaluation, its log rows and the checkpoints. Returns the dev metrics on rank 0."""
    from .evaluate import encode_split, retrieval_metrics

    progress = run.progress
    run.scheduler.step()
    epoch = progress.epoch + 1  # 1-based number of the epoch just finished
    progress.epoch = epoch
    means = progress.epoch_totals.means(progress.step_in_epoch)
    progress.step_in_epoch = 0
    progress.epoch_totals = EpochTotals()
    metrics = None
    if run.dist.is_main:
        run.model.eval()
        with torch.no_grad():
            img_emb, txt_emb, img_index = encode_split(
                run.model, run.dev_split, run.config.eval_batch_size, run.device, text=run.dev_text
            )
            raw = retrieval_metrics(img_emb, txt_emb, img_index, rule=run.config.rank_rule)
        set_training_mode(run.model, run.config)
        metrics = {key: float(value) for key, value in raw.items()}
        row = {
            "epoch": epoch, "step": progress.step, "mode": mode, "lr": lr,
            "train_loss": means.loss, "gated_r": means.gated_r, "gated_c": means.gated_c,
            "near_tie_r": means.near_tie_r, "near_tie_c": means.near_tie_c,
            "seconds": time.perf_counter() - epoch_start,
            **{key: metrics[key] for key in METRICS_COLUMNS if key in metrics},
        }  # fmt: skip
        logs.write_epoch(row, metrics, progress.step)
        print(format_epoch_line(epoch, metrics, (means.gated_r, means.gated_c)), flush=True)
        improved = metrics["rsum"] > progress.best_rsum
        if improved:
            progress.best_rsum = metrics["rsum"]
            progress.best_epoch = epoch
        best = [run.out_dir / "best.pt"] if improved else []
        save_checkpoint(run.checkpoint_payload(), *best, run.out_dir / "last.pt")
    if run.dist.enabled:
        _share_progress(progress, run.device)
    return metrics


def _finish(run: Run) -> Path | None:
    """The closing line and the curves (rank 0); every rank leaves the process group."""
    curves = None
    progress = run.progress
    if run.dist.is_main:
        if progress.best_epoch:
            print(f"best dev rsum {progress.best_rsum:.2f} at epoch {progress.best_epoch}")
        else:
            print(f"stopped after {progress.step} steps (max_steps), before any dev evaluation")
        curves = plot_curves(run.out_dir)
    if run.dist.owns_group:
        import torch.distributed as dist

        # Every rank leaves together: a rank tearing gloo down while rank 0 still writes
        # the curves can abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return curves


# --------------------------------------------------------------------------------------
# Small helpers of the loop
# --------------------------------------------------------------------------------------


def _to_device(value: Any, device: torch.device) -> Any:
    """Move a batch to ``device``, except length vectors: the encoders need them on the host
    (packed sequences, slicing), and keeping them there saves a device sync per forward."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {
            key: item if key.endswith("lengths") else _to_device(item, device)
            for key, item in value.items()
        }
    return value


def _grad_norm(parameters: list[nn.Parameter], device: torch.device) -> Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _clip_(parameters: list[nn.Parameter], total_norm: Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (no host sync)."""
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(scale)


def _share_progress(progress: Progress, device: torch.device) -> None:
    """Rank 0 evaluated; every rank learns the best epoch so far (one small broadcast)."""
    import torch.distributed as dist

    values = torch.tensor([progress.best_rsum, float(progress.best_epoch)], dtype=torch.float64)
    values = values.to(device)
    dist.broadcast(values, src=0)
    progress.best_rsum, progress.best_epoch = float(values[0]), int(values[1])


def _progress_bar(config: TrainConfig, is_main: bool, total: int, done: int, epoch: int) -> Any:
    if not (config.progress and is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
