import pytest

from memsafe.config import RunConfig, config_from_dict, load_config, merge
from memsafe.errors import MemsafeError


def test_defaults_and_yaml_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_steps: 7\n  learning_rate: 1\ndata:\n  resolution: 32\n")
    config = load_config(path)
    assert config.train.max_steps == 7
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.data.resolution == 32
    assert config.model.block_out_channels == RunConfig().model.block_out_channels


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"max_stepz": 3}}, "unknown config key 'train.max_stepz'"),
        ({"colour": 1}, "unknown config key 'colour'"),
        ({"train": {"max_steps": "ten"}}, "'train.max_steps' must be int"),
        ({"train": {"ema": 3}}, "'train.ema' must be bool"),
        ({"data": {"resolution": 10}}, "data.resolution 10 cannot go through a UNet of 3 levels"),
        ({"model": {"attention_levels": [True]}}, "attention_levels has 1 entries"),
        ({"train": "fast"}, "section 'train' must be a mapping"),
        ({"data": {"channels": 2}}, "data.channels must be 1 or 3"),
    ],
)
def test_bad_configs_are_named(values, message):
    with pytest.raises(MemsafeError, match=message):
        config_from_dict(values)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MemsafeError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(MemsafeError, match="not valid YAML"):
        load_config(bad)


def test_merge_applies_dotted_overrides():
    config = merge(RunConfig(), {"train.max_steps": 5, "defense.name": "none"})
    assert config.train.max_steps == 5
    with pytest.raises(MemsafeError, match="unknown config key 'train.nope'"):
        merge(RunConfig(), {"train.nope": 1})
