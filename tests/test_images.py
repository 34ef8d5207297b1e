"""Every image mode Pillow reads becomes the same 8-bit RGB picture: each case is checked
against an 8-bit rendering of the same picture, through the extractor's own loader."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

# The [rvsepp] extra; without it these tests skip (a failure under SELHN_STRICT_SKIPS=1).
Image = pytest.importorskip("PIL.Image", reason="pip install 'selhn[rvsepp]' (Pillow)")

from rvsepp.extract_inputs import FeatureExtractionError  # noqa: E402
from rvsepp.images import ImageModeError, to_rgb8  # noqa: E402
from rvsepp.region_encoder import load_rgb_image  # noqa: E402

SIDE = 24


def picture() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An 8-bit grey picture, an 8-bit RGB picture, and an alpha channel with transparent,
    half and opaque pixels."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    grey = ((x * 11 + y * 7) % 256).astype(np.uint8)
    rgb = np.stack([grey, 255 - grey, ((x * 37 + y * 5) % 256).astype(np.uint8)], axis=-1)
    alpha = np.where(x < 8, 0, np.where(x < 16, 128, 255)).astype(np.uint8)
    return grey, rgb, alpha


def png(path: Path, pixels: np.ndarray, colour_type: int, trns: bytes | None = None) -> Path:
    """A 16-bit PNG written by hand (Pillow writes 16 bits for grey only): ``pixels`` is
    (H, W, channels) uint16; colour types 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """The 8-bit rendering of an RGB picture with ``alpha`` over white."""
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def same_picture(tmp_path: Path, path: Path, expected: Image.Image, mean_levels: float = 0) -> None:
    """``path`` loads as the 8-bit rendering ``expected`` (saved losslessly as PNG): equal,
    or for a lossy colour space within ``mean_levels`` of it on average."""
    reference = tmp_path / "expected.png"
    expected.save(reference)
    got, want = load_rgb_image(path), load_rgb_image(reference)
    assert got.shape == want.shape == (3, 224, 224)
    if mean_levels == 0:
        np.testing.assert_array_equal(got, want, err_msg=path.name)
    levels = np.abs(got - want).mean() * 127.5
    assert levels <= mean_levels, f"{path.name}: {levels:.2f} levels from the 8-bit picture"
    # Not a blank or inverted image: the picture's own contrast is there.
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def grey_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey, mode="L").convert("RGB")


def test_16_bit_grey_png_is_the_8_bit_picture(tmp_path):
    """The reported case: a 16-bit grey PNG came out white (every level clipped at 255)."""
    grey, _, _ = picture()
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    same_picture(tmp_path, path, grey_rgb(grey))


def test_dark_16_bit_grey_stays_dark(tmp_path):
    """Levels below 256 in a 16-bit file are near black, not an 8-bit picture."""
    grey, _, _ = picture()
    path = tmp_path / "dark16.png"
    Image.fromarray(grey.astype(np.uint16)).save(path)
    same_picture(tmp_path, path, grey_rgb(np.rint(grey / 257).astype(np.uint8)))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_tiff_in_either_byte_order(tmp_path, mode):
    grey, _, _ = picture()
    words = (grey.astype(np.uint16) * 257).astype(">u2" if mode.endswith("B") else "<u2")
    path = tmp_path / "grey16.tif"
    Image.frombytes(mode, (SIDE, SIDE), words.tobytes()).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    same_picture(tmp_path, path, grey_rgb(grey))


@pytest.mark.parametrize("scale", [1, 257])
def test_32_bit_integer_tiff_with_8_or_16_bit_levels(tmp_path, scale):
    grey, _, _ = picture()
    path = tmp_path / "grey32.tif"
    Image.fromarray(grey.astype(np.int32) * scale).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I"
    same_picture(tmp_path, path, grey_rgb(grey))


@pytest.mark.parametrize("scale", [1 / 255, 1.0])
def test_float_tiff_with_levels_in_0_1_or_0_255(tmp_path, scale):
    grey, _, _ = picture()
    path = tmp_path / "grey.tif"
    Image.fromarray((grey.astype(np.float32) * np.float32(scale)).astype(np.float32)).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "F"
    same_picture(tmp_path, path, grey_rgb(grey))


def test_16_bit_rgb_rgba_and_grey_alpha_pngs(tmp_path):
    grey, rgb, alpha = picture()
    wide = rgb.astype(np.uint16) * 257
    same_picture(tmp_path, png(tmp_path / "rgb16.png", wide, 2), Image.fromarray(rgb))
    rgba = np.dstack([wide, alpha.astype(np.uint16) * 257])
    same_picture(tmp_path, png(tmp_path / "rgba16.png", rgba, 6), on_white(rgb, alpha))
    la = np.dstack([grey.astype(np.uint16) * 257, alpha.astype(np.uint16) * 257])
    grey3 = np.dstack([grey] * 3)
    same_picture(tmp_path, png(tmp_path / "la16.png", la, 4), on_white(grey3, alpha))


def test_keyed_transparency_in_grey_16_bit_grey_and_rgb(tmp_path):
    grey, rgb, _ = picture()
    key = grey == grey[0, 0]
    assert 1 < key.sum() < key.size
    opaque = np.where(key, 0, 255).astype(np.uint8)
    grey3 = np.dstack([grey] * 3)

    Image.fromarray(grey).save(tmp_path / "grey.png", transparency=int(grey[0, 0]))
    same_picture(tmp_path, tmp_path / "grey.png", on_white(grey3, opaque))
    trns16 = struct.pack(">H", int(grey[0, 0]) * 257)
    path = png(tmp_path / "grey16.png", grey[..., None].astype(np.uint16) * 257, 0, trns16)
    same_picture(tmp_path, path, on_white(grey3, opaque))

    rgb_key = (rgb == rgb[0, 0]).all(axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=tuple(int(v) for v in rgb[0, 0]))
    same_picture(
        tmp_path, tmp_path / "rgb.png", on_white(rgb, np.where(rgb_key, 0, 255).astype(np.uint8))
    )


