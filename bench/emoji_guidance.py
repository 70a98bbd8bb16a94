"""Copies and FID of finished emoji runs (kept by `bench/emoji.py --workdir DIR`) at several guidance
scales, read as bench/emoji.py reads its --guidance grid (for runs measured before it had one): a defense that weakens what the caption pulls out of the model may need stronger guidance for the
same quality, and stronger guidance may bring the copies back, so both are read at every scale.

    python bench/emoji_guidance.py DIR/runs/plain-1 DIR/runs/iet_agc_plus_caption_mid-1 [--scales 1,3,5,7]

Per run and scale: `dup_extracted_sscd` (duplicated prompts that draw their own emoji, the prompts of
bench/emoji.py's reading for the run's seed), `dup_copy_rate_sscd` and FID against the held-out emoji.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emoji import kept_run_probe  # noqa: E402
from results_io import CARRIED, METADATA, RESULTS, write_results  # noqa: E402

from memsafe.runs import FinishedRun  # noqa: E402


def readings(run_dir: Path, scales: list[float], samples: int) -> dict[str, dict[str, float]]:
    run = FinishedRun(run_dir)
    probe = kept_run_probe(run, samples)
    sample = run.sampler(run.config.eval.seed)
    out = {}
    for scale in scales:
        out[str(scale)] = probe.at_scale(sample, scale)
        print(run_dir.name, scale, json.dumps(out[str(scale)]), flush=True)
    return out


def markdown(results: dict) -> list[str]:
    lines = ["| run | guidance | own emoji drawn (dup.) | SSCD > 0.5 (dup.) | FID |", "|---|---|---|---|---|"]
    for run, by_scale in results.items():
        for scale, r in by_scale.items():
            lines.append(f"| {run} | {scale} | {r['dup_extracted_sscd']:.2f} | {r['dup_copy_rate_sscd']:.2f} | {r['fid']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of bench/emoji.py --workdir")
    parser.add_argument("--scales", default="1,3,5,7")
    parser.add_argument("--samples", type=int, default=100, help="generations for duplicated prompts (as bench/emoji.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_guidance.json")
    parser.add_argument("--merge", action="store_true", help="add to --out (a run's scales measured again replaced)")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    previous = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    results = {name: value for name, value in previous.items() if name not in METADATA}
    for run in args.runs:
        results[run.name] = results.get(run.name, {}) | readings(run, scales, args.samples)
    carried = {key: previous[key] for key in CARRIED if key in previous}
    write_results(args.out, results | carried, markdown(results))


if __name__ == "__main__":
    main()
