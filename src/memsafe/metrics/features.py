"""A domain feature network for copy detection and FID, trained by memsafe on the real images at hand.

Pretrained SSCD and Inception weights cannot be downloaded here, so memsafe trains a small CNN the way
SSCD is trained (SimCLR-style instance discrimination under augmentation). It needs no labels, so it
serves any image folder. It is trained once per dataset, deterministically, and cached, so every run on the same data is
measured with the same network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from memsafe.progress import progress_bar

from memsafe.errors import MemsafeError

FEATURE_NET_VERSION = 1


class FeatureNet(nn.Module):
    """Images in model range [-1, 1] -> `num_features`-d backbone features (FID) and, through a projection
    head, unit vectors in the instance space (copy detection).

    `background_similarity` is the 95th percentile of real images' cosine similarity to their nearest
    *other* real image, measured once after training; `calibrate` maps it to 0.5 so that the copy
    threshold of the literature (0.5) means "closer to a training image than 95% of real images are to
    each other" in this domain.
    """

    def __init__(self, channels: int = 1, width: int = 32, num_features: int = 128, projection_dim: int = 64,
                 background_similarity: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.background_similarity = background_similarity
        self.arch = {"channels": channels, "width": width, "num_features": num_features,
                     "projection_dim": projection_dim}

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_features),
        )
        self.projection = nn.Sequential(nn.ReLU(), nn.Linear(num_features, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Unit vectors in the contrastive (instance) space, where distinct images are pushed apart."""
        self.eval()
        chunks = [self.projection(self(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(chunks), dim=1)

    def calibrate(self, similarity: torch.Tensor) -> torch.Tensor:
        """Affine map of cosine similarity: the background level goes to 0.5, identity (1.0) stays 1.0."""
        b = self.background_similarity
        return 0.5 + 0.5 * (similarity - b) / max(1.0 - b, 1e-6)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift, scale, small rotation, contrast/brightness jitter and noise: a copy stays a copy."""
    n = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = (rand(n) - 0.5) * 0.4
    scale = 0.85 + 0.3 * rand(n)
    shift = (rand(n, 2) - 0.5) * 0.3
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images + 1, grid, padding_mode="zeros", align_corners=False) - 1
    contrast = 0.8 + 0.4 * rand(n, 1, 1, 1)
    brightness = (rand(n, 1, 1, 1) - 0.5) * 0.2
    noise = torch.randn(images.shape, generator=generator) * 0.05
    return (out * contrast + brightness + noise).clamp(-1, 1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def train_feature_net(
    images: torch.Tensor, steps: int = 300, batch_size: int = 128, seed: int = 0, progress: bool = True
) -> FeatureNet:
    """SimCLR-style instance discrimination on real images in model range; deterministic per seed and data."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(channels=images.shape[1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batch_size = min(batch_size, len(images))
    net.train()
    for _ in progress_bar(range(steps), desc="feature network", disable=not progress, leave=False):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        batch = images[idx]
        view_a, view_b = augment(batch, generator), augment(batch, generator)
        loss = nt_xent(net.projection(net(view_a)), net.projection(net(view_b)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    net.background_similarity = background_similarity(net, images)
    return net


def background_similarity(net: FeatureNet, images: torch.Tensor, quantile: float = 0.95) -> float:
    from memsafe.metrics.copy_detection import top1_similarity

    features = net.embed(images)
    similarity, _ = top1_similarity(features, features, skip_self=True)
    return float(torch.quantile(similarity.double(), quantile))


def save_feature_net(net: FeatureNet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"arch": json.dumps(net.arch), "background_similarity": repr(net.background_similarity)}
    save_file(net.state_dict(), tmp, metadata=metadata)
    os.replace(tmp, path)


def load_feature_net(path: str | Path) -> torch.nn.Module:
    """A memsafe FeatureNet (.safetensors) or any TorchScript module (.pt/.ts) mapping images to features."""
    path = Path(path)
    if not path.is_file():
        raise MemsafeError(f"feature network not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        if "arch" not in metadata:
            raise MemsafeError(f"{path} is not a memsafe feature network (no 'arch' metadata)")
        net = FeatureNet(**json.loads(metadata["arch"]), background_similarity=float(metadata["background_similarity"]))
        net.load_state_dict(load_file(path))
        return net.eval()
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as exc:
        raise MemsafeError(f"cannot load feature network {path}: {exc}") from exc
    if not hasattr(module, "num_features"):
        raise MemsafeError(f"feature network {path} must define an integer attribute 'num_features'")
    return module


def cache_dir() -> Path:
    return Path(os.environ.get("MEMSAFE_CACHE", Path.home() / ".cache" / "memsafe"))


def data_fingerprint(images: torch.Tensor) -> str:
    digest = hashlib.sha256(f"v{FEATURE_NET_VERSION}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def domain_feature_net(images: torch.Tensor, progress: bool = True) -> FeatureNet:
    """The cached feature network for these real images (model range), trained on first use."""
    path = cache_dir() / "features" / f"{data_fingerprint(images)}.safetensors"
    if path.is_file():
        return load_feature_net(path)
    net = train_feature_net(images, progress=progress)
    save_feature_net(net, path)
    return net
