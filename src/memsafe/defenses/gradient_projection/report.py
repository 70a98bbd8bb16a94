"""Gradient projection's part of a run report: the share of gradient removed, and extraction against strength."""

from __future__ import annotations

from pathlib import Path

from memsafe.report.document import Report
from memsafe.report.figures import save_curve
from memsafe.report.quality import sibling_metrics

REMOVED = "gradient_projection/removed_grad_norm"


def sibling_strength_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(projection strength, extraction rate) of every evaluated run in the same parent folder that measured
    the concept: an undefended run counts as strength 0. Sorted by strength; one point per strength (the mean)."""
    runs = sibling_metrics(run_dir)
    source = runs.get(run_dir.name, {}).get("data_source")
    points: dict[float, list[float]] = {}
    for metrics in runs.values():
        if "extraction_rate" not in metrics or metrics.get("data_source") != source:
            continue
        points.setdefault(float(metrics.get("projection_strength", 0.0)), []).append(metrics["extraction_rate"])
    return sorted((strength, sum(v) / len(v)) for strength, v in points.items())


def add_projection(report: Report, run_dir: Path, metrics: dict, log_rows: list[dict]) -> None:
    figures = []
    removed = [r for r in log_rows if REMOVED in r]
    if removed:
        save_curve([r["step"] for r in removed], [r[REMOVED] for r in removed], run_dir / "removed.png",
                   "step", "share of gradient norm removed")
        figures.append(("removed.png", "gradient projection: share of the projected layers' gradient norm removed"))
    curve = sibling_strength_curve(run_dir) if "extraction_rate" in metrics else []
    if len(curve) > 1:
        save_curve([p[0] for p in curve], [p[1] for p in curve], run_dir / "extraction_vs_strength.png",
                   "projection strength (0 = undefended)", "extraction rate", marker="o")
        figures.append(("extraction_vs_strength.png",
                        f"extraction rate against projection strength over the evaluated runs in {run_dir.parent}"))
    report.add("Gradient projection", [("strength", str(metrics.get("projection_strength")))], figures)
