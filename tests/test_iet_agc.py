import json
import math

import pytest
import torch
import yaml

from memsafe.cli import main
from memsafe.config import merge
from memsafe.data import load_dataset
from memsafe.defenses import build_trainer
from memsafe.defenses.iet_agc.agc import (
    LOSS_WEIGHT, AntiGradientControl, LossBank, SampleLedger, caption_gain, duplicated_caption_groups,
)
from memsafe.defenses.iet_agc.augment import augment_batch, augmentation_strength
from memsafe.defenses.iet_agc.config import IETConfig, agc_ratio
from memsafe.defenses.iet_agc.driver import IETTrainer, OuterStep
from memsafe.defenses.iet_agc.shards import redistribute, split_shards
from memsafe.errors import MemsafeError
from memsafe.train import Trainer
from memsafe.train.loss import per_sample_diffusion_loss
from tests.conftest import tiny_config_dict

IET = {"name": "iet_agc", "iet_agc": {"shards": 2, "local_steps": 5}}


def test_shard_split_is_a_balanced_partition():
    assignment = split_shards(103, 10, seed=0)
    assert assignment.shape == (103,)
    sizes = torch.bincount(assignment, minlength=10)
    assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1
    assert torch.equal(assignment, split_shards(103, 10, seed=0))
    assert not torch.equal(assignment, split_shards(103, 10, seed=1))
    with pytest.raises(MemsafeError, match="shards 11 is larger than the number of training images \\(10\\)"):
        split_shards(10, 11, seed=0)


def test_aggregating_identical_proxies_returns_them_and_leaves_integer_buffers(tiny_config):
    config = merge(tiny_config, {"defense.name": "iet_agc", "defense.iet_agc.shards": 3})
    trainer = IETTrainer(config, load_dataset(config.data)[0])
    before = {k: v.clone() for k, v in trainer.proxies[0].unwrapped.state_dict().items()}
    for k, proxy in enumerate(trainer.proxies):
        proxy.unwrapped.register_buffer("count", torch.tensor(3 + 4 * k))
    trainer.aggregate()  # the proxies start identical: their weighted mean is themselves
    for k, proxy in enumerate(trainer.proxies):
        state = proxy.unwrapped.state_dict()
        assert all(torch.equal(state[name], value) for name, value in before.items())
        assert state["count"].item() == 3 + 4 * k  # integer buffers are not averaged


def test_a_sole_proxy_skips_aggregation_because_its_mean_is_itself_bit_for_bit(tiny_config):
    config = merge(tiny_config, {"defense.name": "iet_agc", "defense.iet_agc.shards": 1, "train.max_steps": 30})
    train_set, _ = load_dataset(config.data)
    trainer = IETTrainer(config, train_set)
    assert trainer.sole_proxy
    trainer.proxies[0].train_step()  # weights no longer round numbers
    mean = trainer._weighted_sum(trainer.weights)  # what aggregation would load
    assert all(torch.equal(m.to(w.dtype), w) for m, w in zip(mean, trainer.weights(0)))
    assert not IETTrainer(merge(config, {"defense.iet_agc.shards": 3}), train_set).sole_proxy
    assert not IETTrainer(merge(config, {"defense.iet_agc.outer_momentum": 0.9}), train_set).sole_proxy


def test_real_proxies_aggregate_to_their_weighted_mean(tiny_config):
    config = merge(tiny_config, {"defense.name": "iet_agc", "defense.iet_agc.shards": 3, "defense.iet_agc.local_steps": 3,
                                 "train.max_steps": 45})
    train_set, _ = load_dataset(config.data)
    trainer = IETTrainer(config, train_set)
    for k, proxy in enumerate(trainer.proxies):
        proxy.use_subset(trainer.shard_members(k), seed=k)
        proxy.train_step()
        proxy.train_step()
    states = [{k: v.clone() for k, v in p.unwrapped.state_dict().items()} for p in trainer.proxies]
    sizes = [len(trainer.shard_members(k)) for k in range(3)]
    trainer.aggregate()
    name = "conv_in.weight"
    expected = sum(s[name] * n for s, n in zip(states, sizes)) / sum(sizes)
    for proxy in trainer.proxies:
        assert torch.allclose(proxy.unwrapped.state_dict()[name], expected, atol=1e-6)


def test_planted_low_loss_sample_is_skipped_then_reassigned():
    ledger = SampleLedger(6)
    bank = LossBank(num_timesteps=10, decay=0.8)
    bank.values.fill_(1.0)
    agc = AntiGradientControl(bank, ledger, ratio=2.0)
    index = torch.tensor([0, 1, 2])
    timesteps = torch.tensor([3, 3, 4])
    for _ in range(4):
        weights = agc.on_losses(torch.tensor([1.2, 0.01, 0.9]), {"index": index, "timesteps": timesteps}, None)
        assert weights.tolist() == [1.0, 0.0, 1.0]  # 0.01 < 1.0 / 2: skipped; 0.9 >= 0.5: kept
    # The bank follows every sample, skipped ones included, sequentially.
    assert 0.0 < bank.values[3].item() < 1.0 and bank.values[5].item() == 1.0
    ledger.end_round()
    assert ledger.skips.tolist() == [0, 4, 0, 0, 0, 0] and ledger.visits[:3].tolist() == [4, 4, 4]
    assignment = torch.tensor([0, 0, 0, 1, 1, 1])
    moved = redistribute(assignment, ledger.round_skip_rate(), threshold=0.5, shards=2)
    assert moved == 1 and assignment.tolist() == [0, 1, 0, 1, 1, 1]


