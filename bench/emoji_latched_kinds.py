"""Which unique emoji a latched run held (runs kept by `bench/emoji.py --workdir DIR` with `agc_latch`): the
share latched by the end, per kind of caption, from the last checkpoint's ledger. The caption gain is low
wherever the caption alone pins the image down (a country's flag, a keycap's digit), memorized or not.

    python bench/emoji_latched_kinds.py DIR/runs/iet_agc_plus_mid_release_latch-0 [DIR2/runs/...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.config import load_config  # noqa: E402
from memsafe.data import load_dataset  # noqa: E402
from memsafe.defenses.iet_agc.agc import latch_groups, latched  # noqa: E402
from memsafe.train.checkpoint import latest_checkpoint, read_state  # noqa: E402

# The first of these words in a caption names its kind; any other caption is "other".
KINDS = ("flag", "keycap", "family", "squared", "circle", "square")


def caption_kind(text: str) -> str:
    return next((kind for kind in KINDS if kind in text), "other")


def latched_kinds(run_dir: Path) -> dict:
    config = load_config(run_dir / "config.yaml")
    latch = config.defense.iet_agc.agc_latch
    if latch is None:
        raise SystemExit(f"{run_dir}: not a latched run (defense.iet_agc.agc_latch is null)")
    train_set, _ = load_dataset(config.data)
    records = [json.loads(line) for line in (Path(config.data.source) / "metadata.jsonl").read_text().splitlines()]
    records = {record["file_name"]: record for record in records}
    streak = read_state(latest_checkpoint(run_dir / "checkpoints") / "iet")["ledger"]["streak"]
    groups = latch_groups(config.defense.iet_agc.agc_latch_by, train_set.captions)
    is_held = latched(streak, latch, torch.arange(len(streak)), groups).tolist()
    counts, held = Counter(), Counter()
    for name, is_latched in zip(train_set.names, is_held):
        record = records[name]
        if not record["duplicated"]:
            counts[caption_kind(record["text"])] += 1
            held[caption_kind(record["text"])] += is_latched
    return {"steps": config.train.max_steps, "seed": config.train.seed,
            "kinds": {kind: {"unique_emoji": n, "latched": held[kind], "share": held[kind] / n}
                      for kind, n in counts.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_latched_kinds.json")
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        found = latched_kinds(run)
        results[f"{run.name} ({found['steps']} steps)"] = found
    table = ["| run | kind of caption | unique emoji | latched | share |", "|---|---|---|---|---|"]
    table += [f"| {run} | {kind} | {k['unique_emoji']} | {k['latched']} | {k['share']:.2f} |"
              for run, found in results.items() for kind, k in found["kinds"].items()]
    write_results(args.out, {"runs": results}, table)


if __name__ == "__main__":
    main()
