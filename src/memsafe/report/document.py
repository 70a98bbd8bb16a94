"""report.md and report.html of a run: the metrics table and the figures, in one page a person reads."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memsafe.report.figures import save_loss_curve
from memsafe.report.table import HEADLINE, reading

CONCEPT_KEYS = [
    ("extraction_rate", "concept extraction rate (attack prompts)"),
    ("base_rate", "concept base rate (prompts not asking for it)"),
    ("allowed_accuracy", "allowed-prompt accuracy (text-image agreement)"),
]


@dataclass
class Report:
    title: str
    sections: list[tuple[str, list[str], list[tuple[str, str]], list[tuple[str, str]]]] = field(default_factory=list)

    def add(self, heading: str, rows: list[tuple[str, str]] = (), figures: list[tuple[str, str]] = (),
            paragraphs: list[str] = ()) -> None:
        """A section: paragraphs of text, (label, value) table rows and (file name, caption) figures."""
        self.sections.append((heading, list(paragraphs), list(rows), list(figures)))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for heading, paragraphs, rows, figures in self.sections:
            lines += [f"## {heading}", ""]
            for paragraph in paragraphs:
                lines += [paragraph, ""]
            if rows:
                lines += ["| | |", "|---|---|"] + [f"| {label} | {value} |" for label, value in rows] + [""]
            for name, caption in figures:
                lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:2px 10px}"
                 "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        for heading, paragraphs, rows, figures in self.sections:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in paragraphs]
            if rows:
                cells = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows)
                parts.append(f"<table>{cells}</table>")
            for name, caption in figures:
                parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return "\n".join(parts + ["</body></html>"])

    def write(self, folder: Path) -> None:
        for name, text in (("report.md", self.markdown()), ("report.html", self.html())):
            tmp = folder / f".tmp-{name}"
            tmp.write_text(text + "\n")
            tmp.replace(folder / name)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _rows(metrics: dict, keys) -> list[tuple[str, str]]:
    return [(label, _fmt(metrics[key])) for key, label in keys if metrics.get(key) is not None]


def write_run_report(run_dir: Path, metrics: dict, log_rows: list[dict], extras: Sequence[Callable] = ()) -> Path:
    """report.md / report.html (plus their PNG figures) in `run_dir`, from metrics.json's values and the log.
    Each of `extras` (report, run_dir, metrics, log_rows) adds its own sections (a defense's report extras)."""
    report = Report(f"memsafe run {run_dir.name}: defense {metrics.get('defense', 'none')}")
    warning = [f"WARNING: {metrics['quality_warning']}."] if "quality_warning" in metrics else []
    report.add("Memorization and quality", _rows(metrics, HEADLINE + [("num_samples", "generations measured"),
                                                                       ("num_train_images", "training images")]),
               [("nearest.png", "generations (top) above their nearest training images; red = memorized"),
                ("samples.png", "samples")],
               warning + [reading(metrics), f"Samples: samples/ and samples.npz (evaluation seed {metrics.get('eval_seed')})."])
    training = _rows(metrics, [("train_steps", "steps"), ("sec_per_step", "seconds per step"),
                               ("final_loss", "final loss")])
    figures = []
    if log_rows:
        save_loss_curve(log_rows, run_dir / "loss.png")
        figures.append(("loss.png", "training loss"))
    report.add("Training", training, figures)
    if "extraction_rate" in metrics:
        report.add("Concept extraction attack", _rows(metrics, CONCEPT_KEYS))
    for add_sections in extras:
        add_sections(report, run_dir, metrics, log_rows)
    report.write(run_dir)
    return run_dir / "report.md"
