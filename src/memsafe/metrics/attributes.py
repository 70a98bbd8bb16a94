"""A detector of image attributes (which digit, which ink, stamped or not), trained by memsafe on real labelled images.

It decides whether a generation shows the protected concept (concept-extraction attacks) and whether
it shows what an allowed prompt asked for (text-image agreement).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from memsafe.progress import progress_bar

from memsafe.metrics.features import FeatureNet, augment, cache_dir, data_fingerprint


class AttributeClassifier(nn.Module):
    """A FeatureNet backbone with one linear head per attribute (name -> number of classes)."""

    def __init__(self, channels: int, heads: dict[str, int]):
        super().__init__()
        self.heads_spec = dict(heads)
        self.backbone = FeatureNet(channels=channels)
        self.heads = nn.ModuleDict({name: nn.Linear(self.backbone.num_features, n) for name, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = F.silu(self.backbone(images))
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        self.eval()
        outputs = [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return {name: torch.cat([o[name] for o in outputs]).argmax(1) for name in self.heads}


def train_attribute_classifier(
    images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int = 300, batch_size: int = 128, seed: int = 0,
    progress: bool = True,
) -> AttributeClassifier:
    """Supervised training on model-range images under the copy-detection augmentations."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AttributeClassifier(images.shape[1], {k: int(v.max()) + 1 for k, v in labels.items()})
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    for _ in progress_bar(range(steps), desc="attribute detector", disable=not progress, leave=False):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        outputs = net(augment(images[idx], generator))
        loss = sum(F.cross_entropy(outputs[k], labels[k][idx]) for k in labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def cached_attribute_classifier(images: torch.Tensor, labels: dict[str, torch.Tensor], progress: bool = True):
    """Trained once per data set and cached beside the feature networks."""
    key = data_fingerprint(torch.cat([images.flatten(1), *[v[:, None].float() for v in labels.values()]], 1))
    path = cache_dir() / "attributes" / f"{key}.safetensors"
    if path.is_file():
        with open(path.with_suffix(".json")) as handle:
            spec = json.load(handle)
        net = AttributeClassifier(spec["channels"], spec["heads"])
        net.load_state_dict(load_file(path))
        return net.eval()
    net = train_attribute_classifier(images, labels, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"channels": images.shape[1], "heads": net.heads_spec}))
    tmp = path.with_name(path.name + ".tmp")
    save_file(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net


def ink_digit_detector(resolution: int, progress: bool = True) -> AttributeClassifier:
    """The detector for the built-in ink and stamped digits: every real digit rendered in every ink, with
    and without the stamp."""
    from memsafe.data.digits import load_digits
    from memsafe.data.images import to_model_range
    from memsafe.data.ink_digits import INK_NAMES, add_stamp, render_in_ink

    digits = load_digits(resolution, channels=1)
    copies = 2 * len(INK_NAMES)
    inks = torch.arange(len(INK_NAMES)).repeat_interleave(len(digits)).repeat(2)
    stamped = torch.arange(2).repeat_interleave(len(digits) * len(INK_NAMES))
    pixels = add_stamp(render_in_ink(digits.pixels.repeat(copies, 1, 1, 1), inks), stamped)
    labels = {"digit": digits.labels.repeat(copies), "ink": inks, "stamp": stamped}
    return cached_attribute_classifier(to_model_range(pixels), labels, progress)


__all__ = ["AttributeClassifier", "cached_attribute_classifier", "ink_digit_detector", "train_attribute_classifier"]
