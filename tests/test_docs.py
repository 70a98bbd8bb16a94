"""The docs say what the code does: the configuration block is the real defaults, and every config shown
in the README and docs is one memsafe accepts (known keys, right types)."""

import math
import re
from pathlib import Path

import pytest
import yaml

from memsafe.config import RunConfig, _build

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)


def _same(shown, real, where=""):
    if isinstance(real, dict):
        assert isinstance(shown, dict) and set(shown) == set(real), (where, sorted(set(shown) ^ set(real)))
        for key in real:
            _same(shown[key], real[key], f"{where}.{key}".lstrip("."))
    elif isinstance(real, float) and not isinstance(shown, bool):
        assert math.isclose(shown, real, rel_tol=1e-3), (where, shown, real)
    else:
        assert shown == real, (where, shown, real)


def test_the_configuration_page_shows_every_key_with_its_default():
    (block,) = yaml_blocks(ROOT / "docs" / "configuration.md")
    _same(yaml.safe_load(block), RunConfig().to_dict())


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_config_shown_uses_known_keys_and_types(page):
    for block in yaml_blocks(page):
        values = yaml.safe_load(block)
        if isinstance(values, dict) and set(values) <= set(RunConfig().to_dict()):
            _build(RunConfig, values, "")  # raises on an unknown key or a wrong type, naming it
