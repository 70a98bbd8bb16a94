"""Which duplicated emoji a finished emoji run still draws: for each duplicated image's caption, how many of its
generations have that image as their SSCD-nearest real image (bench/emoji.py's "own emoji drawn", per image).

    python bench/emoji_per_image.py RUN_DIR [RUN_DIR ...] [--guidance 7] [--samples 100]

RUN_DIR is a run kept by `bench/emoji.py --workdir DIR` (DIR/runs/VARIANT-SEED); prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emoji import kept_run_probe  # noqa: E402

from memsafe.data.images import to_uint8  # noqa: E402
from memsafe.metrics.copy_detection import own_image_nearest  # noqa: E402
from memsafe.runs import FinishedRun  # noqa: E402


def drawn_per_caption(run: Path, scale: float, samples: int) -> dict[str, str]:
    finished = FinishedRun(run)
    probe = kept_run_probe(finished, samples)
    sample = finished.sampler(finished.config.eval.seed)
    prompts = probe.prompts["dup"]
    rows = probe.rows["dup"]
    embedded = probe.detector.embed(to_uint8(sample(prompts, scale)))
    own = own_image_nearest(embedded, probe.references[rows], probe.references, own_index=rows)
    by_caption = collections.defaultdict(list)
    for prompt, found in zip(prompts, own.tolist()):
        by_caption[prompt].append(found)
    return {prompt: f"{sum(found)}/{len(found)}" for prompt, found in sorted(by_caption.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=100, help="generations over the duplicated captions")
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps({"run": run.name, "guidance": args.guidance,
                          "drawn": drawn_per_caption(run, args.guidance, args.samples)}), flush=True)


if __name__ == "__main__":
    main()
