"""``rvsepp demo``: RVSE++ with the SelHN loss against the hardest-negative loss, on real data.

The shipped emoji subset (``rvsepp.demo_data``: Noto emoji images with their CLDR names and
keywords) is turned into region features once (EfficientNet-Lite0, cached under
``~/.cache/selhn/emoji-<hash>``, or ``$SELHN_CACHE_DIR``, or ``--cache-dir``; a complete
folder is reused). Then the same model is trained twice with the same seed and settings
(``rvsepp/configs/emoji_demo.json``: the frozen MiniLM text encoder with cached token
states, since a BiGRU learnt from a few hundred emoji names would not know most test
words), once with loss mode ``selhn`` and once with ``hardest``, and the best-on-dev
checkpoint of each is evaluated on the test split. Everything in the printed table is
computed in this run; its last line is chance (the expected recalls of a random ranking of
the same split, :func:`chance_metrics`).

The runs (checkpoints, ``steps.csv``, ``metrics.csv``, ``curves.png``) are kept in
``demo-runs/<date-time>/<mode>`` under the current folder, or ``--out``; the last line
printed names the folder.

The table starts with a fixed header line (:data:`TABLE_HEADER`); each following line is
one mode, whitespace-separated, in the header's column order (:func:`parse_table`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, load_config, preset_path

MODES = ("selhn", "hardest")
COLUMNS = (
    "mode", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "seed", "epochs", "images", "wall_s",
)  # fmt: skip
TABLE_HEADER = "{:<8}".format("mode") + "".join(f"{c:>9}" for c in COLUMNS[1:])
CACHE_ENV = "SELHN_CACHE_DIR"
RUNS_FOLDER = "demo-runs"  # under the current folder, one subfolder per demo


def default_cache_root() -> Path:
    """``$SELHN_CACHE_DIR``, else ``$XDG_CACHE_HOME/selhn``, else ``~/.cache/selhn``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selhn"


