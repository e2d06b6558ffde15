"""Sharing through a DVC remote: a teammate clones, pulls, and nothing recomputes."""

from __future__ import annotations

import pytest

from tests.e2e import pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def producer(repo, tmp_path):
    remote = tmp_path / "remote"
    pipeline.dvc(repo, "remote", "add", "-d", "team", str(remote))
    pipeline.commit(repo, "record the build and the remote")  # dvc.lock travels through git
    pipeline.dvc(repo, "push")
    assert any(remote.rglob("*")), "push stored objects in the remote"
    return repo


def test_teammate_pull_recomputes_nothing(producer, tmp_path):
    mate = tmp_path / "mate"
    pipeline.sh(tmp_path, "git", "clone", "-q", str(producer), str(mate))
    assert not (mate / "data" / "sft" / "model").exists()
    pipeline.dvc(mate, "pull")
    assert "up to date" in pipeline.dvc(mate, "status").stdout
    assert pipeline.repro(mate) == []
    assert pipeline.data_digests(mate) == pipeline.data_digests(producer)


def test_teammate_repro_pull_recomputes_nothing(producer, tmp_path):
    mate = tmp_path / "mate"
    pipeline.sh(tmp_path, "git", "clone", "-q", str(producer), str(mate))
    assert pipeline.repro(mate, "--pull") == []
    assert pipeline.data_digests(mate) == pipeline.data_digests(producer)


def test_teammate_edit_reuses_the_producers_rows(producer, tmp_path):
    """The row caches travel with the build: after a pull, a principle edit re-asks only the questions under it."""
    import json

    import polars as pl

    mate = tmp_path / "mate"
    pipeline.sh(tmp_path, "git", "clone", "-q", str(producer), str(mate))
    pipeline.dvc(mate, "pull")
    assert list((mate / "data" / "label" / "rowcache").glob("rows-*.jsonl")), "the row cache was pulled"
    before = json.loads((mate / "data" / "label" / "metrics.json").read_text())
    asked = pl.read_parquet(mate / "data" / "label" / "comparisons.parquet")["principle_id"].mode().sort()[0]
    pipeline.edit_principle(mate, asked, "text", "Which response is kinder and less likely to cause harm?")
    assert pipeline.repro(mate, "label") == ["label"]
    after = json.loads((mate / "data" / "label" / "metrics.json").read_text())
    assert after["tokens"]["sampling"]["rows"] == 0, "the producer's samples, not new ones"
    assert 0 < after["tokens"]["scoring"]["rows"] < before["tokens"]["scoring"]["rows"]
