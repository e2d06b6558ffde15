"""The `caiforge` command line, called in-process."""

from __future__ import annotations

import copy

import pytest
import yaml

from caiforge import cli, config, constitution
from tests.unit.test_constitution import BASE

DEFAULT = config.ROOT / "constitutions" / "default.yaml"


def test_check_default_prints_counts(capsys):
    assert cli.main(["constitution", "check", str(DEFAULT)]) == 0
    out, err = capsys.readouterr()
    c = constitution.load(DEFAULT)
    assert err == "" and len(out.strip().splitlines()) == 1
    assert f"critique_revision {len(c.critique_revision)} (" in out
    assert f"comparison {len(c.comparison)} (" in out
    assert f"comparison_examples {len(c.comparison_examples)}" in out
    harmless = len(constitution.by_category(c.comparison, "harmlessness"))
    assert f"harmlessness {harmless}" in out
    assert all(cat in out for cat in constitution.CATEGORIES)


def test_check_duplicate_id_exits_1_and_names_it(tmp_path, capsys):
    data = copy.deepcopy(BASE)
    data["comparison"][1]["id"] = "cmp-a"
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["constitution", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {path}: comparison[1]: duplicate id 'cmp-a'")


def test_check_missing_file(tmp_path, capsys):
    assert cli.main(["constitution", "check", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml: no such file" in capsys.readouterr().err


def test_import_anthropic_writes_a_file_that_check_accepts(anchors, tmp_path, capsys):
    folder = anchors / "anthropic-cai-prompts"
    dest = tmp_path / "constitutions" / "anthropic.yaml"
    assert cli.main(["constitution", "import", "anthropic", str(folder), str(dest)]) == 0
    assert "critique_revision 16" in capsys.readouterr().out
    assert constitution.load(dest) == constitution.import_anthropic(folder)
    assert cli.main(["constitution", "check", str(dest)]) == 0
    assert "comparison 16" in capsys.readouterr().out


def test_import_llm_swarm_writes_critique_parts_only(anchors, tmp_path, capsys):
    dest = tmp_path / "grok.yaml"
    src = anchors / "llm-swarm-constitutions" / "constitution_grok.json"
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest)]) == 0
    capsys.readouterr()
    c = constitution.parse(yaml.safe_load(dest.read_text()), str(dest), require=("critique_revision",))
    assert len(c.critique_revision) == 2 and c.comparison == ()
    # A full check needs comparison principles, which this format does not have.
    assert cli.main(["constitution", "check", str(dest)]) == 1
    assert "comparison" in capsys.readouterr().err


def test_import_refuses_to_overwrite_without_force(anchors, tmp_path, capsys):
    src = anchors / "llm-swarm-constitutions" / "constitution_grok.json"
    dest = tmp_path / "out.yaml"
    dest.write_text("keep me\n")
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest)]) == 1
    assert "--force" in capsys.readouterr().err
    assert dest.read_text() == "keep me\n"
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest), "--force"]) == 0
    assert constitution.load(dest, require=("critique_revision",)).name == "constitution_grok"


def test_import_of_a_bad_source_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "out.yaml"
    assert cli.main(["constitution", "import", "anthropic", str(tmp_path / "nowhere"), str(dest)]) == 1
    assert "error: " in capsys.readouterr().err
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv", [[], ["constitution"], ["constitution", "import", "nosuchformat", "a", "b"], ["nosuchcommand"]]
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: caiforge" in capsys.readouterr().err
