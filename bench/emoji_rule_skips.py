"""What AGC's two caption rules would skip on a finished emoji run (kept by `bench/emoji.py --workdir DIR`),
per draw, over a grid of lambda: `caption_gain` (the gain over its bank, skipped below bank / lambda) and
`caption_gain_loss` (the relative gain times the relative loss ** 0.25, the loss over a geometric bank). Every
distinct training emoji at `--draws` noise draws with t in [200, 500); banks per tenth of the window, weighted
as training draws the images. Shares of the duplicated and unique images' draws, and of all training draws.

    python bench/emoji_rule_skips.py DIR/runs/iet_agc_plus-0 [DIR2/runs/...] [--draws 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emoji_signal_auc import caption_draws, log_gain, over_bank  # noqa: E402
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.defenses.iet_agc.agc import LOSS_WEIGHT  # noqa: E402

RATIOS = (1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5)


def rule_skips(run_dir: Path, draws: int) -> dict:
    logs, copies, dup = caption_draws(run_dir, draws)
    gain = over_bank(log_gain(logs), logs["t"], copies)
    scores = {"caption_gain": gain,
              "caption_gain_loss": gain + LOSS_WEIGHT * over_bank(logs["own"], logs["t"], copies, geometric=True)}
    dup = dup.expand_as(gain)
    weights = copies.double().expand_as(gain)
    found = {}
    for name, score in scores.items():
        for ratio in RATIOS:
            skipped = (score < -math.log(ratio)).double()
            found[f"{name}@{ratio}"] = {"dup": skipped[dup].mean().item(), "unique": skipped[~dup].mean().item(),
                                        "all_draws": ((skipped * weights).sum() / weights.sum()).item()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_rule_skips.json")
    args = parser.parse_args()
    results = {str(run): rule_skips(run, args.draws) for run in args.runs}
    table = ["| run | rule @ lambda | dup. draws skipped | unique | all draws |", "|---|---|---|---|---|"]
    table += [f"| {run} | {rule} | {r['dup']:.3f} | {r['unique']:.3f} | {r['all_draws']:.3f} |"
              for run, rules in results.items() for rule, r in rules.items()]
    write_results(args.out, {"draws": args.draws, "runs": results}, table)


if __name__ == "__main__":
    main()
