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

Gradient-cached encoding (``chunk_size`` > 0 and smaller than the batch): the loss needs the
whole batch, the encoders only a chunk at a time. (1) every chunk is encoded without
autograd; (2) the loss runs on the concatenated, detached embeddings and its backward gives
the gradient of each embedding; (3) every chunk is encoded again with autograd and its slice
of the embedding gradient is back-propagated. The parameter gradients equal those of one
big backward through the same per-chunk forward passes.

* BatchNorm runs twice per chunk. Both passes use training mode, so the second pass
  computes exactly the embeddings whose gradients step (2) produced (an eval-mode first
  pass would give different embeddings, and the gradients would belong to another point).
  The running statistics are saved before pass (1) and put back after it, so each chunk
  updates them exactly once, in pass (3), as an unchunked step would per chunk. As with
  data parallelism, the batch statistics are those of a chunk, not of the whole batch.
* Random inputs: augmentation happens once, when the data loader builds the batch, and both
  passes reuse those tensors. Randomness inside the model (dropout, if a model has it) is
  replayed: the generator state before each chunk's first pass is restored for its second.

Data parallel (``torchrun --nproc_per_node N -m rvsepp train ...``): ``batch_size`` is per
process; every step draws one global batch of ``N * batch_size`` pairs from one permutation
shared by all ranks, and rank r takes rows ``[r * batch_size, (r + 1) * batch_size)``. The
loss is ``selhn_ext.distributed.selhn_loss`` over the global batch; DDP averages parameter
gradients over ranks, so the loss is multiplied by the world size before backward, which
makes the gradient (and so the 2.0 clip) that of one process with the global batch. Only
rank 0 evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import TrainConfig, save_config

STEP_COLUMNS = (
    "step", "epoch", "mode", "loss", "lr", "gated_r", "gated_c", "near_tie_r", "near_tie_c",
    "grad_norm_image", "grad_norm_text",
)  # fmt: skip
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
METRICS_COLUMNS = (
    "epoch", "step", "mode", "lr", "train_loss", "gated_r", "gated_c", "near_tie_r",
    "near_tie_c", *METRIC_KEYS, "rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
    "seconds",
)  # fmt: skip
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------
# Gradient-cached chunked encoding
# --------------------------------------------------------------------------------------


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The number of pairs in a collated batch."""
    return int(batch["image_index"].shape[0])


def slice_rows(value: Any, start: int, stop: int, rows: int) -> Any:
    """Rows ``[start, stop)`` of every per-pair tensor in a (nested) batch."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() >= 1 and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {key: slice_rows(item, start, stop, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return value[start:stop]
    return value


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    buffers = []
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                if buffer is not None:
                    buffers.append(buffer)
    return buffers


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


LossFn = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Any]]


