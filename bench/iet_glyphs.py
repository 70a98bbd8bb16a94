"""IET-AGC+ variants on a user's folder of 64 rendered glyphs (the setting of tests/test_iet_quality.py: 48
trained on, 16 held out, 2,400 steps of batch 16, minimal configs): FID against the held-out glyphs,
memorization and AGC's skip rate, per variant and seed. Written to find what costs IET-AGC+ its quality
(docs/research/iet-agc.md).

    python bench/iet_glyphs.py [--seeds 1] [--variants plain,iet_agc_plus,iet_agc_plus_reference] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, run_name, seed_summary, write_results  # noqa: E402

from memsafe.config import config_from_dict  # noqa: E402
from memsafe.data.glyphs import glyph_folder  # noqa: E402
from memsafe.runs import evaluate_run, train_run  # noqa: E402

IET = {"name": "iet_agc"}
VARIANTS = {
    "plain": {"name": "none"},
    "iet": IET | {"iet_agc": {"agc": False, "redistribute": False, "augment": False}},
    "iet_agc_plus": IET,
    "iet_agc_plus_no_augment": IET | {"iet_agc": {"augment": False}},
    "iet_agc_plus_reference": IET | {"iet_agc": {"agc_smoothing": 0.0}},  # the reference code's one-draw rule
    "iet_agc_plus_smoothing_0.95": IET | {"iet_agc": {"agc_smoothing": 0.95}},
}
READINGS = ("fid", "memorized_fraction", "copy_fraction", "skip_rate_last_round")


def run(name: str, seed: int, data: Path, root: Path) -> dict:
    config = config_from_dict({"data": {"source": str(data), "holdout_images": 16},
                               "train": {"max_steps": 2400, "batch_size": 16, "seed": seed},
                               "defense": VARIANTS[name], "output_dir": str(root / run_name(name, seed))})
    run_dir = train_run(config, progress=False)
    metrics = evaluate_run(run_dir, progress=False).metrics
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    last_round = max((r.get("round", 0) for r in rows), default=0)
    skips = [r["skip_rate"] for r in rows if r.get("round") == last_round and "skip_rate" in r]
    return {"seed": seed, **{k: metrics[k] for k in READINGS[:3]},
            "skip_rate_last_round": statistics.fmean(skips) if skips else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", default="plain,iet_agc_plus,iet_agc_plus_reference")
    parser.add_argument("--out", default=str(RESULTS / "iet_glyphs.json"))
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = glyph_folder(Path(tmp) / "glyphs")
        for seed in range(args.seeds):
            for name in args.variants.split(","):
                record = run(name, seed, data, Path(tmp) / "runs")
                print(json.dumps({"variant": name, **record}), flush=True)
                results.setdefault(name, {"runs": []})["runs"].append(record)
    results = {name: seed_summary(value["runs"], READINGS) for name, value in results.items()}
    plain = results.get("plain", {}).get("fid")
    table = ["| variant | FID (held-out) | vs plain | memorized | copies | AGC skip rate, last round |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        versus = f"{r['fid'] / plain:.2f}x" if plain else "-"
        table.append(f"| {name} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {versus} | {r['memorized_fraction']:.3f} | "
                     f"{r['copy_fraction']:.3f} | {r['skip_rate_last_round']:.2f} |")
    write_results(Path(args.out), results | {"settings": {"seeds": args.seeds}}, table)


if __name__ == "__main__":
    main()
