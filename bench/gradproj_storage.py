"""Where a fine-tuned model keeps the protected concept: the gradient-projection benchmark's runs, taken apart.

For each run (by default the seed-0 `none`, `gp_lambda_1`, `none_lora` and `gp_lora_lambda_1` runs of
`bench/gradproj.py --concept stamp`) the UNet's parameters are split into groups: the cross-attention key/value projections that read the text (what
gradient projection freezes along the concept), the cross-attention queries, the cross-attention output
projection, the rest of the transformer blocks, and the convolutional rest. Each group is measured two ways
against the pretrained base: only that group fine-tuned (the rest at base), and every group but that one.
Extraction rate and allowed accuracy come from the benchmark's attack. Writes
bench/results/gradproj_storage.json and .md. Usage: python bench/gradproj_storage.py [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memsafe.metrics.attributes import ink_digit_detector
from memsafe.metrics.extraction import attack_for, measure_concept
from memsafe.models.text import TextEncoder
from memsafe.runs import load_run_config, load_run_unet
from memsafe.models.sampling import generate
from memsafe.models.unet import build_noise_scheduler

RESULTS = Path(__file__).parent / "results"
GROUPS = {
    "text K/V (attn2.to_k, to_v)": lambda n: "attn2.to_k" in n or "attn2.to_v" in n,
    "queries (attn2.to_q)": lambda n: "attn2.to_q" in n,
    "attention output (attn2.to_out)": lambda n: "attn2.to_out" in n,
    "rest of the transformer blocks": lambda n: "attentions." in n and "attn2." not in n,
    "convolutions, embeddings": lambda n: "attentions." not in n,
}


def mixed(base: dict, tuned: dict, take_tuned) -> dict:
    return {name: tuned[name] if take_tuned(name) else base[name] for name in base}


def measure(unet, state: dict, config, encoder, detector, attack, per_prompt: int) -> dict:
    unet.load_state_dict(state)

    def sample(prompts: list[str]) -> torch.Tensor:
        return generate(unet, build_noise_scheduler(config.model), len(prompts), steps=config.eval.sampling_steps,
                        batch_size=config.eval.batch_size, seed=0, progress=False,
                        encoder_hidden_states=encoder.encode(prompts), uncond_hidden_states=encoder.encode([""]),
                        guidance_scale=config.eval.guidance_scale)

    measured = measure_concept(sample, detector, attack, per_prompt=per_prompt)
    return {k: round(measured[k], 3) for k in ("extraction_rate", "base_rate", "allowed_accuracy")}


def take_apart(run_dir: Path, per_prompt: int) -> dict[str, dict]:
    config = load_run_config(run_dir)
    tuned_unet = load_run_unet(run_dir, config).eval()
    base_unet = load_run_unet(Path(config.model.pretrained).parent, load_run_config(Path(config.model.pretrained).parent))
    # Copies: load_state_dict writes into the tensors that state_dict() hands out.
    tuned = {k: v.clone() for k, v in tuned_unet.state_dict().items()}
    base = base_unet.state_dict()
    encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    detector = ink_digit_detector(config.data.resolution, progress=False)
    attack = attack_for(config.data.source)
    rows = {"fine-tuned (all groups)": measure(tuned_unet, tuned, config, encoder, detector, attack, per_prompt),
            "base (no group)": measure(tuned_unet, base, config, encoder, detector, attack, per_prompt)}
    for group, member in GROUPS.items():
        rows[f"only {group}"] = measure(tuned_unet, mixed(base, tuned, member), config, encoder, detector, attack,
                                        per_prompt)
        rows[f"all but {group}"] = measure(tuned_unet, mixed(base, tuned, lambda n: not member(n)), config, encoder,
                                           detector, attack, per_prompt)
        print(run_dir.name, group, rows[f"only {group}"], rows[f"all but {group}"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = Path("runs/bench-gradproj")
    parser.add_argument("runs", nargs="*", default=[str(work / n) for n in ("none-0", "gp_lambda_1-0", "none_lora-0", "gp_lora_lambda_1-0")])
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "gradproj_storage.json"))
    args = parser.parse_args()
    results = {Path(r).name: take_apart(Path(r), args.per_prompt) for r in args.runs}
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    runs = list(results)
    lines = ["| UNet parameters fine-tuned | " + " | ".join(f"{r}: extraction / base rate / allowed accuracy" for r in runs)
             + " |", "|---|" + "---|" * len(runs)]
    for row in results[runs[0]]:
        cells = [results[r][row] for r in runs]
        lines.append(f"| {row} | " + " | ".join(
            f"{c['extraction_rate']:.2f} / {c['base_rate']:.2f} / {c['allowed_accuracy']:.2f}" for c in cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
