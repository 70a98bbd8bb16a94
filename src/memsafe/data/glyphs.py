"""A small captioned image folder drawn on the spot: letters, digits and punctuation in PIL's built-in font (a
user's folder in the diffusers ImageFolder layout, for tests and benchmarks that must not use the built-in
digits)."""

from __future__ import annotations

import json
import string
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def glyph_folder(folder: Path, count: int = 64, size: int = 16) -> Path:
    """`count` captioned glyphs (letters, digits, punctuation) drawn in PIL's built-in font, one per image."""
    folder.mkdir()
    font = ImageFont.load_default()
    rows = []
    for i, char in enumerate((string.ascii_letters + string.digits + "#%&@?!")[:count]):
        image = Image.new("L", (size, size), color=255)
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), char, fill=0, font=font)
        image.save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"the glyph {char}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
