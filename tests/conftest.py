import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _memsafe_cache(tmp_path_factory):
    """Feature networks trained by tests are cached per test session, never in the user's cache."""
    os.environ["MEMSAFE_CACHE"] = str(tmp_path_factory.mktemp("memsafe-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config_dict(output_dir, **sections):
    """A 8x8 digits run with a ~0.1M-parameter UNet: trains at tens of steps per second on 2 cores."""
    values = {
        "data": {"source": "builtin:digits", "resolution": 8, "channels": 1, "max_train_images": 48, "holdout_images": 64},
        "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [False, True]},
        "train": {"max_steps": 30, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 5, "checkpoint_every": 10,
                  "log_every": 5, "deterministic": True},
        "eval": {"num_samples": 32, "sampling_steps": 10, "grid_size": 8},
        "output_dir": str(output_dir),
    }
    for section, updates in sections.items():
        if isinstance(updates, dict):
            values.setdefault(section, {}).update(updates)
        else:
            values[section] = updates
    return values


@pytest.fixture
def tiny_config(tmp_path):
    from memsafe.config import config_from_dict

    return config_from_dict(tiny_config_dict(tmp_path / "run"))
