"""Sharing through a DVC remote: a teammate clones, pulls, and nothing recomputes."""

from __future__ import annotations

import sys

import pytest

from tests.e2e import pipeline
from tests.e2e.pipeline import ROOT

pytestmark = pytest.mark.slow


def readme_block(after: str) -> list[str]:
    """The commands of the README's first bash block after the line starting with `after` (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(after) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def run_literally(repo, commands: list[str], substitutions: dict[str, str]) -> None:
    """Run README commands as typed, through bash (`&&` chains and globs included), with `uv run ` dropped (this
    interpreter's environment is first on PATH). `git push` is left out: the teammate clones the folder."""
    for line in commands:
        for old, new in substitutions.items():
            line = line.replace(old, new)
        for command in line.split("&&"):
            command = command.strip().removeprefix("uv run ")
            if not command.startswith("git push"):
                pipeline.sh(repo, "bash", "-c", command)


@pytest.fixture
def producer(repo, tmp_path):
    """The shared build, not yet in git, as a producer has it after `caiforge params profile=smoke` and `dvc repro`
    in a clone whose committed params.yaml is the default: the README's commands must record all of it."""
    pipeline.sh(repo, "git", "reset", "-q", "--mixed", "HEAD~1")  # undo the shared build's commit
    used = (repo / "params.yaml").read_text()
    pipeline.sh(repo, sys.executable, "-m", "caiforge.cli", "params")  # the default (cpu_demo) composition
    pipeline.sh(repo, "git", "commit", "-q", "-m", "default params", "params.yaml")
    (repo / "params.yaml").write_text(used)
    assert pipeline.sh(repo, "git", "status", "--porcelain").stdout.strip(), "the build is not in git yet"
    remote = tmp_path / "remote"
    run_literally(repo, readme_block("The producer builds once"), {"/mnt/shared/caiforge-cache": str(remote)})
    assert any(remote.rglob("*")), "push stored objects in the remote"
    return repo


def test_teammate_pull_recomputes_nothing(producer, tmp_path):
    mate = tmp_path / "mate"
    pipeline.sh(tmp_path, "git", "clone", "-q", str(producer), str(mate))
    assert not (mate / "data" / "sft" / "model").exists()
    commands = readme_block("A teammate gets every model")
    assert commands[1:3] == ["uv run dvc pull", "uv run dvc status"]
    pipeline.dvc(mate, "pull")
    status = pipeline.dvc(mate, "status").stdout
    assert "Data and pipelines are up to date." in status, status
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
    assert pipeline.repro(mate, "label") == ["check", "label"]
    after = json.loads((mate / "data" / "label" / "metrics.json").read_text())
    assert after["tokens"]["sampling"]["rows"] == 0, "the producer's samples, not new ones"
    assert 0 < after["tokens"]["scoring"]["rows"] < before["tokens"]["scoring"]["rows"]
