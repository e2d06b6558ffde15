"""Shared fixtures: stage modules by path, smoke-profile configs, tiny local models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from caiforge import config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ANCHORS = SHARED / "anchors"


def load_stage(name: str) -> ModuleType:
    """Import stages/<name>.py (stage scripts are not a package) as module `caiforge_stage_<name>`."""
    mod_name = f"caiforge_stage_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "stages" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def smoke_section(stage: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The stage's params section as the smoke profile composes it (plus Hydra-style overrides)."""
    params = config.compose(["profile=smoke", *(overrides or [])])
    return params[stage]


@pytest.fixture(scope="session")
def anchors() -> Path:
    if not ANCHORS.is_dir():
        pytest.skip(f"{ANCHORS} not present (it sits beside the checkout in CI and dev sessions)")
    return ANCHORS

