"""Training images encoded once by a pipeline's VAE, kept on disk for every run that uses the same images,
VAE and resolution (seeds, defenses and IET proxies alike).

The file name is a hash of the images' bytes (which fixes source, subset, resolution and crop), the VAE's
config and weights file, and the encoding rule, so a change of any of them gives another file. A file is
written under a temporary name and renamed when complete: a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memsafe.errors import MemsafeError
from memsafe.progress import progress_bar

ENCODING = "mean*scaling_factor-v1"  # changes when the encoding rule does


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMSAFE_CACHE", Path.home() / ".cache" / "memsafe")) / "latents"


def _vae_fingerprint(pipeline: Path) -> str:
    digest = hashlib.sha256()
    folder = pipeline / "vae"
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update((folder / "config.json").read_bytes())
    return digest.hexdigest()


def cache_key(pixels: torch.Tensor, pipeline: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([list(pixels.shape), ENCODING, _vae_fingerprint(pipeline)]).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_latents(pixels: torch.Tensor, pipeline: str | Path, codec=None, cache_dir: str | Path | None = None,
                   batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) scaled latents of the uint8 images `pixels`, from the cache or encoded now by
    `codec` (a models.pipeline.LatentCodec; built from `pipeline` when not given)."""
    from memsafe.data.images import to_model_range

    pipeline = Path(pipeline)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{cache_key(pixels, pipeline)}.safetensors"
    if path.is_file():
        return load_file(path)["latents"]
    if codec is None:
        from memsafe.models.pipeline import LatentCodec

        codec = LatentCodec(pipeline)
    bar = progress_bar(total=len(pixels), desc="encoding latents", unit="img", disable=not progress, leave=False)
    chunks = []
    for start in range(0, len(pixels), batch_size):
        chunks.append(codec.encode(to_model_range(pixels[start : start + batch_size])))
        bar.update(len(chunks[-1]))
    bar.close()
    latents = torch.cat(chunks).contiguous()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{os.getpid()}-{path.name}"
        save_file({"latents": latents}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise MemsafeError(f"cannot write the latent cache {path}: {exc} (set MEMSAFE_CACHE to a writable folder)") from exc
    return latents
