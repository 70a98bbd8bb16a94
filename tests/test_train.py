import pytest
import torch

from memsafe.config import merge
from memsafe.data import load_dataset
from memsafe.errors import MemsafeError
from memsafe.train import Trainer, TrainHook, latest_checkpoint, load_checkpoint
from memsafe.train.loss import per_sample_diffusion_loss


def _state(trainer):
    return {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}


def _fixed_loss(trainer, images):
    torch.manual_seed(123)
    with torch.no_grad():
        batch = images.repeat(8, 1, 1, 1).to(trainer.device)
        losses, _ = per_sample_diffusion_loss(trainer.unwrapped.eval(), trainer.noise_scheduler, batch)
    return losses.mean().item()


def test_short_real_training_lowers_the_loss(tiny_config):
    config = merge(tiny_config, {"train.max_steps": 120})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    images = train_set.as_model_input()
    before = _fixed_loss(trainer, images)
    trainer.fit(progress=False)
    after = _fixed_loss(trainer, images)
    assert after < 0.7 * before


def test_resume_from_checkpoint_continues_exactly(tiny_config, tmp_path):
    config = merge(tiny_config, {"train.max_steps": 20, "train.ema": True, "train.checkpoint_every": 10})
    train_set, _ = load_dataset(config.data)
    straight = Trainer(config, train_set)
    straight.fit(checkpoint_dir=tmp_path / "ckpt", progress=False)

    resumed = Trainer(config, train_set)
    checkpoint = tmp_path / "ckpt" / "checkpoint-00000010"
    load_checkpoint(resumed, checkpoint)
    assert resumed.step == 10 and resumed.batch_position == 10
    resumed.fit(progress=False)
    assert resumed.step == 20
    for name, value in _state(straight).items():
        assert torch.equal(value, resumed.unwrapped.state_dict()[name]), name
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-00000020"


class SkipEverything(TrainHook):
    name = "skip"

    def __init__(self):
        self.calls = 0

    def on_losses(self, losses, batch, trainer):
        self.calls += 1
        return torch.zeros_like(losses)


class KeepFirstHalf(TrainHook):
    name = "half"

    def on_losses(self, losses, batch, trainer):
        weights = torch.zeros_like(losses)
        weights[: len(losses) // 2] = 1
        return weights

    def state_dict(self):
        return {"seen": torch.tensor([1.0, 2.0]), "note": "kept"}


def test_a_batch_skipped_by_every_hook_makes_no_update(tiny_config):
    train_set, _ = load_dataset(tiny_config.data)
    hook = SkipEverything()
    trainer = Trainer(tiny_config, train_set, hooks=[hook])
    before = _state(trainer)
    values = trainer.train_step()
    assert hook.calls == 1 and values["kept_fraction"] == 0.0
    for name, value in before.items():
        assert torch.equal(value, trainer.unwrapped.state_dict()[name]), name
    assert not trainer.optimizer.state  # Adam never stepped: no moments to move the weights later


class KeepAll(TrainHook):
    name = "all"

    def on_losses(self, losses, batch, trainer):
        return torch.ones_like(losses)


def _one_step(config, train_set, hooks):
    trainer = Trainer(config, train_set, hooks=hooks)
    torch.manual_seed(7)
    values = trainer.train_step()
    return trainer, values


def test_hook_weights_change_the_update_and_hook_state_is_checkpointed(tiny_config, tmp_path):
    config = merge(tiny_config, {"train.warmup_steps": 0})
    train_set, _ = load_dataset(config.data)
    plain, _ = _one_step(config, train_set, [])
    ones, _ = _one_step(config, train_set, [KeepAll()])
    halved, values = _one_step(config, train_set, [KeepFirstHalf()])
    assert values["kept_fraction"] == 0.5
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.unwrapped.parameters(), b.unwrapped.parameters()))  # noqa: E731
    assert same(plain, ones)
    assert not same(plain, halved)
    from memsafe.train import save_checkpoint
    from memsafe.train.checkpoint import read_state

    path = save_checkpoint(halved, tmp_path / "ck")
    saved = read_state(path / "hooks")
    assert torch.equal(saved["half"]["seen"], torch.tensor([1.0, 2.0])) and saved["half"]["note"] == "kept"


class PoisonPixels(TrainHook):
    name = "poison"

    def on_batch_start(self, batch, trainer):
        batch["pixels"] = batch["pixels"] * float("nan")
        return batch


def test_nan_loss_stops_with_a_clear_error(tiny_config):
    train_set, _ = load_dataset(tiny_config.data)
    trainer = Trainer(tiny_config, train_set, hooks=[PoisonPixels()])
    with pytest.raises(MemsafeError, match="training loss became nan at step 0"):
        trainer.train_step()


def test_batches_stream_through_seeded_epochs_and_fill_small_subsets():
    from memsafe.train.sampler import EpochBatches

    items = torch.tensor([10, 11, 12, 13, 14])
    batches = EpochBatches(items, batch_size=3, seed=0)
    first_two_epochs = torch.cat([batches.batch(k) for k in range(10)])  # 30 positions = 6 epochs
    for epoch in range(6):
        assert sorted(first_two_epochs[5 * epoch : 5 * epoch + 5].tolist()) == items.tolist()
    assert torch.equal(EpochBatches(items, 3, seed=0).batch(7), batches.batch(7))
    big = EpochBatches(items, batch_size=12, seed=1).batch(0)  # larger than the subset: several epochs
    assert len(big) == 12 and set(big.tolist()) == set(items.tolist())
    halves = [EpochBatches(items, 4, seed=0, rank=r, world_size=2).batch(3) for r in (0, 1)]
    assert sorted(torch.cat(halves).tolist()) == sorted(batches.__class__(items, 4, seed=0).batch(3).tolist())
