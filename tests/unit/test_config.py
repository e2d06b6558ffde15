"""The typed config builder, overrides and the loader that reads only declared params."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from caiforge import config
from caiforge.config import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str
    mode: Literal["a", "b"]
    inner: Inner
    tags: tuple[str, ...] = ()
    limit: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


GOOD = {"name": "x", "mode": "a", "inner": {"lr": 1}, "tags": ["t1", "t2"], "limit": None, "extra": {"k": 1}}


def test_build_converts_nested_and_freezes():
    cfg = config.build(Outer, GOOD, "params.yaml")
    assert cfg.inner == Inner(lr=1.0, steps=10)
    assert isinstance(cfg.inner.lr, float)
    assert cfg.tags == ("t1", "t2")
    assert cfg.extra["k"] == 1
    with pytest.raises(AttributeError):
        cfg.name = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.extra["k"] = 2  # type: ignore[index]


@pytest.mark.parametrize(
    ("patch", "key", "needle"),
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"inner": {"lr": 1, "stpes": 3}}, "inner.stpes", "unknown key"),
        ({"mode": "c"}, "mode", "must be one of"),
        ({"inner": {"lr": "fast"}}, "inner.lr", "expected a number"),
        ({"inner": {"lr": 1, "steps": 2.5}}, "inner.steps", "expected an integer"),
        ({"inner": {"lr": 1, "steps": True}}, "inner.steps", "expected an integer"),
        ({"name": 3}, "name", "expected str"),
        ({"tags": "t1"}, "tags", "expected a list"),
        ({"tags": ["ok", 2]}, "tags[1]", "expected str"),
        ({"limit": "ten"}, "limit", "matches none"),
        ({"inner": None}, "inner", "expected a mapping"),
    ],
)
def test_build_errors_name_file_and_key(patch, key, needle):
    with pytest.raises(ConfigError) as err:
        config.build(Outer, {**GOOD, **patch}, "params.yaml")
    assert str(err.value).startswith(f"params.yaml: {key}: ")
    assert needle in str(err.value)


def test_unknown_key_suggests_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"params.yaml: inner.stpes: unknown key \(did you mean steps\?\)"):
        config.build(Outer, {**GOOD, "inner": {"lr": 1, "stpes": 3}}, "params.yaml")
    with pytest.raises(ConfigError, match=r"params.yaml: bogus: unknown key \(known keys: "):
        config.build(Outer, {**GOOD, "bogus": 1}, "params.yaml")


def test_build_missing_required_key():
    data = dict(GOOD)
    del data["mode"]
    with pytest.raises(ConfigError, match=r"params.yaml: mode: missing required key"):
        config.build(Outer, data, "params.yaml")


def test_overrides_apply_and_reject_unknown_keys():
    values = {"sft": ("params.yaml", {"lr": 0.1, "lora": {"r": 8}})}
    out = config.apply_overrides(values, ["sft.lr=0.5", "sft.lora.r=16"])
    assert out["sft"][1] == {"lr": 0.5, "lora": {"r": 16}}
    assert values["sft"][1]["lr"] == 0.1, "overrides must not mutate their input"
    with pytest.raises(ConfigError, match=r"command line: sft.lrr: unknown key \(did you mean lr\?\)"):
        config.apply_overrides(values, ["sft.lrr=1"])
    with pytest.raises(ConfigError, match=r"sft.lora.rank: unknown key \(known keys: r\)"):
        config.apply_overrides(values, ["sft.lora.rank=1"])
    with pytest.raises(ConfigError, match="not a param this stage declares"):
        config.apply_overrides(values, ["curate.eval_fraction=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config.apply_overrides(values, ["sft.lr"])


def test_declared_params_are_only_the_stage_section():
    values = config.declared_params("models")
    assert set(values) == {"models"}
    assert values["models"][0] == "params.yaml"


def test_declared_params_of_a_stage_dvc_yaml_lacks_names_the_file_and_stage():
    with pytest.raises(ConfigError, match="dvc.yaml: stage 'sfft' not found"):
        config.declared_params("sfft")


def test_stage_script_rejects_bad_override_cleanly():
    proc = subprocess.run(
        [sys.executable, "stages/models.py", "models.dtype=float8"],
        cwd=config.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "params.yaml: models.dtype: must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr
