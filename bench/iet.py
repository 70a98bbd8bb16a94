"""IET-AGC+ against plain training: same data, same samples seen, same seeds.

Runs every variant for each seed (interleaved, so machine drift hits all variants alike), evaluates each
with the same feature network, and writes bench/results/iet.json (seed means and standard deviations per
variant) and bench/results/iet.md. Usage: python bench/iet.py [--seeds 3] [--steps N] [--variants a,b]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from memsafe.cli import demo_config_path
from memsafe.config import load_config, merge
from memsafe.runs import evaluate_run, train_run
from results_io import RESULTS, add_run, previous_runs, run_name, same_seed_change, seed_summary, write_results

# The loss rule (profile "loss", what "auto" picks for these unconditional digits), pinned so that the emoji
# benchmark's text model runs the same rule under these names
IET = {"defense.name": "iet_agc", "defense.iet_agc.profile": "loss", "defense.iet_agc.shards": 4,
       "defense.iet_agc.local_steps": 25}
REFERENCE_RULE = {"defense.iet_agc.agc_smoothing": 0.0}  # AGC on one draw, as the public reference code
VARIANTS = {
    "plain": {"defense.name": "none"},
    "iet": IET | {"defense.iet_agc.agc": False, "defense.iet_agc.redistribute": False, "defense.iet_agc.augment": False},
    "iet_agc": IET | {"defense.iet_agc.redistribute": False, "defense.iet_agc.augment": False},
    "iet_agc_redistribute": IET | {"defense.iet_agc.augment": False},
    "iet_agc_plus": IET,
}
# Every AGC variant again under the reference rule (until 2026-12-05 the default; docs/research/iet-agc.md)
VARIANTS |= {f"{name}_reference": VARIANTS[name] | REFERENCE_RULE for name in list(VARIANTS) if name.startswith("iet_agc")}
METRICS = ("memorized_fraction", "copy_fraction", "fid", "heldout_loss", "mia_auc", "mia_tpr_at_1pct_fpr", "wall_s")
READINGS = METRICS  # what bench/merge_runs.py summarises


def run_variant(name: str, seed: int, steps: int | None, root: Path, extra: dict | None = None) -> dict:
    overrides = VARIANTS[name] | {"train.seed": seed, "output_dir": str(root / run_name(name, seed))}
    if name != "plain":
        overrides |= extra or {}
    if steps:
        overrides["train.max_steps"] = steps
    config = merge(load_config(demo_config_path()), overrides)
    started = time.perf_counter()
    run_dir = train_run(config, progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    metrics = evaluate_run(run_dir, progress=False).metrics
    return {"seed": seed, "wall_s": wall, **{k: metrics[k] for k in METRICS if k != "wall_s"},
            "nn_ratio_median": metrics["nn_ratio_median"], "steps": metrics["train_steps"]}


def markdown(results: dict) -> list[str]:
    """Seed means ± spreads; a change over plain is the mean over seeds of each run against plain's run of the
    same seed (the variants of one seed run one after the other, so machine drift hits them alike), for the
    wall time only against plain runs of the same commit (run one after the other, or side by side)."""
    plain_runs = results["plain"]["runs"] if "plain" in results else []
    lines = [
        "| variant | memorized (NN ratio < 1/3) | copy fraction | FID (domain) | FID vs plain | held-out loss "
        "| held-out vs plain | MIA AUC | wall s | wall vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, digits: int) -> str:  # runs before 2026-12-05 lack the MIA, before 12-06 held-out
        return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}" if key in r else "-"

    for name, r in results.items():
        change = {key: same_seed_change(r["runs"], plain_runs, key, together=key == "wall_s")
                  for key in ("fid", "heldout_loss", "wall_s")}
        lines.append(
            f"| {name} | {cell(r, 'memorized_fraction', 3)} | {cell(r, 'copy_fraction', 3)} | {cell(r, 'fid', 3)} "
            f"| {change['fid']} | {cell(r, 'heldout_loss', 4)} | {change['heldout_loss']} | {cell(r, 'mia_auc', 3)} "
            f"| {cell(r, 'wall_s', 0)} | {change['wall_s']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", help="comma-separated seeds instead of 0..seeds-1")
    parser.add_argument("--steps", type=int, help="override train.max_steps (default: the demo's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "iet.json"))
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to an existing --out (a run of the same variant and seed is replaced)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the IET variants, e.g. defense.iet_agc.augment_max_shift=0.06")
    args = parser.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (pair.partition("=") for pair in args.set)}
    names = args.variants.split(",")
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs, history = previous_runs(out, args.merge)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in names:
                record = run_variant(name, seed, args.steps, Path(tmp), extra)
                add_run(runs, name, record)
                print(json.dumps({"variant": name, **record}), flush=True)
                order = [n for n in VARIANTS if n in runs]
                results = {n: seed_summary(runs[n], METRICS) for n in order}
                write_results(out, results | history, markdown(results), echo=False)
    print("\n".join(markdown(results)))


if __name__ == "__main__":
    main()
