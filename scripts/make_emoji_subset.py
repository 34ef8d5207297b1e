"""Regenerate the shipped emoji image-caption subset in ``rvsepp/demo_data/``.

Inputs (Debian packages; ``apt-get install -y fonts-noto-color-emoji unicode-cldr-core``):

* ``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf``: the Noto Color Emoji images
  (Apache-2.0), rendered here with Pillow, downscaled to ``--size`` pixels and stored as
  palette PNGs with transparency.
* ``/usr/share/unicode/cldr/common/properties/labels.txt``: CLDR's emoji groups, used to
  choose visually distinct categories (faces, animals, plants, food, activities, objects,
  places, transport, weather, clothing) and to leave out near-duplicates (people with
  skin-tone and gender variants, flags, clocks, moon phases, books, envelopes, banknotes,
  locks, hearts and other symbols).
* ``/usr/share/unicode/cldr/common/annotations/en.xml``: CLDR English names and keywords
  (Unicode licence), which become the captions.

Captions per emoji (2 or 3, duplicates removed): the CLDR short name ("grinning face"),
its CLDR keywords other than the name ("face, grin"), and the Unicode character name in
lower case when it differs from both ("smiling face with open mouth").

Run from the repository root: ``python scripts/make_emoji_subset.py``. The output is
deterministic for a given font, CLDR version and Python (Unicode) version.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR = Path("/usr/share/unicode/cldr/common")
LABELS = CLDR / "properties" / "labels.txt"
ANNOTATIONS = CLDR / "annotations" / "en.xml"
OUT = Path(__file__).resolve().parent.parent / "rvsepp" / "demo_data"
MAX_IMAGES = 600
# The colour bitmap font only has strikes at this size.
FONT_SIZE = 109

# CLDR (group, subgroup) pairs whose members look distinct from one another.
SUBGROUPS = {
    "Smileys & People": {
        "face-positive",
        "face-neutral",
        "face-negative",
        "face-sick",
        "face-role",
        "face-fantasy",
        "cat-face",
        "monkey-face",
        "clothing",
    },
    "Animals & Nature": {
        "animal-mammal",
        "animal-bird",
        "animal-amphibian",
        "animal-reptile",
        "animal-marine",
        "animal-bug",
        "plant-flower",
        "plant-other",
    },
    "Food & Drink": {
        "food-fruit",
        "food-vegetable",
        "food-prepared",
        "food-asian",
        "food-sweet",
        "drink",
    },
    "Activities": {"event", "sport"},
    "Objects": {
        "music",
        "musical-instrument",
        "computer",
        "light & video",
        "tool",
        "household",
    },
    "Travel & Places": {
        "place-geographic",
        "transport-ground",
        "transport-air",
        "sky & weather",
    },
}
# Near-duplicates inside the chosen subgroups: the eight moon phases.
EXCLUDED = {chr(cp) for cp in range(0x1F311, 0x1F319)}


def parse_unicode_set(text: str) -> list[str]:
    """Single code points of a CLDR UnicodeSet like ``[a-cx{seq}]`` (sequences skipped)."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(f"{LABELS}: not a UnicodeSet: {text!r}")
    body = body[1:-1]
    chars: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "{":
            i = body.index("}", i) + 1
            continue
        if i + 2 < len(body) and body[i + 1] == "-":
            chars.extend(chr(cp) for cp in range(ord(body[i]), ord(body[i + 2]) + 1))
            i += 3
        else:
            chars.append(body[i])
            i += 1
    return chars


def chosen_emoji() -> list[str]:
    chosen: set[str] = set()
    for line in LABELS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(";")]
        if len(fields) < 3:
            continue
        group, subgroup = fields[1], fields[2]
        if subgroup in SUBGROUPS.get(group, ()):
            chosen.update(parse_unicode_set(fields[0]))
    return sorted(chosen - EXCLUDED)


def read_annotations() -> dict[str, tuple[str, list[str]]]:
    """Map each annotated character to (short name, keywords)."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for node in ET.parse(ANNOTATIONS).getroot().iter("annotation"):
        text = (node.text or "").strip()
        if node.get("type") == "tts":
            names[node.get("cp")] = text
        else:
            keywords[node.get("cp")] = [kw.strip() for kw in text.split("|") if kw.strip()]
    return {cp: (names[cp], keywords.get(cp, [])) for cp in names}


def captions_for(char: str, name: str, keywords: list[str]) -> list[str]:
    captions = [name]
    other_keywords = [kw for kw in keywords if kw.lower() != name.lower()]
    if other_keywords:
        captions.append(", ".join(other_keywords))
    unicode_name = unicodedata.name(char, "").lower()
    if unicode_name and unicode_name not in {c.lower() for c in captions}:
        captions.append(unicode_name)
    return captions


def render(char: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """The emoji cropped to its bounding box, centred on a transparent square."""
    canvas = Image.new("RGBA", (2 * FONT_SIZE, 2 * FONT_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None  # the font has no glyph for it
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="demo_data folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES)
    args = parser.parse_args(argv)
    for needed in (FONT, LABELS, ANNOTATIONS):
        if not needed.exists():
            sys.exit(
                f"{needed} is missing: apt-get install -y fonts-noto-color-emoji unicode-cldr-core"
            )

    annotations = read_annotations()
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    image_dir = args.out / "emoji"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)

    rows: list[str] = []
    written = 0
    for char in chosen_emoji():
        if written == args.max_images:
            break
        if char not in annotations:
            continue
        image = render(char, font, args.size)
        if image is None:
            continue
        relative = f"u{ord(char):05x}.png"  # relative to the image folder
        # A 256-colour palette with transparency keeps the subset near 2 MB; the
        # feature extractor composites it on white like any RGBA image.
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(
            image_dir / relative, optimize=True
        )
        name, keywords = annotations[char]
        rows.extend(f"{relative}\t{caption}" for caption in captions_for(char, name, keywords))
        written += 1

    (args.out / "emoji_captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    total = sum(path.stat().st_size for path in image_dir.iterdir())
    print(f"{written} images ({total / 1e6:.2f} MB), {len(rows)} captions -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