def emoji_features_key(max_images: int | None) -> str:
    """A hash of everything the emoji features depend on: the caption file, the image
    files' names and sizes, the image count and the extractor's settings."""
    from . import features
    from .demo_data import EMOJI_CAPTIONS, EMOJI_IMAGES

    digest = hashlib.sha256()
    digest.update(EMOJI_CAPTIONS.read_bytes())
    for path in sorted(EMOJI_IMAGES.iterdir()):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    settings = (
        features.ENCODER_NAME, features.IMAGE_SIZE, features.GRID, features.FEATURE_DIM,
        features.FORMAT_VERSION, max_images,
    )  # fmt: skip
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def prepare_emoji_features(
    cache_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    *,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Region features of the first ``max_images`` shipped emoji (all when None), extracted
    once into ``cache_root/emoji-<hash>`` and reused when complete. Returns the folder and
    the extraction summary (``reused_images`` tells whether anything was extracted)."""
    from .demo_data import EMOJI_CAPTIONS, EMOJI_IMAGES
    from .features import extract_features

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / f"emoji-{emoji_features_key(max_images)}"
    summary = extract_features(
        EMOJI_IMAGES, EMOJI_CAPTIONS, folder, max_images=max_images, resume=True,
        progress=progress,
    )  # fmt: skip
    return folder, summary


def demo_config(
    epochs: int | None = None, batch_size: int | None = None, seed: int = 0
) -> TrainConfig:
    """The shipped ``emoji_demo.json`` preset with the command line's overrides."""
    config = load_config(preset_path("emoji_demo"))
    changes: dict[str, Any] = {"seed": seed}
    if epochs is not None:
        changes["epochs"] = epochs
    if batch_size is not None:
        changes["batch_size"] = batch_size
    return config.replace(**changes)


def run_demo(
    *,
    max_images: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    modes: tuple[str, ...] = MODES,
    progress: bool = True,
    echo: Any = print,
) -> list[dict[str, Any]]:
    """Train and test one model per loss mode; print and return the table's rows."""
    from .evaluate import evaluate_split
    from .precomp import load_split
    from .train import train

    started = time.perf_counter()
    features_dir, summary = prepare_emoji_features(cache_dir, max_images, progress=progress)
    echo(
        f"features: {features_dir} ({summary['images']} images, {summary['captions']} captions; "
        f"{'reused' if summary['reused_images'] else 'extracted'} in {summary['seconds']:.0f} s)"
    )
    base = demo_config(epochs, batch_size, seed).replace(
        token_cache_dir=str(features_dir), progress=progress
    )
    test_split = load_split(features_dir, "test")
    runs_root = _runs_root(out_dir, modes)
    rows = []
    for mode in modes:
        mode_started = time.perf_counter()
        config = base.replace(loss_mode=mode)
        echo(f"training with loss mode {mode!r} ({config.epochs} epochs) in {runs_root / mode}")
        result = train(config, features_dir, runs_root / mode)
        model, text = _load_for_test(runs_root / mode / "best.pt", config, features_dir)
        metrics = evaluate_split(model, test_split, config.eval_batch_size, "cpu", text=text)
        row = {key: metrics[key] for key in COLUMNS[1:8]}
        row.update(
            mode=mode, seed=config.seed, epochs=config.epochs, images=summary["images"],
            wall_s=time.perf_counter() - mode_started, best_epoch=result["best_epoch"],
        )  # fmt: skip
        rows.append(row)
    total = time.perf_counter() - started
    echo(
        f"test split: {test_split.n_images} images, {test_split.n_captions} captions; "
        f"best-on-dev checkpoints; total wall time {total:.0f} s"
    )
    chance = chance_metrics(test_split.img_index, test_split.n_images)
    echo(format_table(rows, chance))
    echo(
        f"runs kept in {runs_root}: one folder per mode ({', '.join(modes)}) with best.pt, "
        "last.pt, steps.csv, metrics.csv and curves.png"
    )
    return rows


def _runs_root(out_dir: str | os.PathLike | None, modes: tuple[str, ...]) -> Path:
    """``out_dir``, or a new ``demo-runs/<date-time>`` in the current folder; the runs'
    folders in it must not exist yet (the demo never overwrites a run)."""
    if out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = Path(RUNS_FOLDER) / stamp
        number = 1
        while root.exists():
            number += 1
            root = Path(RUNS_FOLDER) / f"{stamp}-{number}"
        return root
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file, not a folder for the demo's runs")
    taken = [str(root / mode) for mode in modes if (root / mode).exists()]
    if taken:
        raise ValueError(
            f"{', '.join(taken)} already exist; the demo keeps every run, so choose another "
            "--out folder (or leave --out out: each demo gets a new demo-runs/<date-time>)"
        )
    return root


def chance_metrics(img_index: Any, n_images: int) -> dict[str, float]:
    """The expected R@1/5/10 (in %) and rsum of a uniformly random ranking of a split with
    ``img_index[c]`` the image of caption ``c``.

    Image to text: an image with ``k`` of the ``M`` captions is found within the first
    ``K`` unless all ``K`` come from the other ``M - k``: ``1 - C(M-k, K) / C(M, K)``, the
    mean over images. Text to image: one right image among ``N``: ``min(K, N) / N``.
    """
    counts = [0] * n_images
    for image in img_index:
        counts[int(image)] += 1
    total = sum(counts)
    chance: dict[str, float] = {}
    for k in (1, 5, 10):
        shown = min(k, total)  # a list shorter than K shows every caption
        i2t = sum(1 - math.comb(total - c, shown) / math.comb(total, shown) for c in counts)
        i2t /= n_images
        chance[f"i2t_r{k}"] = 100 * i2t
        chance[f"t2i_r{k}"] = 100 * min(k, n_images) / n_images
    chance["rsum"] = sum(chance[key] for key in COLUMNS[1:7])
    return chance


def _load_for_test(checkpoint_path: Path, config: TrainConfig, features_dir: Path) -> Any:
    from .build import make_text
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .precomp import load_split

    checkpoint = load_checkpoint(checkpoint_path)
    model, vocab = model_from_checkpoint(checkpoint, "cpu", source=checkpoint_path)

    split = load_split(features_dir, "test")
    text = make_text(config, split, vocab, train=False, cache_dir=features_dir)
    return model, text


def format_table(rows: list[dict[str, Any]], chance: dict[str, float] | None = None) -> str:
    """The header line, one line per mode, then (given ``chance``) the chance line."""
    lines = [TABLE_HEADER]
    for row in rows:
        cells = [f"{row['mode']:<8}"]
        cells += [f"{row[key]:>9.2f}" for key in COLUMNS[1:8]]
        cells += [f"{row['seed']:>9d}", f"{row['epochs']:>9d}", f"{row['images']:>9d}"]
        cells.append(f"{row['wall_s']:>9.1f}")
        lines.append("".join(cells))
    if chance is not None:
        cells = [f"{'chance':<8}"] + [f"{chance[key]:>9.2f}" for key in COLUMNS[1:8]]
        lines.append("".join(cells) + f"{'(random ranking of the same test split)':>41}")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, Any]]:
    """Rows of the table printed by :func:`run_demo`, from any text that contains it."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER.strip())
    except StopIteration:
        raise ValueError("no demo table header found") from None
    rows = []
    for line in lines[start + 1 :]:
        cells = line.split()
        if len(cells) != len(COLUMNS) or cells[0] not in MODES:
            break
        row: dict[str, Any] = {"mode": cells[0]}
        for key, cell in zip(COLUMNS[1:], cells[1:], strict=True):
            row[key] = int(cell) if key in ("seed", "epochs", "images") else float(cell)
        rows.append(row)
    return rows
