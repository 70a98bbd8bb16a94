"""IET-AGC+'s part of a run report: the share of samples AGC skipped, per round."""

from __future__ import annotations

from pathlib import Path

from memsafe.report.document import Report
from memsafe.report.figures import save_curve


def add_skip_rate(report: Report, run_dir: Path, log_rows: list[dict]) -> None:
    rows = [r for r in log_rows if "skip_rate" in r]
    if not rows:
        return
    rounds = sorted({r["round"] for r in rows})
    mean = [sum(r["skip_rate"] for r in rows if r["round"] == k) / sum(r["round"] == k for r in rows) for k in rounds]
    save_curve(rounds, mean, run_dir / "skip_rate.png", "IET round", "AGC skip rate (mean over shards)")
    report.add("IET-AGC+", [("rounds", str(len(rounds)))],
               [("skip_rate.png", "IET-AGC+: share of samples skipped as memorization-prone, per round")])