def forward_backward(
    encoder: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    *,
    chunk_size: int = 0,
    ids: Tensor | None = None,
    loss_scale: float = 1.0,
    inner: nn.Module | None = None,
) -> tuple[Tensor, Any]:
    """Accumulate the parameter gradients of ``loss_scale * loss`` on ``batch``.

    ``encoder(regions, region_lengths, text) -> (img_emb, txt_emb)`` (the model, or its
    DDP wrapper, whose ``no_sync`` then defers the gradient all-reduce to the last chunk;
    ``inner`` is the unwrapped model, used for the pass without autograd).
    ``loss_fn(img_emb, txt_emb, ids) -> (loss, stats)``. With ``chunk_size`` 0 or at least
    the batch, one plain forward and backward; otherwise the three-step gradient cache of
    the module docstring. Returns the detached loss (unscaled) and the loss statistics.
    """
    rows = batch_rows(batch)
    args = (batch["regions"], batch["region_lengths"], batch["text"])
    if chunk_size <= 0 or chunk_size >= rows:
        img, txt = encoder(*args)
        loss, stats = loss_fn(img, txt, ids)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        return loss.detach(), stats

    inner = encoder if inner is None else inner
    device = batch["regions"].device
    bounds = [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]
    chunks = [slice_rows(batch, start, stop, rows) for start, stop in bounds]

    # (1) embeddings of every chunk, without autograd; BatchNorm statistics put back after.
    saved_bn = [buffer.clone() for buffer in _batchnorm_buffers(inner)]
    rng_states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            rng_states.append(_rng_state(device))
            img, txt = inner(chunk["regions"], chunk["region_lengths"], chunk["text"])
            img_parts.append(img)
            txt_parts.append(txt)
        for buffer, saved in zip(_batchnorm_buffers(inner), saved_bn, strict=True):
            buffer.copy_(saved)

    # (2) the loss over the whole batch on detached embeddings -> embedding gradients.
    img_all = torch.cat(img_parts).requires_grad_(True)
    txt_all = torch.cat(txt_parts).requires_grad_(True)
    loss, stats = loss_fn(img_all, txt_all, ids)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    img_grad, txt_grad = img_all.grad, txt_all.grad

    # (3) each chunk again, with autograd, back-propagating its slice of the gradients.
    no_sync = getattr(encoder, "no_sync", None)
    for index, (chunk, (start, stop)) in enumerate(zip(chunks, bounds, strict=True)):
        _set_rng_state(rng_states[index], device)
        last = index == len(chunks) - 1
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            img, txt = encoder(chunk["regions"], chunk["region_lengths"], chunk["text"])
            torch.autograd.backward((img, txt), (img_grad[start:stop], txt_grad[start:stop]))
    return loss.detach(), stats


# --------------------------------------------------------------------------------------
# Sampling: global batches, each rank its slice, resumable mid-epoch
# --------------------------------------------------------------------------------------


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per epoch one permutation of all pairs (the same on every rank), cut into global
    batches of ``batch_size * world_size``; rank r yields rows ``[r*b, (r+1)*b)`` of each.

    The permutation depends only on the seed and the epoch (:meth:`set_epoch`), so a run
    resumes with the same batches; ``skip`` batches of the epoch are left out (the ones a
    stopped run already took).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        global_batch = batch_size * world_size
        if num_items < global_batch and drop_last:
            raise ValueError(
                f"the training split has {num_items} pairs, fewer than one global batch of "
                f"{global_batch} (batch_size {batch_size} x {world_size} processes); lower "
                "batch_size or set drop_last false"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def _global_batches(self) -> list[tuple[int, int]]:
        size = self.batch_size * self.world_size
        full = self.num_items // size
        bounds = [(b * size, (b + 1) * size) for b in range(full)]
        rest = self.num_items - full * size
        # A short last batch is kept only if every rank gets at least 2 pairs.
        if not self.drop_last and rest >= 2 * self.world_size:
            bounds.append((full * size, self.num_items))
        return bounds

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "sampler"))
        order = torch.randperm(self.num_items, generator=generator)
        for start, stop in self._global_batches()[self.skip :]:
            rows = order[start:stop]
            if stop - start == self.batch_size * self.world_size:
                local = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            else:
                local = torch.tensor_split(rows, self.world_size)[self.rank]
            yield local.tolist()


def epoch_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 63-bit seed for one purpose in one epoch (stable across runs and platforms)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{epoch}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------
# Checkpoints: atomic writes, full RNG state
# --------------------------------------------------------------------------------------


def _serialize(payload: Mapping[str, Any], handle: Any) -> None:
    torch.save(payload, handle)


