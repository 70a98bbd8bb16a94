"""Baseline benchmark: the demo configuration (plain DDPM on 32 real digits), trained and measured.

Writes bench/results/baseline.json with memorized_fraction, copy_fraction, fid, sec_per_step and
peak_rss_mb (plus the MQ counts and context). Usage: python bench/baseline.py [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from memsafe.cli import demo_config_path
from memsafe.config import load_config, merge
from memsafe.runs import evaluate_run, train_run
from results_io import RESULTS, write_json



def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="override train.max_steps (default: the demo's)")
    parser.add_argument("--out", default=str(RESULTS / "baseline.json"))
    args = parser.parse_args()

    config = load_config(demo_config_path())
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"output_dir": str(Path(tmp) / "baseline")}
        if args.steps:
            overrides["train.max_steps"] = args.steps
        config = merge(config, overrides)
        started = time.perf_counter()
        run_dir = train_run(config, progress=sys.stderr.isatty())
        train_seconds = time.perf_counter() - started
        metrics = evaluate_run(run_dir, progress=sys.stderr.isatty()).metrics

    result = {
        "memorized_fraction": metrics["memorized_fraction"],
        "copy_fraction": metrics["copy_fraction"],
        "fid": metrics["fid"],
        "sec_per_step": metrics["sec_per_step"],
        "peak_rss_mb": peak_rss_mb(),
        "fid_features": metrics["fid_features"],
        "fid_reference": metrics["fid_reference"],
        "sim_95pc": metrics["sim_95pc"],
        "train_sim_95pc": metrics["train_sim_95pc"],
        "nn_ratio_median": metrics["nn_ratio_median"],
        "mq_counts": metrics["mq_counts"],
        "num_samples": metrics["num_samples"],
        "train_images": metrics["num_train_images"],
        "train_steps": metrics["train_steps"],
        "batch_size": config.train.batch_size,
        "train_seconds": train_seconds,
        "eval_seconds": metrics["eval_seconds"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
