"""params.yaml is what DVC fingerprints: it must equal a fresh composition of conf/."""

from __future__ import annotations

from omegaconf import OmegaConf

from caiforge import config


def test_params_yaml_is_fresh():
    # OmegaConf writes 2e-05 for floats; PyYAML (YAML 1.1) would read that as a string, DVC and OmegaConf do not.
    committed = OmegaConf.to_container(OmegaConf.load(config.ROOT / "params.yaml"))
    assert committed == config.compose(), "params.yaml is stale: run `uv run caiforge params`"


def test_profiles_compose():
    smoke = config.compose(["profile=smoke"])
    assert smoke["models"]["roles"]["policy"]["source"] == "tiny"
    assert config.compose(["profile=gpu"])["models"]["dtype"] == "bfloat16"


def test_command_line_model_group_beats_profile():
    assert config.compose(["profile=smoke", "models=hub"])["models"]["roles"]["policy"]["source"].startswith("hf:")
