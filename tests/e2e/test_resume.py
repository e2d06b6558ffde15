"""Crash-safe resume: a generation stage killed with SIGKILL keeps the rows it finished, and `dvc repro` redoes
only the rest and writes the bytes an uninterrupted run wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from caiforge import report
from tests.e2e import pipeline

OUTPUTS = ("revisions.parquet", "sft.parquet")


def journal_rows(cache) -> int:
    return sum(p.read_bytes().count(b"\n") for p in cache.glob("journal-*.jsonl")) if cache.is_dir() else 0


def test_killed_critique_revise_resumes_where_it_stopped(repo):
    out = repo / "data" / "critique_revise"
    want = {name: (out / name).read_bytes() for name in OUTPUTS}
    total = json.loads((out / "metrics.json").read_text())["generation"]["rows"]
    shutil.rmtree(out / "rowcache")  # start from nothing, as the first build did

    run_until(repo, "stages/critique_revise.py", lambda: journal_rows(out / "rowcache") > 0)
    kept = journal_rows(out / "rowcache")
    assert 0 < kept < total, "killed mid-run, with some rows finished"

    stale = out / ".revisions.parquet.x1y2.tmp"  # what a kill during an atomic write leaves
    stale.mkdir()
    (stale / "revisions.parquet").write_bytes(b"PAR1 half")
    ran = pipeline.repro(repo, "critique_revise")
    assert not stale.exists(), "the stage removes stale temporaries at start"
    assert ran == ["critique_revise"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generation"]["cache_hits"] == kept
    assert metrics["generation"]["rows"] == total - kept, "only the rows the killed run had not finished"
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == want
    assert [p.name for p in (out / "rowcache").iterdir()][0].startswith("rows-"), "compacted once complete"


def run_until(repo, script: str, ready) -> None:
    """Start a stage script as `dvc repro` does (DVC_STAGE set: it writes the DVC output), SIGKILL it (and its
    children) as soon as `ready()` holds."""
    proc = subprocess.Popen(
        [sys.executable, script],
        cwd=repo,
        env={**pipeline.env(repo), "DVC_STAGE": Path(script).stem, "DVC_ROOT": str(repo)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None, f"{script} ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_sft_resumes_from_its_checkpoint_to_the_same_weights(repo):
    # Long enough to be killed between checkpoints; the uninterrupted run is the reference.
    pipeline.sh(repo, sys.executable, "-m", "caiforge.cli", "params", "profile=smoke", "sft.epochs=6",
                "sft.checkpoint_every=2")  # fmt: skip
    assert pipeline.repro(repo, "sft") == ["check", "sft"], "a params edit reruns the check first"
    out = repo / "data" / "sft"
    want = (out / "model" / "model.safetensors").read_bytes()
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert steps >= 6 and not (out / "checkpoints").exists(), "checkpoints are removed when the stage completes"
    curve = report.read_curve(out / "dvclive" / "plots" / "metrics" / "loss.tsv")
    assert len(curve) >= steps

    def complete() -> list:
        return sorted((out / "checkpoints").glob("*/checkpoint-*/caiforge_complete"))

    run_until(repo, "stages/sft.py", lambda: complete())
    done = int(complete()[-1].parent.name.rsplit("-", 1)[1])
    assert 0 < done < steps

    assert pipeline.repro(repo, "-f", "-s", "sft") == ["sft"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= done and metrics["steps"] == steps
    assert (out / "model" / "model.safetensors").read_bytes() == want, "the same weights as the uninterrupted run"
    assert report.read_curve(out / "dvclive" / "plots" / "metrics" / "loss.tsv") == curve, "the whole curve, once"
    assert not (out / "checkpoints").exists()
