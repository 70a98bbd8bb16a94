"""Training images encoded once by a pipeline's VAE, kept on disk for every run that uses the same images,
VAE and resolution (seeds, defenses and IET proxies alike).

The file name is a hash of the images (their bytes, or for a folder not decoded yet its files' paths, sizes
and modification times with the resolution and crop), the VAE's config and weights files, and the encoding
rule, so a change of any of them gives another file. A file is
written under a temporary name and renamed when complete: a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from memsafe.errors import MemsafeError
from memsafe.progress import progress_bar

ENCODING = "mean*scaling_factor-v2"  # changes when the encoding rule or the file layout does


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


def cache_key(images, pipeline: Path) -> str:
    """Decoded images are keyed by their bytes; files not decoded yet by their paths, sizes, modification
    times and decoding settings (data/image_folder.ImageFiles.fingerprint), so a cache hit decodes nothing."""
    digest = hashlib.sha256()
    digest.update(json.dumps([len(images), ENCODING, _vae_fingerprint(pipeline)]).encode())
    if images.decoded:
        digest.update(json.dumps(list(images.pixels.shape)).encode())
        digest.update(images.pixels.contiguous().numpy().tobytes())
    else:
        digest.update(images.files.fingerprint().encode())
    return digest.hexdigest()[:32]


def _decoded_batches(images, batch_size: int):
    for start in range(0, len(images), batch_size):
        if images.decoded:
            yield images.pixels[start : start + batch_size]
        else:
            yield images.files.decode(start, start + batch_size)


def cached_latents(images, pipeline: str | Path, codec=None, cache_dir: str | Path | None = None,
                   batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) scaled latents of the ImageSet `images`, read from the cache (memory-mapped) or encoded
    now by `codec` (a models.pipeline.LatentCodec; built from `pipeline` when not given), a batch of images
    decoded at a time and written straight to the file, so neither the images nor the latents are ever held
    whole in memory."""
    from memsafe.data.images import to_model_range

    pipeline = Path(pipeline)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{cache_key(images, pipeline)}.npy"
    if not path.is_file():
        if codec is None:
            from memsafe.models.pipeline import LatentCodec

            codec = LatentCodec(pipeline)
        _encode_into(path, images, codec, batch_size, progress, to_model_range)
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _encode_into(path: Path, images, codec, batch_size: int, progress: bool, to_model_range) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    bar = progress_bar(total=len(images), desc="encoding latents", unit="img", disable=not progress, leave=False)
    out = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = 0
        for pixels in _decoded_batches(images, batch_size):
            latents = codec.encode(to_model_range(pixels)).numpy()
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), *latents.shape[1:]))
            out[done : done + len(latents)] = latents
            done += len(latents)
            bar.update(len(latents))
        out.flush()
        del out
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MemsafeError(f"cannot write the latent cache {path}: {exc} (set MEMSAFE_CACHE to a writable folder)") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
