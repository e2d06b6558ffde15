"""The build-system promises, end to end on the smoke profile, in a throwaway git + DVC copy of the project.

One full build is shared (copied) by the tests that then change something; each asserts the exact set of stages
DVC ran, read from its own "Running stage" lines.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.e2e import pipeline

pytestmark = pytest.mark.slow


def checked(ran: list[str]) -> set[str]:
    """The stages an edit reran, after the `check` stage that must come first (it checks every config)."""
    assert ran[0] == "check", ran
    return set(ran[1:])


def test_second_repro_runs_nothing(repo):
    assert pipeline.repro(repo) == []
    assert "up to date" in pipeline.dvc(repo, "status").stdout


def test_comparison_principle_edit_reruns_exactly_label_and_downstream(repo):
    pipeline.edit_first(repo, "comparison", "text", "Which response is kinder and less likely to cause harm?")
    ran = checked(pipeline.repro(repo))
    downstream = pipeline.descendants(repo, "label")
    assert "label" in ran
    assert ran <= {"label"} | downstream, (
        f"ran stages outside label and its descendants: {ran - downstream - {'label'}}"
    )
    assert not ran & {"models", "curate", "critique_revise", "sft"}


def test_preference_source_decides_what_reads_label(repo):
    """With revision pairs as the preference source, pm and what follows read nothing of label's: switching to it
    leaves label and everything before pm cached, and a comparison-principle edit then reruns only the two stages
    that read comparison principles themselves (label, and evaluate's judge), never pm, rlaif or distill."""
    pipeline.sh(repo, sys.executable, "-m", "caiforge.cli", "params", "profile=smoke", "preference_source=revisions")
    ran = checked(pipeline.repro(repo))
    assert {"pm", "rlaif"} <= ran <= {"pm", "rlaif", "distill", "evaluate"}
    metrics = json.loads((repo / "data" / "pm" / "metrics.json").read_text())
    assert metrics["pairs_by_source"] == {"revision": metrics["train_pairs"] + metrics["heldout_pairs"]}
    pipeline.commit(repo, "revision pairs")
    pipeline.edit_first(repo, "comparison", "text", "Which response is kinder and less likely to cause harm?")
    assert checked(pipeline.repro(repo)) == {"label", "evaluate"}


def test_critique_principle_edit_leaves_curate_cached(repo):
    pipeline.edit_first(repo, "critique_revision", "critique", "List every way the last answer could hurt someone.")
    ran = checked(pipeline.repro(repo))
    assert "critique_revise" in ran
    assert ran <= {"critique_revise"} | pipeline.descendants(repo, "critique_revise")
    assert not ran & {"models", "curate"}


def test_param_of_one_stage_reruns_it_and_what_follows_only(repo):
    path = repo / "params.yaml"
    text = path.read_text()
    section = text.index("\npm:\n")
    at = text.index("  learning_rate: ", section)
    end = text.index("\n", at)
    path.write_text(text[:at] + "  learning_rate: 0.002" + text[end:])
    ran = checked(pipeline.repro(repo))
    assert "pm" in ran
    assert ran <= {"pm"} | pipeline.descendants(repo, "pm")


def test_forced_rebuild_is_byte_identical(repo):
    before = pipeline.data_digests(repo)
    assert any(p.endswith(".parquet") for p in before) and any(p.endswith(".safetensors") for p in before)
    pipeline.repro(repo, "-f")
    after = pipeline.data_digests(repo)
    changed = sorted(p for p in before if before[p] != after.get(p))
    assert not changed, f"a forced rerun changed these files: {changed}"
