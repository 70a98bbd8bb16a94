"""Plain-text and markdown tables of metrics."""

from __future__ import annotations

HEADLINE = [
    ("memorized_fraction", "memorized (NN ratio < 1/3)"),
    ("nn_ratio_median", "median NN1/NN2 ratio"),
    ("copy_fraction", "copy-similarity > threshold"),
    ("sim_95pc", "copy similarity (cosine), 95th pct"),
    ("train_sim_95pc", "train-vs-train cosine, 95th pct"),
    ("fid", "FID"),
    ("heldout_loss", "held-out denoising loss"),
    ("memorized_fraction_worst", "memorized, at the guidance scale that copies most"),
    ("copy_fraction_worst", "copy-similarity > threshold, at the guidance scale that copies most"),
    ("copy_rate_sscd_worst", "SSCD > 0.5, at the guidance scale that copies most"),
]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(rows: dict[str, dict], keys=HEADLINE) -> str:
    """A markdown table: one row per named result (e.g. per variant), one column per headline metric."""
    header = "| run | " + " | ".join(label for _, label in keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"
    lines = [header, rule]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k, "-")) for k, _ in keys) + " |")
    return "\n".join(lines)


def copy_scale(metrics: dict) -> str:
    """What the copy threshold means, in the units it was applied in."""
    if "copy_threshold_cosine" not in metrics:
        return f"cosine similarity > {metrics['copy_threshold']} to the nearest training image"
    return (f"calibrated copy score > {metrics['copy_threshold']}, i.e. cosine > {metrics['copy_threshold_cosine']:.3f} "
            "to the nearest training image in the domain features, which 5% of real images reach against their "
            "nearest other real image")


def reading(metrics: dict) -> str:
    """One line with memorization and quality side by side, each with its scale."""
    return (
        f"memorized {metrics['memorized_fraction']:.1%} of {metrics['num_samples']} generations (nearest / "
        f"second-nearest training image distance < {metrics['memorization_threshold']:.3f}); copies "
        f"{metrics['copy_fraction']:.1%} ({copy_scale(metrics)}); FID {metrics['fid']:.3g} "
        f"({metrics.get('fid_features', 'domain')} features, against the {metrics.get('fid_reference', 'holdout')} images)"
        + worst_guidance(metrics)
    )


def worst_guidance(metrics: dict) -> str:
    """The copies of a text run at the guidance scale that copies most, SSCD's reading when it was taken."""
    key = "copy_rate_sscd" if "copy_rate_sscd_worst" in metrics else "copy_fraction"
    if f"{key}_worst" not in metrics:
        return ""
    scales = ", ".join(metrics["guidance_copies"])
    label = "SSCD > 0.5" if key == "copy_rate_sscd" else "copies"
    return (f"; at the guidance scale that copies most of {scales}: {label} {metrics[f'{key}_worst']:.1%} "
            f"(scale {metrics[f'{key}_worst_guidance']:g}), memorized {metrics['memorized_fraction_worst']:.1%} "
            f"(scale {metrics['memorized_fraction_worst_guidance']:g})")


COMPARISON = [
    ("memorized_fraction", "memorized (NN ratio < 1/3)"),
    ("copy_fraction", "copies (calibrated score > 0.5)"),
    ("fid", "FID (domain)"),
    ("heldout_loss", "held-out loss"),
    ("train_seconds", "training wall s"),
]
