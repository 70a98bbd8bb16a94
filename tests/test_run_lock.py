"""One writer per run directory, checked with real processes."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import tiny_config_dict


def _command(tmp_path, *args):
    return [sys.executable, "-m", "memsafe.cli", *args]


def _start_long_run(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", train={"max_steps": 100000, "checkpoint_every": 20})))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_command(tmp_path, "train", "--config", str(config), "--no-progress"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().strip()):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process, config, env


def test_a_second_writer_is_refused_while_the_first_lives_and_a_killed_one_blocks_nothing(tmp_path):
    first, config, env = _start_long_run(tmp_path)
    run = tmp_path / "run"
    try:
        second = subprocess.run(_command(tmp_path, "train", "--config", str(config), "--no-progress"), env=env,
                                capture_output=True, text=True, timeout=120)
        evaluate = subprocess.run(_command(tmp_path, "evaluate", str(run), "--no-progress"), env=env,
                                  capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for refused in (second, evaluate):
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert lines[0].startswith("memsafe: error: run directory") and f"process {first.pid} " in lines[0]
        assert "(train, since" in lines[0]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one writer's log, never interleaved

    # The killed process's lock is gone with it: the run resumes.
    resumed = subprocess.run(_command(tmp_path, "train", "--config", str(config), "--no-progress",
                                      "--set", "train.max_steps=40"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