def atomic_save(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is always the old or the new file.

    Written to a temporary file in the same folder, flushed and fsynced, then renamed over
    ``path`` (atomic on POSIX) and the folder fsynced. A failure midway removes the
    temporary file and leaves ``path`` untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            _serialize(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def rng_states(device: torch.device) -> dict[str, Any]:
    """The global generators' states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors, numbers, strings only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable rvsepp checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rvsepp checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


# --------------------------------------------------------------------------------------
# Logging: CSV files, TensorBoard, curves
# --------------------------------------------------------------------------------------


class CsvLog:
    """Appends rows to a CSV file, flushed per row; on resume, rows past the checkpoint
    (written after it, before a crash) are dropped first."""

    def __init__(self, path: Path, columns: tuple[str, ...], *, keep: Callable | None) -> None:
        self.path = path
        self.columns = columns
        kept: list[dict[str, str]] = []
        if keep is not None and path.is_file():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if keep(row)]
        self.handle = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.DictWriter(self.handle, fieldnames=columns)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.handle.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({key: _format_cell(row[key]) for key in self.columns})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _format_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _tensorboard_writer(out_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def plot_curves(out_dir: str | os.PathLike) -> Path | None:
    """Draw ``curves.png`` from ``steps.csv`` and ``metrics.csv``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: curves.png not drawn", file=sys.stderr)
        return None
    out_dir = Path(out_dir)
    steps = read_csv(out_dir / "steps.csv")
    metrics = read_csv(out_dir / "metrics.csv") if (out_dir / "metrics.csv").is_file() else []

    def column(rows: list[dict[str, str]], name: str) -> list[float]:
        return [float(row[name]) for row in rows]

    x = column(steps, "step")
    figure, axes = plt.subplots(5, 1, figsize=(8, 14), sharex=True)
    axes[0].plot(x, column(steps, "loss"), lw=0.8)
    axes[0].set_ylabel("loss")
    if metrics:
        axes[1].plot(column(metrics, "step"), column(metrics, "rsum"), marker="o")
    axes[1].set_ylabel("dev rsum")
    for axis, name in ((axes[2], "gated"), (axes[3], "near_tie")):
        axis.plot(x, column(steps, f"{name}_r"), lw=0.8, label="image anchors (r)")
        axis.plot(x, column(steps, f"{name}_c"), lw=0.8, label="caption anchors (c)")
        axis.set_ylabel(f"{name.replace('_', '-')} fraction")
        axis.legend(loc="upper right")
    axes[4].plot(x, column(steps, "grad_norm_image"), lw=0.8, label="image encoder")
    axes[4].plot(x, column(steps, "grad_norm_text"), lw=0.8, label="text encoder")
    axes[4].set_ylabel("gradient norm")
    axes[4].set_xlabel("step")
    axes[4].legend(loc="upper right")
    figure.tight_layout()
    path = out_dir / "curves.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """Where this process runs: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(config: TrainConfig) -> Distributed:
    """Join the torchrun process group (if ``WORLD_SIZE`` > 1) and pick the device."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if world_size <= 1 and not dist.is_initialized():
        return Distributed(device=torch.device("cuda" if want_cuda else "cpu"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if want_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Distributed(rank=rank, world_size=world_size, device=device, owns_group=owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def format_epoch_line(epoch: int, metrics: Mapping[str, float], gated: tuple[float, float]) -> str:
    """The line printed after each epoch (its layout is part of the command-line contract)."""
    i2t = " ".join(f"{metrics[k]:.2f}" for k in METRIC_KEYS[:3])
    t2i = " ".join(f"{metrics[k]:.2f}" for k in METRIC_KEYS[3:])
    return (
        f"epoch {epoch}  dev rsum {metrics['rsum']:.2f}  i2t {i2t}  t2i {t2i}  "
        f"gated r/c {gated[0]:.3f}/{gated[1]:.3f}"
    )


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    # Sums over the current epoch's steps: loss, gated r/c, near-tie r/c (epoch means).
    epoch_totals: list[float] = field(default_factory=lambda: [0.0] * 5)
    best_rsum: float = -math.inf
    best_epoch: int = 0


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    resume: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train RVSE++ on ``data_dir`` with ``config``; write logs and checkpoints to ``out_dir``.

    ``resume``: a ``last.pt`` (or ``best.pt``) of an earlier run of the same configuration;
    training continues exactly where it stopped (bit-identical on CPU with no workers).
    Returns a summary: best dev rsum and epoch, the last epoch's metrics, steps, paths.
    """
    from .data import ImageCaptionDataset
    from .evaluate import encode_split, first_captions, retrieval_metrics
    from .model import build_model
    from .precomp import load_split

    config.validate()
    dist_info = setup_distributed(config)
    device = dist_info.device
    out_dir = Path(out_dir)
    is_main = dist_info.is_main
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:
        _check_resume_config(config, checkpoint, resume)
        if checkpoint.get("world_size", 1) != dist_info.world_size:
            raise ValueError(
                f"cannot resume from {resume}: it was written by a run of "
                f"{checkpoint.get('world_size', 1)} processes, this one has {dist_info.world_size} "
                "(batch_size is per process, so the batches would differ)"
            )
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.json")

    seed_everything(config.seed)
    train_split = load_split(data_dir, "train", config.captions_per_image)
    dev_split = load_split(data_dir, config.dev_split, config.captions_per_image)
    vocab = build_vocabulary(config, train_split, checkpoint["vocab"] if checkpoint else None)
    dev_split = first_captions(dev_split, config.dev_captions)  # model selection's captions
    cache_dir = token_cache_dir(config, data_dir, out_dir)
    train_text = make_text(config, train_split, vocab, train=True, cache_dir=cache_dir)
    dev_text = make_text(config, dev_split, vocab, train=False, cache_dir=cache_dir)
    if is_main and vocab is not None:
        vocab.save(out_dir / "vocab.json")
    feature_dim = int(train_split.images.shape[2])
    model = build_model(
        config, len(vocab) if vocab is not None else None, device,
        feature_dim=feature_dim, vocab=vocab,
    )  # fmt: skip
    if dist_info.enabled and config.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    encoder: nn.Module = model
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        # A fine-tuned transformer has layers the embeddings do not use (BERT's pooler).
        unused = config.text_encoder == "minilm" and config.minilm_finetune
        encoder = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=unused
        )

    optimizer = torch.optim.AdamW(
        model.parameter_groups(config.lr, config.minilm_lr_scale),
        lr=config.lr, weight_decay=config.weight_decay,
    )  # fmt: skip
    milestones = [config.lr_decay_epoch] if 0 < config.lr_decay_epoch < config.epochs else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones, gamma=config.lr_decay_factor
    )

    dataset = ImageCaptionDataset(
        train_split, train_text, train=config.augment, region_drop=config.region_dropout,
        seed=config.seed,
    )  # fmt: skip
    sampler = GlobalBatchSampler(
        len(dataset), config.batch_size, seed=config.seed, drop_last=config.drop_last,
        world_size=dist_info.world_size, rank=dist_info.rank,
    )  # fmt: skip
    loader_generator = torch.Generator()  # reseeded per epoch (worker seeds come from it)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=dataset.collate,
        num_workers=config.num_workers, generator=loader_generator,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    if len(sampler) == 0:
        raise ValueError(f"no training batch: {len(dataset)} pairs, batch_size {config.batch_size}")

    progress = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"], device)
        progress = Progress(**checkpoint["progress"])

    params = [p for p in model.parameters() if p.requires_grad]
    image_params = [p for p in model.image_encoder.parameters() if p.requires_grad]
    text_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
    other_params = [
        p for p in params if all(p is not q for q in image_params + text_params)
    ]  # a model may hold parameters outside the two encoders
    loss_scale = float(dist_info.world_size)

    logs: dict[str, Any] = {}
    if is_main:
        resumed_step, resumed_epoch = progress.step, progress.epoch
        keep_steps = (lambda row: int(row["step"]) <= resumed_step) if checkpoint else None
        keep_epochs = (lambda row: int(row["epoch"]) <= resumed_epoch) if checkpoint else None
        logs["steps"] = CsvLog(out_dir / "steps.csv", STEP_COLUMNS, keep=keep_steps)
        logs["metrics"] = CsvLog(out_dir / "metrics.csv", METRICS_COLUMNS, keep=keep_epochs)
        logs["tb"] = _tensorboard_writer(out_dir, config.tensorboard)

    def checkpoint_payload() -> dict[str, Any]:
        # The sampler, the loader's generator and the augmentation are seeded from (seed,
        # epoch), so the epoch and the batches taken in it restore them; the loader's
        # generator state is kept for inspection.
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader_generator": loader_generator.get_state(),
            "rng": rng_states(device),
            "progress": {**vars(progress), "epoch_totals": list(progress.epoch_totals)},
            "vocab": vocab.to_dict() if vocab is not None else None,
            "feature_dim": feature_dim,
            "world_size": dist_info.world_size,
        }

    last_metrics: dict[str, float] = {}
    stopped_early = False
    started = time.perf_counter()
    try:
        while progress.epoch < config.epochs and not stopped_early:
            epoch = progress.epoch  # 0-based index of the epoch being run
            mode = config.mode_for_epoch(epoch)
            loss_fn = make_loss_fn(config, mode, dist_info.enabled)
            lr = optimizer.param_groups[0]["lr"]
            sampler.set_epoch(epoch, skip=progress.step_in_epoch)
            loader_generator.manual_seed(epoch_seed(config.seed, epoch, "loader"))
            dataset.set_epoch(epoch)  # augmentation draws from (seed, epoch, item)
            epoch_start = time.perf_counter()
            set_training_mode(model, config)
            batches = iter(loader)
            bar = _progress_bar(config, is_main, len(sampler), progress.step_in_epoch, epoch + 1)
            for batch in batches:
                batch = _to_device(batch, device)
                ids = batch["image_index"] if config.mask_same_image else None
                optimizer.zero_grad(set_to_none=True)
                loss, stats = forward_backward(
                    encoder, batch, loss_fn, chunk_size=config.chunk_size, ids=ids,
                    loss_scale=loss_scale, inner=model,
                )  # fmt: skip
                norm_image = _grad_norm(image_params, device)
                norm_text = _grad_norm(text_params, device)
                if config.grad_clip > 0:
                    total = torch.linalg.vector_norm(
                        torch.stack([norm_image, norm_text, _grad_norm(other_params, device)])
                    )
                    _clip_(params, total, config.grad_clip)
                optimizer.step()
                progress.step += 1
                progress.step_in_epoch += 1
                # The one host sync of the step: everything logged, in one transfer.
                values = torch.stack([
                    loss.float(), *stats.gated_fraction.float(),
                    *stats.near_tie.float().mean(dim=1), norm_image.float(), norm_text.float(),
                ]).tolist()  # fmt: skip
                progress.epoch_totals = [
                    total + value
                    for total, value in zip(progress.epoch_totals, values[:5], strict=True)
                ]
                if is_main:
                    row = dict(zip(STEP_COLUMNS[3:], [values[0], lr, *values[1:]], strict=True))
                    row.update(step=progress.step, epoch=epoch + 1, mode=mode)
                    logs["steps"].write(row)
                    if logs["tb"] is not None:
                        for key in STEP_COLUMNS[3:]:
                            logs["tb"].add_scalar(f"train/{key}", row[key], progress.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{values[0]:.4f}", refresh=False)
                    bar.update(1)
                if not math.isfinite(values[0]):
                    raise FloatingPointError(
                        f"the loss is {values[0]} at step {progress.step} (epoch {epoch + 1})"
                    )
                if config.max_steps and progress.step >= config.max_steps:
                    stopped_early = progress.step_in_epoch < len(sampler)
                    break
            if bar is not None:
                bar.close()
            if stopped_early:
                # Mid-epoch stop: last.pt resumes with the rest of this epoch's batches.
                if is_main:
                    atomic_save(checkpoint_payload(), out_dir / "last.pt")
                break

            scheduler.step()
            progress.epoch = epoch + 1
            means = [total / max(progress.step_in_epoch, 1) for total in progress.epoch_totals]
            progress.step_in_epoch = 0
            progress.epoch_totals = [0.0] * 5
            if is_main:
                model.eval()
                with torch.no_grad():
                    img_emb, txt_emb, img_index = encode_split(
                        model, dev_split, config.eval_batch_size, device, text=dev_text
                    )
                    metrics = retrieval_metrics(img_emb, txt_emb, img_index, rule=config.rank_rule)
                set_training_mode(model, config)
                last_metrics = {key: float(value) for key, value in metrics.items()}
                row = {
                    "epoch": epoch + 1, "step": progress.step, "mode": mode, "lr": lr,
                    "train_loss": means[0], "gated_r": means[1], "gated_c": means[2],
                    "near_tie_r": means[3], "near_tie_c": means[4],
                    "seconds": time.perf_counter() - epoch_start,
                    **{key: last_metrics[key] for key in METRICS_COLUMNS if key in last_metrics},
                }  # fmt: skip
                logs["metrics"].write(row)
                if logs["tb"] is not None:
                    for key in (*METRIC_KEYS, "rsum"):
                        logs["tb"].add_scalar(f"dev/{key}", last_metrics[key], progress.step)
                print(format_epoch_line(epoch + 1, last_metrics, (means[1], means[2])), flush=True)
                improved = last_metrics["rsum"] > progress.best_rsum
                if improved:
                    progress.best_rsum = last_metrics["rsum"]
                    progress.best_epoch = epoch + 1
                payload = checkpoint_payload()
                if improved:
                    atomic_save(payload, out_dir / "best.pt")
                atomic_save(payload, out_dir / "last.pt")
            if dist_info.enabled:
                _share_progress(progress, device)
            if config.max_steps and progress.step >= config.max_steps:
                stopped_early = progress.epoch < config.epochs
    finally:
        for name in ("steps", "metrics"):
            if name in logs:
                logs[name].close()
        if logs.get("tb") is not None:
            logs["tb"].close()

    curves = None
    if is_main:
        if progress.best_epoch:
            print(f"best dev rsum {progress.best_rsum:.2f} at epoch {progress.best_epoch}")
        else:
            print(f"stopped after {progress.step} steps (max_steps), before any dev evaluation")
        curves = plot_curves(out_dir)
    if dist_info.owns_group:
        import torch.distributed as dist

        # Every rank leaves together: a rank tearing gloo down while rank 0 still writes
        # the curves can abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return {
        "best_rsum": progress.best_rsum,
        "best_epoch": progress.best_epoch,
        "epochs_completed": progress.epoch,
        "steps": progress.step,
        "stopped_early": stopped_early,
        "last_metrics": last_metrics,
        "seconds": time.perf_counter() - started,
        "out_dir": str(out_dir),
        "curves": str(curves) if curves else None,
    }


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], device: Any = "cpu"
) -> tuple[nn.Module, Any]:
    """The model of a checkpoint (weights loaded, eval mode) and its vocabulary (or None)."""
    from .config import config_from_dict
    from .model import build_model

    config = config_from_dict(checkpoint["config"], source="checkpoint config")
    vocab = build_vocabulary(config, None, checkpoint["vocab"])
    model = build_model(
        config, len(vocab) if vocab is not None else None, device,
        feature_dim=int(checkpoint["feature_dim"]), vocab=vocab,
    )  # fmt: skip
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, vocab


