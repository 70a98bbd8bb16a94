"""Defenses, one file each, chosen by `defense.name` ("none", "iet_agc", "gradient_projection"; several
joined by "+", e.g. "iet_agc+gradient_projection").

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

# A hook defense does its expensive set-up once and returns a maker of fresh hooks (one set per trainer,
# so each IET proxy gets its own).
HookMaker = Callable[[], list[TrainHook]]


def _gradient_projection(config: RunConfig, train_set: ImageSet) -> HookMaker:
    from memsafe.defenses.gradient_projection import hook_maker

    return hook_maker(config, train_set)


HOOK_DEFENSES: dict[str, Callable[[RunConfig, ImageSet], HookMaker]] = {"gradient_projection": _gradient_projection}
# Defenses that change how the loop is driven.
DRIVER_DEFENSES = {"iet_agc"}


def known_defenses() -> list[str]:
    return sorted({"none", *HOOK_DEFENSES, *DRIVER_DEFENSES})


def build_trainer(config: RunConfig, train_set: ImageSet):
    names = config.defense.names
    unknown = [n for n in names if n not in HOOK_DEFENSES and n not in DRIVER_DEFENSES]
    if unknown:
        raise MemsafeError(f"unknown defense '{unknown[0]}' in defense.name (have: {', '.join(known_defenses())})")

    makers = [HOOK_DEFENSES[n](config, train_set) for n in names if n in HOOK_DEFENSES]

    def hooks() -> list[TrainHook]:
        return [hook for make in makers for hook in make()]

    if "iet_agc" in names:
        from memsafe.defenses.iet_agc import IETTrainer

        return IETTrainer(config, train_set, extra_hooks=hooks)
    return Trainer(config, train_set, hooks=hooks())
