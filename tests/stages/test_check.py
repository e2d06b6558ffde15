"""A configuration that would fail fails before any stage runs: `dvc repro` starts with the `check` stage, which
builds every stage's config (params, constitution parts, each config's own validation) and stops the build with
a message naming the file and key. Each case edits a fresh, unbuilt smoke project."""

from __future__ import annotations

import re

import pytest

from tests.e2e import pipeline

pytestmark = pytest.mark.slow

# (case id, params.yaml line pattern, replacement, what the message must name)
CASES = [
    ("late-stage-value", r"(?m)^  judge_principles: \d+$", "  judge_principles: 0", ["evaluate:", "judge_principles"]),
    ("unknown-key", r"(?m)^  bootstrap: ", "  bootstrp: ", ["evaluate:", "bootstrp", "did you mean"]),
    ("missing-constitution", r"(?m)^constitution: default$", "constitution: nope",
     ["constitutions/nope.yaml", "does not exist", "default, minimal"]),
    ("launch-without-launcher", r"(?m)^  num_processes: 1$", "  num_processes: 2", ["launch:", "needs config_file"]),
]  # fmt: skip


@pytest.mark.parametrize(("pattern", "new", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_config_that_would_fail_stops_the_build_before_any_stage(tmp_path, pattern, new, names):
    repo = pipeline.make_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    text, n = re.subn(pattern, new, params.read_text(), count=1)
    assert n == 1, pattern
    params.write_text(text)
    proc = pipeline.dvc(repo, "repro", check=False)
    assert proc.returncode != 0
    assert pipeline.RAN.findall(proc.stdout) == ["check"], "no stage ran after the check"
    assert not (repo / "data" / "models" / "manifest.json").exists()
    out = proc.stdout + proc.stderr
    assert "check: error: the build would fail, so no stage runs" in out
    for name in names:
        assert name in out, f"{name!r} not in:\n{out[-3000:]}"


def test_caiforge_check_passes_on_the_shipped_config(tmp_path):
    repo = pipeline.make_repo(tmp_path / "repo")
    proc = pipeline.sh(repo, "caiforge", "check")
    assert proc.stdout.startswith("ok: 9 stages (models, curate, critique_revise,")
