"""The bad-input table: each row is a clear one-line error naming the culprit, exit 1, and nothing half-written."""

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from memsafe.cli import main
from tests.conftest import tiny_config_dict


def _folder(tmp_path, *extra) -> dict:
    """A data folder of two good images plus the bad `extra` files; returns the data section using it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8), 10).save(folder / "a.png")
    Image.new("L", (8, 8), 200).save(folder / "b.png")
    for name, content in extra:
        (folder / name).write_bytes(content(folder) if callable(content) else content)
    return {"source": str(folder), "holdout_images": 0, "max_train_images": None}


def _truncated_png(folder) -> bytes:
    Image.effect_noise((32, 32), 64).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    return data[: len(data) // 2]


def _jpeg_bytes(folder) -> bytes:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    return data[: len(data) // 2]


def _pretrained_missing_config(tmp_path) -> dict:
    from memsafe.config import config_from_dict
    from memsafe.models import build_unet

    config = config_from_dict(tiny_config_dict(tmp_path / "unused"))
    build_unet(config.model, config.data).save_pretrained(tmp_path / "pretrained" / "unet")
    (tmp_path / "pretrained" / "unet" / "config.json").unlink()
    return {"model": {"pretrained": str(tmp_path / "pretrained")}}


ROWS = {
    "missing-folder": (lambda t: {"data": {"source": "/no/such/folder"}}, "data folder not found: /no/such/folder"),
    "empty-folder": (lambda t: ((t / "empty").mkdir(), {"data": {"source": str(t / "empty")}})[1], "holds no images"),
    "truncated-png": (lambda t: {"data": _folder(t, ("t.png", _truncated_png))},
                      "cannot read image .*t.png"),
    "truncated-jpeg": (lambda t: {"data": _folder(t, ("t.jpg", _jpeg_bytes))}, "cannot read image .*t.jpg"),
    "not-an-image": (lambda t: {"data": _folder(t, ("notes.jpg", b"shopping list"))}, "cannot read image .*notes.jpg"),
    "bad-metadata-line": (
        lambda t: {"data": _folder(t, ("metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n{oops\n'))},
        "metadata.jsonl line 2 is not valid JSON"),
    "caption-missing-file": (
        lambda t: {"data": _folder(t, ("metadata.jsonl", b'{"file_name": "nope.png", "text": "x"}\n'))},
        "line 1 names a missing file: nope.png"),
    "unknown-key": (lambda t: {"train": {"max_stepz": 3}}, "unknown config key 'train.max_stepz'"),
    "wrong-type": (lambda t: {"train": {"max_steps": "ten"}}, "'train.max_steps' must be int"),
    "bad-resolution": (lambda t: {"data": {"resolution": 9}}, "data.resolution 9 cannot go through a UNet of 2 levels"),
    "missing-pretrained": (lambda t: {"model": {"pretrained": "/no/such/model"}}, "model.pretrained directory not found"),
    "pretrained-missing-file": (_pretrained_missing_config, "model.pretrained directory .*unet is missing config.json"),
}


def _write_config(tmp_path, sections) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", **sections)))
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, capsys, row):
    make, message = ROWS[row]
    config = _write_config(tmp_path, make(tmp_path))
    assert main(["train", "--config", config, "--no-progress"]) == 1
    line = _error_line(capsys)
    assert line.startswith("memsafe: error: ") and re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_grayscale_rgba_and_rgb_together_are_converted_not_refused(tmp_path):
    data = _folder(tmp_path)
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(tmp_path / "imgs" / "c.png")
    Image.new("RGB", (12, 12), (0, 255, 0)).save(tmp_path / "imgs" / "d.jpg")
    config = _write_config(tmp_path, {"data": data | {"channels": 3}, "train": {"max_steps": 2}})
    assert main(["train", "--config", config, "--no-progress"]) == 0


def test_nan_loss_fails_the_run_without_claiming_completion(tmp_path, capsys):
    config = _write_config(tmp_path, {"train": {"max_steps": 40, "learning_rate": 1e30, "warmup_steps": 0,
                                                "grad_clip": 0.0}})
    assert main(["train", "--config", config, "--no-progress"]) == 1
    assert "training loss became nan" in _error_line(capsys)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "nan" in status["error"]
    assert not (tmp_path / "run" / "model").exists()
    assert main(["evaluate", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "is not complete (status: failed)" in _error_line(capsys)


def _limit_file_size():
    # A "disk" that takes no file larger than 64 KiB: the UNet weights (~0.4 MB) cannot be written.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_disk_full_while_checkpointing_fails_cleanly(tmp_path):
    config = _write_config(tmp_path, {"train": {"max_steps": 10, "checkpoint_every": 5}})
    done = subprocess.run([sys.executable, "-m", "memsafe.cli", "train", "--config", config, "--no-progress"],
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"memsafe: error: could not write checkpoint .*checkpoint-00000005: .*File too large",
                                        lines[0]), lines
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert not list((run / "checkpoints").iterdir())  # no checkpoint, and no temporary folder left behind
    assert not (run / "model").exists()
