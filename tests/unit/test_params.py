"""params.yaml is what DVC fingerprints: it must equal a fresh composition of conf/."""

from __future__ import annotations

import yaml

from caiforge import config


def test_params_yaml_is_fresh():
    committed = yaml.safe_load((config.ROOT / "params.yaml").read_text())
    assert committed == config.compose(), "params.yaml is stale: run `uv run caiforge params`"


def test_profiles_compose():
    smoke = config.compose(["profile=smoke"])
    assert smoke["models"]["roles"]["policy"]["source"] == "tiny"
    assert config.compose(["profile=gpu"])["models"]["dtype"] == "bfloat16"


def test_command_line_model_group_beats_profile():
    assert config.compose(["profile=smoke", "models=hub"])["models"]["roles"]["policy"]["source"].startswith("hf:")