def test_palette_grey_alpha_one_bit_and_cmyk(tmp_path):
    grey, rgb, alpha = picture()
    palette = Image.fromarray(rgb).quantize(colors=256, dither=Image.Dither.NONE)
    palette.save(tmp_path / "p.png")
    same_picture(tmp_path, tmp_path / "p.png", palette.convert("RGB"))
    palette.save(tmp_path / "p_trns.png", transparency=int(np.asarray(palette)[0, 0]))
    hidden = np.asarray(palette) == np.asarray(palette)[0, 0]
    expected = on_white(
        np.asarray(palette.convert("RGB")), np.where(hidden, 0, 255).astype(np.uint8)
    )
    same_picture(tmp_path, tmp_path / "p_trns.png", expected)

    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    same_picture(tmp_path, tmp_path / "la.png", on_white(np.dstack([grey] * 3), alpha))

    bits = grey > 100
    Image.fromarray(bits).save(tmp_path / "bits.png")
    same_picture(tmp_path, tmp_path / "bits.png", grey_rgb(np.where(bits, 255, 0).astype(np.uint8)))

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    same_picture(tmp_path, tmp_path / "cmyk.tif", Image.fromarray(rgb))


@pytest.mark.parametrize(
    ("mode", "fmt", "mean_levels"), [("YCbCr", "TIFF", 1.5), ("LAB", "TIFF", 2)]
)
def test_colour_spaces_pillow_converts(tmp_path, mode, fmt, mean_levels):
    """YCbCr and CIELAB files: Pillow's conversion, within the rounding of 8-bit storage in
    that colour space (about one level on average)."""
    _, rgb, _ = picture()
    path = tmp_path / f"picture.{fmt.lower()}"
    Image.fromarray(rgb).convert(mode).save(path, fmt)
    with Image.open(path) as opened:
        assert opened.mode == mode
    same_picture(tmp_path, path, Image.fromarray(rgb), mean_levels=mean_levels)


def test_modes_no_file_format_stores():
    """Premultiplied alpha (La, RGBa), palette with alpha (PA) and HSV, in memory."""
    grey, rgb, alpha = picture()
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    got = np.asarray(to_rgb8(rgba.convert("RGBa"), "memory"), dtype=np.int32)
    want = np.asarray(on_white(rgb, alpha), dtype=np.int32)
    assert np.abs(got - want).max() <= 2  # premultiplying rounds

    palette = Image.fromarray(rgb).quantize(colors=256, dither=Image.Dither.NONE)
    with_alpha = Image.merge("PA", [palette, Image.fromarray(alpha)])
    with_alpha.putpalette(palette.getpalette())
    got = np.asarray(to_rgb8(with_alpha, "memory"), dtype=np.int32)
    want = np.asarray(on_white(np.asarray(palette.convert("RGB")), alpha), dtype=np.int32)
    assert np.abs(got - want).max() == 0

    premultiplied = np.dstack([np.rint(grey * (alpha / 255.0)), alpha]).astype(np.uint8)
    la = Image.frombytes("La", (SIDE, SIDE), premultiplied.tobytes())
    got = np.asarray(to_rgb8(la, "memory"), dtype=np.int32)
    want = np.asarray(on_white(np.dstack([grey] * 3), alpha), dtype=np.int32)
    assert np.abs(got - want).max() <= 1

    got = np.asarray(to_rgb8(Image.fromarray(rgb).convert("HSV"), "memory"), dtype=np.int32)
    assert np.abs(got - rgb.astype(np.int32)).max() <= 6  # 8-bit HSV rounding


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (np.full((SIDE, SIDE), -5, np.int32), "32-bit integer pixels from -5 to -5"),
        (np.full((SIDE, SIDE), 70000, np.int32), "outside 0..65535"),
        (np.full((SIDE, SIDE), np.nan, np.float32), "NaN or infinite"),
        (np.full((SIDE, SIDE), 300.0, np.float32), "expected levels in 0..1 or 0..255"),
    ],
)
def test_pixels_of_unknown_scale_are_an_error_naming_the_file(tmp_path, pixels, problem):
    path = tmp_path / "odd.tif"
    Image.fromarray(pixels).save(path)
    with pytest.raises(ImageModeError, match=f"odd.tif: .*{problem}"):
        load_rgb_image(path)


def test_extraction_names_the_file_and_tsv_line_of_an_unconvertible_image(tmp_path):
    from rvsepp.features import extract_features

    images = tmp_path / "images"
    images.mkdir()
    grey, _, _ = picture()
    for index in range(3):
        Image.fromarray(grey).save(images / f"ok{index}.png")
    Image.fromarray(np.full((SIDE, SIDE), -1, np.int32)).save(images / "odd.tif")
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("ok0.png\ta\nok1.png\tb\nodd.tif\tc\nok2.png\td\n")

    def encoder(pixels):
        return np.zeros((len(pixels), 36, 1280), np.float32)

    with pytest.raises(FeatureExtractionError, match=r"odd\.tif: 32-bit integer .*line 3\)"):
        extract_features(
            images, tsv, tmp_path / "out", split=(0.34, 0.33, 0.33), encoder=encoder,
            progress=False,
        )  # fmt: skip
