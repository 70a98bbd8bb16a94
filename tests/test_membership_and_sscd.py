"""The loss membership-inference attack and SSCD copy detection, on real small computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from memsafe.config import config_from_dict
from memsafe.data import load_dataset
from memsafe.metrics import sscd
from memsafe.metrics.copy_detection import own_image_nearest, top1_similarity
from memsafe.metrics.membership import attack_losses, balanced_sets, loss_attack
from memsafe.models.unet import build_noise_scheduler
from memsafe.runs import FinishedRun, evaluate_run, train_run
from tests.conftest import tiny_config_dict

needs_sscd = pytest.mark.skipif(not sscd.available(), reason=f"SSCD not installed ({sscd.INSTALL})")


def test_the_loss_attack_scores_separated_and_identical_losses():
    members, others = torch.linspace(0.1, 0.2, 200), torch.linspace(0.3, 0.4, 200)
    separated = loss_attack(members, others)
    assert separated["mia_auc"] == pytest.approx(1.0) and separated["mia_tpr_at_1pct_fpr"] == pytest.approx(1.0)
    same = loss_attack(members, members.clone())
    assert same["mia_auc"] == pytest.approx(0.5) and same["mia_tpr_at_1pct_fpr"] < 0.05
    reversed_ = loss_attack(others, members)
    assert reversed_["mia_auc"] == pytest.approx(0.0) and reversed_["mia_tpr_at_1pct_fpr"] == 0.0
    members, nonmembers = balanced_sets(10, 4, seed=0)
    assert (members, nonmembers) == balanced_sets(10, 4, seed=0) and len(members) == len(nonmembers) == 4
    assert len(set(balanced_sets(3, 9, 0)[1])) == 3


def test_an_overfitted_model_gives_its_members_away(tmp_path):
    """16 training digits, many epochs: their denoising error falls below that of held-out digits, and the
    attack tells them apart far better than chance; before training it cannot."""
    values = tiny_config_dict(tmp_path / "run", data={"max_train_images": 16, "holdout_images": 64},
                              train={"max_steps": 500, "checkpoint_every": 500, "learning_rate": 2e-3},
                              eval={"sscd": "off"})
    config = config_from_dict(values)
    run_dir = train_run(config, progress=False)
    train_set, holdout = load_dataset(config.data)
    member_indices, nonmember_indices = balanced_sets(len(train_set), len(holdout), 0)
    members, nonmembers = train_set.subset(member_indices), holdout.subset(nonmember_indices)
    run = FinishedRun(run_dir)
    unet, scheduler, to_model = run.unet, build_noise_scheduler(config.model), run.to_model
    trained = loss_attack(attack_losses(unet, scheduler, to_model(members)),
                          attack_losses(unet, scheduler, to_model(nonmembers)))
    assert trained["mia_auc"] > 0.8, trained
    fresh = type(unet).from_config(unet.config)
    untrained = loss_attack(attack_losses(fresh, scheduler, to_model(members)),
                            attack_losses(fresh, scheduler, to_model(nonmembers)))
    assert abs(untrained["mia_auc"] - 0.5) < 0.3, untrained

    metrics = evaluate_run(run_dir, progress=False).metrics
    assert metrics["mia_members"] == metrics["mia_nonmembers"] == 16
    assert 0.0 <= metrics["mia_auc"] <= 1.0 and "copy_rate_sscd" not in metrics


def scenes(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, size, size) pictures of four coloured ellipses and boxes on a coloured ground."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        picture = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(4):
            x, y = rng.integers(0, size - 8, 2)
            w, h = rng.integers(8, size // 2, 2)
            shape = draw.ellipse if rng.integers(2) else draw.rectangle
            shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        pictures.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    return torch.stack(pictures)


@needs_sscd
def test_sscd_finds_copies_above_what_other_images_reach():
    pictures = scenes(40)
    detector = sscd.SSCD(size=128)
    copies = torch.roll(pictures[:20], shifts=1, dims=3)  # a one-pixel shift of each training picture
    metrics, similarity = sscd.sscd_statistics(detector, copies, pictures[:20], holdout=pictures[20:])
    assert metrics["copy_rate_sscd"] == 1.0 and metrics["sscd_size"] == 128
    assert similarity.min() > metrics["holdout_sim_95pc_sscd"], "a copy is closer than 95 % of other pictures get"
    found, index = top1_similarity(detector.embed(copies), detector.embed(pictures[:20]))
    assert index.tolist() == list(range(20)) and torch.allclose(found, similarity, atol=1e-5)
    again = sscd.cached_embeddings(detector, pictures[:20])
    assert torch.allclose(again, detector.embed(pictures[:20]), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        detector.embed(pictures.float())


@needs_sscd
def test_a_noisy_copy_has_its_own_image_nearest_and_another_picture_does_not():
    pictures = scenes(40)
    detector = sscd.SSCD(size=128)
    references = detector.embed(pictures[:20])
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 8, pictures[:10].shape))
    noisy = (torch.roll(pictures[:10], shifts=1, dims=3).double() + noise).clamp(0, 255).to(torch.uint8)
    own = torch.arange(10)
    copied = own_image_nearest(detector.embed(noisy), references[own], references, own_index=own)
    assert copied.all(), "a noisy copy of a training picture has that picture nearest"
    strangers = own_image_nearest(detector.embed(pictures[20:30]), references[own], references, own_index=own)
    assert strangers.sum() <= 3, "unrelated pictures match their assigned image only by chance (1 in 20)"
    held_out = own_image_nearest(detector.embed(noisy), detector.embed(pictures[:10]), references[10:])
    assert held_out.all(), "a held-out image competes with the others on the same terms"


@needs_sscd
def test_evaluate_reports_sscd_on_colour_runs_when_asked(tmp_path):
    values = tiny_config_dict(tmp_path / "run", data={"source": "builtin:ink-digits-clean", "channels": 3},
                              train={"max_steps": 10, "checkpoint_every": 10}, eval={"sscd": "on", "num_samples": 8})
    metrics = evaluate_run(train_run(config_from_dict(values), progress=False), progress=False).metrics
    assert 0.0 <= metrics["copy_rate_sscd"] <= 1.0 and 0.0 <= metrics["holdout_copy_rate_sscd"] <= 1.0
    assert -1.0 <= metrics["sim_95pc_sscd"] <= 1.0


def test_sscd_settings_are_checked(tmp_path):
    from memsafe.errors import MemsafeError

    with pytest.raises(MemsafeError, match="eval.sscd must be auto, on or off"):
        config_from_dict(tiny_config_dict(tmp_path, eval={"sscd": "yes"}))
    with pytest.raises(MemsafeError, match="eval.sscd_size must be at least 32"):
        config_from_dict(tiny_config_dict(tmp_path, eval={"sscd_size": 8}))