def test_bank_starting_at_zero_skips_nothing_at_first():
    agc = AntiGradientControl(LossBank(10, 0.8), SampleLedger(2), ratio=2.0)
    weights = agc.on_losses(torch.tensor([1e-6, 1e-6]), {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([1, 2])}, None)
    assert weights.tolist() == [1.0, 1.0]


def test_redistribution_never_empties_a_shard():
    assignment = torch.tensor([0, 1, 2])
    assert redistribute(assignment, torch.ones(3, dtype=torch.float64), threshold=0.5, shards=3) == 0
    assert torch.bincount(assignment).tolist() == [1, 1, 1]


def test_augmentation_strength_is_monotone_in_loss():
    relative = torch.linspace(0.0, 2.0, 201)
    strength = augmentation_strength(relative, ratio=2.0)
    assert (strength[1:] <= strength[:-1]).all()  # a lower loss never gets weaker augmentation
    assert strength[relative <= 0.5].eq(1.0).all() and strength[relative >= 1.0].eq(0.0).all()
    assert augmentation_strength(torch.tensor([math.inf]), 2.0).item() == 0.0

    torch.manual_seed(0)
    images = torch.rand(64, 1, 16, 16) * 2 - 1
    config = IETConfig()
    assert torch.equal(augment_batch(images, torch.zeros(64), config), images)
    change = [(augment_batch(images, torch.full((64,), s), config) - images).abs().mean().item() for s in (0.25, 1.0)]
    assert 0 < change[0] < change[1]
    torch.manual_seed(1)
    first = augment_batch(images, torch.full((64,), 0.5), config)
    torch.manual_seed(1)
    assert torch.equal(first, augment_batch(images, torch.full((64,), 0.5), config))  # reproducible


@pytest.mark.parametrize("outer", [{}, {"defense.iet_agc.outer_learning_rate": 0.7, "defense.iet_agc.outer_momentum": 0.9}],
                         ids=["mean", "outer-nesterov"])
def test_iet_run_spends_the_same_sample_budget_and_resumes_exactly(tiny_config, tmp_path, outer):
    config = merge(tiny_config, {"defense.name": "iet_agc", "defense.iet_agc.shards": 2,
                                 "defense.iet_agc.local_steps": 5, "train.max_steps": 50,
                                 "train.checkpoint_every": 10, "train.ema": True, "train.checkpoints_total_limit": 5}
                   | outer)
    train_set, _ = load_dataset(config.data)
    straight = build_trainer(config, train_set)
    assert isinstance(straight, IETTrainer)
    stats = straight.fit(checkpoint_dir=tmp_path / "a", progress=False)
    assert straight.samples_seen == 50 * 16 and straight.step == 50 and stats["rounds"] == 5
    assert straight.ledger.visits.sum() == 50 * 16
    # each proxy's EMA steps once per 2 global steps, so it decays twice as much per step (same horizon)
    assert straight.ema.decay == pytest.approx(config.train.ema_decay ** 2)

    resumed = build_trainer(config, train_set)
    checkpoints = sorted((tmp_path / "a").iterdir())
    first = [c for c in checkpoints if c.name.endswith("00000010")]
    assert first, [c.name for c in checkpoints]
    resumed.load_checkpoint(first[0])
    assert resumed.round == 1
    resumed.fit(progress=False)
    assert resumed.step == straight.step and torch.equal(resumed.assignment, straight.assignment)
    for a, b in zip(straight.global_trainer.unwrapped.parameters(), resumed.global_trainer.unwrapped.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight.ledger.skips, resumed.ledger.skips)
    assert resumed.ema.decay == straight.ema.decay


