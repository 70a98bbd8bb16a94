"""Where the benchmarks write, and how: a JSON file and a markdown table beside it."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(out: Path, results: dict, table: list[str], echo: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    if echo:
        print("\n".join(table))