def build_vocabulary(
    config: TrainConfig, train_split: Any, saved: Mapping[str, Any] | None = None
) -> Any:
    """The BiGRU vocabulary (None for MiniLM): from a checkpoint, ``vocab_path``, or built
    by ``vocab_build`` (see :func:`rvsepp.data.build_vocabulary`)."""
    from .data import build_vocabulary as build

    return build(config, train_split, saved)


def token_cache_dir(config: TrainConfig, data_dir: Any, out_dir: Any) -> Path:
    """Where frozen MiniLM token states are cached: ``token_cache_dir``, else the data
    folder when it is writable (runs on the same data share them), else ``out_dir``."""
    if config.token_cache_dir:
        return Path(config.token_cache_dir)
    data_dir = Path(data_dir)
    return data_dir if os.access(data_dir, os.W_OK) else Path(out_dir)


def make_text(
    config: TrainConfig, split: Any, vocab: Any, *, train: bool, cache_dir: Path | None
) -> Any:
    """The text side of ``split`` for the configured encoder (augmented when ``train``)."""
    from .data import TokenAugmentation, make_text_side, text_source

    augmentation = None
    if train and config.augment and config.token_select_prob > 0:
        augmentation = TokenAugmentation(
            select=config.token_select_prob, mask=config.token_mask_prob,
            replace=config.token_replace_prob, delete=config.token_delete_prob,
            rule=config.token_augment_rule,
        )  # fmt: skip
    cache_path = None
    if config.text_encoder == "minilm" and not config.minilm_finetune and cache_dir is not None:
        cache_path = Path(cache_dir) / f"minilm_states_{split.name or 'split'}.npz"
    return make_text_side(
        config.text_encoder, split.captions, vocab=vocab, augmentation=augmentation,
        finetune=config.minilm_finetune, cache_path=cache_path, source=text_source(split),
        word_tokenizer=config.tokenizer,
    )  # fmt: skip


