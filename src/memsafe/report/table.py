"""Plain-text and markdown tables of metrics."""

from __future__ import annotations

HEADLINE = [
    ("memorized_fraction", "memorized (NN ratio < 1/3)"),
    ("nn_ratio_median", "median NN1/NN2 ratio"),
    ("copy_fraction", "copy-similarity > threshold"),
    ("sim_95pc", "copy similarity (cosine), 95th pct"),
    ("train_sim_95pc", "train-vs-train cosine, 95th pct"),
    ("fid", "FID"),
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
