"""How SSCD reads small emoji art: the nearest *other* emoji's cosine (what a non-copy reaches) against the
cosine of degraded copies (blur, noise, shift, flip), at several input sizes. Picks `eval.sscd_size` and says
how loose the literature's 0.5 threshold is on this data.

    python -m memsafe.cli data emoji data/emoji32 --size 32     # once
    python bench/sscd_probe.py data/emoji32 [--count 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.metrics.sscd import SSCD  # noqa: E402


def degradations(image: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    def noisy(picture: Image.Image, sigma: float) -> Image.Image:
        values = np.asarray(picture).astype(float) + rng.normal(0, sigma, np.asarray(picture).shape)
        return Image.fromarray(values.clip(0, 255).astype(np.uint8))

    return {
        "flip": image.transpose(Image.FLIP_LEFT_RIGHT),
        "shift_2px": Image.fromarray(np.roll(np.asarray(image), 2, axis=1)),
        "blur_0.5px": image.filter(ImageFilter.GaussianBlur(0.5)),
        "noise_4": noisy(image, 4),
        "noise_12": noisy(image, 12),
    }


def tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.array(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an emoji folder written by `memsafe data emoji`")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--sizes", default="32,64,128,224")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "sscd_probe.json"))
    args = parser.parse_args()

    folder = Path(args.folder)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    base = [r for r in records if "skin tone" not in r["name"]]  # skin-tone variants are near-copies of each other
    rng = np.random.default_rng(args.seed)
    chosen = [base[i] for i in rng.choice(len(base), min(args.count, len(base)), replace=False)]
    originals = [Image.open(folder / r["file_name"]).convert("RGB") for r in chosen]
    variants = [degradations(image, rng) for image in originals]

    results = {"settings": {"folder": str(folder), "count": len(chosen), "seed": args.seed,
                            "excluded": "skin-tone variants"}}
    table = ["| input px | nearest other: median | p95 | share > 0.5 | " + " | ".join(
        f"{k}: median" for k in variants[0]) + " | ms / image |", "|" + "---|" * (5 + len(variants[0]))]
    for size in [int(s) for s in args.sizes.split(",")]:
        detector = SSCD(size=size)
        started = time.perf_counter()
        embedded = detector.embed(tensor(originals))
        ms = 1000 * (time.perf_counter() - started) / len(originals)
        similarity = embedded @ embedded.T
        similarity.fill_diagonal_(-1)
        other = similarity.max(dim=1).values
        copies = {name: (detector.embed(tensor([v[name] for v in variants])) * embedded).sum(1)
                  for name in variants[0]}
        row = {"other_median": other.median().item(), "other_p95": torch.quantile(other, 0.95).item(),
               "other_above_0.5": other.gt(0.5).double().mean().item(), "ms_per_image": ms}
        row |= {f"{name}_median": value.median().item() for name, value in copies.items()}
        row |= {f"{name}_above_0.5": value.gt(0.5).double().mean().item() for name, value in copies.items()}
        results[f"size_{size}"] = row
        table.append(f"| {size} | {row['other_median']:.3f} | {row['other_p95']:.3f} | {row['other_above_0.5']:.1%} | "
                     + " | ".join(f"{row[f'{n}_median']:.3f}" for n in copies) + f" | {ms:.1f} |")
    write_results(Path(args.out), results, table)


if __name__ == "__main__":
    main()
