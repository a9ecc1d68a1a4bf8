"""Run configs: every shipped YAML parses; unknown keys and wrong types are errors that name the key."""

from pathlib import Path

import pytest

from puzzle.config import dotted, from_mapping, read_yaml
from puzzle.errors import ConfigError
from puzzle.pipeline import SearchConfig, load_search_config

CONFIGS = sorted((Path(__file__).parents[1] / "puzzle" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_search_config(path)
    assert isinstance(cfg, SearchConfig)
    assert path.read_text().startswith("# puzzle "), "a shipped YAML starts with the command that runs it"


def test_demo_config_is_small_enough_for_a_cpu():
    cfg = load_search_config(Path(__file__).parents[1] / "puzzle" / "configs" / "demo.yaml")
    assert cfg.bld.tokens_per_unit <= 1 << 17 and cfg.profile.batch_size <= 32
    assert [(t.name, t.vllm_native) for t in cfg.solve.targets] == [("1.5x", False), ("2x", False), ("2x-vllm", True)]


@pytest.mark.parametrize("data,message", [
    ({"bld": {"lr": 1e-3, "lrr": 2}}, r"config\.bld: unknown key 'lrr'"),
    ({"bld": {"batch_size": "eight"}}, r"config\.bld\.batch_size: expected an integer"),
    ({"space": {"mode": "joint"}}, r"config\.space\.mode: 'joint' is not one of"),
    ({"space": {"ffn": {"fractions": [1.0, 1.5]}}}, r"fractions must lie in"),
    ({"solve": {"targets": [{"name": "x"}]}}, r"target 'x' has no constraint"),
    ({"profile": {"batch_size": 0}}, r"profile.batch_size must be positive"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(SearchConfig, data, "config")


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bld: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bld:\n  lr: 0.001\n  batch_size: 4\n")
    cfg = load_search_config(path, dotted({"bld.lr": 0.01, "device": None}))
    assert cfg.bld.lr == 0.01 and cfg.bld.batch_size == 4 and cfg.device == "auto"
    assert isinstance(cfg.space.ffn.fractions, tuple)