def test_iet_cli_run_trains_evaluates_and_logs_skip_rates(tmp_path):
    values = tiny_config_dict(tmp_path / "run", defense=IET, train={"max_steps": 50})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {row["shard"] for row in rows} == {0, 1} and all("skip_rate" in row for row in rows)
    assert main(["evaluate", str(tmp_path / "run"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["defense"] == "iet_agc"


@pytest.mark.parametrize(
    "defense, message",
    [
        ({"name": "iet_agc", "iet_agc": {"shards": 500}}, "shards 500 is larger than the number of training images"),
        ({"name": "iet_agc", "iet_agc": {"agc_ratio": 0.5}}, "agc_ratio 0.5 < 1 would skip"),
        ({"name": "iet_agc+nonsense"}, "unknown defense 'nonsense'"),
        # The schedule that returned noise and said "complete": 1000 steps, 10 shards of 100 local steps.
        ({"name": "iet_agc", "iet_agc": {"shards": 10, "local_steps": 100}, "max_steps": 1000},
         "gives 1 round(s), and IET-AGC+ needs at least 5 to learn: raise train.max_steps to 5000"),
        ({"name": "iet_agc", "iet_agc": {"rounds": 5, "local_steps": 5}}, "set rounds or local_steps, not both"),
        ({"name": "iet_agc", "iet_agc": {"agc_signal": "gain"}}, "agc_signal must be loss, caption_gain or caption_gain_loss, got 'gain'"),
        ({"name": "iet_agc", "iet_agc": {"agc_signal": "caption_gain"}}, "caption_gain needs a text-conditional model"),
        ({"name": "iet_agc", "iet_agc": {"agc_timesteps": [500, 200]}}, "agc_timesteps must be [low, high)"),
        ({"name": "iet_agc", "iet_agc": {"agc_timesteps": [1000, 2000]}},
         "lies past the scheduler's 1000 training timesteps: AGC would read no draw"),
        ({"name": "iet_agc", "iet_agc": {"shards": 2}, "max_steps": 10}, "all within train.warmup_steps 5"),
        ({"name": "iet_agc", "iet_agc": {"profile": "strict"}}, "profile must be auto or one of loss, caption, reference"),
        ({"name": "iet_agc", "iet_agc": {"bank_bins": 0}}, "bank_bins must be between 1 and the scheduler's"),
        ({"name": "iet_agc", "iet_agc": {"bank_decay": 1.0}}, "bank_decay must be in [0, 1), got 1.0"),
        ({"name": "iet_agc", "iet_agc": {"agc_ratio": 1.25, "agc_release": 0.7}},
         "agc_release 0.7 is below the skipping threshold 1 / agc_ratio (0.8)"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch": 0}}, "agc_latch must be a whole number of readings >= 1"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch": 3, "agc_latch_by": "image"}},
         "agc_latch_by must be sample or caption, got 'image'"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch": 3, "agc_latch_by": "caption"}},
         "agc_latch_by caption shares a latch's streak among the samples of one caption: it needs agc_latch set and captions"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch": 3, "agc_latch_leaves": "epoch"}},
         "agc_latch_leaves must be batch or shard, got 'epoch'"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch_leaves": "shard"}},
         "agc_latch_leaves shard moves latched samples out of their shard, and agc_latch is not set"),
        ({"name": "iet_agc", "iet_agc": {"agc_per_draw": False}},
         "agc_per_draw false leaves the latch as AGC's only way to skip a sample, and agc_latch is not set"),
        ({"name": "iet_agc", "iet_agc": {"agc_bank_share": 0.0}}, "agc_bank_share must be in (0, 1], got 0.0"),
        ({"name": "iet_agc", "iet_agc": {"agc_latch": 3, "agc_per_draw": False, "agc_bank_share": 0.25}},
         "agc_bank_share 0.25 leaves unread the draws that can latch nothing, which only agc_latch_by: caption"),
    ],
)
def test_bad_iet_settings_are_one_line_errors(tmp_path, capsys, defense, message):
    path = tmp_path / "cfg.yaml"
    steps = defense.pop("max_steps", 5000)
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", defense=defense, train={"max_steps": steps})))
    assert main(["train", "--config", str(path), "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_lora_proxies_are_adapters_over_one_base_that_aggregate(tiny_config):
    pytest.importorskip("peft")
    config = merge(tiny_config, {"defense.name": "iet_agc", "defense.iet_agc.shards": 2,
                                 "defense.iet_agc.local_steps": 3, "model.lora_rank": 2, "train.max_steps": 30,
                                 "model.lora_targets": ["to_k", "to_v"]})
    train_set, _ = load_dataset(config.data)
    trainer = IETTrainer(config, train_set)
    model = trainer.global_trainer.unwrapped
    assert all(proxy.unwrapped is model for proxy in trainer.proxies)  # K adapters, one UNet
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for k, proxy in enumerate(trainer.proxies):
        trainer.activate(k)
        proxy.use_subset(trainer.shard_members(k), seed=k)
        for _ in range(3):
            proxy.train_step()
    adapters = [[t.clone() for t in trainer.weights(k)] for k in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*adapters))
    trainer.activate(0)  # the model now holds proxy 0's adapter, proxy 1's waits
    live = dict(model.named_parameters())
    assert all(torch.equal(live[n], a) for n, a in zip(names, adapters[0]))
    trainer.aggregate()
    sizes = [len(trainer.shard_members(k)) for k in range(2)]
    for name, a, b in zip(names, *adapters):
        expected = (a * sizes[0] + b * sizes[1]) / sum(sizes)
        assert torch.allclose(live[name], expected, atol=1e-7)
        assert torch.allclose(trainer.weights(1)[names.index(name)], expected, atol=1e-7)
    for key, value in model.state_dict().items():  # the frozen base model is untouched
        if key in base:
            assert torch.equal(value, base[key]), key


def test_agc_ratio_defaults_follow_the_reference_code(tiny_config, tmp_path):
    assert agc_ratio(tiny_config) == 2.0
    assert agc_ratio(merge(tiny_config, {"model.pretrained": str(tmp_path)})) == 1.25
    assert agc_ratio(merge(tiny_config, {"defense.iet_agc.agc_ratio": 1.5})) == 1.5


def test_a_shard_smaller_than_a_batch_trains_and_says_so(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", defense={"name": "iet_agc", "iet_agc": {"shards": 4}},
                                                    train={"max_steps": 40})))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "memsafe: warning: defense.iet_agc: 48 training images over 4 shards leave 12 per shard, fewer than" in err and "train.batch_size 12 or less, or more images" in err
    assert json.loads((tmp_path / "run" / "status.json").read_text())["rounds"] == 10