def set_training_mode(model: nn.Module, config: TrainConfig) -> None:
    """``model.train()``, with BatchNorm layers left in eval mode if ``freeze_batchnorm``
    (running statistics used and never updated; their affine weights still train)."""
    model.train()
    if config.freeze_batchnorm:
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()


def _share_progress(progress: Progress, device: torch.device) -> None:
    """Rank 0 evaluated; every rank learns the best epoch so far (one small broadcast)."""
    import torch.distributed as dist

    values = torch.tensor([progress.best_rsum, float(progress.best_epoch)], dtype=torch.float64)
    values = values.to(device)
    dist.broadcast(values, src=0)
    progress.best_rsum, progress.best_epoch = float(values[0]), int(values[1])


# Fields that change what a resumed run computes; the rest (epochs, max_steps, progress,
# num_workers, ...) may differ between the first run and its continuation.
_RESUME_MUST_MATCH = (
    "lr", "weight_decay", "lr_decay_epoch", "lr_decay_factor", "grad_clip", "batch_size",
    "drop_last", "loss_mode", "warmup_epochs", "margin", "eps", "mask_same_image",
    "embed_dim", "text_encoder", "word_dim", "minilm_finetune", "minilm_lr_scale",
    "gpo_pe_dim", "gpo_hidden", "freeze_batchnorm", "augment", "region_dropout",
    "token_select_prob", "token_mask_prob", "token_replace_prob", "token_delete_prob", "seed",
    "captions_per_image", "chunk_size", "loss_reduction", "baseline_reduction", "tokenizer",
    "vocab_build", "image_bn_stats", "image_mlp", "token_augment_rule", "dev_captions",
    "rank_rule",
)  # fmt: skip


def _check_resume_config(config: TrainConfig, checkpoint: Mapping[str, Any], path: Any) -> None:
    # A field missing from an older checkpoint had its default's meaning.
    saved = {**TrainConfig().to_dict(), **checkpoint["config"]}
    differing = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if differing:
        raise ValueError(
            f"cannot resume from {path}: the configuration differs in " + "; ".join(differing)
        )


def _progress_bar(config: TrainConfig, is_main: bool, total: int, done: int, epoch: int) -> Any:
    if not (config.progress and is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
