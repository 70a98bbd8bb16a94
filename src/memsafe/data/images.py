"""Image sets held in memory as uint8 tensors, and the split into training and held-out images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageSet:
    """Images (N, C, H, W, uint8) with optional captions, labels, source names and per-image labels of named
    attributes (e.g. ink colour). Made from decoded `pixels`, or from `files` (data/image_folder.ImageFiles)
    that are decoded, all at once, the first time `pixels` is read."""

    def __init__(self, pixels: torch.Tensor | None = None, captions: list[str] | None = None,
                 labels: torch.Tensor | None = None, names: list[str] | None = None,
                 attributes: dict[str, torch.Tensor] | None = None, files=None):
        if (pixels is None) == (files is None):
            raise ValueError("an ImageSet is made from pixels or from files, one of the two")
        self._pixels, self.files = pixels, files
        self.captions, self.labels, self.names, self.attributes = captions, labels, names, attributes

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = self.files.decode(progress=True)
        return self._pixels

    @property
    def decoded(self) -> bool:
        return self._pixels is not None

    def __len__(self) -> int:
        return self._pixels.shape[0] if self.decoded else len(self.files)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        order = idx.tolist()
        pick = lambda seq: None if seq is None else [seq[i] for i in order]  # noqa: E731
        return ImageSet(
            pixels=self._pixels[idx] if self.decoded else None,
            files=None if self.decoded else self.files.subset(order),
            captions=pick(self.captions),
            labels=None if self.labels is None else self.labels[idx],
            names=pick(self.names),
            attributes=None if self.attributes is None else {k: v[idx] for k, v in self.attributes.items()},
        )

    def as_model_input(self) -> torch.Tensor:
        """Float images in [-1, 1], the range the diffusion model works in."""
        return to_model_range(self.pixels)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model-range images back to [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (to_unit_range(images) * 255.0).round().to(torch.uint8)


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """diffusers' convention: shorter side to `resolution`, then a centre crop (or a square resize)."""
    if not center_crop:
        return image.resize((resolution, resolution), Image.BICUBIC)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.BICUBIC)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    mode = "L" if channels == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "P"):
        # Composite transparency on white rather than letting PIL drop alpha onto black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def split_holdout(images: ImageSet, max_train: int | None, holdout: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded random split: up to `max_train` training images and `holdout` disjoint held-out images."""
    from memsafe.errors import MemsafeError

    total = len(images)
    if holdout >= total:
        raise MemsafeError(f"data.holdout_images {holdout} leaves no training image out of {total}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    held = order[:holdout]
    rest = order[holdout:]
    if max_train is not None:
        if max_train <= 0:
            raise MemsafeError(f"data.max_train_images must be positive, got {max_train}")
        rest = rest[:max_train]
    return images.subset(rest.sort().values), images.subset(held.sort().values)
