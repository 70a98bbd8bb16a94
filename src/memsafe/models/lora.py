"""LoRA fine-tuning through peft, as in diffusers' LoRA text-to-image example, and merging for release."""

from __future__ import annotations

import copy

import torch

from memsafe.config import ModelConfig
from memsafe.errors import MemsafeError


def add_lora(unet: torch.nn.Module, model: ModelConfig) -> torch.nn.Module:
    """Freeze the UNet and add a trainable LoRA adapter on the `lora_targets` projections."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise MemsafeError("model.lora_rank needs peft: pip install 'memsafe[text]'") from exc
    unet.requires_grad_(False)
    config = LoraConfig(
        r=model.lora_rank,
        lora_alpha=model.lora_alpha if model.lora_alpha is not None else model.lora_rank,
        init_lora_weights="gaussian",
        target_modules=list(model.lora_targets),
    )
    try:
        # What diffusers' add_adapter does, for UNet2DModel too (which lacks the peft mixin).
        inject_adapter_in_model(config, unet)
    except ValueError as exc:
        raise MemsafeError(f"cannot add LoRA on model.lora_targets {model.lora_targets}: {exc}") from exc
    return unet


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Qualified name -> peft LoRA Linear layer."""
    from peft.tuners.lora import Linear as LoraLinear

    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLinear)}


def has_lora(unet: torch.nn.Module) -> bool:
    try:
        return bool(lora_layers(unet))
    except ImportError:
        return False


@torch.no_grad()
def merged_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain UNet of the same class whose weights are base + LoRA delta: what diffusers loads back."""
    layers = lora_layers(unet)
    state = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.base_layer.weight + layer.get_delta_weight("default")
    plain = type(unet).from_config(copy.deepcopy(dict(unet.config)))
    plain.load_state_dict(state)
    return plain.eval()
