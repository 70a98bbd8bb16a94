"""Measures finished emoji runs again (kept by `bench/emoji.py --workdir DIR`) with today's readings, e.g. the
guidance grid for runs measured before it existed, in the results file that holds their records: each run's
training record stays (seed, steps, wall time), the command and commit that trained it move to `trained_by`,
and the run is stamped with this command and commit.

    python bench/emoji_remeasure.py /tmp/plain-1.json DIR/runs/plain-1 [--guidance 3,5,7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emoji import markdown, measure, summarise  # noqa: E402
from results_io import add_run, previous_runs, variant_and_seed, write_results  # noqa: E402

from memsafe.runs import load_run_config  # noqa: E402

STAMP = ("command", "git_commit", "uncommitted_changes")


def remeasured(run_dir: Path, runs: dict[str, list[dict]], samples: int, scales: list[float]) -> tuple[str, dict]:
    name, seed = variant_and_seed(run_dir.name)
    old = next((r for r in runs.get(name, []) if r["seed"] == seed), None)
    if old is None:
        raise SystemExit(f"{run_dir}: no run of {name!r} seed {seed} in the results file")
    kept = {key: old[key] for key in ("seed", "wall_s", "steps")}
    trained_by = old.get("trained_by", {key: old.get(key) for key in STAMP})
    return name, kept | {"trained_by": trained_by} | measure(run_dir, load_run_config(run_dir), samples, seed, scales)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results file of bench/emoji.py holding the runs' records")
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--samples", type=int, default=100, help="generations per group (as bench/emoji.py)")
    parser.add_argument("--guidance", default="3,5,7")
    args = parser.parse_args()
    scales = [float(scale) for scale in args.guidance.split(",") if scale]
    runs, history = previous_runs(args.results, merge=True)
    settings = json.loads(args.results.read_text()).get("settings", {})
    for run_dir in args.runs:
        name, record = remeasured(run_dir, runs, args.samples, scales)
        add_run(runs, name, record)
        print(json.dumps({"variant": name, **record}), flush=True)
    results = summarise(runs)
    write_results(args.results, results | history | {"settings": settings}, markdown(results), echo=False)


if __name__ == "__main__":
    main()
