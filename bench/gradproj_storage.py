"""Where a fine-tuned model keeps the protected concept: the gradient-projection benchmark's runs, taken apart.

For each run (by default the seed-0 `none`, `gp_lambda_1`, `none_lora` and `gp_lora_lambda_1` runs of
`bench/gradproj.py --concept stamp`) the UNet's parameters are split into groups: the cross-attention
key/value projections that read the text (what gradient projection freezes along the concept), the
cross-attention queries, the cross-attention output projection, the rest of the transformer blocks, and the
convolutional rest. Each group is measured two ways
against the pretrained base: only that group fine-tuned (the rest at base), and every group but that one.
Extraction rate and allowed accuracy come from the benchmark's attack. Writes
bench/results/gradproj_storage.json and .md. Usage: python bench/gradproj_storage.py [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memsafe.metrics.attributes import ink_digit_detector
from memsafe.metrics.extraction import attack_for, measure_concept
from memsafe.runs import load_run_config, load_run_unet, prompt_sampler
from results_io import RESULTS, write_results

GROUPS = {
    "text K/V (attn2.to_k, to_v)": lambda n: "attn2.to_k" in n or "attn2.to_v" in n,
    "queries (attn2.to_q)": lambda n: "attn2.to_q" in n,
    "attention output (attn2.to_out)": lambda n: "attn2.to_out" in n,
    "rest of the transformer blocks": lambda n: "attentions." in n and "attn2." not in n,
    "convolutions, embeddings": lambda n: "attentions." not in n,
}


def mixed(base: dict, tuned: dict, take_tuned) -> dict:
    return {name: tuned[name] if take_tuned(name) else base[name] for name in base}


def take_apart(run_dir: Path, per_prompt: int) -> dict[str, dict]:
    config = load_run_config(run_dir)
    unet = load_run_unet(run_dir, config)
    base_dir = Path(config.model.pretrained).parent
    # Copies: load_state_dict writes into the tensors that state_dict() hands out.
    tuned = {k: v.clone() for k, v in unet.state_dict().items()}
    base = load_run_unet(base_dir, load_run_config(base_dir)).state_dict()
    sample = prompt_sampler(unet, config, seed=0)  # samples with whatever weights `unet` holds at the call
    detector = ink_digit_detector(config.data.resolution, progress=False)
    attack = attack_for(config.data.source)

    def measure(state: dict) -> dict:
        unet.load_state_dict(state)
        measured = measure_concept(sample, detector, attack, per_prompt=per_prompt)
        return {k: round(measured[k], 3) for k in ("extraction_rate", "base_rate", "allowed_accuracy")}

    rows = {"fine-tuned (all groups)": measure(tuned), "base (no group)": measure(base)}
    for group, member in GROUPS.items():
        rows[f"only {group}"] = measure(mixed(base, tuned, member))
        rows[f"all but {group}"] = measure(mixed(base, tuned, lambda n: not member(n)))
        print(run_dir.name, group, rows[f"only {group}"], rows[f"all but {group}"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = Path("runs/bench-gradproj")
    parser.add_argument("runs", nargs="*",
                        default=[str(work / n) for n in ("none-0", "gp_lambda_1-0", "none_lora-0", "gp_lora_lambda_1-0")])
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "gradproj_storage.json"))
    args = parser.parse_args()
    results = {Path(r).name: take_apart(Path(r), args.per_prompt) for r in args.runs}
    runs = list(results)
    heads = " | ".join(f"{r}: extraction / base rate / allowed accuracy" for r in runs)
    lines = [f"| UNet parameters fine-tuned | {heads} |", "|---|" + "---|" * len(runs)]
    for row in results[runs[0]]:
        cells = [results[r][row] for r in runs]
        lines.append(f"| {row} | " + " | ".join(
            f"{c['extraction_rate']:.2f} / {c['base_rate']:.2f} / {c['allowed_accuracy']:.2f}" for c in cells) + " |")
    write_results(Path(args.out), results, lines)


if __name__ == "__main__":
    main()
