"""Defenses, one file each, each turned into training-loop hooks by name (`defense.name` in the config)."""

from __future__ import annotations

from typing import Callable

from memsafe.config import RunConfig
from memsafe.data.images import ImageSet
from memsafe.errors import MemsafeError
from memsafe.train.hooks import TrainHook

HookFactory = Callable[[RunConfig, ImageSet], list[TrainHook]]

REGISTRY: dict[str, HookFactory] = {
    "none": lambda config, train_set: [],
}


def build_hooks(config: RunConfig, train_set: ImageSet) -> list[TrainHook]:
    name = config.defense.name
    if name not in REGISTRY:
        raise MemsafeError(f"unknown defense.name '{name}' (have: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name](config, train_set)
