"""Training wall time of an emoji variant over plain's, side by side: both runs of one seed start together, one
thread each, each pinned to its own core (`--cores VARIANT_CORE,PLAIN_CORE`), training only (no evaluation, so
a pair takes half of `bench/emoji.py`'s time). Run a seed twice with the cores swapped to see how much of a ratio
is the core; `plain` as the variant runs plain beside itself (the method's noise floor), and with `--plain-seed`
beside plain of another seed (how far two trajectories' paces differ). `--flush-denormal` runs
both with denormal floats flushed to zero (`torch.set_flush_denormal`), where denormals are suspected of slowing
one side (on the emoji model they were not: docs/research/iet-agc.md, 2026-12-07 thirteenth); `--preload LIB` runs
both with another C allocator (e.g. jemalloc's .so, through LD_PRELOAD), where the C heap's fragmentation is
suspected (2026-12-07 fourteenth).
Every pair is added to `--out` (one list per variant), with the machine it ran on: a timing is a sample of that
machine's noise, and only the two runs of one pair are compared with each other.

    python bench/emoji_wall.py data/emoji32 VARIANT --seed 0 --cores 0,1 --workdir /tmp/w_wall
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from emoji import VARIANTS, base_config, split_emoji  # noqa: E402
from results_io import CARRIED, METADATA, RESULTS, machine, run_name, run_stamp, write_json  # noqa: E402

from memsafe.config import config_from_dict, merge  # noqa: E402
from memsafe.runs import train_run  # noqa: E402


CHILD_THREADS = 1  # each run of a pair: one thread on its own core


def train_pinned(name: str, seed: int, steps: int, data: Path, runs: Path, core: int, flush: bool) -> dict:
    """One run of `name` on core `core` alone (this process), timed from start to the saved model."""
    os.sched_setaffinity(0, {core})
    torch.set_flush_denormal(flush)
    config = merge(config_from_dict(base_config(data / "train", data / "holdout", steps)),
                   VARIANTS[name] | {"train.seed": seed, "output_dir": str(runs / run_name(name, seed))})
    started = time.perf_counter()
    train_run(config, progress=False)
    return {"variant": name, "core": core, "wall_s": time.perf_counter() - started}


def side_by_side(variant: str, seed: int, steps: int, data: Path, runs: Path, cores: tuple[int, int],
                 flush: bool, plain_seed: int, preload: Path | None) -> dict:
    """Both runs as child processes started together, one thread each; their wall times and the ratio."""
    environment = os.environ | {"OMP_NUM_THREADS": str(CHILD_THREADS), "MKL_NUM_THREADS": str(CHILD_THREADS)}
    if preload is not None:
        environment["LD_PRELOAD"] = str(preload)
    sides = ((variant, cores[0], "variant", seed), ("plain", cores[1], "plain", plain_seed))
    children = [subprocess.Popen([sys.executable, __file__, "--worker", name, str(core), str(run_seed), str(steps),
                                  str(data), str(runs / side), str(int(flush))],
                                 stdout=subprocess.PIPE, text=True, env=environment)
                for name, core, side, run_seed in sides]
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"a run failed: exit codes {[child.returncode for child in children]}")
    defended, plain = (json.loads(output.strip().splitlines()[-1]) for output in outputs)
    return {"seed": seed, "plain_seed": plain_seed, "steps": steps, "cores": {"variant": cores[0], "plain": cores[1]},
            "flush_denormal": flush, "preload": None if preload is None else preload.name,
            "wall_s": defended["wall_s"], "plain_wall_s": plain["wall_s"], "ratio": defended["wall_s"] / plain["wall_s"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, core, seed, steps, data, runs, flush = sys.argv[2:9]
        print(json.dumps(train_pinned(name, int(seed), int(steps), Path(data), Path(runs), int(core), flush == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by `memsafe data emoji ... --size 32`")
    parser.add_argument("variant", choices=[name for name in VARIANTS if name != "plain_dedup"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-seed", type=int, help="plain's seed, if not --seed (two trajectories' paces)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--cores", default="0,1", help="the variant's core and plain's")
    parser.add_argument("--flush-denormal", action="store_true", help="both runs flush denormal floats to zero")
    parser.add_argument("--preload", type=Path, help="a C allocator's shared library both runs load (LD_PRELOAD)")
    parser.add_argument("--workdir", type=Path, required=True, help="the split data and both runs go here")
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_wall.json")
    args = parser.parse_args()
    cores = tuple(int(core) for core in args.cores.split(","))
    if len(cores) != 2 or cores[0] == cores[1] or not set(cores) <= os.sched_getaffinity(0):
        raise SystemExit(f"--cores {args.cores}: give two different cores of this machine's {sorted(os.sched_getaffinity(0))}")
    if args.workdir.exists():
        raise SystemExit(f"--workdir {args.workdir} exists: give a fresh folder (the split and both runs go there)")
    if args.preload is not None and not args.preload.is_file():
        raise SystemExit(f"--preload {args.preload}: no such file")
    split_emoji(Path(args.folder), args.workdir / "data")  # bench/emoji.py's split
    found = side_by_side(args.variant, args.seed, args.steps, args.workdir / "data", args.workdir / "runs", cores,
                         args.flush_denormal, args.seed if args.plain_seed is None else args.plain_seed,
                         args.preload)
    found |= run_stamp() | {"torch_threads": CHILD_THREADS, "machine": machine()}  # the children's threads
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entries = {name: value for name, value in previous.items() if name not in METADATA}
    entries[args.variant] = {"pairs": entries.get(args.variant, {}).get("pairs", []) + [found]}
    write_json(args.out, entries | {key: previous[key] for key in CARRIED if key in previous},
               torch_threads=CHILD_THREADS)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
