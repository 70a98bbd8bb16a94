"""The training hook: every update of the projected weights restricted to the orthogonal complement of
their concept subspace, and the factory that builds the subspaces once per run."""

from __future__ import annotations

import torch

from memsafe.config import RunConfig
from memsafe.defenses.gradient_projection.captions import concept_mask
from memsafe.defenses.gradient_projection.config import GradientProjectionConfig
from memsafe.defenses.gradient_projection.sink import sink_vector
from memsafe.defenses.gradient_projection.subspace import SubspaceProjector
from memsafe.defenses.gradient_projection.text_basis import concept_basis, text_moment
from memsafe.errors import MemsafeError
from memsafe.train.hooks import TrainHook


def projected_parameters(model: torch.nn.Module, layers: list[str], dim: int) -> dict[str, torch.nn.Parameter]:
    """Trainable weights that multiply d-dimensional text embeddings in the matching layers: the Linear
    weight itself (full fine-tuning) or, under LoRA, the adapter's `lora_A` factor."""
    found = {}
    for name, module in model.named_modules():
        if not any(name.endswith(suffix) or f"{suffix}." in f"{name}." for suffix in layers):
            continue
        for pname, param in module.named_parameters(recurse=True):
            if not param.requires_grad or param.dim() != 2 or param.shape[1] != dim:
                continue
            if "lora_B" in pname:
                continue
            found[f"{name}.{pname}"] = param
    if not found:
        raise MemsafeError(
            f"no trainable layer of the model matches defense.gradient_projection.layers {layers} "
            f"(with {dim}-d inputs): a text-conditional UNet reads text in attn2.to_k / attn2.to_v"
        )
    return found


def _stacked(tensors) -> torch.Tensor:
    """Matrices (convolution kernels flattened to out x fan_in) as one (sum of rows, fan_in) matrix: one
    product per group and step instead of one per layer."""
    return torch.cat([t.detach().flatten(1) for t in tensors])


