"""The example configs load, and configs/default.toml is exactly the embedded default."""

from pathlib import Path

import pytest

from nbody_dt import config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    config.load(path)


def test_default_toml_is_the_embedded_default():
    assert config.load(Path(__file__).parent.parent / "configs" / "default.toml") == config.load()


def test_config_reference_is_up_to_date():
    committed = (Path(__file__).parent.parent / "docs" / "CONFIG.md").read_text()
    assert committed.strip() == config.defaults_markdown().strip()
