"""A folder of images in the diffusers ImageFolder convention, with an optional metadata.jsonl of captions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from memsafe.progress import progress_bar

from memsafe.data.images import ImageSet, pil_to_tensor, resize_and_crop
from memsafe.errors import MemsafeError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_metadata(folder: Path) -> dict[str, str]:
    """`file_name` -> `text` from metadata.jsonl; each bad line is named by its number."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemsafeError(f"{path} line {number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or "file_name" not in record:
            raise MemsafeError(f"{path} line {number} has no 'file_name' field")
        name = str(record["file_name"])
        if not (folder / name).is_file():
            raise MemsafeError(f"{path} line {number} names a missing file: {name}")
        captions[name] = str(record.get("text", ""))
    return captions


def decode_image(path: Path, resolution: int, channels: int, center_crop: bool) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image.load()  # forces a full decode, so a truncated file fails here and not mid-training
            if image.mode not in ("L", "RGB", "RGBA", "LA"):
                image = image.convert("RGBA")  # palette and 16-bit modes do not resize smoothly
            return pil_to_tensor(resize_and_crop(image, resolution, center_crop), channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MemsafeError(f"cannot read image {path}: {exc}") from exc


def load_image_folder(folder: str | Path, resolution: int, channels: int, center_crop: bool = True) -> ImageSet:
    folder = Path(folder)
    if not folder.exists():
        raise MemsafeError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise MemsafeError(f"data source is not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise MemsafeError(f"data folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    captions = read_metadata(folder)
    names = [p.relative_to(folder).as_posix() for p in files]
    with progress_bar(files, desc=f"loading {folder.name}", disable=len(files) < 500) as bar:
        pixels = [decode_image(p, resolution, channels, center_crop) for p in bar]
    return ImageSet(
        pixels=torch.stack(pixels),
        captions=[captions.get(n, "") for n in names] if captions else None,
        names=names,
    )
