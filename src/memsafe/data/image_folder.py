"""A folder of images in the diffusers ImageFolder convention, with an optional metadata.jsonl of captions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class ImageFiles:
    """Image files not yet decoded: what an ImageSet of a folder holds until its pixels are asked for, so a
    latent run whose VAE latents are cached never decodes the folder, and one that encodes it decodes a
    batch at a time."""

    paths: tuple[Path, ...]
    resolution: int
    channels: int
    center_crop: bool

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> ImageFiles:
        return replace(self, paths=tuple(self.paths[i] for i in indices))

    def decode(self, start: int = 0, stop: int | None = None, progress: bool = False) -> torch.Tensor:
        """(n, C, H, W) uint8 pixels of files start..stop."""
        chosen = self.paths[start:stop]
        with progress_bar(chosen, desc="decoding images", disable=not progress or len(chosen) < 500) as bar:
            return torch.stack([decode_image(p, self.resolution, self.channels, self.center_crop) for p in bar])

    def fingerprint(self) -> str:
        """Changes when any file's path, size or modification time, or the decoding settings, change."""
        digest = hashlib.sha256(repr((self.resolution, self.channels, self.center_crop)).encode())
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def load_image_folder(folder: str | Path, resolution: int, channels: int, center_crop: bool = True,
                      lazy: bool = False) -> ImageSet:
    """The folder's images and captions; `lazy` defers decoding until the pixels are first read."""
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
    images = ImageSet(
        files=ImageFiles(tuple(files), resolution, channels, center_crop),
        captions=[captions.get(n, "") for n in names] if captions else None,
        names=names,
    )
    if not lazy:
        images.pixels  # noqa: B018  (decodes now)
    return images
