"""curate on the smoke profile: outputs, schema, determinism, split stability and clear errors."""

from __future__ import annotations

import json

import polars as pl
import pytest

from caiforge import config, io, schemas
from tests.conftest import load_stage, smoke_section

stage = load_stage("curate")

HELPFUL_SEED = "data/seed/helpful_prompts.jsonl"


@pytest.fixture(autouse=True)
def _project_root(monkeypatch):
    """Source paths in params are relative to the project root, where DVC runs stages."""
    monkeypatch.chdir(config.ROOT)


def make_cfg(tmp_path, overrides=(), **replace):
    section = smoke_section("curate", list(overrides))
    section.update(out_dir=str(tmp_path / "out"), **replace)
    return config.build(stage.CurateConfig, section, "params.yaml", "curate")


def test_outputs_schema_and_determinism(tmp_path):
    cfg = make_cfg(tmp_path)
    metrics = stage.run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "prompts.parquet"]
    df = io.read_parquet(out / "prompts.parquet", schemas.PROMPTS)
    assert df.columns == schemas.PROMPTS.names and df.height == metrics["rows"]
    assert set(df["kind"]) == {"red_team", "helpful"} and set(df["split"]) == {"train", "eval"}
    assert df["id"].n_unique() == df.height
    assert set(df.filter(pl.col("kind") == "helpful")["category"]) == {"helpfulness"}
    assert set(df.filter(pl.col("kind") == "red_team")["category"]) <= set(cfg.categories)
    assert df.equals(schemas.PROMPTS.check(df, "prompts")), "rows are written in schema order"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["by_kind"] == {"helpful": 30, "red_team": 80 - metrics["dropped_by_reason"]["exact"]}
    assert sum(metrics["by_split"].values()) == df.height

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stage.run(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a rerun writes byte-identical files"


def test_adding_prompts_moves_none_between_splits(tmp_path):
    small = make_cfg(tmp_path / "a")
    stage.run(small)
    sources = [dict(config.to_dict(s)) for s in small.sources]
    sources[-1]["limit"] = 60
    stage.run(make_cfg(tmp_path / "b", sources=sources))
    a = pl.read_parquet(tmp_path / "a" / "out" / "prompts.parquet")
    b = pl.read_parquet(tmp_path / "b" / "out" / "prompts.parquet")
    assert b.height > a.height
    joined = a.join(b, on="id", suffix="_b")
    assert joined.height == a.height and (joined["split"] == joined["split_b"]).all()


def test_embedding_mode_on_a_few_prompts(tmp_path):
    sources = [
        {"type": "package", "name": "advbench", "kind": "red_team", "limit": 30},
        {"type": "file", "path": HELPFUL_SEED, "kind": "helpful", "hint_field": "topic", "limit": 20},
    ]
    cfg = make_cfg(tmp_path, ["curate.dedup=embedding"], sources=sources, max_per_category=8)
    metrics = stage.run(cfg)
    df = pl.read_parquet(tmp_path / "out" / "prompts.parquet")
    assert metrics["dropped_by_reason"]["near"] > 0, "AdvBench's first rows hold near-duplicate paraphrases"
    assert max(df.group_by("kind", "category").len()["len"]) <= 8
    assert metrics["dropped_by_reason"]["category_cap"] > 0
    assert set(df["source"]) == {"advbench", "helpful_prompts"}


def test_errors_name_the_param_and_leave_no_output(tmp_path):
    helpful_only = [{"type": "file", "path": HELPFUL_SEED, "kind": "helpful"}]
    with pytest.raises(ValueError, match=r"curate\.sources: no red-team prompts"):
        stage.run(make_cfg(tmp_path, sources=helpful_only))
    with pytest.raises(ValueError, match=r"curate\.eval_fraction=0\.0001: no prompts in the eval split"):
        stage.run(make_cfg(tmp_path, eval_fraction=0.0001))
    missing = [{"type": "file", "path": "data/seed/nope.jsonl", "kind": "helpful"}]
    with pytest.raises(ValueError, match=r"data/seed/nope\.jsonl: no such prompt file"):
        stage.run(make_cfg(tmp_path, sources=missing))
    assert not (tmp_path / "out").exists()
    with pytest.raises(config.ConfigError, match=r"curate: eval_fraction must be in \(0, 1\)"):
        make_cfg(tmp_path, eval_fraction=1.0)
    with pytest.raises(config.ConfigError, match=r"curate: categories: 'helpfulness' is reserved"):
        make_cfg(tmp_path, categories={"helpfulness": ["being useful"]})
    with pytest.raises(config.ConfigError, match=r"curate\.dedup: must be one of"):
        make_cfg(tmp_path, dedup="fuzzy")