def test_smoothed_agc_skips_a_persistently_low_sample_not_one_low_draw():
    """With agc_smoothing the rule reads a sample's relative loss averaged over its visits: one low draw of an
    ordinary sample is kept, a sample low at every visit is still skipped (after its average falls)."""
    bank = LossBank(num_timesteps=10, decay=0.0)
    agc = AntiGradientControl(bank, SampleLedger(2, smoothing=0.8), ratio=2.0)
    batch = {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([3, 3])}
    kept = []
    for draw in ([1.0, 0.3], [1.0, 0.3], [0.2, 0.3], [1.0, 0.3], [1.0, 0.3], [1.0, 0.3], [1.0, 0.3]):
        bank.values.fill_(1.0)  # a fixed running mean: the relative losses are the draws
        kept.append(agc.on_losses(torch.tensor(draw), batch, None).tolist())
    assert all(k[0] == 1.0 for k in kept)  # sample 0: 1, 1, 0.2 (0.84 smoothed), 1, ...: never skipped
    assert kept[0][1] == 0.0 and all(k[1] == 0.0 for k in kept)  # sample 1: 0.3 from its first visit on
    reference = AntiGradientControl(bank, SampleLedger(2), ratio=2.0)
    bank.values.fill_(1.0)
    assert reference.on_losses(torch.tensor([0.2, 1.0]), batch, None).tolist() == [0.0, 1.0]  # one draw decides


def test_agc_with_release_holds_a_skipped_sample_until_it_is_back_at_the_bank():
    """Hysteresis: a sample skipped at 0.7 (threshold 1 / 1.25 = 0.8) stays skipped at 0.9 and is trained again
    only once a reading reaches the bank (1.0); without `release` a reading of 0.9 alone decides."""
    readings = [0.7, 0.9, 0.85, 1.0, 0.9, 0.7]
    kept = {}
    for release in (None, 1.0):
        bank = LossBank(num_timesteps=10, decay=0.0)
        ledger = SampleLedger(2)
        agc = AntiGradientControl(bank, ledger, ratio=1.25, release=release)
        batch = {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([3, 3])}
        kept[release] = []
        for reading in readings:
            bank.values.fill_(1.0)  # a fixed running mean: the relative losses are the draws
            weights = agc.on_losses(torch.tensor([reading, 1.1]), batch, None)
            kept[release].append(weights[0].item())
            assert weights[1].item() == 1.0  # an ordinary sample is never held
        assert ledger.flagged.tolist() == [True, False]  # the last reading, 0.7, skipped sample 0 either way
    assert kept[None] == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert kept[1.0] == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_a_held_sample_leaves_the_batch_before_the_forward_pass_until_a_reading_releases_it():
    """A draw AGC does not read is judged on its sample's last reading and, under hysteresis, its flag."""
    bank = LossBank(num_timesteps=10, decay=0.0)
    ledger = SampleLedger(2)
    agc = AntiGradientControl(bank, ledger, ratio=1.25, timesteps=(0, 5), release=1.0)
    read = {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([3, 3])}
    unread = {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([7, 7]), "pixels": torch.zeros(2, 1, 2, 2)}
    for reading, passing in ((0.7, [1]), (0.9, [1]), (1.05, [0, 1])):  # 0.9: over bank / 1.25, under the release
        bank.values.fill_(1.0)
        agc.on_losses(torch.tensor([reading, 1.1]), read, None)
        assert agc.on_batch_start(unread, None)["index"].tolist() == passing


def test_a_latched_sample_is_held_for_the_rest_of_the_run_unread():
    """Latch 2: two readings in a row under bank / 1.25 hold a sample for good; its draws, read or not, leave the
    batch before the forward pass. A reading back over the threshold breaks a streak before it latches."""
    bank = LossBank(num_timesteps=10, decay=0.0)
    ledger = SampleLedger(3)
    agc = AntiGradientControl(bank, ledger, ratio=1.25, latch=2)
    batch = {"index": torch.tensor([0, 1, 2]), "timesteps": torch.tensor([3, 3, 3]),
             "pixels": torch.zeros(3, 1, 2, 2)}
    passing = []
    for readings in ([0.7, 0.7, 1.1], [0.9, 0.7, 1.1], [0.7, 1.1, 1.1], [0.7, 1.1, 1.1]):
        kept_batch = agc.on_batch_start(dict(batch), None)
        passing.append(kept_batch["index"].tolist())
        bank.values.fill_(1.0)  # a fixed running mean: the relative losses are the draws
        values = torch.tensor(readings)[kept_batch["index"]]
        agc.on_losses(values, kept_batch, None)
    # sample 0: under, over (streak broken), under, under: latched after the fourth reading;
    # sample 1: under, under: latched after the second, never read again; sample 2: never under
    assert passing == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 2]]
    assert agc.on_batch_start(dict(batch), None)["index"].tolist() == [2]
    assert ledger.streak.tolist() == [2, 2, 0]
    assert ledger.relative_loss[1].item() == pytest.approx(0.7)  # its last reading, not a later draw


