"""caiforge.planning reads dvc.yaml's deps as DVC resolves them: `${...}` from params.yaml."""

from __future__ import annotations

import shutil

import pytest
import yaml

from caiforge import config, planning


def test_templated_deps_resolve_from_params(tmp_path):
    shutil.copy(config.ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((config.ROOT / "params.yaml").read_text())
    for source, expected in (
        ("revisions", "data/critique_revise/pairs.parquet"),
        ("ai", "data/label/preferences.parquet"),
    ):
        params["pm"]["data"] = params["rlaif"]["preferences"] = params["pm"]["files"][source]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        stages = {s.name: s for s in planning.read_stages(tmp_path)}
        assert expected in stages["pm"].deps and expected in stages["rlaif"].deps
        assert not any("${" in d for s in stages.values() for d in s.deps + s.outs)
    del params["pm"]["data"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(planning.StageError, match=r"\$\{pm.data\} names no value in params.yaml"):
        planning.read_stages(tmp_path)
