"""One smoke build shared by the end-to-end tests (each test works on a copy)."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e import pipeline


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    repo = pipeline.make_repo(tmp_path_factory.mktemp("built") / "repo")
    ran = pipeline.repro(repo)
    assert ran == pipeline.stages(repo), "a full build runs every stage, in pipeline order"
    pipeline.commit(repo, "build")
    return repo


@pytest.fixture
def repo(built, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(built, copy, symlinks=True)
    return copy