def test_a_latch_by_caption_shares_one_streak_among_a_captions_copies_and_spares_single_captions():
    """agc_latch_by caption: the copies of one caption count their readings into one streak, in draw order (two in
    one batch count twice), and latch together; a caption only one sample carries (or none) never latches."""
    captions = ["a cat", "a dog", "a cat", "a flag of chad", "", "", "a cat"]
    keys = duplicated_caption_groups(captions)
    assert keys.tolist() == [0, -1, 0, -1, -1, -1, 0]
    bank = LossBank(num_timesteps=10, decay=0.0)
    ledger = SampleLedger(len(captions))
    agc = AntiGradientControl(bank, ledger, ratio=1.25, latch=3, latch_groups=keys)
    batch = {"index": torch.tensor([0, 2, 3, 1]), "timesteps": torch.tensor([3, 3, 3, 3]),
             "pixels": torch.zeros(4, 1, 2, 2)}

    def read(values: list[float]) -> None:
        bank.values.fill_(1.0)  # a fixed running mean: the relative losses are the draws
        agc.on_losses(torch.tensor(values), batch, None)

    read([0.5, 0.5, 0.5, 1.1])  # the cats' key: two readings under
    assert ledger.streak[0].item() == 2 and not agc.latched(torch.tensor([0, 2, 6])).any()
    assert ledger.streak[3].item() == 0  # the flag reads under too, but counts nowhere
    read([0.5, 1.1, 0.5, 1.1])  # under, over: the over ends the streak
    assert ledger.streak[0].item() == 0
    read([1.1, 0.5, 0.5, 0.5])
    read([0.5, 0.5, 0.5, 0.5])  # three in a row under: every copy latched
    assert agc.latched(torch.arange(len(captions))).tolist() == [True, False, True, False, False, False, True]
    kept = agc.on_batch_start({"index": torch.tensor([6, 3, 0, 1]), "timesteps": torch.tensor([3, 3, 3, 3]),
                               "pixels": torch.zeros(4, 1, 2, 2)}, None)
    assert kept["index"].tolist() == [3, 1]  # the flag, read under on every visit, still trains


def test_without_per_draw_skips_only_a_latched_sample_leaves():
    """agc_per_draw false: a reading under bank / 1.25 skips nothing on its own, it only counts toward the latch;
    the same readings with the per-draw rule skip the first low draw already."""
    batch = {"index": torch.tensor([0, 1]), "timesteps": torch.tensor([3, 3]), "pixels": torch.zeros(2, 1, 2, 2)}
    weights = {}
    for per_draw in (True, False):
        bank = LossBank(num_timesteps=10, decay=0.0)
        ledger = SampleLedger(2)
        agc = AntiGradientControl(bank, ledger, ratio=1.25, latch=3, per_draw=per_draw)
        weights[per_draw] = []
        for reading in (0.7, 0.9, 0.7, 0.7, 0.7):  # 0.9 breaks the streak: latched after the fifth reading
            bank.values.fill_(1.0)  # a fixed running mean: the relative losses are the draws
            weights[per_draw].append(agc.on_losses(torch.tensor([reading, 0.6]), batch, None).tolist())
        passing = agc.on_batch_start(dict(batch), None)["index"].tolist()
        assert passing == [0] and ledger.streak.tolist() == [3, 5]  # both latched; one draw stays for the backward
    assert weights[True] == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert weights[False] == [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]  # latched: read, not trained


def test_a_bank_share_reads_the_draws_that_cannot_latch_at_that_rate_and_feeds_the_bank_fairly():
    """agc_bank_share 0.25 (latch by caption, no per-draw skips): the copies of a shared caption are read on every
    draw for their streak; a caption of its own, which can latch nothing, is read on about a quarter of its draws;
    only a quarter of each kind enters the bank. Once the copies latch, their draws leave unread."""
    captions = ["a cat"] * 4 + [f"emoji {i}" for i in range(4)]
    index = torch.arange(8).repeat(250)  # 2,000 draws, half of them copies
    batch = {"index": index, "timesteps": torch.full_like(index, 3), "pixels": torch.zeros(len(index), 1, 2, 2)}
    bank = LossBank(num_timesteps=10, decay=0.0)
    agc = AntiGradientControl(bank, SampleLedger(8), ratio=1.25, latch=10**6, per_draw=False, bank_share=0.25,
                              latch_groups=duplicated_caption_groups(captions))
    read = agc.on_batch_start(dict(batch), None)
    copies = index < 4
    assert read["agc_read"][copies].all()
    assert 0.2 < read["agc_read"][~copies].double().mean() < 0.3
    assert not (read["agc_bank"] & ~read["agc_read"]).any()
    for kind in (copies, ~copies):
        assert 0.2 < read["agc_bank"][kind].double().mean() < 0.3
    # the bank (decay 0: its last banked reading) takes a unique draw's 1.0 or a copy's 0.5, never an unbanked one
    readings = torch.where(copies, 0.5, 1.0)
    bank.values.fill_(1.0)  # a running mean to read against: each copy's reading is under 1 / 1.25
    agc.on_losses(readings, read, None)
    last_banked = readings[read["agc_bank"]][-1].item()
    assert bank.values[3].item() == last_banked
    assert agc.ledger.streak[0].item() == int(read["agc_read"][copies].sum())  # every copy's reading counted
    agc.latch = 3
    left = agc.on_batch_start(dict(batch), None)
    assert left["index"].unique().tolist() == [4, 5, 6, 7]
    # the one caption that could latch has: a reading could change nothing but the bank, so none is taken
    assert not left["agc_read"].any() and not left["agc_bank"].any()
    banked = bank.values.clone()
    agc.on_losses(torch.full((len(left["index"]),), 0.5), left, None)
    assert torch.equal(bank.values, banked)
    agc.ledger_read = True  # something else (the loss-driven augmentation) reads the ledger: reading goes on
    assert agc.on_batch_start(dict(batch), None)["agc_read"].any()


