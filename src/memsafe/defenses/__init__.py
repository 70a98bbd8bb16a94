"""Defenses, one package each behind one contract (contract.py), listed in registry.py and chosen by
`defense.name` ("none", "iet_agc", "gradient_projection"; several joined by "+").

A defense joins training through hooks of the one training loop, and may drive that loop its own way
(IET-AGC+ runs it as K proxy trainers over shards). `build_trainer` returns the trainer a run needs.
"""

from __future__ import annotations

from memsafe.defenses.contract import Defense, HookMaker
from memsafe.defenses.registry import DEFENSES, known_defenses, selected


def build_trainer(config, train_set):
    """The run's trainer: the selected defenses' hooks in the one loop, or in the one selected driver."""
    from memsafe.errors import MemsafeError
    from memsafe.train.loop import Trainer

    chosen = selected(config.defense.names)
    makers = [d.hooks(config, train_set) for d in chosen if d.hooks is not None]

    def hooks():
        return [hook for make in makers for hook in make()]

    drivers = [d for d in chosen if d.driver is not None]
    if len(drivers) > 1:
        raise MemsafeError(f"defenses {' and '.join(d.name for d in drivers)} each schedule training their own way; "
                           "choose one of them")
    if drivers:
        return drivers[0].driver(config, train_set, hooks)
    return Trainer(config, train_set, hooks=hooks())


__all__ = ["DEFENSES", "Defense", "HookMaker", "build_trainer", "known_defenses", "selected"]
