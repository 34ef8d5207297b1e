"""What a training run is built from before its loop: the process group and device, the
seeds, the vocabulary, the text side of each split, and :class:`Run`, which holds the
model, optimizer, schedule, data and progress the loop works on."""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import remove_stale_temporaries
from .checkpoint import (
    CHECKPOINT_FORMAT,
    check_resume_config,
    load_checkpoint,
    rng_states,
    set_rng_states,
)
from .config import TrainConfig
from .progress import Progress
from .sampler import GlobalBatchSampler


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
        # A cache that is valid is never rewritten: clear what a killed write left of it.
        remove_stale_temporaries(cache_path.parent, {cache_path.name})
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


@dataclass
class Run:
    config: TrainConfig
    dist: Distributed
    out_dir: Path
    model: nn.Module
    encoder: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Any
    sampler: GlobalBatchSampler
    loader: Any
    loader_generator: torch.Generator  # reseeded per epoch (worker seeds come from it)
    dev_split: Any
    dev_text: Any
    vocab: Any
    feature_dim: int
    progress: Progress = field(default_factory=Progress)
    # Trainable parameters of the image encoder, the text encoder, and any others.
    param_groups: tuple[list, list, list] = ((), (), ())
    # Names the run in its checkpoints (kept on resume): best.pt is only ever replaced by
    # a checkpoint of the same run.
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def checkpoint_payload(self) -> dict[str, Any]:
        # The sampler, the loader's generator and the augmentation are seeded from (seed,
        # epoch), so the epoch and the batches taken in it restore them; the loader's
        # generator state is kept for inspection.
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader_generator": self.loader_generator.get_state(),
            "rng": rng_states(self.device),
            "progress": self.progress.to_dict(),
            "vocab": self.vocab.to_dict() if self.vocab is not None else None,
            "feature_dim": self.feature_dim,
            "world_size": self.dist.world_size,
            "run_id": self.run_id,
        }


def load_resume(resume: Any, config: TrainConfig, dist_info: Distributed) -> dict | None:
    if resume is None:
        return None
    checkpoint = load_checkpoint(resume)
    check_resume_config(config, checkpoint, resume)
    if checkpoint.get("world_size", 1) != dist_info.world_size:
        raise ValueError(
            f"cannot resume from {resume}: it was written by a run of "
            f"{checkpoint.get('world_size', 1)} processes, this one has {dist_info.world_size} "
            "(batch_size is per process, so the batches would differ)"
        )
    return checkpoint


def build_run(
    config: TrainConfig,
    data_dir: Any,
    out_dir: Path,
    checkpoint: dict | None,
    dist_info: Distributed,
) -> Run:
    """Data, model, optimizer and loader of a run; a checkpoint's states put back."""
    from .data import ImageCaptionDataset
    from .evaluate import first_captions
    from .model import build_model
    from .precomp import load_split

    device = dist_info.device
    seed_everything(config.seed)
    train_split = load_split(data_dir, "train", config.captions_per_image)
    dev_split = load_split(data_dir, config.dev_split, config.captions_per_image)
    vocab = build_vocabulary(config, train_split, checkpoint["vocab"] if checkpoint else None)
    dev_split = first_captions(dev_split, config.dev_captions)  # model selection's captions
    cache_dir = token_cache_dir(config, data_dir, out_dir)
    train_text = make_text(config, train_split, vocab, train=True, cache_dir=cache_dir)
    dev_text = make_text(config, dev_split, vocab, train=False, cache_dir=cache_dir)
    if dist_info.is_main and vocab is not None:
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
    loader_generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=dataset.collate,
        num_workers=config.num_workers, generator=loader_generator,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    if len(sampler) == 0:
        raise ValueError(
            f"no training batch: the training split has {len(dataset)} pairs, and a batch "
            f"needs at least 2 per process ({dist_info.world_size} processes)"
        )

    run = Run(
        config=config, dist=dist_info, out_dir=out_dir, model=model, encoder=encoder,
        optimizer=optimizer, scheduler=scheduler, dataset=dataset, sampler=sampler,
        loader=loader, loader_generator=loader_generator, dev_split=dev_split,
        dev_text=dev_text, vocab=vocab, feature_dim=feature_dim,
        param_groups=parameter_groups(model),
    )  # fmt: skip
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"], device)
        run.progress = Progress.from_dict(checkpoint["progress"])
        run.run_id = checkpoint.get("run_id") or run.run_id
    return run


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """Trainable parameters of the image encoder, the text encoder, and any others (a model
    may hold parameters outside the two encoders)."""
    image = [p for p in model.image_encoder.parameters() if p.requires_grad]
    text = [p for p in model.text_encoder.parameters() if p.requires_grad]
    seen = {id(p) for p in image + text}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return image, text, other