def test_outer_step_is_nesterov_sgd_on_the_rounds_pseudo_gradient():
    """DiLoCo's outer optimizer: torch's own Nesterov SGD, stepped on (round start - proxies' mean)."""
    torch.manual_seed(0)
    start = [torch.randn(3, 4), torch.randn(5)]
    outer = OuterStep(start, learning_rate=0.7, momentum=0.9)
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        mean = [p.detach() + 0.1 * torch.randn_like(p) for p in reference]  # where the proxies went this round
        for p, m in zip(reference, mean):
            p.grad = p.detach() - m
        sgd.step()
        stepped = outer.step(mean)
        for mine, theirs in zip(stepped, reference):
            torch.testing.assert_close(mine, theirs.detach())
    plain = OuterStep(start, learning_rate=1.0, momentum=0.0)
    mean = [t + 1.0 for t in start]
    assert all(torch.equal(a, b) for a, b in zip(plain.step(mean), mean))  # lr 1, no momentum: the plain mean


def test_a_bank_that_starts_at_its_first_reading_reads_one_at_once():
    """The caption gain sits near 1; a bank starting at 0 would read it as 5x its mean after one visit."""
    bank = LossBank(10, decay=0.8, start_at_first=True)
    bank.update(torch.tensor([0.9, math.nan]), torch.tensor([3, 4]))
    assert bank.values[3].item() == pytest.approx(0.9) and bank.values[4].item() == 0.0  # NaN: not measured
    bank.update(torch.tensor([0.4]), torch.tensor([3]))
    assert bank.values[3].item() == pytest.approx(0.8 * 0.9 + 0.2 * 0.4)
    geometric = LossBank(10, decay=0.8, start_at_first=True, geometric=True)
    geometric.update(torch.tensor([0.9, 0.4]), torch.tensor([3, 3]))
    assert geometric.values[3].item() == pytest.approx(math.exp(0.8 * math.log(0.9) + 0.2 * math.log(0.4)))
    binned = LossBank(1000, decay=0.0, bins=100)
    binned.update(torch.tensor([0.5]), torch.tensor([203]))
    assert binned.values[20].item() == 0.5 and binned.relative(torch.tensor([1.0]), torch.tensor([209])).item() == 2.0


def test_caption_gain_is_the_loss_over_the_empty_caption_loss_and_skips_on_it(tiny_config):
    """On a text-conditional model AGC's signal is each draw's loss over the same draw's loss with the empty
    caption; a draw whose caption was dropped says nothing (NaN): a sample never measured before is kept."""
    config = merge(tiny_config, {"model.conditioning": "text", "train.caption_dropout": 0.5, "train.max_steps": 40})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    trainer.fit(progress=False)
    batch = trainer.next_batch()
    states = batch["model_kwargs"]["encoder_hidden_states"]
    dropped = batch["caption_dropped"]
    assert dropped.any() and not dropped.all()
    assert (states == trainer.conditioner.empty.to(states)).flatten(1).all(1).tolist() == dropped.tolist()
    with torch.no_grad():
        losses, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, batch["pixels"], batch["noise"],
                                              batch["timesteps"], encoder_hidden_states=states)
        empty, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, batch["pixels"], batch["noise"],
                                             batch["timesteps"], encoder_hidden_states=trainer.conditioner.empty.expand_as(states))
    gain = caption_gain(losses, batch, trainer, ~dropped.cpu())
    assert torch.allclose(gain[~dropped], (losses / empty)[~dropped]) and gain[dropped].isnan().all()
    bank = LossBank(trainer.noise_scheduler.config.num_train_timesteps, 0.8, start_at_first=True)
    bank.values[batch["timesteps"].cpu()] = (losses / empty).cpu().double().max() * 2  # every drawn gain is low
    agc = AntiGradientControl(bank, SampleLedger(len(train_set)), ratio=1.05, signal="caption_gain")
    kept = agc.on_losses(losses, batch, trainer)
    assert kept.cpu().bool().tolist() == dropped.cpu().tolist()


def test_caption_gain_loss_scores_the_gain_times_the_loss_to_its_weight_each_over_its_own_bank(tiny_config):
    """caption_gain_loss: (gain / gain bank[t]) x (loss / loss bank[t]) ** LOSS_WEIGHT, both banks fed after."""
    config = merge(tiny_config, {"model.conditioning": "text", "train.caption_dropout": 0.5, "train.max_steps": 10})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    trainer.fit(progress=False)
    batch = trainer.next_batch()
    read = ~batch["caption_dropped"].cpu()
    with torch.no_grad():
        losses, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, batch["pixels"], batch["noise"],
                                              batch["timesteps"], **batch["model_kwargs"])
    gain = caption_gain(losses, batch, trainer, read).cpu()
    timesteps = batch["timesteps"].cpu()
    bank = LossBank(trainer.noise_scheduler.config.num_train_timesteps, 0.8, start_at_first=True)
    agc = AntiGradientControl(bank, SampleLedger(len(train_set)), ratio=1.05, signal="caption_gain_loss")
    bank.values[timesteps] = 0.9
    loss_bins = agc.loss_bank.bin(timesteps)
    agc.loss_bank.values[loss_bins] = 2.0 * losses.cpu().double().mean()
    expected = (gain / 0.9) * (losses.cpu() / agc.loss_bank.values[loss_bins]) ** LOSS_WEIGHT
    kept = agc.on_losses(losses, batch, trainer).cpu().bool()
    relative = agc.ledger.relative_loss[batch["index"].cpu()]
    torch.testing.assert_close(relative[read], expected[read].float())
    assert kept[~read].all() and kept[read].tolist() == (expected[read] * 1.05 >= 1.0).tolist()
    assert (agc.loss_bank.values[loss_bins[read]] != 2.0 * losses.cpu().double().mean()).all()  # fed after
    assert "loss_bank" in agc.state_dict()


