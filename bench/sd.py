"""Stable Diffusion pipeline runs: whole-run cost of each defense beside plain training, the latent cache,
and peak memory as the image folder grows.

Each variant trains in a process of its own (`memsafe train` through `--one`), so wall time covers the whole
run (loading, latent encoding or cache read, activation subspaces, training, saving) and peak memory is that
process's own. The random-weight pipeline comes from models/random_pipeline.py.

    python bench/sd.py                 # CPU: tiny pipeline, 32 px, batch 16; fills `cpu` in bench/results/sd.json
    python bench/sd.py --gpu           # GPU: SD 1.5 architecture (860M UNet), 512 px, bf16, batch 8; fills `gpu`
    python bench/sd.py --gpu --dry     # the GPU path on tiny sizes, to try it on the CPU before GPU time
    python bench/sd.py --sd15-cache    # CPU: the cache speed-up with SD 1.5's VAE and UNet at 128 px, into `cpu`

Ratios: a LoRA defense against LoRA, full fine-tuning against itself. `fixed_cost_s` of a variant is its
whole-run wall time minus its steps at the per-step rate measured over two run lengths (the set-up that a
longer run amortises).
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "black": (20, 20, 20)}
LORA = {"model": {"lora_rank": 8}}
PROJECTION = {"name": "gradient_projection", "gradient_projection": {"concepts": ["red", "crimson red"]}}
# (sections over the base config, the variant its ratios are taken against)
VARIANTS = {
    "full": ({}, None),
    "lora": (LORA, None),
    "gradient_projection_lora": (LORA | {"defense": PROJECTION}, "lora"),
    # K = 4 LoRA proxies (the loss profile; `auto` would pick the caption profile's one shard for this text model)
    "iet_agc_lora": (LORA | {"defense": {"name": "iet_agc", "iet_agc": {"profile": "loss"}}}, "lora"),
}
TARGETS = {
    # 32 px through the tiny VAE gives 8x8 latents. The tiny pipeline's 32-d CLIP has no text direction left
    # for the sink once the concept subspaces are taken (docs/stable-diffusion.md), so it runs without.
    "cpu": {"size": "tiny", "resolution": 32, "batch_size": 16, "mixed_precision": "no", "images": 96, "sink": False},
    "gpu": {"size": "sd15", "resolution": 512, "batch_size": 8, "mixed_precision": "bf16", "images": 64, "sink": True},
}


def make_data(folder: Path, count: int, resolution: int) -> Path:
    """`count` captioned images of a coloured square on white, `resolution` px, in ImageFolder layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = resolution // 2
    with open(folder / "metadata.jsonl", "w") as lines:
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            image = np.full((resolution + 8, resolution + 8, 3), 255, np.uint8)
            top, left = rng.integers(0, resolution - side, 2)
            image[top : top + side, left : left + side] = COLOURS[colour]
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            lines.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"a {colour} square"}) + "\n")
    return folder


def config(work: Path, target: dict, variant: str, steps: int, data: str = "data", tag: str = "",
           pipeline: str = "pipeline") -> dict:
    sections, _ = VARIANTS[variant]
    values = {"data": {"source": str(work / data), "resolution": target["resolution"],
                       "latent_cache": str(work / f"latents-{data}")},
              "model": {"pretrained": str(work / pipeline)},
              "train": {"max_steps": steps, "batch_size": target["batch_size"], "warmup_steps": 10,
                        "checkpoint_every": steps, "mixed_precision": target["mixed_precision"]},
              "output_dir": str(work / f"{variant}-{steps}{tag}")}
    for section, updates in sections.items():
        values.setdefault(section, {}).update(json.loads(json.dumps(updates)))
    if variant == "gradient_projection_lora":
        values["defense"]["gradient_projection"]["sink"] = target["sink"]
    return values


