"""Any image Pillow reads, as 8-bit RGB with its transparency composited on white.

Pillow's own ``convert("RGB")`` is right for most modes (1, L, P, RGB, RGBX, CMYK, YCbCr,
LAB, HSV, and 16-bit-per-channel RGB and RGBA PNGs, which Pillow reads as 8-bit), but not
for high-depth grey: a 16-bit PNG (mode ``I;16``) has levels 0..65535, and ``convert``
clips them at 255, so nearly every pixel comes out white. Here:

* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: levels 0..65535, mapped to 0..255
  (``round(v / 257)``, so 8-bit levels stored as ``v * 257`` come back exactly).
* ``I`` (32-bit integers): 0..65535 when the file says 16 bits (a PNG, a 16-bit TIFF);
  otherwise 0..255 if no value exceeds 255 (Pillow's own convention for ``I``), else
  0..65535; values outside 0..65535 have no known scale and are an error.
* ``F`` (32-bit floats): 0..1 if no value exceeds 1, else 0..255; NaN, infinities,
  negative values or values above 255 are an error.
* ``La`` (grey with premultiplied alpha), which Pillow cannot convert: composited directly.
* ``CMYK`` with an embedded ICC profile: converted to sRGB through the profile.
* Anything with an alpha band, or a ``transparency`` entry (palette, grey or RGB keyed
  transparency): composited on white.

A mode that cannot be converted raises :class:`ImageModeError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .extract_inputs import FeatureExtractionError

ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageModeError(FeatureExtractionError):
    """An image's pixels cannot be turned into 8-bit RGB; the message names the file."""


def to_rgb8(image: Any, path: str | Path, source_format: str | None = None) -> Any:
    """``image`` (a PIL image read from ``path``; ``source_format`` its file format) as an
    8-bit RGB PIL image, transparency composited on white."""
    from PIL import Image

    mode = image.mode
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            image = _high_depth_grey(image, path, source_format)
        elif mode == "La":
            return _premultiplied_grey(image).convert("RGB")
        elif mode == "CMYK" and image.info.get("icc_profile"):
            return _cmyk_through_profile(image)
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ImageModeError:
        raise
    except (ValueError, OSError, TypeError) as err:
        raise ImageModeError(f"{path}: cannot convert image mode {mode!r} to RGB ({err})") from None


def _high_depth_grey(image: Any, path: str | Path, source_format: str | None) -> Any:
    """A 16-bit, 32-bit integer or float grey image as 8-bit ``L`` (with ``LA`` for a
    keyed transparent level)."""
    from PIL import Image

    values = np.asarray(image)
    mode = image.mode
    if mode == "F":
        scale = _float_scale(values, path)
    elif mode.startswith("I;16") or _says_16_bit(image, source_format):
        scale = 65535.0
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageModeError(
                f"{path}: 32-bit integer pixels from {low} to {high}, outside 0..65535, so "
                "their scale is unknown; save the image with 8 or 16 bits per channel"
            )
        scale = 255.0 if high <= 255 else 65535.0
    levels = np.clip(np.rint(values.astype(np.float64) * (255.0 / scale)), 0, 255)
    grey = Image.fromarray(levels.astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(alpha, mode="L")))
    return grey


def _float_scale(values: np.ndarray, path: str | Path) -> float:
    if not np.isfinite(values).all():
        raise ImageModeError(f"{path}: floating-point pixels that are NaN or infinite")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ImageModeError(
            f"{path}: floating-point pixels from {low:g} to {high:g}; expected levels in 0..1 "
            "or 0..255"
        )
    return 1.0 if high <= 1 else 255.0


def _says_16_bit(image: Any, source_format: str | None) -> bool:
    """Whether the file records 16 bits per sample (a PNG's ``I`` is always 16-bit)."""
    if source_format == "PNG":
        return True
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return bits == 16


def _premultiplied_grey(image: Any) -> Any:
    """``La`` over white: the stored grey already carries the alpha, so white * (1 - a)
    is added."""
    from PIL import Image

    values = np.asarray(image).astype(np.int32)
    grey = np.clip(values[..., 0] + 255 - values[..., 1], 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def _cmyk_through_profile(image: Any) -> Any:
    """CMYK to sRGB through the image's embedded ICC profile (the plain formula when the
    profile cannot be used)."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        target = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
    except Exception:  # a broken or unsupported profile, or no LittleCMS in this Pillow
        return image.convert("RGB")
