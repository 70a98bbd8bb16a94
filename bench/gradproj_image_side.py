"""Can image-side concept directions be separated from allowed content, layer by layer?

The issue's optional image side would add, per layer, the directions by which *showing* the concept changes
the layer's inputs. The stamp benchmark renders every stamped digit also without its stamp, so the change
is measured exactly: each pair runs through the base model with the same noise, timestep and stamp-free
caption, and every projectable layer's input difference is collected (as in gradient_projection/activation_basis.py).
For each layer this reports, for bases holding a share of the change's energy, how many input dimensions
they take and how much of the *allowed* input energy (the same images without the stamp) lies in them:
what projecting off that basis would also freeze. A separable concept holds most of its change in
directions that allowed content barely uses. Without pairs (what a user with example images has), the
concept can only show as extra input energy of stamped images over allowed ones: `unpaired_excess` is
the top eigenvalue of that excess second moment divided by the same for a second set of allowed images
(sampling noise alone), both against one reference set; near 1, the concept does not stand out.
Writes bench/results/gradproj_image_side.json and .md.
Usage: python bench/gradproj_image_side.py [--base runs/bench-gradproj-new-green/base] [--images 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from memsafe.data.ink_digits import load_stamped_digits
from memsafe.defenses.gradient_projection.activation_basis import captured_inputs, projectable_layers
from memsafe.defenses.gradient_projection.subspace import energy_basis
from memsafe.errors import MemsafeError
from memsafe.models.text import TextEncoder
from memsafe.models.unet import build_noise_scheduler
from memsafe.runs import load_run_config, load_run_unet
from memsafe.train.loss import draw_noise
from results_io import RESULTS, write_results

ENERGIES = (0.5, 0.9, 0.99)


@torch.no_grad()
def layer_inputs(unet, scheduler, pixels: torch.Tensor, noise, steps, states) -> dict[str, torch.Tensor]:
    """Every projectable layer's input rows (float64) for one batch."""
    with captured_inputs(projectable_layers(unet)) as captured:
        unet(scheduler.add_noise(pixels, noise, steps), steps, encoder_hidden_states=states)
    return captured


def share_in(rows: torch.Tensor, basis: torch.Tensor) -> float:
    return ((rows @ basis).pow(2).sum() / rows.pow(2).sum().clamp_min(1e-30)).item()


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ rows / len(rows)


def unpaired_excess(unet, scheduler, stamped, text, images: int, generator) -> dict[str, float]:
    """Per layer, the top excess eigenvalue of stamped over allowed images, relative to that of a second
    allowed set over the first: images drawn without pairs, under shared noise, timesteps and captions."""
    plain = torch.nonzero(stamped.attributes["stamp"] == 0).flatten()
    plain = plain[torch.randperm(len(plain), generator=generator)[: 2 * images]]
    concept = torch.nonzero(stamped.attributes["stamp"]).flatten()
    concept = concept[torch.randint(len(concept), (images,), generator=generator)]
    resolution = stamped.pixels.shape[-1]
    noise, steps = draw_noise(scheduler, (images, 3, resolution, resolution), generator)
    states = text.encode([stamped.captions[i] for i in plain[:images].tolist()])
    reference, other, shown = (layer_inputs(unet, scheduler, stamped.subset(chosen.tolist()).as_model_input(),
                                            noise, steps, states)
                               for chosen in (plain[:images], plain[images:], concept))
    excess = {}
    for name in reference:
        base = second_moment(reference[name])
        null = torch.linalg.eigvalsh(second_moment(other[name]) - base).max().item()
        if null > 0:
            excess[name] = torch.linalg.eigvalsh(second_moment(shown[name]) - base).max().item() / null
    return excess


def separability(base: Path, images: int, seed: int) -> dict[str, dict]:
    if not (base / "status.json").exists():
        raise MemsafeError(f"no pretrained base at {base}: run bench/gradproj.py first (it trains one)")
    config = load_run_config(base)
    unet, scheduler = load_run_unet(base, config), build_noise_scheduler(config.model)
    resolution = config.data.resolution
    stamped, clean = load_stamped_digits(resolution, 3, True), load_stamped_digits(resolution, 3, False)
    chosen = torch.nonzero(stamped.attributes["stamp"]).flatten()[:images]
    text = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    states = text.encode([clean.captions[i] for i in chosen.tolist()])
    generator = torch.Generator().manual_seed(seed)
    noise, steps = draw_noise(scheduler, (len(chosen), 3, resolution, resolution), generator)
    with_stamp = layer_inputs(unet, scheduler, stamped.subset(chosen.tolist()).as_model_input(), noise, steps, states)
    without = layer_inputs(unet, scheduler, clean.subset(chosen.tolist()).as_model_input(), noise, steps, states)
    excess = unpaired_excess(unet, scheduler, stamped, text, 2 * images, generator)
    layers = {}
    for name in with_stamp:
        change = with_stamp[name] - without[name]
        if change.pow(2).sum() <= 1e-10 * without[name].pow(2).sum():
            continue  # the stamp has not reached this layer's inputs (text-only layers)
        covariance = change.T @ change
        layers[name] = {"fan_in": change.shape[1], "unpaired_excess": excess.get(name, float("nan"))}
        for energy in ENERGIES:
            basis = energy_basis(covariance, energy)
            layers[name][f"dims_{energy}"] = basis.shape[1] / change.shape[1]
            layers[name][f"allowed_{energy}"] = share_in(without[name], basis)
    return layers


def summary(layers: dict[str, dict]) -> dict[str, float]:
    keys = [f"{kind}_{energy}" for energy in ENERGIES for kind in ("dims", "allowed")] + ["unpaired_excess"]
    return {key: statistics.median(layer[key] for layer in layers.values()) for key in keys} | {"layers": len(layers)}


def write(layers: dict[str, dict], out: Path, settings: dict) -> None:
    results = {"settings": settings, "median": summary(layers), "layers": layers}
    head = " | ".join(f"{e:.0%} of the stamp's change: dims, allowed energy" for e in ENERGIES)
    lines = [f"| layer | fan-in | {head} | unpaired excess |", "|---|---|" + "---|" * (len(ENERGIES) + 1)]
    rows = {"median over layers": {"fan_in": "", **results["median"]}} | layers
    for name, layer in rows.items():
        cells = " | ".join(f"{layer[f'dims_{e}']:.1%}, {layer[f'allowed_{e}']:.1%}" for e in ENERGIES)
        lines.append(f"| {name} | {layer['fan_in']} | {cells} | {layer['unpaired_excess']:.2f} |")
    write_results(out, results, lines, echo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/bench-gradproj-new-green/base",
                        help="a pretrained base of bench/gradproj.py (its -clean data never showed the stamp)")
    parser.add_argument("--images", type=int, default=128, help="stamped images, each with its unstamped twin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "gradproj_image_side.json"))
    args = parser.parse_args()
    layers = separability(Path(args.base), args.images, args.seed)
    write(layers, Path(args.out), {"base": args.base, "images": args.images, "seed": args.seed})
    print(json.dumps(summary(layers)))


if __name__ == "__main__":
    main()
