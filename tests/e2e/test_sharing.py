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
