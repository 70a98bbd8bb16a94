"""Which prompts turn red: the leak routes of the gradient-projection benchmark, read off trained runs.

For each run (by default the seed-0 `none` and `gp_lambda_1` runs of bench/gradproj.py, plus its base
model) the model is prompted with the digit and an ink word that is red, an allowed ink, an ink it never
saw (purple), the word "ink" alone, or no ink, and the detector counts the inks it draws. A model that
learned "red" from the word draws red only for "red"; a model that learned "red = no blue, no green" draws
red for purple, "ink" and no ink as well. Writes bench/results/gradproj_routes.json and .md.
Usage: python bench/gradproj_routes.py [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from memsafe.data.digits import DIGIT_NAMES
from memsafe.data.ink_digits import INK_NAMES
from memsafe.metrics.attributes import ink_digit_detector
from memsafe.runs import load_run_config, run_prompt_sampler
from results_io import RESULTS, write_results

INK_PHRASES = {"red": " in red ink", "blue": " in blue ink", "green": " in green ink", "purple (unseen)": " in purple ink",
               "'ink' alone": " in ink", "no ink": ""}


def ink_shares(run_dir: Path, per_digit: int) -> dict[str, dict[str, float]]:
    detector = ink_digit_detector(load_run_config(run_dir).data.resolution, progress=False)
    sample = run_prompt_sampler(run_dir, 0)
    shares = {}
    for label, phrase in INK_PHRASES.items():
        prompts = [f"a handwritten digit {DIGIT_NAMES[d]}{phrase}" for d in range(10) for _ in range(per_digit)]
        inks = detector.predict(sample(prompts))["ink"]
        counts = torch.bincount(inks, minlength=len(INK_NAMES)).float() / len(prompts)
        shares[label] = {ink: round(counts[i].item(), 3) for i, ink in enumerate(INK_NAMES)}
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = Path("runs/bench-gradproj-ink")
    parser.add_argument("runs", nargs="*", default=[str(work / n) for n in ("base", "none-0", "gp_lambda_1-0")])
    parser.add_argument("--per-digit", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "gradproj_routes.json"))
    args = parser.parse_args()
    results = {Path(r).name: ink_shares(Path(r), args.per_digit) for r in args.runs}
    lines = ["| run | " + " | ".join(f"red share, prompt: {p}" for p in INK_PHRASES) + " |",
             "|---|" + "---|" * len(INK_PHRASES)]
    for run, shares in results.items():
        lines.append(f"| {run} | " + " | ".join(f"{shares[p]['red']:.2f}" for p in INK_PHRASES) + " |")
    write_results(Path(args.out), results, lines)


if __name__ == "__main__":
    main()
