import pytest
import torch

from memsafe.data import load_images
from memsafe.config import DataConfig
from memsafe.metrics import copy_statistics, fid_with_features, top1_similarity, train_feature_net
from memsafe.metrics.features import augment, load_feature_net, save_feature_net
from tests.conftest import tiny_config_dict


def _digits():
    images = load_images(DataConfig(resolution=8))
    return images.as_model_input(), images.labels


def _net():
    images, labels = _digits()
    return train_feature_net(images[:600], steps=80, batch_size=128, progress=False), images, labels


def test_feature_net_finds_the_source_of_an_augmented_copy():
    net, images, _ = _net()
    references = images[:200]
    copies = augment(references[:50], torch.Generator().manual_seed(5))
    similarity, index = top1_similarity(net.embed(copies), net.embed(references))
    # Instance discrimination: most augmented copies are matched back to their own source image.
    assert (index == torch.arange(50)).float().mean() > 0.6
    # Calibrated similarity: a real image's nearest other real image sits near 0.5 (95th percentile),
    # an exact copy at 1.0.
    assert net.calibrate(torch.tensor(1.0)).item() == 1.0
    background, _ = top1_similarity(net.embed(images[:600]), net.embed(images[:600]), skip_self=True)
    assert copy_statistics(background, calibrate=net.calibrate)["copy_fraction"] == pytest.approx(0.05, abs=0.01)
    exact = copy_statistics(top1_similarity(net.embed(references[:20]), net.embed(references))[0], calibrate=net.calibrate)
    assert exact["copy_fraction"] == 1.0 and exact["sim_mean"] == pytest.approx(1.0, abs=1e-5)
    raw = copy_statistics(torch.tensor([0.2, 0.6, 0.9]))
    assert raw["copy_fraction"] == pytest.approx(2 / 3) and raw["sim_mean"] == pytest.approx(1.7 / 3)


def test_feature_net_training_is_deterministic_and_round_trips(tmp_path):
    images, labels = _digits()
    a = train_feature_net(images[:200], steps=5, batch_size=64, progress=False)
    b = train_feature_net(images[:200], steps=5, batch_size=64, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    save_feature_net(a, tmp_path / "net.safetensors")
    loaded = load_feature_net(tmp_path / "net.safetensors")
    assert torch.allclose(loaded(images[:8]), a(images[:8]))
    assert loaded.background_similarity == a.background_similarity != 0.0


def test_fid_is_zero_for_identical_sets_and_orders_distributions():
    net, images, labels = _net()
    zeros = images[labels == 0]
    ones = images[labels == 1]
    same_class = fid_with_features(zeros[:80], zeros[80:], net)
    other_class = fid_with_features(zeros[:80], ones[:80], net)
    noise = fid_with_features(zeros[:80], torch.rand(80, 1, 8, 8) * 2 - 1, net)
    assert fid_with_features(zeros[:80], zeros[:80], net) < 1e-3
    # Two halves of one class are far closer than another class or noise.
    assert 3 * same_class < min(other_class, noise)


def test_inception_fid_needs_its_weights_on_disk(tmp_path):
    from memsafe.errors import MemsafeError
    from memsafe.metrics import fid_inception

    with pytest.raises(MemsafeError, match="eval.inception_weights file not found"):
        fid_inception(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), tmp_path / "pt_inception.pth")


def test_heldout_loss_of_an_unconditional_run_falls_with_training(tmp_path):
    from memsafe.config import config_from_dict
    from memsafe.data import load_dataset
    from memsafe.runs import load_run_config, run_heldout_loss, train_run

    runs = {steps: train_run(config_from_dict(tiny_config_dict(tmp_path / f"run{steps}", train={"max_steps": steps})),
                             progress=False) for steps in (2, 150)}
    _, holdout = load_dataset(load_run_config(runs[150]).data)
    early, late = (run_heldout_loss(runs[steps], holdout) for steps in (2, 150))
    assert late.shape == (len(holdout),) and late.mean() < 0.8 * early.mean()
