"""Defenses, one file each, chosen by `defense.name` ("none", "iet_agc"; several joined by "+").

A defense joins training through hooks of the one training loop; IET-AGC+ also runs that loop as K proxy
trainers over shards. `build_trainer` returns the Trainer (or ensemble trainer) a run needs.
"""

from __future__ import annotations

from typing import Callable

from memsafe.config import RunConfig
from memsafe.data.images import ImageSet
from memsafe.errors import MemsafeError
from memsafe.train.hooks import TrainHook
from memsafe.train.loop import Trainer

HookFactory = Callable[[RunConfig, ImageSet], list[TrainHook]]

# Defenses that are hooks of one trainer (per-trainer instances, so each IET proxy gets its own).
HOOK_DEFENSES: dict[str, HookFactory] = {}
# Defenses that change how the loop is driven.
DRIVER_DEFENSES = {"iet_agc"}


def known_defenses() -> list[str]:
    return sorted({"none", *HOOK_DEFENSES, *DRIVER_DEFENSES})


def build_trainer(config: RunConfig, train_set: ImageSet):
    names = config.defense.names
    unknown = [n for n in names if n not in HOOK_DEFENSES and n not in DRIVER_DEFENSES]
    if unknown:
        raise MemsafeError(f"unknown defense '{unknown[0]}' in defense.name (have: {', '.join(known_defenses())})")

    def hooks() -> list[TrainHook]:
        return [hook for n in names if n in HOOK_DEFENSES for hook in HOOK_DEFENSES[n](config, train_set)]

    if "iet_agc" in names:
        from memsafe.defenses.iet_agc import IETTrainer

        return IETTrainer(config, train_set, extra_hooks=hooks)
    return Trainer(config, train_set, hooks=hooks())
