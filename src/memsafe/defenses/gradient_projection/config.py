"""Gradient projection settings (`defense.gradient_projection`) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from memsafe.errors import MemsafeError

if TYPE_CHECKING:  # pragma: no cover
    from memsafe.config import RunConfig


# Named starting points; a key set in the config wins over its profile. "recommended" is what the concept
# benchmark supports (docs/defenses/gradient_projection.md); "paper" is the published key/value projection.
PROFILES = {
    "recommended": {"space": "activations", "project_every": 10, "sink": True},
    "paper": {"space": "text", "project_every": 1, "sink": False},
}


@dataclass
class ExperimentalSettings:
    """Extensions the research log measured and does not recommend (`defense.gradient_projection.experimental`)."""

    # Add the directions by which naming a concept changes the other tokens of its training captions (a
    # bidirectional encoder spreads a phrase into its whole caption) ...
    counterfactual: bool = False
    # ... and train on caption embeddings with their concept component removed (scaled by 1 - strength), so the
    # layers after the frozen keys/values cannot learn to decode the concept from them either.
    project_inputs: bool = False
    # "all": every sample's gradient is projected (the guarantee). "concept_samples": only the share of the
    # samples whose caption names a concept (concept_samples.py); `mode` does not apply, no guarantee.
    scope: str = "all"
    # space activations: keep only the directions along which the concept moves a layer's inputs more than
    # switching to another training caption does (allowed content keeps the rest; activation_energy does not apply).
    activation_allowed: bool = False


@dataclass
class GradientProjectionConfig:
    """Concept-level defense: updates of layers that read a concept lose their concept component."""

    concepts: list[str] = field(default_factory=list)  # prompts naming the prohibited concepts (several each)
    profile: str = "recommended"  # fills space, project_every and sink where they are not set (PROFILES)
    neutral: list[str] = field(default_factory=lambda: ["", "a photo", "an image of", "a picture of something"])
    strength: float = 1.0  # the projection strength (lambda in the method's equations); 1 removes the component
    rank: int | None = None  # basis size; None: smallest rank holding `energy` of the concept spectrum
    energy: float = 0.95
    neutral_energy: float = 0.99
    layers: list[str] = field(default_factory=lambda: ["attn2.to_k", "attn2.to_v"])  # module-name suffixes
    # "update": project the optimizer's update (exact); "gradient": project gradients; "both": gradients,
    # so AdamW's moments see only the allowed part, and the update (exact)
    mode: str = "update"
    # Training captions that name no concept join the neutral prompts: their directions stay learnable.
    neutral_captions: bool = True
    # "text": the concepts' text-embedding subspace, on the layers that read text (`layers`). "activations":
    # every trainable layer gets the subspace by which naming a concept changes its inputs
    # (activation_basis.py), from `activation_samples` training captions with a concept prompt appended,
    # keeping `activation_energy` of each layer's difference energy; `layers` does not apply.
    space: str | None = None
    activation_samples: int = 256
    activation_energy: float = 0.99
    # mode "update" only: project the update accumulated over this many steps at once (and before any
    # checkpoint, IET aggregation or the end of training), so the hook costs 1/N per step. W u = W0 u holds
    # at those points; between them the weights may drift along the subspace.
    project_every: int | None = None
    # Add a private "sink" vector to the last token of every training sample whose caption names a concept:
    # a direction that no projected weight is frozen along and that the text encoder's tokens use least. With
    # the text route frozen, the concept images' content needs an explanation; the sink gives it one that no
    # prompt produces, instead of allowed content that comes with it.
    sink: bool | None = None
    sink_scale: float = 1.0  # the sink's norm, in RMS norms of the text tokens
    experimental: ExperimentalSettings = field(default_factory=ExperimentalSettings)
    PROFILES: ClassVar[dict[str, dict]] = PROFILES

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise MemsafeError(f"defense.gradient_projection.profile must be one of {', '.join(PROFILES)}, "
                               f"got {self.profile!r}")
        for key, value in PROFILES[self.profile].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


def validate(config: RunConfig) -> None:
    gp, where = config.defense.gradient_projection, "defense.gradient_projection"
    if config.model.conditioning != "text":
        raise MemsafeError("defense gradient_projection needs a text-conditional model (model.conditioning: text)")
    if not 0.0 <= gp.strength <= 1.0:
        raise MemsafeError(f"{where}.strength must be in [0, 1], got {gp.strength}")
    if gp.mode not in ("update", "gradient", "both"):
        raise MemsafeError(f"{where}.mode must be update, gradient or both, got {gp.mode!r}")
    if gp.experimental.scope not in ("all", "concept_samples"):
        raise MemsafeError(f"{where}.experimental.scope must be all or concept_samples, got {gp.experimental.scope!r}")
    if gp.space not in ("text", "activations"):
        raise MemsafeError(f"{where}.space must be text or activations, got {gp.space!r}")
    if gp.space == "activations" and (gp.experimental.project_inputs or gp.experimental.counterfactual):
        raise MemsafeError(f"{where}.experimental.project_inputs and counterfactual apply to space: text only")
    if gp.sink_scale <= 0:
        raise MemsafeError(f"{where}.sink_scale must be positive, got {gp.sink_scale}")
    if gp.project_every < 1:
        raise MemsafeError(f"{where}.project_every must be at least 1, got {gp.project_every}")
    if gp.project_every > 1 and (gp.mode != "update" or gp.experimental.scope != "all" or config.train.ema):
        raise MemsafeError(f"{where}.project_every {gp.project_every} (profile {gp.profile}) needs mode: update, "
                           "experimental.scope: all and train.ema: false (the other modes and the EMA act on every "
                           "step); set project_every: 1 or profile: paper")
    if not 0 < gp.activation_energy <= 1 or gp.activation_samples < 1:
        raise MemsafeError(f"{where}.activation_energy must be in (0, 1] and activation_samples at least 1")
