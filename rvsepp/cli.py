"""The ``rvsepp`` command line: extract-features, train, eval, demo.

``python -m rvsepp <command>`` and the ``rvsepp`` console script are the same entry point
(:func:`main`); ``torchrun --nproc_per_node N -m rvsepp train ...`` trains data-parallel.
Errors in the inputs (missing files, malformed data, bad options) print one line,
``rvsepp: error: ...``, and exit with status 1; ``RVSEPP_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

# Training flags and the TrainConfig fields they set (None: not given, keep the config's).
TRAIN_FLAGS = {
    "loss_mode": "loss_mode",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "backend": "backend",
    "text_encoder": "text_encoder",
    "seed": "seed",
    "mask_same_image": "mask_same_image",
    "captions_per_image": "captions_per_image",
    "chunk_size": "chunk_size",
    "num_workers": "num_workers",
    "device": "device",
    "sync_bn": "sync_bn",
    "max_steps": "max_steps",
    "vocab": "vocab_path",
}


# ``--resume`` without a path: the output folder's last.pt.
RESUME_FROM_OUT = object()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rvsepp",
        description="RVSE++ image-text matching with the SelHN triplet loss.",
    )
    parser.add_argument("--version", action="version", version=f"rvsepp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_extract_parser(commands)
    _add_train_parser(commands)
    _add_eval_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_extract_parser(commands: Any) -> None:
    extract = commands.add_parser(
        "extract-features",
        help="images + a caption TSV -> a precomp folder of region features",
        description="Extract EfficientNet-Lite0 region features (36 x 1280 per image) of the "
        "images named in a TSV ('relative/path<TAB>caption' per line) into a precomp folder.",
    )
    extract.add_argument("--images", required=True, type=Path, help="the image folder")
    extract.add_argument("--captions", required=True, type=Path, help="the caption TSV")
    extract.add_argument("--out", required=True, type=Path, help="the output folder")
    extract.add_argument("--split", default="0.8,0.1,0.1", help="train,dev,test image fractions")
    extract.add_argument("--split-seed", type=int, default=0)
    extract.add_argument("--batch-size", type=int, default=32)
    extract.add_argument("--resume", action="store_true", help="continue an interrupted run")
    extract.add_argument("--max-images", type=int, default=None, help=argparse.SUPPRESS)


def _add_train_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train RVSE++ on a precomp folder",
        description="Train RVSE++ (defaults: the paper's recipe). Precedence: built-in "
        "defaults < --resume's checkpoint config < --config file < --set < explicit flags.",
    )
    train.add_argument("--data", required=True, type=Path, help="the precomp folder")
    train.add_argument("--out", required=True, type=Path, help="the run's output folder")
    train.add_argument(
        "--loss-mode", choices=("selhn", "hardest", "all", "sum_hinges", "warmup"), default=None
    )
    train.add_argument("--epochs", type=int, default=None, help="default 30")
    train.add_argument("--batch-size", type=int, default=None, help="per process; default 128")
    train.add_argument("--lr", type=float, default=None, help="default 5e-4")
    train.add_argument(
        "--backend", choices=("auto", "reference", "chunked", "cpu", "triton", "cuda"), default=None
    )
    train.add_argument("--text-encoder", choices=("bigru", "minilm"), default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument(
        "--mask-same-image",
        action="store_const",
        const=True,
        default=None,
        help="pairs showing the same image are not negatives of each other",
    )
    train.add_argument("--captions-per-image", type=int, default=None, help="SCAN folders: 5")
    train.add_argument(
        "--resume",
        type=Path,
        nargs="?",
        const=RESUME_FROM_OUT,
        default=None,
        metavar="CHECKPOINT",
        help="continue a run from its checkpoint (default: OUT/last.pt)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds a run: move it aside (to OUT.replaced-TIME) and start anew",
    )
    train.add_argument("--config", type=Path, default=None, help="a JSON config file")
    train.add_argument("--vocab", type=str, default=None, help="a SCAN vocabulary JSON (BiGRU)")
    train.add_argument(
        "--chunk-size", type=int, default=None, help="encode at most this many pairs at once"
    )
    train.add_argument("--num-workers", type=int, default=None)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    train.add_argument(
        "--sync-bn", action="store_const", const=True, default=None, help="SyncBatchNorm (CUDA)"
    )
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set any config field (VALUE is JSON, or a plain string); repeatable",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="retrieval metrics of a checkpoint on a split",
        description="Image-to-text and text-to-image R@1/5/10, rsum, median and mean rank.",
    )
    evaluate.add_argument("--data", required=True, type=Path, help="the precomp folder")
    evaluate.add_argument(
        "--checkpoint", required=True, type=Path, help="rvsepp best.pt / last.pt, or a "
        "released RVSE++ / VSE-infinity BiGRU model_best.pth (then also --vocab)",
    )  # fmt: skip
    evaluate.add_argument("--vocab", type=Path, default=None, help="SCAN's vocabulary JSON")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument(
        "--fold5", action="store_true", help="also the mean over 5 folds (MS-COCO 5-fold 1K)"
    )
    evaluate.add_argument("--captions-per-image", type=int, default=5)
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="SelHN vs hardest negatives on the shipped emoji subset",
        description="Extract the shipped emoji subset's features once (cached), train RVSE++ "
        "with loss modes selhn and hardest (same seed and settings) and print their test "
        "retrieval metrics.",
    )
    demo.add_argument("--max-images", type=int, default=None, help="use the first N images")
    demo.add_argument("--epochs", type=int, default=None, help="default: the emoji_demo preset")
    demo.add_argument("--batch-size", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--cache-dir", type=Path, default=None, help="default $SELHN_CACHE_DIR or ~/.cache/selhn"
    )
    demo.add_argument(
        "--out", type=Path, default=None, help="keep the runs here (default: demo-runs/DATE-TIME)"
    )
    demo.add_argument("--no-progress", action="store_true")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    from .config import ConfigError

    changes = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            changes[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            changes[name.strip()] = text
    return changes


def train_config_from_args(args: argparse.Namespace) -> Any:
    """The run's TrainConfig: defaults, then the resumed checkpoint's, the --config file,
    --set, and the explicit flags, each overriding the ones before."""
    from .config import TrainConfig, config_from_dict, load_config

    config = TrainConfig()
    if args.resume is RESUME_FROM_OUT:
        args.resume = args.out / "last.pt"
    if args.resume is not None and args.config is None:
        from .checkpoint import load_checkpoint

        config = config_from_dict(load_checkpoint(args.resume)["config"], source=str(args.resume))
    if args.config is not None:
        config = load_config(args.config)
    changes = _parse_set(args.set)
    for flag, field in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value
    if args.no_progress:
        changes["progress"] = False
    return config.replace(**changes) if changes else config


def _command_extract(args: argparse.Namespace) -> int:
    from .features import extract_features

    summary = extract_features(
        args.images,
        args.captions,
        args.out,
        split=args.split,
        split_seed=args.split_seed,
        batch_size=args.batch_size,
        resume=args.resume,
        max_images=args.max_images,
    )
    for name, counts in summary["splits"].items():
        print(f"{name}: {counts['images']} images, {counts['captions']} captions")
    print(
        f"wrote {summary['out']} in {summary['seconds']:.1f} s "
        f"({summary['extracted_images']} images extracted, {summary['reused_images']} reused)"
    )
    return 0


def _command_train(args: argparse.Namespace) -> int:
    from .train import train

    config = train_config_from_args(args)
    train(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def _command_eval(args: argparse.Namespace) -> int:
    import torch

    from .build import make_text, token_cache_dir
    from .evaluate import encode_split, format_report, retrieval_report
    from .precomp import load_split
    from .released import load_for_eval

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    loaded = load_for_eval(args.checkpoint, device, args.vocab)
    split = load_split(args.data, args.split, args.captions_per_image)
    if split.images.shape[2] != loaded.feature_dim:
        raise ValueError(
            f"{args.data}: {args.split} features have {split.images.shape[2]} dimensions, "
            f"the checkpoint's model takes {loaded.feature_dim}"
        )
    cache = token_cache_dir(loaded.config, args.data, args.checkpoint.parent)
    text = make_text(loaded.config, split, loaded.vocab, train=False, cache_dir=cache)
    img_emb, txt_emb, img_index = encode_split(
        loaded.model, split, args.batch_size, device, text=text
    )
    print(
        f"{loaded.description}; split {args.split}: {split.n_images} images, "
        f"{split.n_captions} captions"
    )
    print(format_report(retrieval_report(img_emb, txt_emb, img_index), "all images"))
    if args.fold5:
        report = retrieval_report(img_emb, txt_emb, img_index, fold5=True)
        print(format_report(report, "5-fold mean (each fold 1/5 of the images)"))
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        max_images=args.max_images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    return 0


COMMANDS = {
    "extract-features": _command_extract,
    "train": _command_train,
    "eval": _command_eval,
    "demo": _command_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError, RuntimeError, ArithmeticError) as error:
        if os.environ.get("RVSEPP_DEBUG") == "1":
            raise
        print(f"rvsepp: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rvsepp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
