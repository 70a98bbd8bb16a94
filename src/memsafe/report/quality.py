"""Memorization read beside quality: a model that learned nothing copies nothing, so a low copy rate means
little unless its quality is near an undefended model's on the same data."""

from __future__ import annotations

import json
from pathlib import Path

# FID this many times an undefended run's, or more, is flagged: the memorization figures then say little.
QUALITY_FACTOR = 3.0


def sibling_metrics(run_dir: Path) -> dict[str, dict]:
    """{run name: metrics.json} of every evaluated run in the parent folder of `run_dir`, itself included;
    a file that cannot be read is passed over."""
    found = {}
    for path in sorted(run_dir.parent.glob("*/metrics.json")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return found


def undefended_siblings(run_dir: Path, data_source: str, num_train_images: int | None) -> dict[str, float]:
    """{run name: FID} of the evaluated runs without a defense in the same parent folder, on the same data."""
    found = {}
    for name, metrics in sibling_metrics(run_dir).items():
        same_data = metrics.get("data_source") == data_source and metrics.get("num_train_images") == num_train_images
        undefended = metrics.get("defense", "none") == "none" and isinstance(metrics.get("fid"), (int, float))
        if name != run_dir.name and same_data and undefended:
            found[name] = float(metrics["fid"])
    return found


def compare_with_undefended(run_dir: Path, metrics: dict, data_source: str) -> dict:
    """`fid_vs_undefended` (this run's FID over the mean of its undefended siblings'), the runs it was read
    against, and `quality_warning`, in words, when the ratio reaches QUALITY_FACTOR. Empty without a sibling
    or for an undefended run."""
    if metrics.get("defense", "none") == "none" or "fid" not in metrics:
        return {}
    siblings = undefended_siblings(run_dir, data_source, metrics.get("num_train_images"))
    if not siblings:
        return {}
    reference = sum(siblings.values()) / len(siblings)
    ratio = metrics["fid"] / max(reference, 1e-12)
    found = {"fid_vs_undefended": ratio, "undefended_runs": sorted(siblings)}
    if ratio >= QUALITY_FACTOR:
        against_train = metrics.get("fid_reference") == "train"
        found["quality_warning"] = (
            f"memorization {metrics['memorized_fraction']:.0%}, but FID {ratio:.1f}x the undefended run "
            f"({', '.join(sorted(siblings))}: {reference:.3g}): the model did not learn the data, so its low "
            "memorization says nothing about the defense"
            + (" (FID is measured against the training images here, which a memorizing model reproduces; "
               "set data.holdout_images for a reading against images neither model saw)" if against_train else "")
        )
    return found
