"""Each model at its own best guidance scale, FID averaged over sampling seeds: a defended run against the
plain run of the same training seed, from two files of bench/emoji_fid_spread.py (runs named `.../<variant>-<seed>`,
each read at the same scales and sampling seeds). One FID estimate moves by about 5 % with the sampling seed;
the mean over n seeds by 5 % / sqrt(n).

    python bench/emoji_best_scale.py PLAIN.json DEFENDED.json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import METADATA, RESULTS, variant_and_seed, write_results  # noqa: E402


def mean_fid_by_seed(path: Path) -> dict[int, dict[float, float]]:
    """{training seed: {guidance: FID averaged over the sampling seeds}}."""
    found: dict[int, dict[float, float]] = defaultdict(dict)
    for name, reading in json.loads(path.read_text()).items():
        if name in METADATA:
            continue
        run = Path(name.split(" @ ")[0]).name
        found[variant_and_seed(run)[1]][reading["guidance"]] = reading["mean"]
    return dict(found)


def best(by_scale: dict[float, float]) -> tuple[float, float]:
    """(scale, FID) of the lowest FID."""
    return min(by_scale.items(), key=lambda item: item[1])


def compare(plain: dict[int, dict[float, float]], defended: dict[int, dict[float, float]]) -> dict:
    seeds = sorted(set(plain) & set(defended))
    rows = []
    for seed in seeds:
        (plain_scale, plain_fid), (scale, fid) = best(plain[seed]), best(defended[seed])
        rows.append({"seed": seed, "plain_scale": plain_scale, "plain_fid": plain_fid, "scale": scale, "fid": fid,
                     "change": fid / plain_fid - 1,
                     "change_at_each_scale": {s: defended[seed][s] / plain[seed][s] - 1 for s in plain[seed]}})
    changes = [row["change"] for row in rows]
    return {"seeds": seeds, "runs": rows, "change_mean": statistics.mean(changes),
            "change_sd": statistics.stdev(changes) if len(changes) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plain", type=Path)
    parser.add_argument("defended", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_best_scale.json")
    args = parser.parse_args()
    found = compare(mean_fid_by_seed(args.plain), mean_fid_by_seed(args.defended))
    table = ["| seed | plain: best scale, FID | defended: best scale, FID | change | change at each scale |",
             "|---|---|---|---|---|"]
    table += [f"| {r['seed']} | {r['plain_scale']:g}, {r['plain_fid']:.2f} | {r['scale']:g}, {r['fid']:.2f} | "
              f"{r['change']:+.1%} | " + ", ".join(f"{s:g}: {c:+.1%}" for s, c in r["change_at_each_scale"].items())
              + " |" for r in found["runs"]]
    spread = f" ± {found['change_sd']:.1%} (s.d. over seeds)" if found["change_sd"] is not None else ""
    table += ["", f"Mean change at each model's best scale: {found['change_mean']:+.1%}{spread}"]
    write_results(args.out, {"plain_file": str(args.plain), "defended_file": str(args.defended)} | found, table)


if __name__ == "__main__":
    main()
