"""Scale benchmark: training throughput on 1 vs 2 processes, and nearest-neighbour cost as the training set grows.

Throughput: the demo's UNet (16x16 digits, batch 32) trained by `torchrun --nproc_per_node N` (gloo on a CPU
machine, NCCL on GPUs), each process given cores / N threads; images/s = global batch / seconds per step.
Nearest neighbours: 256 queries against 1k, 10k and 50k training images (real digits, shifted copies beyond
the 1,797 originals), k = 50, each size in a fresh process so its peak RSS is its own.
Writes bench/results/scale.json. Usage: python bench/scale.py [--steps 150] [--sizes 1000,10000,50000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from results_io import RESULTS, write_json


def throughput(processes: int, steps: int, work: Path) -> float:
    """Images per second of data-parallel training on `processes` processes."""
    from memsafe.cli import demo_config_path

    config = yaml.safe_load(demo_config_path().read_text())
    config["train"] |= {"max_steps": steps, "checkpoint_every": 10**6, "warmup_steps": 0}
    config["data"]["max_train_images"] = 1024
    config["output_dir"] = str(work / f"proc{processes}")
    path = work / f"proc{processes}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "memsafe.cli", "train", "--config", str(path), "--no-progress"]
    subprocess.run(command, env=os.environ | {"OMP_NUM_THREADS": str(threads)}, check=True, capture_output=True)
    status = json.loads((work / f"proc{processes}" / "status.json").read_text())
    return config["train"]["batch_size"] / status["sec_per_step"]


def training_like_images(count: int, resolution: int = 16) -> torch.Tensor:
    """`count` real digits in model range; beyond the originals, copies shifted by a random pixel offset."""
    from memsafe.data.digits import load_digits

    digits = load_digits(resolution, channels=1).as_model_input()
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(digits), (count,), generator=generator)
    picks[: min(count, len(digits))] = torch.arange(min(count, len(digits)))
    shifts = torch.randint(-2, 3, (count, 2), generator=generator)
    shifts[: len(digits)] = 0
    images = digits[picks].clone()
    for (dy, dx) in shifts.unique(dim=0).tolist():
        rows = (shifts == torch.tensor([dy, dx])).all(1)
        images[rows] = torch.roll(images[rows], shifts=(dy, dx), dims=(2, 3))
    return images


def nearest_cost(size: int) -> dict:
    """Seconds and peak RSS of the 256 x `size` nearest-neighbour search, in this (fresh) process."""
    from memsafe.metrics.nearest import nearest_neighbours

    references = training_like_images(size)
    queries = references[torch.randperm(size, generator=torch.Generator().manual_seed(1))[:256]]
    queries = queries + 0.1 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(2))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    nearest_neighbours(queries, references, k=50)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--nn-size", type=int, help=argparse.SUPPRESS)  # child mode: one size, JSON on stdout
    args = parser.parse_args()
    if args.nn_size:
        print(json.dumps(nearest_cost(args.nn_size)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        one = throughput(1, args.steps, Path(tmp))
        two = throughput(2, args.steps, Path(tmp))
    nn = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        child = subprocess.run([sys.executable, __file__, "--nn-size", str(size)], check=True, capture_output=True,
                               text=True)
        nn[size] = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "images_per_s_1proc": one,
        "images_per_s_2proc": two,
        "speedup_2proc": two / one,
        "nn_seconds": {str(size): v["seconds"] for size, v in nn.items()},
        "nn_peak_rss_mb": max(v["peak_rss_mb"] for v in nn.values()),
        "nn_peak_rss_mb_per_size": {str(size): v["peak_rss_mb"] for size, v in nn.items()},
        # What the search itself added on top of the process with its images loaded.
        "nn_search_rss_growth_mb": {str(size): v["peak_rss_mb"] - v["rss_before_mb"] for size, v in nn.items()},
        "settings": {"steps": args.steps, "batch_size": 32, "resolution": 16, "queries": 256, "k": 50,
                     "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                     "cuda": torch.cuda.is_available()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