def test_agc_reads_its_timesteps_only_and_drops_draws_its_record_skips_before_the_forward_pass(tiny_config):
    """Outside agc_timesteps a draw is judged on its sample's last reading: when that skips it, it leaves the
    batch before the forward pass (counted as drawn and skipped); inside, it is read and judged afresh."""
    config = merge(tiny_config, {"model.conditioning": "text", "train.caption_dropout": 0.0})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    batch = trainer.next_batch()
    timesteps, index = batch["timesteps"], batch["index"]
    middle = int(timesteps.median())
    inside = (timesteps >= middle).tolist()
    ledger = SampleLedger(len(train_set), smoothing=0.0)
    ledger.smoothed[index[0::2]] = 0.5  # half the batch's samples read low last time
    ledger.relative_loss[index[0::2]] = 0.5
    low = torch.zeros(len(index), dtype=torch.bool)
    low[0::2] = True
    bank = LossBank(trainer.noise_scheduler.config.num_train_timesteps, 0.8, start_at_first=True)
    bank.values.fill_(1.0)
    agc = AntiGradientControl(bank, ledger, ratio=1.05, signal="caption_gain", timesteps=(middle, 10_000))
    kept_batch = agc.on_batch_start(dict(batch), trainer)
    dropped = [lo and not ins for lo, ins in zip(low.tolist(), inside)]
    assert kept_batch["index"].tolist() == [i for i, d in zip(index.tolist(), dropped) if not d]
    assert kept_batch["pixels"].shape[0] == kept_batch["model_kwargs"]["encoder_hidden_states"].shape[0] == len(
        kept_batch["index"]) and kept_batch["drawn"] == len(index)
    assert ledger.round_skips.sum() == sum(dropped) == agc.seen
    with torch.no_grad():
        losses, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, kept_batch["pixels"],
                                              kept_batch["noise"], kept_batch["timesteps"],
                                              **kept_batch["model_kwargs"])
    weights = agc.on_losses(losses, kept_batch, trainer)
    read = kept_batch["timesteps"] >= middle
    changed = set(bank.values.ne(1.0).nonzero().flatten().tolist())
    assert changed and changed <= set(kept_batch["timesteps"][read].tolist())  # only read draws feed the bank
    unread = ~read  # kept on a reading that did not skip them: still kept, their last reading untouched
    assert weights[unread].eq(1).all() and ledger.relative_loss[kept_batch["index"][unread]].isinf().all()
    assert ledger.relative_loss[kept_batch["index"][read]].isfinite().all()


def test_agc_reads_its_share_of_the_draws_and_judges_the_rest_on_their_last_reading(tiny_config):
    """With agc_read_share 0.5 about half the readable draws are read (only they feed the bank and the ledger);
    of the rest, those whose sample read low last time leave the batch before the forward pass. The choice
    follows a generator that checkpoints carry: the same state chooses the same draws."""
    config = merge(tiny_config, {"train.batch_size": 64})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    batch = trainer.next_batch()
    index = batch["index"]
    ledger = SampleLedger(len(train_set), smoothing=0.0)
    ledger.smoothed[index[0::2]] = 0.5  # half the batch's samples read low last time
    bank = LossBank(trainer.noise_scheduler.config.num_train_timesteps, 0.8)
    bank.values.fill_(1.0)
    agc = AntiGradientControl(bank, ledger, ratio=1.05, read_share=0.5, seed=3)
    saved = agc.state_dict()
    kept_batch = agc.on_batch_start(dict(batch), trainer)
    read = kept_batch["agc_read"]
    assert kept_batch["drawn"] == len(index)
    low = ledger.smoothed[index] < 1.0  # by sample: a small set repeats samples within a batch
    assert len(kept_batch["index"]) == len(index) - int(ledger.round_skips.sum()) > len(index) // 2
    assert set(kept_batch["index"].tolist()) >= set(index[~low].tolist())  # never read low: all kept
    with torch.no_grad():
        losses, _ = per_sample_diffusion_loss(trainer.unet, trainer.noise_scheduler, kept_batch["pixels"],
                                              kept_batch["noise"], kept_batch["timesteps"])
    agc.on_losses(losses, kept_batch, trainer)
    read_samples = set(kept_batch["index"][read].tolist())
    unread_samples = sorted(set(kept_batch["index"][~read].tolist()) - read_samples)
    assert ledger.relative_loss[sorted(read_samples)].isfinite().all()
    assert unread_samples and ledger.relative_loss[unread_samples].isinf().all()  # no reading stored
    again = AntiGradientControl(LossBank(len(bank.values), 0.8), SampleLedger(len(train_set)), ratio=1.05,
                                skip=False, read_share=0.5)
    again.load_state_dict(saved)
    chosen = again.on_batch_start(dict(batch), trainer)["agc_read"]
    assert 0.3 < chosen.float().mean() < 0.7
    dropped = ~chosen & low
    assert kept_batch["index"].tolist() == index[~dropped].tolist()
    assert read.tolist() == chosen[~dropped].tolist()


@pytest.mark.parametrize("rule", [{"agc_signal": "caption_gain"},
                                  {"agc_signal": "caption_gain_loss", "agc_release": 1.0, "bank_bins": 20},
                                  {"agc_signal": "caption_gain", "agc_release": 1.0, "agc_latch": 2},
                                  {"agc_signal": "caption_gain", "agc_latch": 2, "agc_latch_by": "caption"},
                                  {"agc_signal": "caption_gain", "agc_latch": 1, "agc_per_draw": False},
                                  {"agc_signal": "caption_gain", "agc_latch": 2, "agc_latch_by": "caption",
                                   "agc_per_draw": False, "agc_bank_share": 0.5, "bank_bins": 20}])
