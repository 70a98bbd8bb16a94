"""How much of the emoji benchmark's FID spread is the FID estimate itself: each kept run (bench/emoji.py
--workdir DIR) sampled again on its 500 held-out prompts with other sampling seeds, FID read each time as
bench/emoji.py reads it. Set beside the spread over training seeds (bench/results/emoji.json), it says how
large a change in FID one pair of runs can show.

    python bench/emoji_fid_spread.py DIR/runs/plain-0 [...] --sampling-seeds 1234,0,1,2,3 --guidance 3,5,7
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emoji import kept_run_probe  # noqa: E402
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.runs import FinishedRun  # noqa: E402


def fids(run_dir: Path, seeds: list[int], scales: list[float]) -> dict[float, list[float]]:
    run = FinishedRun(run_dir)
    probe = kept_run_probe(run, 1)
    return {scale: [probe.fid(run.sampler(seed)(probe.prompts["holdout"], scale)) for seed in seeds]
            for scale in scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of bench/emoji.py --workdir")
    # 1234 is eval.seed's default, the seed of bench/emoji.py's own reading
    parser.add_argument("--sampling-seeds", default="1234,0,1,2,3")
    parser.add_argument("--guidance", default="3", help="guidance scales, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_fid_spread.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.sampling_seeds.split(",")]
    scales = [float(s) for s in args.guidance.split(",")]
    results = {}
    for run in args.runs:
        for scale, found in fids(run, seeds, scales).items():
            name = str(run) if len(scales) == 1 else f"{run} @ {scale:g}"
            results[name] = {"fid": found, "mean": statistics.mean(found), "sd": statistics.stdev(found),
                             "sampling_seeds": seeds, "guidance": scale}
            print(name, results[name], flush=True)
    table = ["| run | guidance | FID per sampling seed | mean ± s.d. |", "|---|---|---|---|"]
    table += [f"| {name} | {r['guidance']:g} | {', '.join(f'{f:.2f}' for f in r['fid'])} | "
              f"{r['mean']:.2f} ± {r['sd']:.2f} |" for name, r in results.items()]
    write_results(args.out, results, table)


if __name__ == "__main__":
    main()
