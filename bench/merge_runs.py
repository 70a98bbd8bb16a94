"""Adds the runs of one variant, written by separate invocations of a benchmark to their own --out files (two
runs side by side cannot share one file), to a results file; its summary and markdown table are rewritten.

    python bench/merge_runs.py emoji bench/results/emoji.json iet_agc_plus_caption /tmp/a.json /tmp/b.json

Each run keeps the command line and commit stamped on it when it ran; the file's top-level stamps become this
merge's, and its `recorded` note should say which runs came from where.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import seed_summary, with_run, without_metadata, write_results  # noqa: E402


def merge(bench: str, into: Path, variant: str, sources: list[Path]) -> dict:
    module = importlib.import_module(bench)
    results = json.loads(into.read_text())
    runs = list(results.get(variant, {}).get("runs", []))
    for source in sources:
        found = json.loads(source.read_text()).get(variant)
        if found is None:
            raise SystemExit(f"{source}: no variant {variant!r}")
        for run in found["runs"]:
            runs = with_run(runs, run)
    keys = module.summary_keys(runs) if hasattr(module, "summary_keys") else module.READINGS
    results[variant] = seed_summary(runs, keys)
    write_results(into, results, module.markdown(without_metadata(results)), echo=False)
    return results[variant]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="the benchmark module under bench/ (its READINGS or summary_keys, and markdown)")
    parser.add_argument("into", type=Path, help="the results file to add to")
    parser.add_argument("variant")
    parser.add_argument("sources", type=Path, nargs="+", help="--out files of the separate invocations")
    args = parser.parse_args()
    summary = merge(args.bench, args.into, args.variant, args.sources)
    print(f"{args.variant}: seeds {summary['seeds']} in {args.into}")


if __name__ == "__main__":
    main()