def one(work: Path, target: dict, variant: str, steps: int, data: str) -> dict:
    """Train one variant in this process: wall seconds, training seconds per step, peak RSS and GPU memory."""
    import torch

    from memsafe.config import config_from_dict
    from memsafe.runs import train_run

    started = time.perf_counter()
    run = train_run(config_from_dict(config(work, target, variant, steps, data, tag=f"-{data}")), progress=False)
    result = {"wall_s": time.perf_counter() - started,
              "train_sec_per_step": json.loads((run / "status.json").read_text())["sec_per_step"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def spawn(args, variant: str, steps: int, data: str = "data") -> dict:
    command = [sys.executable, __file__, "--one", variant, "--steps", str(steps), "--work", str(args.work),
               "--data", data] + (["--gpu"] if args.gpu else []) + (["--dry"] if args.dry else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(variant, steps, data, result, flush=True)
    return result


def whole_runs(args, short: int) -> dict:
    """Every variant at `args.steps`, and at `short` steps for the fixed cost."""
    runs = {name: spawn(args, name, args.steps) for name in VARIANTS}
    for name in VARIANTS:
        brief = spawn(args, name, short)
        rate = (runs[name]["wall_s"] - brief["wall_s"]) / (args.steps - short)
        runs[name] |= {"wall_s_short": brief["wall_s"], "short_steps": short, "wall_sec_per_step": rate,
                       "fixed_cost_s": runs[name]["wall_s"] - rate * args.steps}
    return runs


def ratios(runs: dict) -> dict:
    out = {}
    for name, (_, against) in VARIANTS.items():
        if against is None:
            continue
        mine, base = runs[name], runs[against]
        short = name.split("_lora")[0].replace("gradient_projection", "projection").replace("iet_agc", "iet_lora")
        memory = "peak_gpu_gb" if "peak_gpu_gb" in mine else "peak_rss_mb"
        label = "wall_ratio" if short == "iet_lora" else "overhead"
        out[f"{short}_{label}"] = mine["wall_s"] / base["wall_s"]
        out[f"{short}_memory_ratio"] = mine[memory] / base[memory]
        out[f"{short}_step_overhead"] = mine["train_sec_per_step"] / base["train_sec_per_step"]
        out[f"{short}_fixed_cost_s"] = mine["fixed_cost_s"] - base["fixed_cost_s"]
    return out


def cache_speedup(work: Path, target: dict, steps: int, pipeline: str = "pipeline", data: str = "data") -> dict:
    """Seconds per step reading cached latents against encoding each batch through the VAE, in one process."""
    from memsafe.config import config_from_dict
    from memsafe.data import load_dataset
    from memsafe.data.images import to_model_range
    from memsafe.defenses import build_trainer
    from memsafe.models.pipeline import LatentCodec
    from memsafe.train.hooks import TrainHook

    class EncodeEachBatch(TrainHook):
        name = "encode"

        def __init__(self, images, device):
            self.images, self.codec = images, LatentCodec(work / pipeline, device)

        def on_batch_start(self, batch, trainer):
            batch["pixels"] = self.codec.encode(to_model_range(self.images[batch["index"]])).to(batch["pixels"])
            return batch

    values = config_from_dict(config(work, target, "lora", steps, data, tag="-cache", pipeline=pipeline))
    train_set, _ = load_dataset(values.data)
    timings = {}
    for label in ("cached", "encoded"):
        trainer = build_trainer(values, train_set)
        if label == "encoded":
            trainer.hooks.hooks.append(EncodeEachBatch(train_set.pixels, trainer.device))
        trainer.fit(max_steps=5, progress=False)  # warm-up
        started = time.perf_counter()
        trainer.fit(max_steps=5 + steps, progress=False)
        timings[label] = (time.perf_counter() - started) / steps
    return {"sec_per_step_cached": timings["cached"], "sec_per_step_encoded": timings["encoded"],
            "cache_speedup": timings["encoded"] / timings["cached"]}


def growing_folder(args, target: dict, steps: int) -> dict:
    """Peak RSS of LoRA runs on 1k and 10k images (each encodes its own cache, a batch at a time)."""
    sizes = {"1k": 1000, "10k": 10000}
    runs = {}
    for label, count in sizes.items():
        make_data(args.work / f"data-{label}", count, target["resolution"])
        runs[label] = spawn(args, "lora", steps, data=f"data-{label}")
    return {"rss_runs": runs, "rss_ratio_10k_vs_1k": runs["10k"]["peak_rss_mb"] / runs["1k"]["peak_rss_mb"]}


def sd15_cache_speedup(args) -> dict:
    """The cache speed-up with the SD 1.5 architecture's VAE and UNet (random weights), LoRA, on the CPU at
    `args.sd15_resolution` px: the tiny pipeline's VAE costs almost nothing beside its UNet, SD 1.5's does not."""
    from memsafe.models.random_pipeline import build_random_pipeline

    target = {"resolution": args.sd15_resolution, "batch_size": 2, "mixed_precision": "no"}
    if not (args.work / "pipeline-sd15").is_dir():
        build_random_pipeline(args.work / "pipeline-sd15", size="sd15")
    make_data(args.work / "data-sd15", 16, target["resolution"])
    found = cache_speedup(args.work, target, args.sd15_steps, pipeline="pipeline-sd15", data="data-sd15")
    return {f"sd15_{key}": value for key, value in found.items()} | {
        "sd15_cache_settings": target | {"steps": args.sd15_steps, "lora_rank": 8}}


def target_of(args) -> dict:
    target = dict(TARGETS["gpu" if args.gpu else "cpu"])
    if args.dry:
        target |= {"size": "tiny", "resolution": 32, "mixed_precision": "no", "images": 16, "sink": False}
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the SD 1.5 architecture on a GPU")
    parser.add_argument("--dry", action="store_true", help="with --gpu: tiny sizes, to try the GPU path anywhere")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--short-steps", type=int, default=None, help="the second run length (default steps / 5)")
    parser.add_argument("--cache-steps", type=int, default=50)
    parser.add_argument("--rss-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "sd.json")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--sd15-cache", action="store_true",
                        help="only the cache speed-up with the SD 1.5 architecture on the CPU, added to `cpu`")
    parser.add_argument("--sd15-resolution", type=int, default=128)
    parser.add_argument("--sd15-steps", type=int, default=4)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default="data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    target = target_of(args)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="memsafe-sd-bench-"))
    if args.one:
        print(json.dumps(one(args.work, target, args.one, args.steps, args.data)))
        return
    if args.sd15_cache:
        earlier = json.loads(args.out.read_text())
        earlier["cpu"] |= sd15_cache_speedup(args)
        earlier["provenance"]["cpu_sd15_cache"] = provenance()
        args.out.write_text(json.dumps(earlier | provenance(), indent=2) + "\n")
        print(json.dumps(earlier["cpu"], indent=2))
        return
    from memsafe.models.random_pipeline import build_random_pipeline

    build_random_pipeline(args.work / "pipeline", size=target["size"])
    make_data(args.work / "data", target["images"], target["resolution"])
    runs = whole_runs(args, args.short_steps or max(args.steps // 5, 20))
    result = {"settings": target | {"steps": args.steps}, "runs": runs, **ratios(runs),
              **cache_speedup(args.work, target, args.cache_steps)}
    if args.gpu:
        import torch

        result["name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry run)"
        result["images_per_s"] = {n: target["batch_size"] / runs[n]["train_sec_per_step"] for n in ("full", "lora")}
        result["peak_memory_gb"] = {n: runs[n].get("peak_gpu_gb") for n in ("full", "lora")}
    else:
        result |= growing_folder(args, target, args.rss_steps)
    key = "gpu" if args.gpu else "cpu"
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    provenances = earlier.get("provenance", {}) | {key: provenance()}
    # top level: the newest run (results_io's convention); `provenance`: the run behind each object
    out = {"cpu": earlier.get("cpu"), "gpu": earlier.get("gpu"), key: result, "provenance": provenances} | provenance()
    if not args.dry:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
