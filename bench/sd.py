"""Stable Diffusion pipeline runs on the CPU, tiny random-weight pipeline (models/random_pipeline.py).

Each variant trains in a process of its own (`memsafe train` through `--one`), so wall time covers the whole
run (loading, latent encoding or cache read, bases, training, saving) and peak RSS is that process's own.
Variants: plain full fine-tuning, LoRA, gradient projection with its recommended profile under LoRA, IET-AGC+
under LoRA. Beside them, in one process: training steps whose latents come from the cache against the same
steps encoding each batch through the VAE.

    python bench/sd.py [--steps 1000] [--images 96] [--out bench/results/sd.json]

Writes `cpu.*` ratios (to plain, or to LoRA for the LoRA defenses); the `gpu` object is filled by a run on a
GPU machine (not yet measured).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import provenance, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "black": (20, 20, 20)}
VARIANTS = {
    "plain": {},
    "lora": {"model": {"lora_rank": 4}},
    "gradient_projection_lora": {"model": {"lora_rank": 4}, "defense": {
        "name": "gradient_projection", "gradient_projection": {"concepts": ["red", "crimson red"], "sink": False}}},
    "iet_agc_lora": {"model": {"lora_rank": 4}, "defense": {"name": "iet_agc"}},
}


def make_data(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as lines:
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            image = np.full((40, 40, 3), 255, np.uint8)
            top, left = rng.integers(0, 20, 2)
            image[top : top + 16, left : left + 16] = COLOURS[colour]
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            lines.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"a {colour} square"}) + "\n")
    return folder


def config(work: Path, name: str, steps: int) -> dict:
    values = {"data": {"source": str(work / "data"), "resolution": 32, "latent_cache": str(work / "latents")},
              "model": {"pretrained": str(work / "pipeline")},
              "train": {"max_steps": steps, "batch_size": 16, "warmup_steps": 10, "checkpoint_every": steps},
              "output_dir": str(work / name)}
    for section, updates in VARIANTS[name].items():
        values.setdefault(section, {}).update(updates)
    return values


def one(work: Path, name: str, steps: int) -> dict:
    """Train one variant in this process: wall seconds and peak RSS."""
    from memsafe.config import config_from_dict
    from memsafe.runs import train_run

    started = time.perf_counter()
    train_run(config_from_dict(config(work, name, steps)), progress=False)
    return {"wall_s": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cache_speedup(work: Path, steps: int) -> dict:
    """Seconds per step reading cached latents against encoding each batch through the VAE."""
    from memsafe.config import config_from_dict
    from memsafe.data import load_dataset
    from memsafe.data.images import to_model_range
    from memsafe.defenses import build_trainer
    from memsafe.models.pipeline import LatentCodec
    from memsafe.train.hooks import TrainHook

    class EncodeEachBatch(TrainHook):
        name = "encode"

        def __init__(self, images):
            self.images, self.codec = images, LatentCodec(work / "pipeline")

        def on_batch_start(self, batch, trainer):
            batch["pixels"] = self.codec.encode(to_model_range(self.images[batch["index"]])).to(batch["pixels"])
            return batch

    values = config_from_dict(config(work, "plain", steps))
    train_set, _ = load_dataset(values.data)
    timings = {}
    for label, hooks in (("cached", []), ("encoded", [EncodeEachBatch(train_set.pixels)])):
        trainer = build_trainer(values, train_set)
        trainer.hooks.hooks.extend(hooks)
        trainer.fit(max_steps=5, progress=False)  # warm-up
        started = time.perf_counter()
        trainer.fit(max_steps=5 + steps, progress=False)
        timings[label] = (time.perf_counter() - started) / steps
    return {"sec_per_step_cached": timings["cached"], "sec_per_step_encoded": timings["encoded"],
            "cache_speedup": timings["encoded"] / timings["cached"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--cache-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "sd.json")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="memsafe-sd-bench-"))
    if args.one:
        print(json.dumps(one(work, args.one, args.steps)))
        return
    from memsafe.models.random_pipeline import build_random_pipeline

    build_random_pipeline(work / "pipeline")
    make_data(work / "data", args.images)
    runs = {}
    for name in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--work", str(work)],
                              capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    plain, lora = runs["plain"], runs["lora"]
    cpu = {
        "steps": args.steps, "images": args.images, "resolution": 32, "runs": runs,
        "lora_wall_ratio": lora["wall_s"] / plain["wall_s"],
        "projection_overhead": runs["gradient_projection_lora"]["wall_s"] / lora["wall_s"],
        "projection_memory_ratio": runs["gradient_projection_lora"]["peak_rss_mb"] / lora["peak_rss_mb"],
        "iet_lora_wall_ratio": runs["iet_agc_lora"]["wall_s"] / lora["wall_s"],
        "iet_lora_memory_ratio": runs["iet_agc_lora"]["peak_rss_mb"] / lora["peak_rss_mb"],
        "rss_ratio_10k_vs_1k": None,  # not measured: the folder is still decoded whole (docs/stable-diffusion.md)
        **cache_speedup(work, args.cache_steps),
    }
    write_json(args.out, {**provenance(), "cpu": cpu, "gpu": None})
    print(json.dumps(cpu, indent=2))


if __name__ == "__main__":
    main()
