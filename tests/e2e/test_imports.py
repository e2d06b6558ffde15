"""Each shipped anchor format, imported as the README says, gives a constitution the pipeline runs: the anthropic
import drives the smoke chain end to end; the llm-swarm import passes the check every build starts with. Without
`--fill-from`, both imports fail with the documented message and write nothing."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e import pipeline
from tests.e2e.pipeline import ROOT

pytestmark = pytest.mark.slow

USES_CONSTITUTION = {"critique_revise", "label", "evaluate"}


def use(repo, name: str) -> None:  # the constitution params.yaml names
    params = repo / "params.yaml"
    text, n = re.subn(r"(?m)^constitution: \w+$", f"constitution: {name}", params.read_text(), count=1)
    assert n == 1
    params.write_text(text)


def test_imported_anthropic_constitution_runs_the_chain(repo, anchors):
    src = anchors / "anthropic-cai-prompts"
    dest = "constitutions/anthropic.yaml"
    failed = pipeline.sh(repo, "caiforge", "constitution", "import", "anthropic", str(src), dest, check=False)
    assert failed.returncode == 1 and "--fill-from constitutions/default.yaml" in failed.stderr
    assert not (repo / dest).exists()
    fill = ["--fill-from", "constitutions/default.yaml"]
    pipeline.sh(repo, "caiforge", "constitution", "import", "anthropic", str(src), dest, *fill)
    # As the README runs it: an experiment, with the profile repeated (-S recomposes from conf/).
    exp = pipeline.dvc(repo, "exp", "run", "-S", "profile=smoke", "-S", "constitution=anthropic")
    ran = pipeline.RAN.findall(exp.stdout)
    assert ran[0] == "check" and set(ran) >= USES_CONSTITUTION, ran
    assert not {"models", "curate"} & set(ran)
    metrics = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())
    assert metrics["models"]["base"]["elo_helpfulness"]["games"] > 0, (
        "helpfulness games judged under the filled-in principles"
    )
    assert "up to date" in pipeline.dvc(repo, "status").stdout

    # The README's comparison: the constitution beside the headline figures, in a 120-column terminal.
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("uv run dvc exp show --drop"))
    command = command.split("  #")[0].strip().removeprefix("uv run ") + " --no-pager"
    table = pipeline.sh(repo, "bash", "-c", f"COLUMNS=120 {command}").stdout
    assert max(len(line.rstrip()) for line in table.splitlines()) <= 120, table
    rows = [line for line in table.splitlines() if "[" in line]  # the experiment's row
    assert rows and "anthropic" in rows[0] and "…" not in table, table


def test_imported_llm_swarm_constitution_passes_the_build_check(repo, anchors):
    src = anchors / "llm-swarm-constitutions" / "constitution_anthropic.json"
    dest = "constitutions/swarm.yaml"
    failed = pipeline.sh(repo, "caiforge", "constitution", "import", "llm-swarm", str(src), dest, check=False)
    assert failed.returncode == 1 and "comparison: must have at least one entry" in failed.stderr
    pipeline.sh(repo, "caiforge", "constitution", "import", "llm-swarm", str(src), dest, "--fill-from",
                "constitutions/default.yaml")  # fmt: skip
    use(repo, "swarm")
    assert pipeline.repro(repo, "check") == ["check"]
    assert pipeline.sh(repo, "caiforge", "check").stdout.startswith("ok: 9 stages")
