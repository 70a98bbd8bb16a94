"""What a defense supplies to memsafe, through one registry (`memsafe.defenses.registry`).

A defense is a package under `defenses/` whose `__init__.py` defines `DEFENSE = Defense(...)` and imports
nothing heavy (the config loader reads the registry): the functions below import their modules when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from memsafe.config import RunConfig
    from memsafe.data.images import ImageSet
    from memsafe.report.document import Report
    from memsafe.train.hooks import TrainHook
    from memsafe.train.protocol import TrainerLike

# A hook defense does its expensive set-up once and returns a maker of fresh hooks (one set per trainer, so
# that each proxy of a driver gets its own).
HookMaker = Callable[[], "list[TrainHook]"]


def _no_checks(config: RunConfig) -> None:
    return None


@dataclass(frozen=True)
class Defense:
    name: str  # `defense.name` selects it; its settings are the config section `defense.<name>`
    config: type  # dataclass of that section; every field has a default
    summary: str = ""  # one line for `memsafe --help`-style listings and the docs
    # Checks of the whole run config that need no data, run when a config is loaded (the defense is selected).
    validate: Callable[[RunConfig], None] = _no_checks
    # (config, training images) -> a maker of the training hooks the defense adds to the loop.
    hooks: Callable[[RunConfig, ImageSet], HookMaker] | None = None
    # (config, training images, maker of the other defenses' hooks) -> a trainer that schedules training its own
    # way (train.protocol.TrainerLike), e.g. rounds of proxies. At most one selected defense may have one.
    driver: Callable[[RunConfig, ImageSet, HookMaker], TrainerLike] | None = None
    # (run directory, config) -> extra values for metrics.json after an evaluation.
    evaluate: Callable[[Path, RunConfig], dict[str, Any]] | None = None
    # (report, run directory, metrics, log rows) -> adds the defense's own sections and figures to the report.
    report: Callable[[Report, Path, dict, list[dict]], None] | None = None
    demo_config: str = "demo.yaml"  # the packaged config `memsafe demo --defense NAME` starts from
