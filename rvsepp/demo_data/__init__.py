"""A small real image-caption set shipped with the package: 599 emoji with 1,310 captions.

``EMOJI_IMAGES`` is the image folder and ``EMOJI_CAPTIONS`` the TSV ("relative/path<TAB>
caption" per line, 1 to 3 captions per image) that ``rvsepp extract-features`` reads.
Sources and licences (Noto Emoji images: Apache-2.0; CLDR captions: Unicode licence) are in
the ``LICENSE`` file next to this one; ``scripts/make_emoji_subset.py`` regenerates it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent
EMOJI_IMAGES: Path = DEMO_DATA / "emoji"
EMOJI_CAPTIONS: Path = DEMO_DATA / "emoji_captions.tsv"

__all__ = ["EMOJI_CAPTIONS", "EMOJI_IMAGES"]
