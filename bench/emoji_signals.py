"""Which per-sample signal tells a duplicated training image from a unique one while plain training runs?
AGC skips on the denoising loss; this measures, on bench/emoji.py's data and plain model, how well three
per-image signals separate the duplicated emoji from unique training emoji (AUC), and unique training emoji
from held-out ones, at several points of one plain run:

- `loss`: the text-conditional denoising loss (what AGC reads; lower = more memorized);
- `caption_gain`: that loss over the same draw's loss with the empty caption (lower = the caption helps more);
- `caption_distance`: RMS of eps(x_t, caption) - eps(x_t, empty) (Wen et al. 2024's detection signal;
  higher = more memorized).

Every image is scored at the same timestep grid, one noise draw per (image, timestep), with the model being
trained (not its EMA), as a training-time rule would see it.

    python bench/emoji_signals.py data/emoji32 [--seed-list 0,1] [--checkpoints 150,300,600,1200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).parent))
from emoji import base_config, duplicated_flags, split_emoji  # noqa: E402
from results_io import RESULTS, add_run, previous_runs, seed_summary, write_results  # noqa: E402

from memsafe.config import config_from_dict, merge  # noqa: E402
from memsafe.data import load_dataset  # noqa: E402
from memsafe.defenses import build_trainer  # noqa: E402

SIGNALS = {"loss": -1, "caption_gain": -1, "caption_distance": 1}  # sign that makes "higher = more memorized"
TIMESTEPS = tuple(range(25, 1000, 50))  # 20 of 1000


@torch.no_grad()
def signals(trainer, pixels: torch.Tensor, captions: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Each signal per image, averaged over TIMESTEPS."""
    unet, scheduler = trainer.unwrapped, trainer.noise_scheduler
    conditioner = trainer.conditioner
    hidden = conditioner.encoder.encode_unique(captions)
    empty = conditioner.empty.expand_as(hidden)
    generator = torch.Generator().manual_seed(seed)
    totals = {name: torch.zeros(len(pixels)) for name in SIGNALS}
    unet.eval()
    for step in TIMESTEPS:
        noise = torch.randn(pixels.shape, generator=generator)
        timesteps = torch.full((len(pixels),), step, dtype=torch.long)
        noisy = scheduler.add_noise(pixels, noise, timesteps)
        conditional = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        unconditional = unet(noisy, timesteps, encoder_hidden_states=empty).sample
        loss = (conditional - noise).pow(2).flatten(1).mean(1)
        totals["loss"] += loss
        totals["caption_gain"] += loss / (unconditional - noise).pow(2).flatten(1).mean(1)
        totals["caption_distance"] += (conditional - unconditional).pow(2).flatten(1).mean(1).sqrt()
    unet.train()
    return {name: total / len(TIMESTEPS) for name, total in totals.items()}


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    scores = torch.cat([positive, negative]).double()
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).long()
    return binary_auroc(scores, labels).item()


def groups(train_set, holdout, train: Path, count: int, seed: int) -> dict[str, list[int]]:
    """One training index per distinct duplicated emoji, `count` unique training and held-out images."""
    duplicated = duplicated_flags(train, train_set.names)
    first_copy: dict[str, int] = {}
    for index in torch.nonzero(duplicated).flatten().tolist():
        first_copy.setdefault(train_set.captions[index], index)
    unique = torch.nonzero(~duplicated).flatten()
    generator = torch.Generator().manual_seed(seed)
    return {"dup": sorted(first_copy.values()),
            "unique": sorted(unique[torch.randperm(len(unique), generator=generator)[:count]].tolist()),
            "holdout": list(range(min(count, len(holdout))))}


def run_seed(seed: int, args, train: Path, holdout_dir: Path, root: Path) -> dict:
    config = merge(config_from_dict(base_config(train, holdout_dir, args.steps)),
                   {"train.seed": seed, "output_dir": str(root / f"plain-{seed}")})
    train_set, holdout = load_dataset(config.data)
    members = groups(train_set, holdout, train, args.count, seed)
    trainer = build_trainer(config, train_set)
    images = {"dup": trainer.pixels[members["dup"]], "unique": trainer.pixels[members["unique"]],
              "holdout": holdout.as_model_input()[members["holdout"]]}
    captions = {"dup": [train_set.captions[i] for i in members["dup"]],
                "unique": [train_set.captions[i] for i in members["unique"]],
                "holdout": [holdout.captions[i] for i in members["holdout"]]}
    record = {"seed": seed}
    for checkpoint in args.checkpoints:
        trainer.fit(max_steps=checkpoint, progress=False)
        scored = {group: signals(trainer, images[group], captions[group], seed) for group in images}
        for name, sign in SIGNALS.items():
            record[f"{name}_auc_dup_vs_unique@{checkpoint}"] = auc(sign * scored["dup"][name], sign * scored["unique"][name])
            record[f"{name}_auc_unique_vs_holdout@{checkpoint}"] = auc(sign * scored["unique"][name],
                                                                       sign * scored["holdout"][name])
            for group in images:
                record[f"{name}_{group}@{checkpoint}"] = scored[group][name].mean().item()
        print({k: round(v, 3) for k, v in record.items() if k.endswith(f"@{checkpoint}") and "auc" in k}, flush=True)
    return record


def markdown(summary: dict, checkpoints: list[int]) -> list[str]:
    lines = ["| signal | step | AUC dup. vs unique | AUC unique vs held-out | dup. | unique | held-out |",
             "|---|---|---|---|---|---|---|"]
    for name in SIGNALS:
        for step in checkpoints:
            cell = lambda key: f"{summary[key]:.3f} ± {summary[key + '_std']:.3f}"  # noqa: E731
            lines.append(f"| {name} | {step} | {cell(f'{name}_auc_dup_vs_unique@{step}')} | "
                         f"{cell(f'{name}_auc_unique_vs_holdout@{step}')} | {summary[f'{name}_dup@{step}']:.4f} | "
                         f"{summary[f'{name}_unique@{step}']:.4f} | {summary[f'{name}_holdout@{step}']:.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by `memsafe data emoji ... --size 32`")
    parser.add_argument("--seed-list", default="0")
    parser.add_argument("--checkpoints", default="150,300,600,1200", help="steps of the plain run at which to score")
    parser.add_argument("--count", type=int, default=300, help="unique training and held-out images scored")
    parser.add_argument("--out", default=str(RESULTS / "emoji_signals.json"))
    parser.add_argument("--merge", action="store_true", help="add to an existing --out (same seed replaced)")
    args = parser.parse_args()
    args.checkpoints = [int(s) for s in args.checkpoints.split(",")]
    args.steps = args.checkpoints[-1]
    out = Path(args.out)
    runs, history = previous_runs(out, args.merge)
    with tempfile.TemporaryDirectory() as tmp:
        train, holdout_dir = split_emoji(Path(args.folder), Path(tmp) / "data")  # bench/emoji.py's split
        for seed in [int(s) for s in args.seed_list.split(",")]:
            record = run_seed(seed, args, train, holdout_dir, Path(tmp) / "runs")
            add_run(runs, "plain", record)
            keys = [k for k in record if k != "seed"]
            summary = seed_summary(runs["plain"], keys)
            write_results(out, {"plain": summary} | history | {"settings": {"count": args.count,
                                                                             "checkpoints": args.checkpoints}},
                          markdown(summary, args.checkpoints), echo=False)
    print("\n".join(markdown(summary, args.checkpoints)))


if __name__ == "__main__":
    main()