def test_a_run_that_reads_agc_at_some_timesteps_trains_and_counts_every_draw(tmp_path, rule):
    """Through the CLI: AGC's skip rate counts every draw, those dropped before the forward pass included."""
    values = tiny_config_dict(tmp_path / "run", model={"conditioning": "text"},
                              train={"max_steps": 60, "caption_dropout": 0.1, "log_every": 10})
    values["defense"] = {"name": "iet_agc", "iet_agc": {"shards": 1, "local_steps": 10, "agc_ratio": 1.0,
                                                        "agc_smoothing": 0.0, "augment": False,
                                                        "agc_timesteps": [300, 700]} | rule}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skip_rates = [entry["skip_rate"] for entry in logged if "skip_rate" in entry]
    assert len(skip_rates) == 6 and max(skip_rates) > 0
    assert all(abs(rate * 160 - round(rate * 160)) < 1e-9 for rate in skip_rates)  # of all 10 x 16 draws a round


def test_latched_samples_leave_their_shard_at_the_next_round_when_told(tmp_path):
    """agc_latch_leaves shard: each round's proxy draws from its shard less the samples latched so far, so the
    logged shard size falls while the draws a round stay 10 batches of 16; by batch it stays the whole shard."""
    sizes = {}
    for leaves in ("batch", "shard"):
        values = tiny_config_dict(tmp_path / leaves, model={"conditioning": "text"},
                                  train={"max_steps": 60, "log_every": 10})
        values["defense"] = {"name": "iet_agc", "iet_agc": {
            "shards": 1, "local_steps": 10, "agc_ratio": 1.0, "agc_smoothing": 0.0, "augment": False,
            "agc_signal": "caption_gain", "agc_timesteps": [0, 1000], "agc_latch": 1, "agc_per_draw": False,
            "agc_latch_leaves": leaves}}
        config_path = tmp_path / f"{leaves}.yaml"
        config_path.write_text(yaml.safe_dump(values))
        assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
        logged = [json.loads(line) for line in (tmp_path / leaves / "log.jsonl").read_text().splitlines()]
        sizes[leaves] = [entry["shard_size"] for entry in logged if "shard_size" in entry]
        assert len(sizes[leaves]) == 6
    assert sizes["batch"] == [48] * 6
    assert sizes["shard"][0] == 48 and 1 <= sizes["shard"][-1] < 48
    assert sizes["shard"] == sorted(sizes["shard"], reverse=True)  # a latch is for good


def test_the_loops_kept_fraction_counts_the_draws_a_hook_dropped_before_the_forward_pass(tiny_config):
    """No timestep read, even samples' last reading low: those leave the batch, and the loop's kept fraction
    is the odd draws over every draw, not over the draws left."""
    train_set, _ = load_dataset(tiny_config.data)
    ledger = SampleLedger(len(train_set), smoothing=0.0)
    ledger.smoothed[0::2] = 0.5
    bank = LossBank(1000, 0.8)
    trainer = Trainer(tiny_config, train_set, hooks=[AntiGradientControl(bank, ledger, ratio=1.05, timesteps=(5000, 6000))])
    odd = sum(i % 2 for i in trainer.batches.batch(trainer.batch_position).tolist())
    assert 0 < odd < tiny_config.train.batch_size
    assert trainer.train_step()["kept_fraction"] == pytest.approx(odd / tiny_config.train.batch_size)


def test_the_profile_fills_what_the_config_leaves_unset_by_the_kind_of_model(tiny_config):
    from memsafe.defenses.iet_agc.config import PROFILES

    def settings(config):
        iet = config.defense.iet_agc
        return iet.profile, {key: getattr(iet, key) for key in ("shards", "agc_signal", "agc_ratio", "agc_smoothing",
                                                                 "agc_timesteps")}

    unconditional = merge(tiny_config, {"defense.name": "iet_agc"})
    assert settings(unconditional) == ("loss", {"shards": 4, "agc_signal": "loss", "agc_ratio": None,
                                                "agc_smoothing": 0.8, "agc_timesteps": None})
    assert agc_ratio(unconditional) == 2.0  # the loss rule's ratio still follows the reference code
    text = merge(tiny_config, {"defense.name": "iet_agc", "model.conditioning": "text"})
    assert settings(text) == ("caption", PROFILES["caption"])
    # A key the config sets wins over the profile, and a profile named again fills every key it left.
    assert merge(text, {"defense.iet_agc.shards": 2}).defense.iet_agc.shards == 2
    assert settings(merge(text, {"defense.iet_agc.profile": "reference"})) == (
        "reference", {"shards": 4, "agc_signal": "loss", "agc_ratio": None, "agc_smoothing": 0.0, "agc_timesteps": None})
    # The resolved settings are what a run records: loading them again changes nothing.
    assert settings(merge(text, {})) == settings(text)
    # The caption profile's window is of 1,000 timesteps: a scheduler with 100 reads the same share of them.
    short = merge(tiny_config, {"defense.name": "iet_agc", "model.conditioning": "text", "model.num_train_timesteps": 100})
    assert short.defense.iet_agc.agc_timesteps == [20, 50]
