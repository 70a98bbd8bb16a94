"""Per-layer concept subspaces in activation space (`defense.gradient_projection.space: activations`).

Freezing only the layers that read text embeddings lets fine-tuning store a concept in the layers after
them (bench/gradproj_storage.py). Here every trainable weight W gets its own subspace, in the space of its
inputs, in the spirit of gradient projection memory (Saha et al., 2021): the directions by which *naming
the concept* changes that layer's input in the model being fine-tuned. For a training image x_t and its
caption c without the concept, the model runs on c and on "c + concept prompt" with the same noise and
timestep; each layer's input difference (unfolded into patches for a convolution) is collected, and an
eigenbasis keeping `activation_energy` of its energy is that layer's basis. Projecting W's update off it
leaves each layer's response to the concept where the starting model had it, to first order across the
network: the phrase cannot learn to steer the output. Layers the text has not reached yet see no
difference and stay free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memsafe.defenses.gradient_projection.captions import without_concept
from memsafe.defenses.gradient_projection.config import GradientProjectionConfig
from memsafe.defenses.gradient_projection.subspace import concept_specific_basis, energy_basis
from memsafe.errors import MemsafeError
from memsafe.train.loss import draw_noise


def projectable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear and (ungrouped) Conv2d layers with a trainable weight; a LoRA layer's `lora_A` counts, its
    `lora_B` (which reads the adapter's own r-dimensional output) does not."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not module.weight.requires_grad:
            continue
        if ".lora_B" in f".{name}" or (isinstance(module, torch.nn.Conv2d) and module.groups != 1):
            continue
        found[name] = module
    return found


def input_rows(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What the weight multiplies, one row per output position: (rows, fan_in)."""
    if isinstance(module, torch.nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return inputs.reshape(-1, inputs.shape[-1])


def output_rows(output: torch.Tensor) -> torch.Tensor:
    """A layer's output (or its gradient) in the row order of `input_rows`: (rows, out)."""
    if output.dim() == 4:  # convolution: (n, out, h, w) -> one row per output position
        output = output.movedim(1, -1)
    return output.reshape(-1, output.shape[-1])


def concept_caption_pairs(captions: list[str], concepts: list[str], count: int,
                          generator: torch.Generator) -> tuple[list[int], list[str], list[str], list[str]]:
    """`count` (image index, caption naming a concept, the same caption without it, another image's caption
    without it): each drawn training caption, stripped of any concept phrase, with one of the concept
    prompts appended; the last is an allowed change of caption to compare the concept's change with."""
    images = torch.randint(len(captions), (count,), generator=generator).tolist()
    prompts = torch.randint(len(concepts), (count,), generator=generator).tolist()
    others = torch.randint(len(captions), (count,), generator=generator).tolist()
    plain = [without_concept(captions[i], concepts) or captions[i] for i in images]
    other = [without_concept(captions[i], concepts) or captions[i] for i in others]
    return images, [f"{p} {concepts[k]}".strip() for p, k in zip(plain, prompts)], plain, other


class InputChangeMoments:
    """Forward pre-hooks that stream, for every layer, statistics of a batch made of `parts` equal parts (the
    same noisy images under other captions, the first part's captions without the concept): the (fan_in,
    fan_in) second moment of how each later part's input differs from the first part's, and the first part's
    input energy. No input outlives its layer, so the memory is the covariances' alone, whatever the model."""

    def __init__(self, layers: dict[str, torch.nn.Module], parts: int):
        self.parts = parts
        self.moments: dict[str, list[torch.Tensor | int]] = {name: [0] * (parts - 1) for name in layers}
        self.signal: dict[str, torch.Tensor | float] = dict.fromkeys(layers, 0.0)
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            base, *others = input_rows(module, args[0]).double().chunk(self.parts)
            for j, part in enumerate(others):
                change = part - base
                self.moments[name][j] = self.moments[name][j] + change.T @ change
            self.signal[name] = self.signal[name] + base.pow(2).sum()

        return hook

    def __enter__(self) -> InputChangeMoments:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def activation_subspaces(model: torch.nn.Module, noise_scheduler, encoder, pixels: torch.Tensor,
                         captions: list[str], config: GradientProjectionConfig, seed: int = 0,
                         batch_size: int = 32) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """{layer name: (fan_in, k) orthonormal basis} for every projectable layer that naming a concept
    reaches, and diagnostics (layers reached, mean share of each one's input dimensions taken)."""
    layers = projectable_layers(model)
    generator = torch.Generator().manual_seed(seed)
    images, named, plain, other = concept_caption_pairs(captions, config.concepts, config.activation_samples, generator)
    device = next(model.parameters()).device
    with_allowed = config.experimental.activation_allowed
    captions_of = [plain, other, named] if with_allowed else [plain, named]
    was_training = model.training
    model.eval()
    try:
        with InputChangeMoments(layers, parts=len(captions_of)) as measured:
            for start in range(0, len(images), batch_size):
                chosen = torch.tensor(images[start : start + batch_size])
                clean = pixels[chosen].to(device)
                noise, steps = draw_noise(noise_scheduler, tuple(clean.shape), generator)
                noisy = noise_scheduler.add_noise(clean, noise.to(device), steps.to(device))
                prompts = [prompt for part in captions_of for prompt in part[start : start + batch_size]]
                repeat = len(captions_of)
                model(noisy.repeat(repeat, *[1] * (noisy.dim() - 1)), steps.to(device).repeat(repeat),
                      encoder_hidden_states=encoder.encode(prompts).to(device))
    finally:
        model.train(was_training)
    covariance = {name: moments[-1].cpu() for name, moments in measured.moments.items()}
    allowed = {name: moments[0].cpu() for name, moments in measured.moments.items()} if with_allowed else {}
    signal = {name: float(value) for name, value in measured.signal.items()}
    # A layer upstream of every cross-attention sees exactly the same inputs either way.
    reached = {name for name in layers if covariance[name].trace() > 1e-10 * max(signal[name], 1e-30)}
    if not reached:
        raise MemsafeError("naming the concepts changes the input of no trainable layer: does the model read text?")
    if with_allowed:
        bases = {name: concept_specific_basis(covariance[name], allowed[name]).float() for name in sorted(reached)}
        bases = {name: basis for name, basis in bases.items() if basis.shape[1]}
    else:
        bases = {name: energy_basis(covariance[name], config.activation_energy).float() for name in sorted(reached)}
    taken = [basis.shape[1] / basis.shape[0] for basis in bases.values()]
    stats = {"layers": len(layers), "layers_reached": len(bases),
             "mean_dimension_share": sum(taken) / len(taken) if taken else 0.0,
             "rank": sum(basis.shape[1] for basis in bases.values())}
    return bases, stats
