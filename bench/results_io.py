"""Where the benchmarks write, and how: a JSON file (with the command line and git commit that produced it)
and a markdown table beside it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Keys of a results file that are not variants: its settings and where it came from (`provenance`).
METADATA = ("settings", "command", "git_commit", "torch_threads", "uncommitted_changes", "date", "recorded", "renamed")
CARRIED = ("recorded", "renamed")  # notes on a file's history, kept when runs are merged into it
RUN_STAMP = ("command", "git_commit", "torch_threads", "uncommitted_changes")  # what each run (or pair) carries


def provenance() -> dict:
    """The command line, git commit (and whether the tree had uncommitted changes) and date of this run, as
    they were when the benchmark started (this module's import): a run of half an hour is stamped with the
    code it ran, not with whatever was committed by the time it wrote."""
    return dict(AT_LAUNCH)


def read_provenance() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    import torch  # the thread count changes float sums, and over a run's steps the model: worth recording

    return {"command": " ".join(["python", *sys.argv]), "git_commit": git("rev-parse", "HEAD"),
            "torch_threads": torch.get_num_threads(),
            # the results folder is left out: a benchmark that merges seeds rewrites its own file between runs
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                            ":(exclude)bench/results")),
            "date": time.strftime("%Y-%m-%d")}


AT_LAUNCH = read_provenance()


def previous_runs(out: Path, merge: bool) -> tuple[dict[str, list[dict]], dict]:
    """The runs per variant already in `out` (none unless merging) and the history notes to carry forward."""
    previous = json.loads(out.read_text()) if merge and out.is_file() else {}
    runs = {name: list(value["runs"]) for name, value in without_metadata(previous).items()}
    return runs, {key: previous[key] for key in CARRIED if key in previous}


def machine() -> dict:
    """What a timing ran on: the CPU's name, its cores and last-level cache. Sessions' machines have differed by
    1.8x in plain's step time on the emoji model, so a timing is compared only within its own pair or run."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    cache = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {"cpu": names[0] if names else "unknown", "cores": len(names) or None,
            "l3_cache": cache.read_text().strip() if cache.is_file() else None}


def run_stamp() -> dict:
    """The part of `provenance` each run or pair is stamped with: files merged from several invocations keep it."""
    stamp = provenance()
    return {key: stamp[key] for key in RUN_STAMP}


def add_run(runs: dict[str, list[dict]], name: str, record: dict) -> None:
    """Puts a new run of variant `name` into `runs` (replacing one of the same seed), stamped with the command
    line and commit that produced it: a file merged from several invocations names only the last at its top."""
    record = record | run_stamp()
    runs[name] = with_run(runs.get(name, []), record)


def run_name(variant: str, seed: int) -> str:
    """The folder name the benchmarks give a run, and read its variant and seed back from (`variant_and_seed`)."""
    return f"{variant}-{seed}"


def variant_and_seed(name: str) -> tuple[str, int]:
    """(variant, seed) of a run folder named by `run_name` (variant names may hold dashes; seeds do not)."""
    variant, seed = name.rsplit("-", 1)
    return variant, int(seed)


def with_run(runs: list[dict], record: dict) -> list[dict]:
    """`runs` with `record` in place of any run of the same seed, by seed."""
    return sorted([r for r in runs if r["seed"] != record["seed"]] + [record], key=lambda r: r["seed"])


def without_metadata(results: dict) -> dict:
    """The results of a file without its metadata keys."""
    return {name: value for name, value in results.items() if name not in METADATA}


def seed_summary(runs: list[dict], keys) -> dict:
    """Mean and standard deviation over seeds of each reading in `keys` that every run has (runs merged from an
    older version may lack a newer reading), with the seeds and the runs."""
    out = {}
    for key in (k for k in keys if all(k in r for r in runs)):
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out | {"seeds": [r["seed"] for r in runs], "runs": runs}


def same_seed_change(runs: list[dict], plain_runs: list[dict], key: str, together: bool = False) -> str:
    """The mean change of `key` over plain's run of the same seed (seeds plain lacks are left out); with
    `together`, only over plain runs of the same commit: for wall times, which other sessions measured on a
    machine of another speed."""
    def invocation(run: dict) -> tuple:
        return (run.get("git_commit"),) if together else ()

    plain = {(r["seed"], invocation(r)): r[key] for r in plain_runs if key in r}
    ratios = [r[key] / plain[found] for r in runs if key in r and (found := (r["seed"], invocation(r))) in plain]
    return f"{(sum(ratios) / len(ratios) - 1) * 100:+.1f} % (seeds {len(ratios)})" if ratios else "-"


def mean_change(runs: list[dict], plain_runs: list[dict], key: str) -> str:
    """The change of `key`'s mean over plain's mean over all its runs: for readings that a run on another machine
    or thread count (another float order) moves as far as another seed does, where a same-seed pair would pair
    two unrelated draws (plain's seed 0 read FID 6.25 and 7.62 on two machines, docs/research/iet-agc.md)."""
    mine, theirs = [r[key] for r in runs if key in r], [r[key] for r in plain_runs if key in r]
    if not mine or not theirs:
        return "-"
    return f"{(statistics.fmean(mine) / statistics.fmean(theirs) - 1) * 100:+.1f} % ({len(mine)} vs {len(theirs)} runs)"


def provenance_line() -> str:
    stamp = provenance()
    dirty = " (with uncommitted changes)" if stamp["uncommitted_changes"] else ""
    return f"_`{stamp['command']}` at commit {stamp['git_commit'][:7]}{dirty}, {stamp['date']}._"


def write_json(out: Path, results: dict, torch_threads: int | None = None) -> None:
    """`results` under this run's command line and commit, which come first (and replace any `results` carries);
    `torch_threads` where the runs used another thread count than this process (child processes)."""
    stamp = provenance() | ({} if torch_threads is None else {"torch_threads": torch_threads})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp | {k: v for k, v in results.items() if k not in stamp}, indent=2) + "\n")


def write_results(out: Path, results: dict, table: list[str], echo: bool = True) -> None:
    """The JSON file, and the markdown table beside it under the same provenance line (a table copied out of
    its folder still names the command and commit it came from)."""
    write_json(out, results)
    out.with_suffix(".md").write_text("\n".join(table + ["", provenance_line()]) + "\n")
    if echo:
        print("\n".join(table))
