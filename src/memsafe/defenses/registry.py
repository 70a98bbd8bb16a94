"""The registry of defenses: one line per defense package. Importing it imports no model code."""

from __future__ import annotations

import importlib

from memsafe.defenses.contract import Defense

DEFENSES: dict[str, Defense] = {
    spec.name: spec
    for spec in (
        importlib.import_module("memsafe.defenses.iet_agc").DEFENSE,
        importlib.import_module("memsafe.defenses.gradient_projection").DEFENSE,
    )
}


def known_defenses() -> list[str]:
    return ["none", *sorted(DEFENSES)]


def selected(names: list[str]) -> list[Defense]:
    """The defenses named, in order; an unknown name is an error naming it."""
    from memsafe.errors import MemsafeError

    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise MemsafeError(f"unknown defense '{unknown[0]}' in defense.name (have: {', '.join(known_defenses())})")
    return [DEFENSES[n] for n in names]
