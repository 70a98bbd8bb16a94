"""A tiny random-weight Stable Diffusion pipeline and a captioned colour image folder, for the tests that
train pipeline runs (test_sd_pipeline, test_crash_resume, test_distributed)."""

import json

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def has_clip_vocabulary() -> bool:
    from memsafe.models.random_pipeline import bpe_vocabulary_path

    try:
        bpe_vocabulary_path()
    except Exception:  # noqa: BLE001
        return False
    return True


def write_squares(folder, count: int = 24):
    """`count` non-square colour images of a square, captioned with its colour, in ImageFolder layout."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as lines:
        for i in range(count):
            colour = list(COLOURS)[i % 3]
            image = np.full((40, 48, 3), 255, np.uint8)
            image[6 + i % 5 : 30, 8 : 30 + i % 7] = COLOURS[colour]
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            lines.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {colour} square"}) + "\n")
    return folder


def sd_config_dict(output_dir, pipeline, images, latent_cache, steps: int = 12, **sections) -> dict:
    values = {
        "data": {"source": str(images), "resolution": 32, "latent_cache": str(latent_cache)},
        "model": {"pretrained": str(pipeline)},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 0,
                  "checkpoint_every": 6, "log_every": 3},
        "eval": {"num_samples": 3, "sampling_steps": 4, "guidance_scale": 2.0, "batch_size": 8},
        "output_dir": str(output_dir),
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return values
