"""A real training process killed with SIGKILL at an arbitrary step, then resumed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from memsafe.train.checkpoint import list_checkpoints
from tests.conftest import tiny_config_dict
from tests.sd_parts import has_clip_vocabulary, sd_config_dict, write_squares

CHECKPOINT_FILES = ["model.safetensors", "optimizer.pt", "trainer_state.json", "rng.safetensors", "hooks.safetensors",
                    "hooks.json"]


def _assert_complete(checkpoint) -> None:
    """Every file a resume reads is there and parses (a half-written folder would fail here)."""
    parts = sorted(checkpoint.glob("proxy-*")) or [checkpoint]
    for part in parts:
        assert all((part / name).is_file() for name in CHECKPOINT_FILES), sorted(p.name for p in part.iterdir())
        load_file(part / "model.safetensors")
        json.loads((part / "trainer_state.json").read_text())


def _logged_steps(run_dir) -> list[int]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _final_weights(run_dir):
    lora = run_dir / "model" / "pytorch_lora_weights.safetensors"
    return load_file(lora if lora.is_file() else run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def _digits(tmp_path, name, sections):
    return tiny_config_dict(tmp_path / name, **sections)


def _stable_diffusion(tmp_path, name, sections):
    """A LoRA run of the tiny pipeline: adapter-only checkpoints and, under IET-AGC+, adapter proxies."""
    from memsafe.models.random_pipeline import build_random_pipeline

    if not (tmp_path / "sd").is_dir():
        build_random_pipeline(tmp_path / "sd")
        write_squares(tmp_path / "data")
    sections = {**sections, "train": {**sections["train"], "batch_size": 8}, "model": {"lora_rank": 4}}
    return sd_config_dict(tmp_path / name, tmp_path / "sd", tmp_path / "data", tmp_path / "latents", **sections)


IET = {"name": "iet_agc", "iet_agc": {"shards": 2, "local_steps": 10}}
CASES = {
    "plain": (_digits, {}),
    "iet_agc": (_digits, IET),
    "sd_lora_iet_agc": pytest.param(_stable_diffusion, IET, marks=pytest.mark.skipif(
        not has_clip_vocabulary(), reason="the CLIP vocabulary needs clip-anytorch")),
}


@pytest.mark.parametrize("make, defense", list(CASES.values()), ids=list(CASES))
def test_sigkill_then_resume_reaches_the_uninterrupted_result(tmp_path, make, defense):
    every = 20
    sections = {"train": {"max_steps": 160, "checkpoint_every": every, "log_every": 5}, "defense": defense}
    commands = {}
    for name in ("killed", "straight"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(make(tmp_path, name, sections)))
        commands[name] = [sys.executable, "-m", "memsafe.cli", "train", "--config", str(path), "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"

    kill_after = random.Random(len(str(defense))).randrange(45, 110)
    process = subprocess.Popen(commands["killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(step >= kill_after for step in _logged_steps(run_dir)):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        for checkpoint in list_checkpoints(run_dir / "checkpoints"):
            try:
                _assert_complete(checkpoint)
            except (FileNotFoundError, RuntimeError, AssertionError):
                # Pruned (renamed away whole) while we read it: safetensors reports the vanished file as a
                # RuntimeError. A folder that is still there failed for real.
                if checkpoint.exists():
                    raise
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for checkpoint in checkpoints:
        _assert_complete(checkpoint)
    reached = max(_logged_steps(run_dir))
    resumed_from = int(checkpoints[-1].name.split("-")[1])
    assert 0 <= reached - resumed_from <= every  # at most one checkpoint interval of work lost

    done = subprocess.run(commands["killed"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete" and status["step"] == 160
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert subprocess.run(commands["straight"], env=env, capture_output=True, timeout=300).returncode == 0
    killed, straight = _final_weights(run_dir), _final_weights(tmp_path / "straight")
    assert all(killed[k].equal(straight[k]) for k in straight)
