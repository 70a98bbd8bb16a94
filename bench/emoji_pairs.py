"""Wall time, FID and held-out loss of a defended emoji run over a plain run of the same seed that ran beside
it (started together, one thread each): ratios measured side by side, from the two runs' --out files. The file
holds one entry per defended variant (its pairs, the command and commit that wrote them); the other variants'
entries are kept, and with --keep the variant's pairs of other seeds too.

    python bench/emoji_pairs.py iet_agc_plus --pair PLAIN.json DEFENDED.json "conditions" [--pair ...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import CARRIED, METADATA, RESULTS, run_stamp, write_json  # noqa: E402


def pair(variant: str, plain_path: Path, defended_path: Path, conditions: str) -> dict:
    plain = json.loads(plain_path.read_text())["plain"]["runs"][0]
    defended = json.loads(defended_path.read_text())[variant]["runs"][0]
    if plain["seed"] != defended["seed"]:
        raise SystemExit(f"{plain_path} is seed {plain['seed']}, {defended_path} seed {defended['seed']}")
    ratios = {f"{key}_ratio": defended[key] / plain[key] for key in ("wall_s", "fid", "heldout_loss")}
    return {"seed": plain["seed"], "conditions": conditions, **ratios, "plain": plain, variant: defended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("PLAIN", "DEFENDED", "CONDITIONS"))
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_pairs.json")
    parser.add_argument("--keep", action="store_true", help="keep the variant's recorded pairs of the seeds not given")
    args = parser.parse_args()
    pairs = [pair(args.variant, Path(p), Path(d), c) for p, d, c in args.pair]
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "variant" in previous:  # the layout of one variant per file, before 2026-12-06
        previous = {previous["variant"]: {key: previous[key] for key in ("pairs", *METADATA) if key in previous}}
    entries = {name: value for name, value in previous.items() if name not in METADATA}
    if args.keep and args.variant in entries:
        given = {p["seed"] for p in pairs}
        pairs = sorted([p for p in entries[args.variant]["pairs"] if p["seed"] not in given] + pairs,
                       key=lambda p: p["seed"])
    entries[args.variant] = {"pairs": pairs} | run_stamp()
    write_json(args.out, entries | {key: previous[key] for key in CARRIED if key in previous})
    for p in pairs:
        print(p["seed"], {k: round(v, 3) for k, v in p.items() if k.endswith("_ratio")}, p["conditions"])


if __name__ == "__main__":
    main()