def _gradients(params) -> list[torch.Tensor]:
    """Each weight's gradient, zeros (written nowhere) for one that got none."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _logging_step(trainer) -> bool:
    """The removed share is measured on the steps that end a logging interval only: measuring it costs as
    much as projecting when every layer has a basis of its own."""
    return (trainer.step + 1) % trainer.config.train.log_every == 0


class GradientProjection(TrainHook):
    """Restricts the updates of groups of weights to the orthogonal complement of their group's basis (in
    the space the weights multiply). Text space: one group, every weight that reads text embeddings, with
    the concepts' embedding basis; `LayerwiseProjection` gives each layer a basis of its own."""

    name = "gradient_projection"

    def __init__(self, basis: torch.Tensor | None, config: GradientProjectionConfig, stats: dict[str, float] | None = None,
                 moment: torch.Tensor | None = None):
        self.basis = basis  # (d, k), orthonormal columns
        self.config = config
        self.moment = moment  # the text tokens' (d, d) second moment, to place the sink (config.sink)
        self.sink: torch.Tensor | None = None
        self.strength = config.strength
        self.stats = dict(stats or {})
        self.params: dict[str, torch.nn.Parameter] = {}
        # (weights, projector on their device, rows of each weight) per group
        self.groups: list[tuple[list[torch.nn.Parameter], SubspaceProjector, list[int]]] = []
        self.before: list[torch.Tensor] | None = None  # each group's weights before the optimizer step, stacked
        self.anchors: list[torch.Tensor] = []  # ... at the last projection, under project_every > 1
        self.names: list[list[str]] = []  # each group's weight names
        self.samples = None  # ConceptSampleGradients under scope: concept_samples
        self.removed_sq = self.total_sq = 0.0

    def subspaces(self, trainer) -> list[tuple[dict[str, torch.nn.Parameter], torch.Tensor]]:
        """(named weights, orthonormal basis of the concept subspace of their inputs) per group."""
        return [(projected_parameters(trainer.unwrapped, self.config.layers, self.basis.shape[0]), self.basis)]

    def attach(self, trainer) -> None:
        self.groups, self.params, self.names = [], {}, []
        subspaces = self.subspaces(trainer)
        if self.config.sink:
            dim = self.moment.shape[0]
            sink, self.stats["sink_text_share"] = sink_vector(self.moment, [b for _, b in subspaces if b.shape[0] == dim])
            self.sink = self.config.sink_scale * sink
        for params, basis in subspaces:
            first = next(iter(params.values()))
            projector = SubspaceProjector(basis, first.device, first.dtype)
            self.groups.append((list(params.values()), projector, [p.shape[0] for p in params.values()]))
            self.names.append(list(params))
            self.params |= params
            with torch.no_grad():
                for name, param in params.items():
                    if "lora_A" in name:  # start the adapter orthogonal to the concepts
                        param.flatten(1).sub_(projector.component(param.flatten(1)))
        if self.config.experimental.scope == "concept_samples":
            from memsafe.defenses.gradient_projection.concept_samples import ConceptSampleGradients

            if self.samples is not None:
                self.samples.remove()
            modules = {name: trainer.unwrapped.get_submodule(name.rsplit(".", 1)[0]) for name in self.params}
            self.samples = ConceptSampleGradients(modules, self.config.concepts)
        self.anchors = [_stacked(params) for params, _, _ in self.groups] if self.deferred else []

    @property
    def deferred(self) -> bool:
        return self.config.project_every > 1

    def _component(self, matrix: torch.Tensor) -> torch.Tensor:
        basis = self.basis.to(device=matrix.device, dtype=matrix.dtype)
        return matrix @ basis @ basis.T

    def _subtract(self, targets, stacked_component: torch.Tensor, rows: list[int]) -> None:
        for target, part in zip(targets, stacked_component.split(rows)):
            target.flatten(1).sub_(part, alpha=self.strength)

    def on_train_start(self, trainer) -> None:
        self.attach(trainer)

    def on_batch_start(self, batch, trainer):
        if self.samples is not None:
            self.samples.select(batch.get("captions"))
        states = batch["model_kwargs"].get("encoder_hidden_states")
        if states is None or not (self.config.experimental.project_inputs or self.config.sink):
            return batch
        if self.config.experimental.project_inputs:
            states = states - self.strength * self._component(states)
        if self.config.sink:
            states = self._with_sink(states, batch.get("captions"), trainer)
        return batch | {"model_kwargs": batch["model_kwargs"] | {"encoder_hidden_states": states}}

    def _with_sink(self, states: torch.Tensor, captions: list[str] | None, trainer) -> torch.Tensor:
        """The sink added to the last token of the samples whose caption names a concept (also when caption
        dropout emptied it, so that the unconditional model is not left to explain the concept either)."""
        if self.sink is None:
            self.attach(trainer)
        named = concept_mask(captions or [], self.config.concepts)
        if not named.any():
            return states
        mask = torch.zeros(states.shape[:2] + (1,), dtype=states.dtype, device=states.device)
        mask[named.to(states.device), -1] = 1.0
        return states + mask * self.sink.to(states)

    def on_after_backward(self, model, trainer) -> None:
        if not self.groups:
            self.attach(trainer)
        if self.samples is not None:
            self._project_concept_samples(trainer)
            return
        snapshot = self.config.mode in ("update", "both") and not self.deferred
        project = self.config.mode in ("gradient", "both")
        measure = project or _logging_step(trainer)
        self.before = [] if snapshot else None
        with torch.no_grad():
            for params, projector, rows in self.groups:
                if snapshot:
                    self.before.append(_stacked(params))
                if not measure:
                    continue
                grads = _gradients(params)
                gradient = _stacked(grads)
                if project:
                    component = projector.component(gradient)
                    self._subtract(grads, component, rows)
                    removed = component.pow(2).sum()
                else:
                    removed = projector.energy(gradient)
                self.removed_sq = self.removed_sq + removed * self.strength**2
                self.total_sq = self.total_sq + gradient.pow(2).sum()

    def _project_concept_samples(self, trainer) -> None:
        """Removes the concept component of the concept samples' share of each gradient (scope: concept_samples)."""
        measure = _logging_step(trainer)
        with torch.no_grad():
            for (params, projector, rows), names in zip(self.groups, self.names):
                share = _stacked([self.samples.take(name, p) for name, p in zip(names, params)])
                if trainer.data_parallel:  # gradients are averaged over processes, so are the shares
                    share = trainer.accelerator.reduce(share, reduction="mean")
                component = projector.component(share)
                grads = _gradients(params)
                if measure:  # against the gradient before projection, as under scope: all
                    self.removed_sq = self.removed_sq + component.pow(2).sum() * self.strength**2
                    self.total_sq = self.total_sq + _stacked(grads).pow(2).sum()
                self._subtract(grads, component, rows)
        self.samples.select(None)  # nothing is collected outside training steps

    def on_after_step(self, model, trainer) -> None:
        if self.deferred and (trainer.step + 1) % self.config.project_every == 0:
            self.on_sync(trainer)
        elif self.before is not None:
            self._project_change(self.before)
            self.before = None

    def on_sync(self, trainer) -> None:
        """Under project_every > 1: projects the change since the last projection."""
        if self.anchors:
            self._project_change(self.anchors)
            self.anchors = [_stacked(params) for params, _, _ in self.groups]

    def _project_change(self, starts: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (params, projector, rows), start in zip(self.groups, starts):
                self._subtract(params, projector.component(_stacked(params) - start), rows)

    @property
    def rank(self) -> int:
        return sum(projector.rank for _, projector, _ in self.groups) if self.groups else self.basis.shape[1]

    def log_values(self) -> dict[str, float]:
        """Share of the projected layers' gradient norm removed, over the steps measured since the last log."""
        total = float(self.total_sq)
        share = (float(self.removed_sq) / total) ** 0.5 if total else 0.0
        self.removed_sq = self.total_sq = 0.0
        values = {"removed_grad_norm": share, "rank": float(self.rank)}
        if "sink_text_share" in self.stats:
            values["sink_text_share"] = self.stats["sink_text_share"]
        return values

    def state_dict(self):
        return {"basis": self.basis, "strength": self.strength} | self._sink_state()

    def _sink_state(self) -> dict[str, torch.Tensor]:
        """The sink as applied, for readers of a checkpoint (a resumed hook computes it again from its bases)."""
        return {"sink": self.sink} if self.sink is not None else {}

    def load_state_dict(self, state):
        if "basis" in state:
            self.basis = state["basis"].float()


class LayerwiseProjection(GradientProjection):
    """Every trainable layer projected off its own concept subspace of activations, computed on the model
    when training starts (see concept_activations.py) and kept in checkpoints, since the model moves."""

    def __init__(self, config: GradientProjectionConfig, compute_bases, stats: dict[str, float] | None = None,
                 moment: torch.Tensor | None = None):
        super().__init__(None, config, stats, moment)
        self.compute_bases = compute_bases  # trainer -> ({layer name: basis}, stats)
        self.bases: dict[str, torch.Tensor] = {}

    def subspaces(self, trainer):
        from memsafe.defenses.gradient_projection.activation_basis import projectable_layers

        if not self.bases:
            self.bases, stats = self.compute_bases(trainer)
            self.stats |= stats
        layers = projectable_layers(trainer.unwrapped)
        return [({f"{name}.weight": layers[name].weight}, basis) for name, basis in self.bases.items()]

    def state_dict(self):
        # Checkpoint keys nest on dots; layer names have them.
        bases = {name.replace(".", "/"): basis for name, basis in self.bases.items()}
        return {"bases": bases, "strength": self.strength} | self._sink_state()

    def load_state_dict(self, state):
        self.bases = {name.replace("/", "."): basis.float() for name, basis in state.get("bases", {}).items()}


def hook_maker(config: RunConfig, train_set):
    """Builds the concept basis once; each call of the returned function makes a fresh hook (one per
    trainer, e.g. per IET proxy). In activation space the layers' bases are computed on the first
    trainer's model when it starts and shared by the later ones."""
    from memsafe.models.text import TextEncoder

    encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    gp = config.defense.gradient_projection
    basis, stats = concept_basis(encoder, gp, train_set.captions)  # also checks the concepts
    moment = text_moment(encoder, gp.concepts + gp.neutral + list(train_set.captions or [])) if gp.sink else None
    if gp.space == "text":
        return lambda: [GradientProjection(basis, gp, stats, moment)]
    computed = {}

    def compute_bases(trainer):
        from memsafe.defenses.gradient_projection.activation_basis import activation_subspaces

        if not computed:
            computed["bases"] = activation_subspaces(trainer.unwrapped, trainer.noise_scheduler, encoder,
                                                     trainer.pixels, train_set.captions, gp, seed=config.train.seed)
        return computed["bases"]

    return lambda: [LayerwiseProjection(gp, compute_bases, moment=moment)]
